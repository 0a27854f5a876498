"""torchrun, quiet on Ctrl-C and SIGTERM: ``python -m csfrn.launch [torchrun options] -m csfrn.cli train ...``.

torchrun's agent forwards SIGINT / SIGTERM to its workers: csfrn's training then stops every rank after the same
step, writes last.pth and rank 0 says so in one line. The agent itself then raises ``SignalException`` with a
traceback of its own; this launcher (torchrun otherwise: same options, same behaviour) exits with 128 + the
signal number (130, 143) instead.

``--shutdown-timeout`` (seconds torchrun waits for its workers to end after SIGTERM before it SIGKILLs them;
default 30, or ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) holds here also when a worker failed: torchrun then stops the
others with its built-in 30 s (``PContext.close``'s default, which the option does not reach). A stalled or
stopped rank, which cannot answer SIGTERM, so ends ``--shutdown-timeout`` after the others gave up waiting for it
(``train.dist_timeout``).
"""

import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.api import PContext, SignalException
from torch.distributed.run import get_args_parser, parse_args
from torch.distributed.run import main as torchrun


class _NoSignalNotices(logging.Filter):
    """Drops the agent's "Received N death signal, shutting down workers" and "Sending process N closing signal":
    rank 0 has said what happened."""

    def filter(self, record):
        message = record.getMessage()
        return "death signal" not in message and "closing signal" not in message


def _bound_worker_shutdown(seconds):
    """Every stop of the workers waits at most ``seconds`` before SIGKILL (see the module's docstring)."""
    close = PContext.close

    def close_within(self, death_sig=None, timeout=seconds):
        return close(self, death_sig, min(timeout, seconds))

    PContext.close = close_within


def _shutdown_timeout(argv):
    """(``--shutdown-timeout``'s seconds or None, the arguments for torchrun). A torchrun without the option (torch
    2.11's) does not get it: the launcher takes it off the options in front of the training script, and the
    bound on every worker stop makes it hold all the same."""
    parser = get_args_parser()
    if any("--shutdown-timeout" in action.option_strings for action in parser._actions):
        return parse_args(argv).shutdown_timeout, argv
    parser.add_argument("--shutdown-timeout", type=int, default=None)
    args = parser.parse_args(argv)
    script_at = len(argv) - len(args.training_script_args) - 1  # torchrun's options are the arguments before it
    options, rest, i = [], argv[script_at:], 0
    while i < script_at:
        if argv[i] == "--shutdown-timeout":
            i += 2
            continue
        if not argv[i].startswith("--shutdown-timeout="):
            options.append(argv[i])
        i += 1
    return args.shutdown_timeout, options + rest


def main(argv=None):
    shutdown, argv = _shutdown_timeout(sys.argv[1:] if argv is None else list(argv))
    _bound_worker_shutdown(
        int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")) if shutdown is None else shutdown
    )

    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(_NoSignalNotices())
    try:
        torchrun(argv)
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
