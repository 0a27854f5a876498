"""What a training run leaves in its work_dir beside the checkpoints and metrics.jsonl: ``config.yaml`` (the
resolved config, every key; ``csfrn train --config work_dir/config.yaml`` runs it again), ``env.json`` (the
software and hardware it ran on) and ``train.log`` (one human-readable line per ``train.log_interval``, the
evaluations and the checkpoints written)."""

import datetime
import json
import os
import platform
import resource
import subprocess
import sys

import yaml

from .. import __version__
from ..errors import MissingDependencyError

CONFIG_FILE, ENV_FILE, LOG_FILE = "config.yaml", "env.json", "train.log"


def config_yaml(cfg):
    """The resolved config as YAML text, every key in the order of the config's dataclasses (what
    ``csfrn config`` prints and ``config.yaml`` holds); :func:`csfrn.engine.config.load_config` reads it back
    to an equal config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=120)


def write_config(cfg, work_dir):
    path = os.path.join(work_dir, CONFIG_FILE)
    with open(path, "w") as f:
        f.write(config_yaml(cfg))
    return path


def _git_commit():
    """The commit of the csfrn source tree when it is a git checkout (with ``-dirty`` for local changes)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device=None, world_size=1):
    """{python, platform, torch, torch_cuda, cudnn, csfrn, kernels, devices, cpu, world_size, command, cwd,
    git_commit, time}: what ``env.json`` holds."""
    # here, not at the top: csfrn config (and --help) use this module without importing torch
    import torch

    from ..ops import built_with_cuda

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "csfrn": __version__,
        "kernels": "CPU + CUDA" if built_with_cuda() else "CPU only",
        "device": str(device) if device is not None else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "world_size": world_size,
        "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
        "cwd": os.getcwd(),
        "git_commit": _git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_env(work_dir, device=None, world_size=1):
    path = os.path.join(work_dir, ENV_FILE)
    with open(path, "w") as f:
        json.dump(environment(device, world_size), f, indent=2)
    return path


def check_tensorboard(train_cfg):
    """``train.tensorboard=true`` needs the tensorboard package: a one-line error before the run starts."""
    if not train_cfg.tensorboard:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (tensorboard is optional: this is the check)
    except ImportError:
        raise MissingDependencyError(
            "train.tensorboard=true but the tensorboard package is not installed: "
            "pip install tensorboard, or set train.tensorboard=false"
        ) from None


def _duration(seconds):
    seconds = int(round(seconds))
    return str(datetime.timedelta(seconds=seconds))


def peak_memory_gib(device):
    """Peak memory since the start: CUDA memory allocated by torch on a GPU, the process's peak resident set
    on the CPU."""
    import torch  # here, not at the top: csfrn config (and --help) use this module without importing torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class TrainLog:
    """``work_dir/train.log``: timestamped lines, appended (a resumed run continues the same file)."""

    def __init__(self, work_dir, total_iters):
        self.path = os.path.join(work_dir, LOG_FILE)
        self.total = total_iters
        self.file = open(self.path, "a", buffering=1)

    def line(self, text):
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"{stamp} {text}\n")

    def iteration(self, it, lr, losses, data_time, step_time, memory_gib, clip=None):
        """One line per log interval: iteration, lr, each loss, data / step time (seconds per iteration, means
        over the interval), ETA, peak memory and, with ``clip`` = (max norm, last gradient norm, steps clipped,
        steps), the gradient norm and how often it was clipped."""
        terms = "  ".join(f"{k} {v:.4f}" for k, v in losses.items())
        eta = _duration((data_time + step_time) * (self.total - it))
        text = (
            f"iter {it}/{self.total}  lr {lr:.3e}  {terms}  data {data_time:.3f}s  step {step_time:.3f}s  "
            f"eta {eta}  mem {memory_gib:.2f} GiB"
        )
        if clip is not None:
            max_norm, norm, clipped, steps = clip
            text += f"  grad_norm {norm:.4g}"
            if clipped:
                text += f" (clipped to {max_norm:g} in {clipped} of {steps} steps)"
        self.line(text)

    def evaluation(self, it, summary, label="val"):
        self.line(
            f"iter {it}: {label} mIoU {100 * summary['mIoU']:.2f}  mAcc {100 * summary['mAcc']:.2f}  "
            f"aAcc {100 * summary['aAcc']:.2f}"
        )

    def close(self):
        self.file.close()
