"""The CUDA kernels without a GPU: csrc/cuda/*.cu, compiled by the host compiler with the CUDA emulation
(csrc/emu/cuda_emu.h, built by tests/cuda_emu.py on first use), run every block and thread on the CPU as
torch.ops.csfrn_emu.*, and are checked here against the CPU kernels (torch.ops.csfrn.*): every op, forward and
backward with every output mask, layouts, empty sizes, the launchers' chunk and grid-stride boundaries, bad labels.

Tolerances. float64: 1e-12 (relative, and absolute times the largest |value| of the tensor). float32, float16,
bfloat16: the emulated kernel gets inputs rounded to the dtype and is compared with the float64 CPU kernel on those
rounded inputs, so only the kernel's own rounding counts: the kernels accumulate in float32 but round their outputs
(and deform conv its column buffers) to the dtype. Tolerance (relative, and absolute times the tensor's largest
|value|): float32 2e-6 (17 eps), float16 2e-3 (2 eps), bfloat16 1.6e-2 (2 eps); the worst errors seen are about
a tenth of that (float32 2.6e-7, float16 3.6e-4, bfloat16 2.8e-3).
"""
import itertools
import re

import pytest
import torch

import csfrn.ops  # noqa: F401  (loads csfrn._C: torch.ops.csfrn.* on the CPU)
import cuda_emu

CPU = torch.ops.csfrn
F64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LAYOUTS = ["nchw", "channels_last", "permuted", "sliced"]


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.load()


@pytest.fixture
def grid_cap(emu):
    """set(cap): every launch runs at most `cap` blocks along x until the test ends (grid-stride loops)."""
    previous = []

    def set_cap(cap):
        previous.append(emu.set_grid_x_cap(cap))
    yield set_cap
    if previous:
        emu.set_grid_x_cap(previous[0])


def lay(t, layout):
    """Same values, other strides: channels_last, H and W strides swapped, or every other element of a wider
    tensor. 3-D tensors (labels) get the permuted / sliced treatment on their last two dims."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    return t.contiguous()


def rounded(t, dtype):
    return None if t is None else t.to(dtype)


def wide(t):
    return None if t is None else t.to(F64)


def assert_matches(got, want, dtype, what=""):
    """got: the emulated kernel's output (in dtype); want: the float64 CPU kernel on the rounded inputs."""
    assert got.dtype == (dtype if want.dtype == F64 else want.dtype), what
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    tol = TOL[dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def random_labels(g, n, h, w, k, ignore=255, ignore_frac=0.2):
    """Random classes, the first and the last one present whatever K, about ignore_frac of the pixels ignored."""
    labels = torch.randint(0, k, (n, h, w), generator=g)
    labels.view(-1)[::13] = 0
    labels.view(-1)[5::17] = k - 1
    return labels.masked_fill(torch.rand(n, h, w, generator=g) < ignore_frac, ignore)


# ---------------------------------------------------------------- the emulation itself
@pytest.mark.parametrize("config", [(1, 1, 1, 1, 1, 1), (7, 1, 1, 256, 1, 1), (3, 2, 4, 4, 3, 2), (2, 1, 1, 1024, 1, 1),
                                    (1, 65535, 1, 1, 1, 1), (1, 1, 1, 2, 8, 64)])
def test_emulation_runs_every_thread(emu, config):
    gx, gy, gz, bx, by, bz = config
    assert emu.selftest_launch(gx, gy, gz, bx, by, bz, 48 * 1024) == gx * gy * gz * bx * by * bz


@pytest.mark.parametrize("config,why", [
    ((0, 1, 1, 32, 1, 1, 0), "the grid is empty"), ((1, 1, 0, 32, 1, 1, 0), "the grid is empty"),
    ((1, 1, 1, 0, 1, 1, 0), "the block is empty"), ((1, 1, 1, 1025, 1, 1, 0), "more than 1024 threads"),
    ((1, 1, 1, 32, 33, 1, 0), "more than 1024 threads"), ((1, 1, 1, 1, 1, 65, 0), "64 along z"),
    ((1, 65536, 1, 1, 1, 1, 0), "at most 65535"), ((1, 1, 65536, 1, 1, 1, 0), "at most 65535"),
    ((1, 1, 1, 32, 1, 1, 48 * 1024 + 1), "48 KiB of dynamic shared memory")])
def test_emulation_refuses_what_a_gpu_refuses(emu, config, why):
    with pytest.raises(RuntimeError, match=f"a GPU refuses the launch of count_kernel.*{re.escape(why)}"):
        emu.selftest_launch(*config)


@pytest.mark.parametrize("threads", [32, 64, 256, 1024])
def test_emulation_barriers_shared_memory_and_warp_intrinsics(emu, threads):
    # Integer-valued data: every summation order gives the exact sum.
    x = torch.randint(-50, 50, (3 * threads + 17,), generator=torch.Generator().manual_seed(threads)).to(F64)
    out = emu.selftest_block_sum(x, threads)
    blocks = torch.nn.functional.pad(x, (0, out.shape[0] * threads - x.numel())).view(-1, threads)
    assert torch.equal(out[:, 0], blocks.sum(1))           # shared-memory tree with __syncthreads
    assert torch.equal(out[:, 1], blocks.sum(1))           # __shfl_down_sync, then __shfl_xor_sync
    assert torch.equal(out[:, 2], (blocks > 0).sum(1).to(F64))  # __ballot_sync + __popc


@pytest.mark.parametrize("what,message", [
    (0, "63 of 64 threads wait at __syncthreads but 1 exited"), (1, "mask 0x00000001 that does not include its lane"),
    (2, "different masks"), (3, "wait in a warp intrinsic for lanes of its mask that exited"),
    (4, "reads lane 20 outside the mask")])
def test_emulation_reports_misuse(emu, what, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        emu.selftest_misuse(what)
    assert emu.selftest_launch(2, 1, 1, 64, 1, 1, 0) == 128   # and the next launch is fine


def test_emulation_grid_cap_hook(emu, grid_cap):
    grid_cap(3)
    assert emu.selftest_launch(10, 2, 1, 32, 1, 1, 0) == 3 * 2 * 32


def test_every_op_is_emulated(emu):
    ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("csfrn::"))
    ops.remove("built_with_cuda")
    assert len(ops) == 8
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"csfrn_emu::{op}", "CPU"), op


# ---------------------------------------------------------------- class_avg_pool
# The forward's plan (class_pool_plan in class_ops.cu, for the emulated device's 132 SMs and 48 KiB of shared
# memory per block) stages 64-pixel tiles, cuts each image into chunks of >= 256 pixels (a multiple of 64) when
# there are few images, keeps up to 8 accumulator copies per block, splits the channels into tiles when K * (D + 1)
# sums do not fit, and takes a global-memory path when not even one channel's do.
POOL_CASES = [  # (N, D, H, W, K)
    (2, 5, 7, 9, 1),          # one partial tile, 8 copies, means written by the block
    (2, 8, 13, 11, 7),        # three tiles, the last partial
    (1, 3, 16, 16, 4),        # exactly one chunk of four full tiles
    (1, 3, 1, 257, 3),        # two chunks (192 + 65 pixels): partial sums and the reduce kernel
    (2, 4, 33, 65, 19),       # 9 chunks of 256, the last one 97
    (1, 2, 129, 129, 5),      # 66 chunks, the last one a single pixel
    (1, 3, 5, 6, 171),        # more classes than pixels: most are absent
    (2, 33, 6, 7, 256),       # float64: two channel tiles of 17 (16 + the count)
    (1, 100, 9, 31, 150),     # float32 two channel tiles of 50, float64 four of 25
    (2, 3, 5, 10, 3000),      # one channel per tile, one copy: 47.7 KiB of shared memory (float64)
    (2, 2, 5, 10, 7000),      # K too large for shared memory: the global-memory path
]


def check_pool(emu, n, d, h, w, k, dtype, layout="nchw", seed=0, ignore=255):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, h, w, generator=g, dtype=F64).to(dtype)
    labels = random_labels(g, n, h, w, k, ignore)
    means, counts = emu.class_avg_pool(lay(features, layout), lay(labels, layout), k, ignore)
    want_means, want_counts = CPU.class_avg_pool(wide(features), labels, k, ignore)
    assert_matches(means, want_means, dtype, "means")
    # exact, in the accumulation type (float32 for half and bfloat16): the backward divides by them
    assert torch.equal(counts, want_counts.to(torch.float64 if dtype == torch.float64 else torch.float32)), "counts"
    grad_means = torch.randn(n, k, d, generator=g, dtype=F64).to(dtype)
    grad = emu.class_avg_pool_backward(lay(grad_means, layout), lay(labels, layout), counts, ignore)
    want = CPU.class_avg_pool_backward(wide(grad_means), labels, want_counts, ignore)
    assert_matches(grad, want, dtype, "grad of features")


@pytest.mark.parametrize("n,d,h,w,k", POOL_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_avg_pool(emu, n, d, h, w, k, dtype):
    check_pool(emu, n, d, h, w, k, dtype, seed=k)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_class_avg_pool_layouts(emu, layout, dtype):
    check_pool(emu, 2, 6, 19, 23, 5, dtype, layout, seed=3)
    check_pool(emu, 1, 3, 1, 300, 4, dtype, layout, seed=4)   # W > 1 = H: the pixel stride is W's


@pytest.mark.parametrize("k", [1, 2, 3, 31, 32, 33, 64, 100, 150, 255, 256])
def test_class_avg_pool_every_k(emu, k):
    check_pool(emu, 2, 3, 11, 13, k, torch.float64, seed=k, ignore=-1)


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0), (2, 0, 4, 5)],
                         ids=["batch0", "H0", "W0", "D0"])
def test_class_avg_pool_empty(emu, shape):
    check_pool(emu, *shape, 4, torch.float64)
    check_pool(emu, *shape, 4, torch.float32)


def test_class_avg_pool_grid_stride(emu, grid_cap):
    grid_cap(2)   # 512 threads walk every item of every kernel
    for case in POOL_CASES[1:6]:
        check_pool(emu, *case, torch.float64, seed=1)
    check_pool(emu, 2, 6, 19, 23, 5, torch.float32, "channels_last", seed=2)


@pytest.mark.parametrize("ignore_index", [255, -1])
@pytest.mark.parametrize("value", [5, -3, 1 << 40])
def test_class_avg_pool_bad_labels(emu, ignore_index, value):
    f = torch.randn(2, 3, 17, 19, dtype=F64)
    for position in (0, 300, 2 * 17 * 19 - 1):
        labels = torch.randint(0, 5, (2, 17, 19))
        labels.view(-1)[::7] = ignore_index
        labels.view(-1)[position] = value
        with pytest.raises(ValueError) as want:
            CPU.class_avg_pool(f, labels, 5, ignore_index)
        with pytest.raises(ValueError) as got:
            emu.class_avg_pool(f, labels, 5, ignore_index)
        assert str(got.value).splitlines()[0] == str(want.value).splitlines()[0]
        assert f"value {value}" in str(got.value)


# ---------------------------------------------------------------- center_distance
DIST_CASES = [  # (N, D, H, W, K)
    (2, 5, 7, 9, 1),
    (2, 8, 13, 11, 7),
    (1, 3, 16, 16, 19),       # N * K * P = 4864 = 19 blocks of 256
    (1, 4, 1, 257, 1),        # one item into a second block
    (2, 33, 6, 7, 150),
]


def check_distance(emu, n, d, h, w, k, dtype, layout="nchw", seed=0, delta=10.0, masks=None):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, h, w, generator=g, dtype=F64).to(dtype)
    s = (torch.randn(n, k, d, generator=g, dtype=F64) * 0.5).to(dtype)
    m = (torch.rand(n, k, generator=g, dtype=F64) * 0.2 - 0.3).to(dtype)
    phi = emu.center_distance(lay(e, layout), s, m, delta)
    want = CPU.center_distance(wide(e), wide(s), wide(m), delta)
    assert_matches(phi, want, dtype, "phi")
    grad_phi = torch.randn(n, k, h, w, generator=g, dtype=F64).to(dtype)
    for mask in masks or itertools.product([False, True], repeat=3):
        got = emu.center_distance_backward(lay(grad_phi, layout), lay(e, layout), s, m, delta, list(mask))
        want = CPU.center_distance_backward(wide(grad_phi), wide(e), wide(s), wide(m), delta, list(mask))
        for name, a, b, on in zip(("embeddings", "centers", "margins"), got, want, mask):
            if on:
                assert_matches(a, b, dtype, f"grad of {name}, mask {mask}")
            else:
                assert a.numel() == 0 and b.numel() == 0, f"grad of {name} not asked for, mask {mask}"


@pytest.mark.parametrize("n,d,h,w,k", DIST_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_center_distance(emu, n, d, h, w, k, dtype):
    check_distance(emu, n, d, h, w, k, dtype, seed=k)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_center_distance_layouts(emu, layout, dtype):
    check_distance(emu, 2, 6, 9, 11, 5, dtype, layout, seed=5)


@pytest.mark.parametrize("shape", [(0, 3, 4, 5, 2), (2, 3, 0, 5, 2), (2, 3, 4, 0, 2), (2, 0, 4, 5, 2),
                                   (2, 3, 4, 5, 0)], ids=["batch0", "H0", "W0", "D0", "K0"])
def test_center_distance_empty(emu, shape):
    check_distance(emu, *shape, torch.float64)


@pytest.mark.parametrize("k", [1, 2, 33, 64, 128, 256])
def test_center_distance_every_k(emu, k):
    check_distance(emu, 1, 4, 5, 6, k, torch.float64, seed=k, masks=[(True, True, True)])


def test_center_distance_grid_stride(emu, grid_cap):
    grid_cap(2)
    for case in DIST_CASES[1:4]:
        check_distance(emu, *case, torch.float64, seed=2)
    check_distance(emu, 2, 6, 9, 11, 5, torch.float32, "permuted", seed=3)


# ---------------------------------------------------------------- deformable convolution
DEFORM_CASES = {  # n, c_in, c_out, groups, offset_groups, (kh, kw), stride, padding, dilation, (h, w)
    "3x3": (2, 4, 3, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), (6, 7)),
    "awkward": (2, 6, 2, 2, 3, (3, 2), (2, 1), (1, 0), (2, 1), (5, 4)),
    "depthwise": (2, 4, 8, 4, 2, (3, 2), (1, 2), (1, 1), (1, 1), (5, 6)),
    "1x1": (1, 3, 5, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), (4, 9)),
    "wide": (1, 2, 2, 1, 2, (2, 3), (2, 2), (2, 1), (1, 3), (9, 8)),
}


def deform_inputs(case, dtype, use_mask, bias=True, seed=0, dual=False, scale=2.0):
    n, c_in, c_out, groups, og, (kh, kw), stride, padding, dilation, (h, w) = case
    g = torch.Generator().manual_seed(seed)
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1

    def rnd(*shape, s=1.0, positive=False):
        t = torch.rand(*shape, generator=g, dtype=F64) if positive else torch.randn(*shape, generator=g, dtype=F64) * s
        return t.to(dtype)
    t = dict(input=rnd(n, c_in, h, w), offset=rnd(n, 2 * og * kh * kw, h_out, w_out, s=scale),
             weight=rnd(c_out, c_in // groups, kh, kw), bias=rnd(c_out) if bias else None,
             mask=rnd(n, og * kh * kw, h_out, w_out, positive=True) if use_mask else None,
             grad_out=rnd(n, c_out, h_out, w_out))
    if dual:
        c_out_y = c_out + groups   # the second convolution has other output channels
        t.update(y=rnd(n, c_in, h, w), weight_y=rnd(c_out_y, c_in // groups, kh, kw),
                 bias_y=rnd(c_out_y) if bias else None, grad_out_y=rnd(n, c_out_y, h_out, w_out))
    return t, [list(stride), list(padding), list(dilation)]


def laid(t, layout):
    return {k: (lay(v, layout) if v is not None and v.dim() == 4 else v) for k, v in t.items()}


def check_deform(emu, case, dtype, use_mask, layout="nchw", bias=True, seed=0, masks=None):
    t, geom = deform_inputs(case, dtype, use_mask, bias, seed)
    w, el = {k: wide(v) for k, v in t.items()}, laid(t, layout)
    out = emu.deform_conv2d(el["input"], el["offset"], el["weight"], el["bias"], el["mask"], *geom)
    want = CPU.deform_conv2d(w["input"], w["offset"], w["weight"], w["bias"], w["mask"], *geom)
    assert_matches(out, want, dtype, "out")
    names = ("input", "offset", "weight", "bias", "mask")
    for mask in masks or itertools.product([False, True], repeat=5):
        got = emu.deform_conv2d_backward(el["grad_out"], el["input"], el["offset"], el["weight"], el["mask"], *geom,
                                         list(mask))
        want = CPU.deform_conv2d_backward(w["grad_out"], w["input"], w["offset"], w["weight"], w["mask"], *geom,
                                          list(mask))
        for name, a, b in zip(names, got, want):
            assert_matches(a, b, dtype, f"grad of {name}, mask {mask}")


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("case", list(DEFORM_CASES))
def test_deform_conv2d_every_mask(emu, case, use_mask):
    check_deform(emu, DEFORM_CASES[case], torch.float64, use_mask, seed=len(case))


ALL_TRUE = [(True,) * 5]


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("case", ["3x3", "awkward", "depthwise"])
def test_deform_conv2d_dtypes(emu, case, dtype):
    check_deform(emu, DEFORM_CASES[case], dtype, True, seed=7, masks=ALL_TRUE)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deform_conv2d_layouts(emu, layout):
    check_deform(emu, DEFORM_CASES["awkward"], torch.float64, True, layout, masks=ALL_TRUE)
    check_deform(emu, DEFORM_CASES["3x3"], torch.float32, False, layout, bias=False, masks=ALL_TRUE)


@pytest.mark.parametrize("what", ["batch0", "H0", "W0", "C_out0"])
def test_deform_conv2d_empty(emu, what):
    base = (2, 4, 3, 1, 2, (1, 1), (1, 1), (1, 1), (1, 1), (5, 6))   # padding: an empty image has outputs
    case = {"batch0": (0,) + base[1:], "H0": base[:-1] + ((0, 6),), "W0": base[:-1] + ((5, 0),),
            "C_out0": base[:2] + (0,) + base[3:]}[what]
    check_deform(emu, case, torch.float64, True, seed=1)


def test_deform_conv2d_grid_stride(emu, grid_cap):
    grid_cap(2)
    for case in ("3x3", "awkward", "wide"):
        check_deform(emu, DEFORM_CASES[case], torch.float64, True, seed=3, masks=ALL_TRUE)


def test_deform_conv2d_corners_outside_are_never_read(emu):
    # An inf in pixel (0, 0) reaches only the samples whose bilinear corners include it.
    t, geom = deform_inputs((1, 2, 2, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), (12, 12)), F64, True, scale=0.5)
    t["input"][:, :, 0, 0] = float("inf")
    args = (t["input"], t["offset"], t["weight"], t["bias"], t["mask"], *geom)
    want = CPU.deform_conv2d(*args)
    assert int(want.isfinite().sum()) > want.numel() // 2
    torch.testing.assert_close(emu.deform_conv2d(*args), want, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_deform_conv2d_column_chunks(emu):
    # The launchers cut the batch into chunks whose columns stay under 256 MiB: 32 channels * 9 taps * 152 * 256
    # pixels * 8 bytes = 85.5 MiB per image, so 2 images per chunk and 3 images make two chunks, the last short;
    # the weight gradient adds up across chunks. (About 4 s and 1 GB here: the smallest case that crosses.)
    case = (3, 32, 1, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), (152, 256))
    check_deform(emu, case, torch.float64, True, seed=2, masks=ALL_TRUE)


# ---------------------------------------------------------------- dual deformable convolution
def check_dual(emu, case, dtype, use_mask, layout="nchw", bias=True, seed=0, masks=None):
    t, geom = deform_inputs(case, dtype, use_mask, bias, seed, dual=True)
    w, el = {k: wide(v) for k, v in t.items()}, laid(t, layout)
    fwd = ("input", "y", "offset", "weight", "weight_y", "bias", "bias_y", "mask")
    got = emu.dual_deform_conv2d(*[el[k] for k in fwd], *geom)
    want = CPU.dual_deform_conv2d(*[w[k] for k in fwd], *geom)
    for name, a, b in zip(("out_x", "out_y"), got, want):
        assert_matches(a, b, dtype, name)
    bwd = ("grad_out", "grad_out_y", "input", "y", "offset", "weight", "weight_y", "mask")
    names = ("x", "y", "offset", "weight_x", "weight_y", "bias_x", "bias_y", "mask")
    for mask in masks or itertools.product([False, True], repeat=8):
        got = emu.dual_deform_conv2d_backward(*[el[k] for k in bwd], *geom, list(mask))
        want = CPU.dual_deform_conv2d_backward(*[w[k] for k in bwd], *geom, list(mask))
        for name, a, b in zip(names, got, want):
            assert_matches(a, b, dtype, f"grad of {name}, mask {mask}")


def test_dual_deform_conv2d_every_mask(emu):
    check_dual(emu, (1, 2, 2, 1, 2, (2, 2), (1, 1), (1, 0), (1, 1), (3, 4)), torch.float64, True, seed=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_dual_deform_conv2d(emu, dtype, layout):
    check_dual(emu, DEFORM_CASES["awkward"], dtype, True, layout, seed=5, masks=[(True,) * 8, (False,) * 8])
    check_dual(emu, DEFORM_CASES["depthwise"], dtype, False, layout, bias=False, seed=6,
               masks=[(True, False, True, False, True, False, False, False)])


def test_dual_deform_conv2d_empty_and_grid_stride(emu, grid_cap):
    check_dual(emu, (0,) + DEFORM_CASES["3x3"][1:], torch.float64, True, masks=[(True,) * 8])
    grid_cap(2)
    check_dual(emu, DEFORM_CASES["wide"], torch.float64, True, seed=8, masks=[(True,) * 8])
