"""What keeps a training step at the device's speed: the memory format (``train.channels_last``), torch.compile
(``train.compile`` / ``eval.compile``), the input pipeline (pinned memory, non_blocking copies, persistent
workers, ``data.prefetch_factor``) and the step's data / compute times, measured without a host sync.

A training step queues its work and returns: nothing in it reads a device value (no ``.item()``, ``.cpu()``,
``bool(tensor)`` or shape that depends on values); the losses stay device tensors and the loop reads them only
every ``train.log_interval`` iterations.
"""

import time

import torch

from ..errors import ConfigError

# torch.compile's modes; true means "default".
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_setting(key, value):
    """``value`` of the config key ``key`` (train.compile / eval.compile) is false, true or a mode name."""
    if isinstance(value, bool) or value in COMPILE_MODES:
        return value
    raise ConfigError(
        f"config key '{key}' is {value!r}; expected false, true or a torch.compile mode: {', '.join(COMPILE_MODES)}"
    )


def compile_mode(value):
    """The torch.compile mode of a train.compile / eval.compile setting, or None for eager."""
    if value is False or value is None:
        return None
    return "default" if value is True else value


def maybe_compile(module, value):
    """``torch.compile(module, mode=...)`` as the setting says, or ``module`` itself (eager). The compiled
    module shares the parameters and buffers of ``module``."""
    mode = compile_mode(value)
    return module if mode is None else torch.compile(module, mode=mode)


def use_channels_last(value, device):
    """train.channels_last: None (the default) means true on CUDA, false on the CPU."""
    if value is None:
        return torch.device(device).type == "cuda"
    return bool(value)


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def loader_options(num_workers, device, prefetch_factor):
    """DataLoader keywords of the input pipeline: pinned host memory for asynchronous copies to a GPU, workers
    kept across the whole run (the training loader is iterated once, so they matter for any epoch-style
    reuse), and ``prefetch_factor`` batches queued per worker."""
    options = {"num_workers": num_workers, "pin_memory": torch.device(device).type == "cuda"}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    return options


def to_device(images, labels, device, channels_last=False):
    """A batch on ``device``: asynchronous copies from pinned memory; the images in channels_last when asked
    (the labels [N, H, W] have no channels)."""
    images = images.to(device, non_blocking=True, memory_format=memory_format(channels_last))
    labels = labels.to(device, non_blocking=True)
    return images, labels


class StepTimes:
    """Host-side times of the training loop between two log points: time blocked waiting for the next batch
    (data) and wall time per iteration. Reading the losses at a log point waits for the device, so the wall
    time of an interval includes all the device work queued in it; data time beside it says whether the
    input pipeline keeps up (it should be near zero)."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.start, self.data, self.steps = time.perf_counter(), 0.0, 0

    def next_batch(self, batches):
        """The next batch of the iterator ``batches`` (None when it is exhausted), its wait counted as data."""
        t0 = time.perf_counter()
        batch = next(batches, None)
        self.data += time.perf_counter() - t0
        self.steps += batch is not None
        return batch

    def figures(self):
        """{"data_ms", "step_ms"}: means per iteration since the last restart."""
        steps = max(self.steps, 1)
        return {"data_ms": 1e3 * self.data / steps, "step_ms": 1e3 * (time.perf_counter() - self.start) / steps}
