"""Shared helpers: where and by what the csfrn ops run (devices, kernel / twin), tiny configs of the real model for
the engine / data / CLI tests, the shipped configs, and PNG writers."""

import glob
import os
import signal
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SHIPPED = os.path.join(ROOT, "csfrn", "configs")


def shipped_configs():
    """The names of the configs a user runs (``cityscapes/psp_r50_769_40k``: the path in csfrn/configs/ without
    .yaml), not the ``_base_`` parts they inherit."""
    paths = glob.glob(os.path.join(SHIPPED, "**", "*.yaml"), recursive=True)
    return sorted(
        os.path.relpath(p, SHIPPED)[: -len(".yaml")].replace(os.sep, "/")
        for p in paths
        if "_base_" not in p.split(os.sep)
    )


# The test models are tiny: one intra-op thread is faster than two and immune to a busy machine.
torch.set_num_threads(1)

# ---------------------------------------------------------------- the ops: devices and backends
CUDA = torch.cuda.is_available()
# A test that runs CUDA kernels on a GPU carries the `cuda` marker, which skips it without one: `pytest -m cuda`
# selects exactly these (the GPU session runs them; the emulation's tests are not among them).
needs_cuda = pytest.mark.cuda


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU (skipped without one); `pytest -m cuda` selects them")
    config.addinivalue_line(
        "markers",
        "slow: starts several torchrun jobs (tens of seconds); runs in CI too, `-m 'not slow'` leaves them out locally",
    )


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


# Where an op's kernels run: the CPU kernels; the CUDA kernels on a GPU; and "emu", the same CUDA kernels compiled
# for the host (tests/cuda_emu.py, built on first use: torch.ops.csfrn_emu.* on CPU tensors). op_samples.kernel(op,
# device) runs an op on any of them, with autograd.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda), "emu"]
# The devices torch.ops.csfrn dispatches to (opcheck, torch.compile, autocast): the emulation is not one of them.
DISPATCH_DEVICES = DEVICES[:2]
# The CUDA kernels, on a GPU and emulated.
CUDA_KERNELS = DEVICES[1:]
# The dtypes each device's kernels run (the CPU kernels: float32 and float64 only).
DEVICE_DTYPES = {
    "cpu": [torch.float64, torch.float32],
    "cuda": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "emu": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
}


def device_dtype_params(dtypes):
    """Parameters (device, dtype) for every device of DEVICES and every one of ``dtypes`` its kernels run."""
    return [
        pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}", marks=needs_cuda if device == "cuda" else ())
        for device in DEVICE_DTYPES
        for dtype in dtypes
        if dtype in DEVICE_DTYPES[device]
    ]


# What runs an op: the *kernel* (our C++/CUDA op, through csfrn.ops) or its *twin* (csfrn/ops/reference.py, which
# csfrn.ops.use_reference() routes to).
BACKENDS = ["kernel", "twin"]


@pytest.fixture(params=DEVICES)
def device(request):
    """Each of DEVICES in turn (a test's own parametrize of "device" takes precedence)."""
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each of BACKENDS in turn."""
    return request.param


# ---------------------------------------------------------------- the engine, data and CLI tests
# The real build_model at test size; fusion "concat" keeps deformable convs out of the engine tests
# (tests/test_models.py covers AAM).
TINY_MODEL = [
    "model.head=fcn",
    "model.num_classes=4",
    "model.backbone=resnet50c",
    "model.width=8",
    "model.blocks=[1,1,1,1]",
    "model.channels=16",
    "model.aux_channels=8",
    "model.embed_dim=8",
    "model.fusion=concat",
]
TINY_DATA = [
    "data.dataset=synthetic",
    "data.size=32",
    "data.length=16",
    "data.val_length=4",
    "data.crop_size=[24,24]",
    "data.scale_range=[1.0,1.25]",
    "data.batch_size=4",
    "data.num_workers=0",
]
TINY_TRAIN = [
    "train.device=cpu",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.tensorboard=false",
    "train.progress=false",
    "eval.mode=whole",
]


# `csfrn train` needs --config: the built-in defaults, every value the tests use set by tiny_overrides.
TINY_CONFIG = os.path.join(ROOT, "tests", "defaults.yaml")


def tiny_overrides(work_dir, iters=4, extra=()):
    return (
        TINY_MODEL
        + TINY_DATA
        + TINY_TRAIN
        + [f"train.work_dir={work_dir}", f"train.iters={iters}", f"train.checkpoint_interval={iters}", *extra]
    )


@pytest.fixture
def ops_path():
    """Model and loss tests run on the compiled CPU kernels (each kernel is tested against its reference twin
    in its own test file); a build without them fails here rather than passing on the twins."""
    ops = ("class_avg_pool", "center_distance", "dual_deform_conv2d")
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"csfrn::{op}", "CPU")]
    assert not missing, f"the extension has no CPU kernel for {missing}"
    return "kernel"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def write_jpg(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, quality=100)


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def finish(proc, timeout=180):
    """(returncode, stdout, stderr) of ``proc`` once it ends; killed if it is still running after ``timeout`` s."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def sigkill_at_checkpoint(proc, last, iteration, timeout=120):
    """Wait (at most ``timeout`` s) until the training ``proc`` has written ``last`` (a last.pth) at ``iteration``
    or later, then SIGKILL it; the process must still be running then (its stderr otherwise says why)."""
    from csfrn.engine.checkpoint import load_checkpoint

    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if last.is_file() and load_checkpoint(last)["iter"] >= iteration:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
