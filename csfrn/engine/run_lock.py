"""One run per work_dir: ``work_dir/run.lock`` names the run that holds it (pid, host, start time).

A second run into the same work_dir is refused with a one-line error naming the first; a lock left by a process
that is gone (a dead pid on this host: killed, the machine rebooted) is taken over with a note. Under torchrun
rank 0 takes the lock and every rank gets the same answer.
"""

import contextlib
import json
import os
import socket
import time

import torch

from ..errors import RunLockedError

LOCK_NAME = "run.lock"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(path):
    """The lock's record, or None while its writer has not finished writing it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _describe(record):
    return (
        f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"
        if record
        else "a run that is still writing its lock"
    )


def acquire(work_dir, log=print):
    """Create ``work_dir/run.lock`` for this process; returns its path. Raises :class:`RunLockedError` when
    another live run holds it."""
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, LOCK_NAME)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    for _attempt in range(20):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read(path)
            if other is None:  # being written right now: look again
                time.sleep(0.05)
                continue
            if other.get("host") == record["host"] and not _alive(int(other.get("pid", 0))):
                log(f"note: taking over the stale lock {path} of a run that is gone ({_describe(other)})")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            raise RunLockedError(
                f"work_dir {work_dir} is in use by another run ({_describe(other)}); wait for it to end or "
                f"choose another --work-dir (if that run is gone, delete {path})"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return path
    raise RunLockedError(f"work_dir {work_dir}: could not take {path} (other runs keep creating it)")


def release(path):
    """Remove the lock if this process still holds it."""
    record = _read(path)
    if record and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def run_lock(work_dir, info, log=print):
    """Hold ``work_dir``'s lock for the block: rank 0 takes it, every rank raises the same error when it could
    not (``info``: a :class:`csfrn.engine.distributed.DistInfo`)."""
    path, error = None, None
    if info.is_main:
        try:
            path = acquire(work_dir, log)
        except RunLockedError as err:
            error = str(err)
    if info.distributed:
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise RunLockedError(error)
    try:
        yield path
    finally:
        if path:
            release(path)
