"""Label values on the training path: checked once per batch, on the CPU, before the batch reaches the device.

Checking CUDA labels is a device-to-host sync (the host waits for the GPU to say whether a bad value is there): it
stalls the launch queue every step and breaks CUDA graphs and torch.compile. So the training engine checks each CPU
batch with ``check_labels`` before the copy and runs the step inside ``labels_checked()``; the models check the
labels they are given themselves (a clear error for a user who calls them directly, on any device) only outside
that block; and the class-wise losses call ``csfrn.ops.class_avg_pool`` with ``validate=False``, on labels they
have renumbered into range themselves (``class_index``).
"""

import contextlib
from typing import Iterator

import torch

from ..ops import check_labels

_checked_depth = 0


@contextlib.contextmanager
def labels_checked() -> Iterator[None]:
    """Inside this block the models take their labels as checked already (``check_labels`` on the CPU batch,
    before the copy to the device) and do not check them again, so a training step makes no host sync for it."""
    global _checked_depth
    _checked_depth += 1
    try:
        yield
    finally:
        _checked_depth -= 1


def check_model_labels(labels, num_classes: int, ignore_index: int) -> None:
    """What a model's forward does with the labels it is given: ``check_labels`` (a one-line ValueError naming
    the first bad value), unless inside ``labels_checked()``, while torch.compile traces the model (the check
    reads a device value: a graph break) or on meta tensors (FLOP counting: no values to check)."""
    if _checked_depth == 0 and labels.device.type != "meta" and not torch.compiler.is_compiling():
        check_labels(labels, num_classes, ignore_index)


__all__ = ["check_labels", "check_model_labels", "labels_checked"]
