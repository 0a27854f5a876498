"""Ctrl-C and SIGTERM: a training stops between two steps, writes last.pth and leaves with one line.

:func:`stop_requests` turns the first SIGINT or SIGTERM into a request that the training loop reads after each
step (:meth:`StopRequests.agreed`); a second signal interrupts at once (a checkpoint being written is then
dropped, the previous one stays intact: checkpoints are written to a temp file and renamed).

Under torchrun the agent forwards the signal to every worker. The request is all-reduced (max of the signal
numbers) after every step, so every rank sees it at the same step: they write last.pth together (rank 0 writes
the file), and each leaves with :class:`csfrn.errors.TrainingInterrupted`; only rank 0 prints.
"""

import contextlib
import signal
import threading

from ..errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum):
    return signal.Signals(signum).name


def raise_interrupted(signum, frame=None):
    """A signal handler: SIGTERM (and SIGINT) as :class:`csfrn.errors.Interrupted`, a KeyboardInterrupt that
    knows its signal."""
    raise Interrupted(signum)


class StopRequests:
    """The signal received so far (0: none)."""

    def __init__(self):
        self.signum = 0

    def handle(self, signum, frame=None):
        if self.signum:  # the second signal: stop now
            raise Interrupted(signum)
        self.signum = signum

    def agreed(self, info):
        """The signal any rank received (0: none), the same on every rank: a collective when distributed."""
        if not info.distributed:
            return self.signum
        import torch  # here: the CLI installs its SIGTERM handler from this module before any verb imports torch

        flag = torch.tensor([self.signum], dtype=torch.int64, device=info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


@contextlib.contextmanager
def stop_requests():
    """Within the block, SIGINT / SIGTERM set a request instead of interrupting; the previous handlers come
    back afterwards. Outside the main thread (where Python cannot handle signals) requests never come."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {s: signal.signal(s, requests.handle) for s in SIGNALS}
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
