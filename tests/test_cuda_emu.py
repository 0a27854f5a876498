"""The CUDA kernels without a GPU: csrc/cuda/*.cu, compiled by the host compiler with the CUDA emulation
(csrc/emu/cuda_emu.h, built by tests/cuda_emu.py on first use), run every block and thread on the CPU as
torch.ops.csfrn_emu.*. Here: the emulation itself (launch limits, barriers, warp intrinsics, misuse), and what is
particular to the CUDA kernels: their launch plans (chunk and tile boundaries, the global-memory path, column
chunks), grid-stride loops and empty grids, against the twin (or the CPU kernel) in float64 on the same rounded
values. The sample-driven checks (tests/test_ops.py) run on the emulation too, as the device "emu": every op
forward and backward with every output mask, every layout of the samples, float32, float16 and bfloat16; and so do
the CUDA kernels' bad labels (test_class_ops.py) and corners outside the image (test_deform_conv.py).

Tolerances (tests/op_samples.py, TOL): float64 1e-12 (relative, and absolute times the largest |value| of the
tensor); float32 2e-6, float16 2e-3, bfloat16 1.6e-2: the kernels accumulate in float32 but round their outputs
(and deform conv its column buffers) to the dtype.
"""

import re
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from op_samples import (
    F64,
    OPS,
    TOL,
    assert_matches,
    center_distance_sample,
    check_ops,
    class_avg_pool_sample,
    deform_conv2d_sample,
    dual_deform_conv2d_sample,
    emulation,
    kernel,
    lay,
    output_masks,
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emu():
    return emulation()


@pytest.fixture
def grid_cap(emu):
    """set(cap): every launch runs at most `cap` blocks along x until the test ends (grid-stride loops)."""
    previous = []

    def set_cap(cap):
        previous.append(emu.set_grid_x_cap(cap))

    yield set_cap
    if previous:
        emu.set_grid_x_cap(previous[0])


# ---------------------------------------------------------------- the emulation itself
@pytest.mark.parametrize(
    "config",
    [
        (1, 1, 1, 1, 1, 1),
        (7, 1, 1, 256, 1, 1),
        (3, 2, 4, 4, 3, 2),
        (2, 1, 1, 1024, 1, 1),
        (1, 65535, 1, 1, 1, 1),
        (1, 1, 1, 2, 8, 64),
    ],
)
def test_emulation_runs_every_thread(emu, config):
    gx, gy, gz, bx, by, bz = config
    assert emu.selftest_launch(gx, gy, gz, bx, by, bz, 48 * 1024) == gx * gy * gz * bx * by * bz


@pytest.mark.parametrize(
    "config,why",
    [
        ((0, 1, 1, 32, 1, 1, 0), "the grid is empty"),
        ((1, 1, 0, 32, 1, 1, 0), "the grid is empty"),
        ((1, 1, 1, 0, 1, 1, 0), "the block is empty"),
        ((1, 1, 1, 1025, 1, 1, 0), "more than 1024 threads"),
        ((1, 1, 1, 32, 33, 1, 0), "more than 1024 threads"),
        ((1, 1, 1, 1, 1, 65, 0), "64 along z"),
        ((1, 65536, 1, 1, 1, 1, 0), "at most 65535"),
        ((1, 1, 65536, 1, 1, 1, 0), "at most 65535"),
        ((1, 1, 1, 32, 1, 1, 48 * 1024 + 1), "48 KiB of dynamic shared memory"),
    ],
)
def test_emulation_refuses_what_a_gpu_refuses(emu, config, why):
    with pytest.raises(RuntimeError, match=f"a GPU refuses the launch of count_kernel.*{re.escape(why)}"):
        emu.selftest_launch(*config)


@pytest.mark.parametrize("threads", [32, 64, 256, 1024])
def test_emulation_barriers_shared_memory_and_warp_intrinsics(emu, threads):
    # Integer-valued data: every summation order gives the exact sum.
    x = torch.randint(-50, 50, (3 * threads + 17,), generator=torch.Generator().manual_seed(threads)).to(F64)
    out = emu.selftest_block_sum(x, threads)
    blocks = torch.nn.functional.pad(x, (0, out.shape[0] * threads - x.numel())).view(-1, threads)
    assert torch.equal(out[:, 0], blocks.sum(1))  # shared-memory tree with __syncthreads
    assert torch.equal(out[:, 1], blocks.sum(1))  # __shfl_down_sync, then __shfl_xor_sync
    assert torch.equal(out[:, 2], (blocks > 0).sum(1).to(F64))  # __ballot_sync + __popc


@pytest.mark.parametrize(
    "what,message",
    [
        (0, "63 of 64 threads wait at __syncthreads but 1 exited"),
        (1, "mask 0x00000001 that does not include its lane"),
        (2, "different masks"),
        (3, "wait in a warp intrinsic for lanes of its mask that exited"),
        (4, "reads lane 20 outside the mask"),
    ],
)
def test_emulation_reports_misuse(emu, what, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        emu.selftest_misuse(what)
    assert emu.selftest_launch(2, 1, 1, 64, 1, 1, 0) == 128  # and the next launch is fine


def test_emulation_grid_cap_hook(emu, grid_cap):
    grid_cap(3)
    assert emu.selftest_launch(10, 2, 1, 32, 1, 1, 0) == 3 * 2 * 32


def test_every_op_is_emulated(emu):
    ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("csfrn::"))
    ops.remove("built_with_cuda")
    assert len(ops) == 8
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"csfrn_emu::{op}", "CPU"), op


def every(sample):
    return [[True] * len(sample.info.differentiable)]


# ---------------------------------------------------------------- class_avg_pool
# The forward's plan (class_pool_plan in class_ops.cu, for the emulated device's 132 SMs and 48 KiB of shared
# memory per block) stages 64-pixel tiles, cuts each image into chunks of >= 256 pixels (a multiple of 64) when
# there are few images, keeps up to 8 accumulator copies per block, splits the channels into tiles when K * (D + 1)
# sums do not fit, and takes a global-memory path when not even one channel's do.
POOL_CASES = [  # (N, D, H, W, K)
    (2, 5, 7, 9, 1),  # one partial tile, 8 copies, means written by the block
    (2, 8, 13, 11, 7),  # three tiles, the last partial
    (1, 3, 16, 16, 4),  # exactly one chunk of four full tiles
    (1, 3, 1, 257, 3),  # two chunks (192 + 65 pixels): partial sums and the reduce kernel
    (2, 4, 33, 65, 19),  # 9 chunks of 256, the last one 97
    (1, 2, 129, 129, 5),  # 66 chunks, the last one a single pixel
    (1, 3, 5, 6, 171),  # more classes than pixels: most are absent
    (2, 33, 6, 7, 256),  # float64: two channel tiles of 17 (16 + the count)
    (1, 100, 9, 31, 150),  # float32 two channel tiles of 50, float64 four of 25
    (2, 3, 5, 10, 3000),  # one channel per tile, one copy: 47.7 KiB of shared memory (float64)
    (2, 2, 5, 10, 7000),  # K too large for shared memory: the global-memory path
]


@pytest.mark.parametrize("n,d,h,w,k", POOL_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_avg_pool_plans(emu, n, d, h, w, k, dtype):
    check_ops(class_avg_pool_sample(n, d, h, w, k, seed=k, device="emu", dtype=dtype), "emu")


@pytest.mark.parametrize("k", [1, 2, 3, 31, 32, 33, 64, 100, 150, 255, 256])
def test_class_avg_pool_every_k(emu, k):
    check_ops(class_avg_pool_sample(2, 3, 11, 13, k, ignore_index=-1, seed=k, device="emu"), "emu")


@pytest.mark.parametrize(
    "shape", [(0, 3, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0), (2, 0, 4, 5)], ids=["batch0", "H0", "W0", "D0"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_class_avg_pool_empty(emu, shape, dtype):
    # against the CPU kernel: the twin fails on D = 0 (test_class_ops.py::test_twin_no_channels)
    check_ops(class_avg_pool_sample(*shape, 4, device="emu", dtype=dtype), "emu", by="kernel")


@pytest.mark.parametrize("n,d,h,w,k", POOL_CASES[3:6] + POOL_CASES[-1:])
def test_class_avg_pool_plans_bad_labels_ignored(emu, n, d, h, w, k):
    """validate=False across the plans (chunks, the reduce kernel, the global-memory path): every 7th pixel holds a
    bad label, which every kernel skips like ignore_index (the twin masks them)."""
    check_ops(class_avg_pool_sample(n, d, h, w, k, bad=True, validate=False, seed=k, device="emu"), "emu")


def aten_calls(fn):
    """The names of the ATen ops fn() dispatches, the launchers' own included (the profiler sees nested calls)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("aten::")}


# What a device-to-host sync looks like from a launcher: a scalar read (.item, bool), a data-dependent shape.
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select"}


@pytest.mark.parametrize(
    "n,d,h,w,k",
    [POOL_CASES[0], POOL_CASES[3], POOL_CASES[-1], (2, 3, 0, 5, 4)],
    ids=["one_chunk", "two_chunks", "global", "no_pixels"],
)
def test_class_avg_pool_without_validation_no_sync_no_fill(emu, n, d, h, w, k):
    """The CUDA forward with validate=False calls no ATen op but at::empty (its outputs and buffers; no pixels:
    a zero-fill, no kernel): no sync, no fill pass. validate=True syncs, as documented (so this test can fail)."""
    sample = class_avg_pool_sample(n, d, h, w, k, bad=True, seed=3, device="emu")
    features, labels = sample.args[:2]
    calls = aten_calls(lambda: emu.class_avg_pool(features, labels, k, 255, False))
    assert calls <= ({"aten::empty", "aten::zero_", "aten::fill_"} if h == 0 else {"aten::empty"}), calls
    if labels.numel():
        with pytest.raises(ValueError, match="got label value"):
            emu.class_avg_pool(features, labels, k, 255, True)
    clean = labels.masked_fill((labels < 0) | (labels >= k), 255)
    assert SYNC_OPS & aten_calls(lambda: emu.class_avg_pool(features, clean, k, 255, True))


def launches(emu, fn):
    before = emu.launch_count()
    fn()
    return emu.launch_count() - before


@pytest.mark.parametrize(
    "n,d,h,w,k",
    [(2, 5, 7, 9, 3), (1, 4, 1, 257, 1), (2, 3, 4, 5, 0), (2, 3, 0, 5, 2), (2, 0, 4, 5, 2)],
    ids=["plain", "two_blocks", "K0", "P0", "D0"],
)
def test_center_distance_backward_three_launches(emu, n, d, h, w, k):
    """At most three kernels (w and the margin terms; the embedding gradient; the centre and margin gradients),
    each only when asked for and non-empty, and no other ATen work (no fill, cast, sum or matmul): launches are
    counted by the emulation, ATen calls by the profiler."""
    sample = center_distance_sample(n, d, h, w, k, seed=9, device="emu")
    g, e, s, m = sample.grads[0], *sample.args[:3]
    nonempty = {"w": n * k * h * w > 0, "e": n * d * h * w > 0, "sm": n * k > 0}
    for mask in output_masks(sample):
        want = 0
        if any(mask):
            want = nonempty["w"] + (mask[0] and nonempty["e"]) + ((mask[1] and d > 0 or mask[2]) and nonempty["sm"])
        got = launches(emu, lambda: emu.center_distance_backward(g, e, s, m, 10.0, mask))
        assert got == want <= 3, (mask, got, want)
        calls = aten_calls(lambda: emu.center_distance_backward(g, e, s, m, 10.0, mask))
        assert calls <= {"aten::empty"}, (mask, calls)


# ---------------------------------------------------------------- center_distance
DIST_CASES = [  # (N, D, H, W, K)
    (2, 5, 7, 9, 1),
    (2, 8, 13, 11, 7),
    (1, 3, 16, 16, 19),  # N * K * P = 4864 = 19 blocks of 256
    (1, 4, 1, 257, 1),  # one item into a second block
    (2, 33, 6, 7, 150),  # 150 classes: 2 * 150 * 34 block sums (centre and margin gradients)
]
# Every dtype and every output mask on the small cases; the large one (minutes in four dtypes and eight masks under
# the emulation) in float64 with every gradient: the other dtypes and masks add nothing there the small cases do not
# check (the masks only trim the units of the same launches).
DIST_PLANS = [(*case, dtype) for case in DIST_CASES[:-1] for dtype in DTYPES] + [(*DIST_CASES[-1], F64)]


@pytest.mark.parametrize("n,d,h,w,k,dtype", DIST_PLANS, ids=lambda v: str(v) if isinstance(v, torch.dtype) else None)
def test_center_distance_plans(emu, n, d, h, w, k, dtype):
    sample = center_distance_sample(n, d, h, w, k, seed=k, device="emu", dtype=dtype)
    check_ops(sample, "emu", masks=output_masks(sample) if (n, d, h, w, k) in DIST_CASES[:-1] else every(sample))


@pytest.mark.parametrize(
    "shape",
    [(0, 3, 4, 5, 2), (2, 3, 0, 5, 2), (2, 3, 4, 0, 2), (2, 0, 4, 5, 2), (2, 3, 4, 5, 0)],
    ids=["batch0", "H0", "W0", "D0", "K0"],
)
def test_center_distance_empty(emu, shape):
    sample = center_distance_sample(*shape, device="emu")
    check_ops(sample, "emu", masks=output_masks(sample))


@pytest.mark.parametrize("k", [1, 2, 33, 64, 128, 256])
def test_center_distance_every_k(emu, k):
    sample = center_distance_sample(1, 4, 5, 6, k, seed=k, device="emu")
    check_ops(sample, "emu", masks=every(sample))


@pytest.mark.parametrize("op", ["class_avg_pool", "center_distance"])
def test_outputs_written_in_full(emu, op):
    """The CUDA class ops make their outputs and buffers with at::empty: under torch.use_deterministic_algorithms
    torch fills such memory with NaN, so an element no kernel writes (an absent class's mean, a count, a chunk's
    partial sums, a gradient, an empty image's outputs) shows. The plans and the empty shapes, float64."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        if op == "class_avg_pool":
            cases = POOL_CASES + [(0, 3, 4, 5, 4), (2, 3, 0, 5, 4), (2, 0, 4, 5, 4)]
            for i, case in enumerate(cases):
                check_ops(
                    class_avg_pool_sample(*case, absent=(1,) if case[-1] > 2 else (), seed=i, device="emu"),
                    "emu",
                    by="kernel",
                )
        else:
            # the small plans (150 classes x 34 channel units of block sums take minutes here), one mask per output
            masks = [[True, True, True], [True, False, False], [False, True, False], [False, False, True]]
            for i, case in enumerate(
                DIST_CASES[:4] + [(0, 3, 4, 5, 2), (2, 3, 0, 5, 2), (2, 0, 4, 5, 2), (2, 3, 4, 5, 0)]
            ):
                check_ops(center_distance_sample(*case, seed=i, device="emu"), "emu", masks=masks, by="kernel")
    finally:
        torch.use_deterministic_algorithms(before)


# ---------------------------------------------------------------- deformable convolution
@pytest.mark.parametrize("what", ["batch0", "H0", "W0", "C_out0"])
def test_deform_conv2d_empty(emu, what):
    base = dict(
        n=2,
        c_in=4,
        c_out=3,
        groups=1,
        offset_groups=2,
        k=(1, 1),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        size=(5, 6),
    )  # padding: an empty image has outputs
    case = dict(
        base, **{"batch0": dict(n=0), "H0": dict(size=(0, 6)), "W0": dict(size=(5, 0)), "C_out0": dict(c_out=0)}[what]
    )
    sample = deform_conv2d_sample(**case, seed=1, device="emu")
    # against the CPU kernel: the twin fails on empty padded images (test_deform_conv.py::test_twin_empty_image)
    check_ops(sample, "emu", masks=output_masks(sample), by="kernel")


@pytest.fixture
def workspace_cap(emu):
    """set(bytes): the deform kernels' workspace cap (chunks of whole images) until the test ends."""
    previous = []

    def set_cap(cap):
        previous.append(emu.set_deform_workspace_cap(cap))

    yield set_cap
    if previous:
        emu.set_deform_workspace_cap(previous[0])


@pytest.mark.parametrize("op", ["deform_conv2d", "dual_deform_conv2d"])
def test_deform_conv2d_column_chunks(emu, workspace_cap, op):
    # A 1-byte cap: every chunk holds one image (never less), so 3 images make three chunks; the weight gradient's
    # per-chunk GEMMs add up (in float32 for half precision), each chunk has its own sort. Every output mask.
    workspace_cap(1)
    build = deform_conv2d_sample if op == "deform_conv2d" else dual_deform_conv2d_sample
    for dtype in (torch.float64, torch.bfloat16):
        sample = build(3, 6, 4, 2, 3, (3, 2), (2, 1), (1, 0), (2, 1), (7, 6), seed=2, device="emu", dtype=dtype)
        check_ops(sample, "emu", masks=every(sample) if dtype != torch.float64 else None)
        check_ops(sample, "emu", masks=output_masks(sample)[1::37])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deform_weight_grad_accumulates_across_chunks(emu, workspace_cap, dtype):
    """Three chunks (a 1-byte cap): the weight gradient's GEMM of each chunk adds into one buffer (addmm, beta 1
    after the first; float32 for bfloat16), so no separate sum pass (no add); the same values as in one chunk."""
    sample = deform_conv2d_sample(
        3, 8, 4, 2, 1, (3, 3), (1, 1), (1, 1), (1, 1), (6, 5), seed=17, device="emu", dtype=dtype
    )
    mask = [False, False, True, False, False]  # the weight gradient alone
    args = sample.info.backward_args(sample.detached().args, None, sample.grads, mask)
    whole = emu.deform_conv2d_backward(*args)[2]
    workspace_cap(1)
    calls = aten_calls(lambda: emu.deform_conv2d_backward(*args))
    assert "aten::addmm_" in calls and not calls & {"aten::add_", "aten::add", "aten::sum"}, calls
    chunked = emu.deform_conv2d_backward(*args)[2]
    assert chunked.dtype == dtype
    assert_matches(chunked, whole.double(), TOL["emu"][dtype], "weight gradient in three chunks")


def test_dual_deform_conv2d_empty(emu):
    sample = dual_deform_conv2d_sample(0, 4, 3, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), (6, 7), device="emu")
    check_ops(sample, "emu", masks=every(sample))


# ---------------------------------------------------------------- grid-stride loops
@pytest.mark.parametrize("op", list(OPS))
def test_grid_stride(emu, grid_cap, op):
    """With at most 2 blocks along x, every kernel's grid-stride loop walks every item: every sample of the op
    (float64 and float32), and for the class ops the cases of several chunks and blocks."""
    grid_cap(2)
    plans = {
        "class_avg_pool": [class_avg_pool_sample(*c, seed=1, device="emu") for c in POOL_CASES[1:6]],
        "center_distance": [center_distance_sample(*c, seed=2, device="emu") for c in DIST_CASES[1:4]],
    }
    for dtype in (torch.float64, torch.float32):
        for sample in OPS[op].sample_inputs("emu", dtype, requires_grad=False):
            check_ops(sample, "emu", masks=every(sample))
    for sample in plans.get(op, []):
        check_ops(sample, "emu", masks=every(sample))


# ---------------------------------------------------------------- deformable convolution: the new kernels
# csrc/cuda/deform_conv.cu: a sampling table per (image, offset group, tap, pixel); lane groups (a power of two up to
# a warp) over each offset group's channels, warp-shuffle sums of the offset / mask gradients; the input gradient a
# stable sort of the contributions by destination and one fixed-order gather each. Against the CPU kernel.
DEFORM_EMU_CASES = {  # n, c_in, c_out, groups, offset_groups, k, stride, padding, dilation, size
    "40 channels per offset group": (2, 80, 6, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), (5, 7)),  # 32 lanes, twice
    "3 per group, 6 per offset group": (1, 12, 8, 4, 2, (3, 2), (2, 1), (1, 0), (2, 1), (7, 6)),  # 8 lanes, 2 idle
    "one channel": (3, 1, 3, 1, 1, (2, 3), (1, 2), (0, 1), (1, 1), (6, 5)),  # 1 lane per item
    "odd, dilated": (1, 6, 4, 2, 3, (3, 3), (2, 2), (2, 1), (2, 3), (9, 11)),
}


@pytest.mark.parametrize("case", list(DEFORM_EMU_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no_mask"])
def test_deform_kernels_against_cpu(emu, case, dtype, masked):
    sample = deform_conv2d_sample(*DEFORM_EMU_CASES[case], mask=masked, seed=7, device="emu", dtype=dtype)
    check_ops(
        sample,
        "emu",
        masks=every(sample) + [[True, False, False, False, True], [False, True, True, False, False]],
        by="kernel",
    )


@pytest.mark.parametrize("case", list(DEFORM_EMU_CASES)[:2])
def test_dual_deform_kernels_against_cpu(emu, grid_cap, case):
    # grid_cap(1): one block of lane groups walks every item and destination (the warp-uniform loop's tail).
    grid_cap(1)
    sample = dual_deform_conv2d_sample(
        *DEFORM_EMU_CASES[case],
        c_y=DEFORM_EMU_CASES[case][1] // 2,
        groups_y=1,
        c_out_y=3,
        seed=8,
        device="emu",
        dtype=torch.float32,
    )
    check_ops(sample, "emu", masks=every(sample), by="kernel")


def _emu_backward(op, sample):
    args = sample.detached().args
    outs = getattr(torch.ops.csfrn_emu, op)(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    info = sample.info
    return getattr(torch.ops.csfrn_emu, info.backward)(*info.backward_args(args, outs, sample.grads, every(sample)[0]))


@pytest.mark.parametrize("op", ["deform_conv2d", "dual_deform_conv2d"])
def test_deform_deterministic_without_alerts(emu, op):
    """Under torch.use_deterministic_algorithms(True) the backward runs without an error or a warning (no atomics
    left to alert for) and gives bitwise-equal gradients on two calls."""
    build = deform_conv2d_sample if op == "deform_conv2d" else dual_deform_conv2d_sample
    sample = build(2, 8, 4, 1, 2, (3, 3), (1, 1), (1, 1), (1, 1), (9, 8), seed=9, device="emu", dtype=torch.float32)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            first, second = _emu_backward(op, sample), _emu_backward(op, sample)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["deform_conv2d", "dual_deform_conv2d"])
def test_deform_half_precision_padding_never_counts(emu, op):
    """bfloat16 with 3 output channels per group: the GEMMs take narrow views of padded buffers (rows of 8). Under
    torch.use_deterministic_algorithms(True) torch fills at::empty memory with NaN, so padding that reached a result
    would show (the CPU's half-precision GEMM reads past K in strided operands: the emulation copies them)."""
    build = deform_conv2d_sample if op == "deform_conv2d" else dual_deform_conv2d_sample
    sample = build(2, 16, 6, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), (5, 6), seed=18, device="emu", dtype=torch.bfloat16)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        check_ops(sample, "emu", masks=every(sample))
    finally:
        torch.use_deterministic_algorithms(was)


def _sequential_input_grad(x, offset, grad_out, stride, padding, dilation, kh, kw, order):
    """grad of input of a one-channel deform conv whose weight makes column (pixel, tap) = grad_out[tap, pixel]
    exactly: each input pixel's contributions w * grad_out added one by one in float32, contribution
    4 * item + corner (item = pixel * taps + tap) in ascending (`order` 1) or descending (-1) order."""
    h, w = x.shape[2:]
    h_out, w_out = offset.shape[2:]
    taps = kh * kw
    f32 = torch.float32
    contributions = {}
    for p in range(h_out * w_out):
        ho, wo = divmod(p, w_out)
        for k in range(taps):
            i, j = divmod(k, kw)
            y = torch.tensor(float(ho * stride[0] - padding[0] + i * dilation[0]), dtype=f32) + offset[0, 2 * k, ho, wo]
            xx = (
                torch.tensor(float(wo * stride[1] - padding[1] + j * dilation[1]), dtype=f32)
                + offset[0, 2 * k + 1, ho, wo]
            )
            if not (-1 < float(y) < h and -1 < float(xx) < w):
                continue
            fy, fx = torch.floor(y), torch.floor(xx)
            ly, lx = y - fy, xx - fx
            hy, hx = 1 - ly, 1 - lx
            weights = (hy * hx * 1, hy * lx * 1, ly * hx * 1, ly * lx * 1)
            for c, wgt in enumerate(weights):
                yy, xc = int(fy) + (c >> 1), int(fx) + (c & 1)
                if 0 <= yy < h and 0 <= xc < w:
                    contributions.setdefault((yy, xc), []).append(
                        (4 * (p * taps + k) + c, wgt * grad_out[0, k, ho, wo])
                    )
    grad = torch.zeros(h, w, dtype=f32)
    for (yy, xc), terms in contributions.items():
        total = torch.zeros((), dtype=f32)
        for _, term in sorted(terms, key=lambda t: order * t[0]):
            total = total + term
        grad[yy, xc] = total
    return grad


def test_deform_input_grad_sums_in_contribution_order(emu):
    """The sort is stable and the gather adds in its order: each input pixel's float32 sum equals, bit for bit, the
    sum of its contributions in ascending contribution order (and, magnitudes spread over 16 decades, not the sum
    in descending order: the test can see the order)."""
    g = torch.Generator().manual_seed(11)
    kh, kw, stride, padding, dilation = 3, 3, (1, 1), (1, 1), (1, 1)
    x = torch.randn(1, 1, 6, 7, generator=g)
    offset = torch.randn(1, 18, 6, 7, generator=g) * 1.5
    weight = torch.eye(9).view(9, 1, 3, 3)  # column (pixel, tap) = grad_out[tap, pixel], exactly
    grad_out = torch.randn(1, 9, 6, 7, generator=g) * 10.0 ** torch.randint(-8, 9, (1, 9, 6, 7), generator=g)
    grads = torch.ops.csfrn_emu.deform_conv2d_backward(
        grad_out,
        x,
        offset,
        weight,
        None,
        list(stride),
        list(padding),
        list(dilation),
        [True, False, False, False, False],
    )
    want = _sequential_input_grad(x, offset, grad_out, stride, padding, dilation, kh, kw, 1)
    assert torch.equal(grads[0][0, 0], want)
    assert not torch.equal(want, _sequential_input_grad(x, offset, grad_out, stride, padding, dilation, kh, kw, -1))


# ---------------------------------------------------------------- deformable convolution: 16-byte vector loads
# The sampling kernel and the gather move 16 bytes of channels a lane (8 float16 / bfloat16, 4 float32, 2 float64)
# when C / groups and C / offset_groups of every branch are multiples of that and the input starts 16-byte aligned,
# else one (the scalar path). deform_vector_width() is the width the last call took.
VECTOR_CASES = {  # n, c_in, c_out, groups, offset_groups, k, stride, padding, dilation, size
    "16 per offset group, 8 per group": (2, 32, 8, 4, 2, (3, 3), (1, 1), (1, 1), (1, 1), (5, 6)),
    "72 per offset group": (1, 72, 4, 1, 1, (3, 2), (2, 1), (1, 0), (2, 1), (6, 5)),  # float64: 36 vectors, 32 lanes
    "12 per group, 24 per offset group": (1, 24, 6, 2, 1, (2, 2), (1, 1), (0, 1), (1, 1), (5, 5)),  # half: scalar
    "5 per offset group": (2, 10, 4, 1, 2, (3, 3), (1, 1), (1, 1), (1, 1), (5, 6)),  # scalar in every dtype
}


def vector_width(c_in, groups, offset_groups, dtype):
    v = 16 // dtype.itemsize
    return v if (c_in // groups) % v == 0 and (c_in // offset_groups) % v == 0 else 1


@pytest.fixture
def vector_loads(emu):
    """set(on): the deform kernels' vector loads on or off until the test ends."""
    previous = []

    def set_on(on):
        previous.append(emu.set_deform_vector_loads(on))

    yield set_on
    if previous:
        emu.set_deform_vector_loads(previous[0])


@pytest.mark.parametrize("case", list(VECTOR_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deform_vector_loads_against_cpu(emu, case, dtype):
    """Each case in each dtype against the CPU kernel (float64, float32; float16 / bfloat16: the float64 twin),
    with the mask, forward and backward: the vector path where the channels allow it, the scalar one elsewhere.
    The gradient comes back channels_last (vector stores) in float32 and float16, NCHW (strided stores) else."""
    n, c_in, c_out, groups, offset_groups = VECTOR_CASES[case][:5]
    layout = "channels_last" if dtype in (torch.float32, torch.float16) else "nchw"
    sample = deform_conv2d_sample(*VECTOR_CASES[case], layout=layout, seed=14, device="emu", dtype=dtype)
    exact = dtype in (torch.float64, torch.float32)
    check_ops(
        sample, "emu", masks=every(sample) + [[True, False, False, False, False]], by="kernel" if exact else "twin"
    )
    assert emu.deform_vector_width() == vector_width(c_in, groups, offset_groups, dtype)


def _forward_backward(op, sample):
    args = sample.detached().args
    outs = getattr(torch.ops.csfrn_emu, op)(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = getattr(torch.ops.csfrn_emu, sample.info.backward)(
        *sample.info.backward_args(args, outs, sample.grads, every(sample)[0])
    )
    return dict(zip(sample.info.grad_outputs, outs)) | dict(zip(sample.info.differentiable, grads))


@pytest.mark.parametrize("op", ["deform_conv2d", "dual_deform_conv2d"])
def test_deform_vector_and_scalar_paths_agree(emu, vector_loads, op):
    """The vector path gives the scalar path's bits for the outputs, the input and weight gradients (each channel's
    value is the same arithmetic in the same order) and, within rounding, its offset and mask gradients (a lane adds
    its channels in another order): float32 (4 a lane, channels_last: vector stores of the input gradient) and
    bfloat16 (8 a lane, NCHW: strided stores)."""
    for dtype, layout in ((torch.float32, "channels_last"), (torch.bfloat16, "nchw")):
        if op == "deform_conv2d":
            sample = deform_conv2d_sample(
                *VECTOR_CASES["16 per offset group, 8 per group"], layout=layout, seed=15, device="emu", dtype=dtype
            )
        else:  # y: 16 channels, 8 per group and offset group
            sample = dual_deform_conv2d_sample(
                *VECTOR_CASES["16 per offset group, 8 per group"],
                c_y=16,
                groups_y=2,
                c_out_y=6,
                layout=layout,
                seed=15,
                device="emu",
                dtype=dtype,
            )
        results = {}
        for on in (True, False):
            vector_loads(on)
            results[on] = _forward_backward(op, sample)
            assert emu.deform_vector_width() == (16 // dtype.itemsize if on else 1)
        for name, got in results[True].items():
            want = results[False][name]
            if name in ("offset", "mask"):
                assert_matches(got, want.double(), TOL["emu"][dtype], f"{dtype} {name}")
            else:
                assert torch.equal(got, want), (dtype, name)
                assert got.stride() == want.stride(), (dtype, name)


def test_deform_misaligned_input_takes_the_scalar_path(emu):
    """A channels_last input that starts 4 bytes past a 16-byte boundary (a view at storage offset 1) is read as it
    is, with scalar loads: the emulation would refuse a misaligned vector load."""
    sample = deform_conv2d_sample(
        *VECTOR_CASES["16 per offset group, 8 per group"], seed=16, device="emu", dtype=torch.float32
    )
    x = sample["input"]
    n, c, h, w = x.shape
    storage = torch.empty(x.numel() + 1, dtype=x.dtype)
    shifted = storage[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    shifted.copy_(x)
    assert shifted.is_contiguous(memory_format=torch.channels_last) and shifted.data_ptr() % 16 == 4
    check_ops(sample.replace(input=shifted), "emu", masks=every(sample), by="kernel")
    assert emu.deform_vector_width() == 1
    check_ops(sample, "emu", masks=every(sample), by="kernel")
    assert emu.deform_vector_width() == 4


@pytest.mark.parametrize("op", ["deform_conv2d", "dual_deform_conv2d"])
@pytest.mark.parametrize("kernels", ["emu", "cpu"])
def test_deform_keeps_memory_format(emu, op, kernels):
    """channels_last in, channels_last out (and the input's gradient); NCHW stays NCHW; the same values either way."""
    build = deform_conv2d_sample if op == "deform_conv2d" else dual_deform_conv2d_sample
    base = build(2, 16, 8, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), (7, 6), seed=12, device="emu", dtype=torch.float32)
    raw = torch.ops.csfrn_emu if kernels == "emu" else torch.ops.csfrn
    results = {}
    for layout in ("nchw", "channels_last"):
        inputs = base.info.arg_names[:2] if op == "dual_deform_conv2d" else base.info.arg_names[:1]
        sample = base.replace(**{n: lay(base[n], layout) for n in inputs})
        args = sample.detached().args
        outs = getattr(raw, op)(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grad_outs = tuple(lay(g, layout) for g in sample.grads)
        grads = getattr(raw, sample.info.backward)(*sample.info.backward_args(args, outs, grad_outs, every(sample)[0]))
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for t in list(outs) + list(grads[: len(inputs)]):
            assert t.is_contiguous(memory_format=fmt), (layout, t.stride())
        results[layout] = (outs, grads)
    for a, b in zip(results["nchw"][0] + results["nchw"][1], results["channels_last"][0] + results["channels_last"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# The offset and the mask in every layout: read in place through their strides (NCHW, channels_last, and views whose
# pixels stay one run, e.g. a slice of channels), or copied contiguous once (H and W swapped, every other column);
# their gradients written in their own memory format.
COORD_LAYOUTS = ("channels_last", "nchw_slice", "channels_last_slice", "permuted", "sliced")
COORDS_IN_PLACE = ("nchw", "channels_last", "nchw_slice", "channels_last_slice")


def coord_lay(t, layout):
    """t (an offset or mask) with the same values in ``layout``: lay()'s, or every other channel of a twice as wide
    NCHW ("nchw_slice") or channels_last ("channels_last_slice") tensor: strided, but one run of pixels."""
    if layout in ("nchw_slice", "channels_last_slice"):
        fmt = torch.channels_last if layout == "channels_last_slice" else torch.contiguous_format
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype).contiguous(memory_format=fmt)
        wide[:, 1::2] = t
        return wide[:, 1::2]
    return lay(t, layout)


def _coord_run(raw, sample, coord_layout, input_layout):
    """Forward and backward (every gradient) of the raw ops with the inputs (and upstream gradients) in
    input_layout and the offset and mask in coord_layout: {name: tensor} of outputs and gradients."""
    info = sample.info
    inputs = info.arg_names[:2] if sample.op == "dual_deform_conv2d" else info.arg_names[:1]
    changes = {n: lay(sample[n], input_layout) for n in inputs}
    changes |= {n: coord_lay(sample[n], coord_layout) for n in ("offset", "mask") if sample[n] is not None}
    args = sample.replace(**changes).detached().args
    outs = getattr(raw, sample.op)(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grad_outs = tuple(lay(g, input_layout) for g in sample.grads)
    grads = getattr(raw, info.backward)(*info.backward_args(args, outs, grad_outs, every(sample)[0]))
    laid = dict(zip(info.arg_names, args))
    return {f"out{i}": o for i, o in enumerate(outs)} | dict(zip(info.differentiable, grads)), laid


COORD_CASES = {  # (args, dtype, mask): the vector path (4 float32 channels a lane) and the scalar one, strided
    "vector": ((2, 16, 8, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), (7, 6)), torch.float32, True),
    "odd, dilated, float64": ((1, 6, 4, 2, 3, (3, 3), (2, 2), (2, 1), (2, 3), (9, 11)), torch.float64, True),
    "no mask": ((2, 4, 3, 1, 2, (2, 3), (1, 2), (0, 1), (1, 1), (6, 5)), torch.float32, False),
    "batch 0": ((0, 4, 3, 1, 2, (3, 3), (1, 1), (1, 1), (1, 1), (5, 6)), torch.float32, True),
    "H 0": ((2, 4, 3, 1, 2, (1, 1), (1, 1), (1, 1), (1, 1), (0, 6)), torch.float32, True),
}


@pytest.mark.parametrize("case", list(COORD_CASES))
@pytest.mark.parametrize("op", ["deform_conv2d", "dual_deform_conv2d"])
@pytest.mark.parametrize("kernels", ["emu", "cpu"])
def test_deform_coords_any_layout_same_bits(emu, case, op, kernels):
    """The offset and mask in any layout, beside an NCHW or a channels_last input: the outputs and every gradient
    bitwise those of NCHW-contiguous offsets and mask (the layout changes only where values are read and written),
    the offset's and the mask's gradients in their memory format (channels_last for channels_last ones, else
    contiguous), and the emulation on the vector path where the channels allow it."""
    args, dtype, masked = COORD_CASES[case]
    build = deform_conv2d_sample if op == "deform_conv2d" else dual_deform_conv2d_sample
    sample = build(*args, mask=masked, seed=21, device="emu", dtype=dtype)
    raw = torch.ops.csfrn_emu if kernels == "emu" else torch.ops.csfrn
    for input_layout in ("nchw", "channels_last"):
        want, _ = _coord_run(raw, sample, "nchw", input_layout)
        for coord_layout in COORD_LAYOUTS:
            got, laid = _coord_run(raw, sample, coord_layout, input_layout)
            what = (input_layout, coord_layout)
            for name in want:
                assert torch.equal(got[name], want[name]), (*what, name)
                if name in ("offset", "mask") and got[name].numel():
                    fmt = torch.channels_last if coord_layout == "channels_last" else torch.contiguous_format
                    assert got[name].stride() == torch.empty_like(laid[name], memory_format=fmt).stride(), (*what, name)
                elif name not in ("offset", "mask"):
                    assert got[name].stride() == want[name].stride(), (*what, name)
            if kernels == "emu" and case == "vector":
                assert emu.deform_vector_width() == 4, what


# What a copy of a tensor looks like to the profiler (.contiguous(), .clone(), .to(), copy_).
COPY_OPS = {"aten::contiguous", "aten::clone", "aten::copy_", "aten::to", "aten::_to_copy"}


def copies_of(shapes, fn):
    """(name, input shapes) of the copy ops fn() dispatches (the launchers' own included) on a tensor of one of
    ``shapes``."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [
        (e.name, e.input_shapes)
        for e in prof.events()
        if e.name in COPY_OPS and shapes & {tuple(s) for s in e.input_shapes if s}
    ]


@pytest.mark.parametrize("op", ["deform_conv2d", "dual_deform_conv2d"])
@pytest.mark.parametrize("device", ["emu", "cpu"])
def test_deform_reads_coords_in_place(emu, op, device):
    """Forward and backward through autograd (csfrn.ops' on the CPU, the emulated ops' on "emu") copy neither a
    channels_last offset nor its mask, on the way in (the launchers) or out (their gradients come back
    channels_last as written): the profiler sees no copy op on a tensor of their shapes. An offset and mask with H
    and W swapped are copied once each, in the forward and in the backward (so the check does see such copies)."""
    build = deform_conv2d_sample if op == "deform_conv2d" else dual_deform_conv2d_sample
    # 16 input channels, 8 out: neither is the offset's 36 channels or the mask's 18
    base = build(2, 16, 8, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), (7, 6), seed=22, device="emu", dtype=torch.float32)
    shapes = {tuple(base["offset"].shape), tuple(base["mask"].shape)}
    names = base.info.arg_names
    for layout in ("channels_last", "permuted"):
        inputs = names[:2] if op == "dual_deform_conv2d" else names[:1]
        changes = {n: lay(base[n], "channels_last") for n in inputs}
        changes |= {n: coord_lay(base[n], layout) for n in ("offset", "mask")}
        args = base.replace(**changes).detached(requires_grad=True).args
        args = [a.requires_grad_() if torch.is_tensor(a) else a for a in args]
        coords = [args[names.index("offset")], args[names.index("mask")]]
        got = []

        def step():
            outs = kernel(op, device)(*args)
            got.extend(torch.autograd.grad([outs[i] for i in base.info.grad_outputs], coords, list(base.grads)))

        seen = copies_of(shapes, step)
        contiguous = sorted(tuple(shape[0]) for name, shape in seen if name == "aten::contiguous")
        if layout == "channels_last":
            assert seen == [], seen
            for g in got:
                assert g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()
        else:
            assert contiguous == sorted([tuple(base["mask"].shape)] * 2 + [tuple(base["offset"].shape)] * 2), seen
            assert all(g.is_contiguous() for g in got)


@pytest.mark.parametrize("op", ["deform_conv2d", "dual_deform_conv2d"])
def test_deform_autocast_keeps_offsets_float32(emu, op):
    """CUDA's autocast rule (csrc/autocast/deform_conv_autocast.h), registered for the emulated ops on AutocastCPU:
    the input and weights run in bfloat16, the offset and mask stay float32 (the kernels take float32 coordinates
    beside bfloat16 input), the same bits as the kernels called so by hand, and not the all-bfloat16 result."""
    build = deform_conv2d_sample if op == "deform_conv2d" else dual_deform_conv2d_sample
    sample = build(2, 8, 4, 1, 2, (3, 3), (1, 1), (1, 1), (1, 1), (9, 8), seed=13, device="emu", dtype=torch.float32)
    args = sample.detached().args
    names = sample.info.arg_names
    fn = getattr(torch.ops.csfrn_emu, op)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*args)
    bf16 = torch.bfloat16

    def cast(coord_dtype):
        return [
            a.to(coord_dtype if n in ("offset", "mask") else bf16) if torch.is_tensor(a) else a
            for n, a in zip(names, args)
        ]

    want, all_bf16 = fn(*cast(torch.float32)), fn(*cast(bf16))
    got, want, all_bf16 = (tuple(o) if isinstance(o, tuple) else (o,) for o in (got, want, all_bf16))
    for a, b, c in zip(got, want, all_bf16):
        assert a.dtype == bf16 and torch.equal(a, b)
        assert not torch.equal(a, c)
    # and the backward: offset and mask gradients in float32, close to the float64 twin
    wide = sample.detached(dtype=torch.float64)
    want_out = sample.info.reference(*wide.args)
    want_out = want_out if isinstance(want_out, tuple) else (want_out,)
    coords = cast(torch.float32)
    grads = getattr(torch.ops.csfrn_emu, sample.info.backward)(
        *sample.info.backward_args(tuple(coords), got, tuple(g.to(bf16) for g in sample.grads), every(sample)[0])
    )
    offset_grad = grads[sample.info.differentiable.index("offset")]
    assert offset_grad.dtype == torch.float32
    for a, b in zip(got, want_out):
        assert_matches(a, b, 3e-2, "bf16 output with float32 offsets")
