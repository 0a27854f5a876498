"""torchrun-style process groups, SyncBN (also on CPU), and the per-sample seeded infinite sampler."""

import dataclasses
import datetime
import os
import re

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError, DistributedTimeoutError


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def resolve_device(preference="auto", local_rank=0):
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device is 'cuda' but no CUDA device is available; expected train.device=cpu "
                "or auto on this machine"
            )
        return torch.device("cuda", local_rank)
    if preference == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"train.device is {preference!r}; expected one of auto, cpu, cuda")


def init_distributed(device="auto", timeout=600):
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group when WORLD_SIZE > 1:
    NCCL on GPUs, gloo on CPU. Without those variables this is a single process. ``timeout`` (seconds,
    ``train.dist_timeout``): how long a collective waits for the other processes before it fails."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        wait = datetime.timedelta(seconds=timeout)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=wait,
            store=_attempt_store(world_size, wait),
        )
    return DistInfo(rank, world_size, local_rank, dev)


def _attempt_store(world_size, timeout):
    """Under torchelastic, the agent's store with a key prefix of this attempt (``TORCHELASTIC_RESTART_COUNT``),
    else None (``env://``). The static rendezvous keeps one store over the agent's restarts and torch adds no
    prefix per attempt: a restarted process group could read the dead attempt's addresses there (gloo then
    fails with "Connection refused")."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"csfrn/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def raise_on_every_rank(err, info):
    """Raise ``err``, an error that every rank raises alike at the same point: rank 0 raises it (the CLI prints
    it as one line), the other ranks leave quietly with exit status 2."""
    if info.distributed and not info.is_main:
        raise SystemExit(2) from err
    raise err


# What gloo / NCCL say when a collective waited longer than the process group's timeout.
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
# Where the message names the peer (gloo: "... [127.0.0.1]:29500 ..." or "rank 1"), the rank that stopped answering.
_PEER_RANK = re.compile(r"\b(?:from|peer|to) rank (\d+)|\brank (\d+)\b", re.IGNORECASE)


def timeout_error(err, info, timeout):
    """A :class:`DistributedTimeoutError` for ``err`` when it is a collective that timed out, else None. The
    message names the rank that stopped answering where the backend's message says it, or where only one other
    process exists."""
    text = str(err)
    if not (info.distributed and _TIMEOUT.search(text)):
        return None
    found = [int(a or b) for a, b in _PEER_RANK.findall(text) if int(a or b) != info.rank]
    if found:
        peer = f"rank {found[0]}"
    elif info.world_size == 2:
        peer = f"rank {1 - info.rank}"
    else:
        peer = "another rank (the backend does not say which)"
    detail = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return DistributedTimeoutError(
        f"rank {info.rank}: {peer} stopped answering for train.dist_timeout={timeout:g} s (a stalled or stopped "
        f"process); the job stops ({detail[:200]})"
    )


def mean_over_ranks(values, info):
    """{name: 0-d tensor} -> {name: float}: each value's mean over the processes (one all-reduce and one host
    sync for all of them; a single process just reads them). Every rank's share of the global batch is equal,
    so this is the mean over the global batch of the per-rank means that DDP's gradient averages."""
    names = list(values)
    stacked = torch.stack([values[name].detach().to(torch.float64) for name in names])
    if info.distributed:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= info.world_size
    return dict(zip(names, stacked.tolist()))


def all_reduce_sum(tensor):
    """In place; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every input is the sum of the output gradients of all processes."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(_BatchNorm):
    """nn.SyncBatchNorm refuses CPU tensors (and DDP refuses it on CPU modules); on CPU this computes the same
    global batch statistics with a differentiable all_reduce of (sum, sum of squares, count), so gloo runs
    train like NCCL ones. Made from nn.SyncBatchNorm layers by :func:`convert_sync_batchnorm`."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        if not (
            self.training
            and input.device.type == "cpu"
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group or dist.group.WORLD) > 1
        ):
            return super().forward(input)
        dims = [0] + list(range(2, input.dim()))
        x = input.float()
        local = torch.cat(
            [x.sum(dims), (x * x).sum(dims), x.new_tensor([input.numel() // input.shape[1]], dtype=torch.float32)]
        )
        total = _AllReduceSum.apply(local, self.process_group or dist.group.WORLD)
        c = input.shape[1]
        count = total[-1]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        shape = [1, c] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


class CPUSyncBatchNormAct(CPUSyncBatchNorm):
    """:class:`CPUSyncBatchNorm` followed by the dropout and activation of a timm ``BatchNormAct2d``, as timm's
    ``SyncBatchNormAct`` on GPUs (made from those by :func:`convert_sync_batchnorm` on CPU)."""

    def forward(self, input):
        x = super().forward(input)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def convert_sync_batchnorm(model, device):
    """Every BatchNorm layer of ``model`` synchronised over the processes, each keeping what it does besides
    normalising. With timm installed, timm's converter (``timm.layers.convert_sync_batchnorm``): torch's own
    turns timm's ``BatchNormAct2d`` (norm + activation in one module, e.g. in EfficientNet, MobileNetV3) into a
    plain ``SyncBatchNorm`` and drops the activation. Without timm no such layer can exist, and torch's converter
    runs. On CPU the layers become :class:`CPUSyncBatchNorm` / :class:`CPUSyncBatchNormAct`."""
    try:
        from timm.layers import SyncBatchNormAct, convert_sync_batchnorm as timm_convert  # optional dependency
    except ImportError:
        SyncBatchNormAct, timm_convert = None, None
    model = timm_convert(model) if timm_convert is not None else nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cpu":
        for module in model.modules():
            if type(module) is nn.SyncBatchNorm:
                module.__class__ = CPUSyncBatchNorm
            elif SyncBatchNormAct is not None and type(module) is SyncBatchNormAct:
                module.__class__ = CPUSyncBatchNormAct
    return model


def global_batch(seed, dataset_len, batch_size, iteration):
    """The (dataset index, sample seed) pairs of the global batch at ``iteration``.

    The data stream is a sequence of epochs, each a permutation drawn from (seed, epoch); sample j of the stream
    gets its own augmentation seed. Everything is a function of (seed, iteration), so a resumed run and a run
    split over any number of processes see exactly the same samples with exactly the same augmentations.
    """
    samples = []
    perms = {}
    for pos in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, offset = divmod(pos, dataset_len)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(dataset_len, generator=g)
        samples.append((int(perms[epoch][offset]), seed * 1_000_000_007 + pos))
    return samples


class SeededBatchSampler:
    """This rank's share of every global batch from ``start_iter`` to ``iters``."""

    def __init__(self, dataset_len, batch_size, seed, start_iter, iters, rank=0, world_size=1):
        if batch_size % world_size:
            raise ValueError(f"the global batch size {batch_size} must be divisible by the {world_size} processes")
        self.dataset_len, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.start_iter, self.iters, self.rank, self.per_rank = start_iter, iters, rank, batch_size // world_size

    def __len__(self):
        return max(self.iters - self.start_iter, 0)

    def __iter__(self):
        for it in range(self.start_iter, self.iters):
            batch = global_batch(self.seed, self.dataset_len, self.batch_size, it)
            yield batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]


class SeededTransforms(torch.utils.data.Dataset):
    """Takes (index, sample seed) and applies ``transforms`` with a generator seeded by the sample seed."""

    def __init__(self, dataset, transforms):
        self.dataset, self.transforms = dataset, transforms

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, sample_seed = item
        image, label = self.dataset.load(index)
        return self.transforms(image, label, generator=torch.Generator().manual_seed(sample_seed))
