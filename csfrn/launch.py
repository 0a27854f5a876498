"""torchrun, quiet on Ctrl-C and SIGTERM: ``python -m csfrn.launch [torchrun options] -m csfrn.cli train ...``.

torchrun's agent forwards SIGINT / SIGTERM to its workers: csfrn's training then stops every rank after the same
step, writes last.pth and rank 0 says so in one line. The agent itself then raises ``SignalException`` with a
traceback of its own; this launcher (torchrun otherwise: same options, same behaviour) exits with 128 + the
signal number (130, 143) instead.
"""
import logging
import sys


class _NoSignalNotices(logging.Filter):
    """Drops the agent's "Received N death signal, shutting down workers" and "Sending process N closing signal":
    rank 0 has said what happened."""

    def filter(self, record):
        message = record.getMessage()
        return "death signal" not in message and "closing signal" not in message


def main(argv=None):
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(_NoSignalNotices())
    try:
        torchrun(argv)
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
