"""csfrn.ops.deform_conv2d / dual_deform_conv2d, their reference twins and csfrn.nn.DeformConv2d.

The ground truth is `expected_fn`, a per-element loop written from torchvision's definition of deformable
convolution (bilinear sampling, zeros outside, offsets (dy, dx) per tap, DCN v2 mask), differentiated by
autograd; torchvision.ops.deform_conv2d is checked beside it on random configurations. The kernel against the
twin on every device, gradcheck and opcheck: tests/test_ops.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import csfrn.nn
import csfrn.ops as ops
from conftest import CUDA_KERNELS, DEVICES, needs_cuda
from csfrn.ops import reference
from op_samples import (
    DEFORM,
    F64,
    check_autograd,
    deform_conv2d_sample,
    deform_conv2d_samples,
    dual_deform_conv2d_sample,
    kernel,
    lay,
    random_deform_config,
    routed,
)


# ---------------------------------------------------------------- the loop-based ground truth
def _bilinear(plane, y, x):
    h, w = plane.shape
    if not (-1 < float(y.detach()) < h and -1 < float(x.detach()) < w):
        return plane.new_zeros(())
    y0, x0 = math.floor(float(y.detach())), math.floor(float(x.detach()))
    ly, lx = y - y0, x - x0
    out = plane.new_zeros(())
    for yy, xx, wgt in (
        (y0, x0, (1 - ly) * (1 - lx)),
        (y0, x0 + 1, (1 - ly) * lx),
        (y0 + 1, x0, ly * (1 - lx)),
        (y0 + 1, x0 + 1, ly * lx),
    ):
        if 0 <= yy < h and 0 <= xx < w:
            out = out + wgt * plane[yy, xx]
    return out


def expected_fn(x, offset, weight, bias, stride, padding, dilation, mask):
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c_in, h, w = x.shape
    c_out, c_per_wg, kh, kw = weight.shape
    out_h = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    offset_groups = offset.shape[1] // (2 * kh * kw)
    c_per_og = c_in // offset_groups
    out_per_wg = c_out // (c_in // c_per_wg)
    rows = []
    for b in range(n):
        for co in range(c_out):
            for i in range(out_h):
                for j in range(out_w):
                    acc = x.new_zeros(())
                    for c in range(c_per_wg):
                        ci = (co // out_per_wg) * c_per_wg + c
                        og = ci // c_per_og
                        for di in range(kh):
                            for dj in range(kw):
                                tap = og * kh * kw + di * kw + dj
                                y = sh * i - ph + dh * di + offset[b, 2 * tap, i, j]
                                xx = sw * j - pw + dw * dj + offset[b, 2 * tap + 1, i, j]
                                m = 1.0 if mask is None else mask[b, tap, i, j]
                                acc = acc + m * weight[co, c, di, dj] * _bilinear(x[b, ci], y, xx)
                    rows.append(acc + (0 if bias is None else bias[co]))
    return torch.stack(rows).reshape(n, c_out, out_h, out_w) if rows else x.new_zeros(n, c_out, out_h, out_w)


def make_case(*, use_mask, device="cpu", dtype=F64, **config):
    """A deform_conv2d sample (tests/op_samples.py) as a dict by argument name, every tensor a leaf that requires
    grad: ``config`` a configuration (n, c_in, ... size, as in op_samples.DEFORM) and the builder's options."""
    sample = deform_conv2d_sample(**config, mask=use_mask, device=device, dtype=dtype, requires_grad=True)
    return dict(zip(sample.info.arg_names, sample.args))


def call(fn, case):
    return fn(
        case["input"],
        case["offset"],
        case["weight"],
        case["bias"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        mask=case["mask"],
    )


def call_expected(case):
    return expected_fn(
        case["input"],
        case["offset"],
        case["weight"],
        case["bias"],
        case["stride"],
        case["padding"],
        case["dilation"],
        case["mask"],
    )


def grads(out, case, grad_out):
    """The gradients of the tensors that require grad, by name."""
    names = [k for k in ("input", "offset", "weight", "bias", "mask") if case[k] is not None and case[k].requires_grad]
    gs = torch.autograd.grad(out, [case[k] for k in names], grad_out)
    return dict(zip(names, gs))


def assert_same(a, b, **tol):
    torch.testing.assert_close(a, b, **tol)


def assert_same_as_torchvision(case):
    """Our deform_conv2d and torchvision's on ``case``: outputs, and the gradients for one random upstream."""
    out, exp = call(ops.deform_conv2d, case), call(torchvision.ops.deform_conv2d, case)
    assert_same(out, exp)
    go = torch.randn_like(exp)
    got, want = grads(out, case, go), grads(exp, case, go)
    for name in want:
        assert_same(got[name], want[name], msg=name)


AWKWARD = DEFORM["awkward"]


# ---------------------------------------------------------------- forward and gradients vs the loop
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no_mask"])
def test_kernel_and_twin_match_loop(masked):
    """Every deform_conv2d sample with outputs (tests/op_samples.py; those with a mask, or those without): the
    kernel and the twin against the loop, forward and the gradients of what requires grad."""
    for sample in deform_conv2d_samples("cpu", F64, requires_grad=True):
        if (sample["mask"] is not None) != masked:
            continue
        exp = call_expected(sample)
        if not exp.numel():
            continue
        want = grads(exp, sample, sample.grads[0])
        for fn in (ops.deform_conv2d, reference.deform_conv2d):
            out = call(fn, sample)
            assert_same(out, exp, msg=f"{fn.__module__} {sample}")
            got = grads(out, sample, sample.grads[0])
            assert got.keys() == want.keys()
            for name in want:
                assert_same(got[name], want[name], msg=f"{fn.__module__} {sample}: grad of {name}")


def test_twin_empty_image():
    """H or W = 0 with padding that still gives outputs: the twin, like the kernels, returns the bias (it once
    gathered from the empty plane)."""
    sample = deform_conv2d_sample(2, 4, 3, 1, 2, (1, 1), (1, 1), (1, 1), (1, 1), (0, 5), requires_grad=True)
    check_autograd(sample, "cpu")


@pytest.mark.parametrize("n", [0, 1, 33])
def test_batch_sizes(n):
    config = dict(AWKWARD, n=n)
    case = make_case(**config, use_mask=True)
    out = call(ops.deform_conv2d, case)
    exp = call(torchvision.ops.deform_conv2d, case)
    assert out.shape == exp.shape == (n, 2, 2, 3)
    assert_same(out, exp)
    if n:
        go = torch.randn_like(exp)
        got, want = grads(out, case, go), grads(exp, case, go)
        for name in want:
            assert_same(got[name], want[name], msg=name)
    else:
        out.sum().backward()
        assert case["weight"].grad is not None and bool((case["weight"].grad == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_no_output_channels(device):
    # C_out = 0 once failed in the kernels' weight.view(..., -1) (ambiguous beside a zero size).
    case = make_case(**dict(AWKWARD, c_out=0), use_mask=True, device=device)
    (out,) = kernel("deform_conv2d", device)(*case.values())
    assert out.shape == (2, 0, 2, 3)
    got = grads(out, case, torch.randn_like(out))
    for name in ("input", "offset", "mask"):
        assert got[name].shape == case[name].shape and bool((got[name] == 0).all()), name
    assert got["weight"].shape == case["weight"].shape and got["bias"].shape == (0,)


@pytest.mark.parametrize("layout", ["permuted", "channels_last"])
def test_memory_layouts(layout):
    case = make_case(**AWKWARD, use_mask=True)
    exp = call_expected(case)
    laid = dict(case)
    for name in ("input", "offset", "mask"):
        t = case[name].detach()
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        else:  # same values, non-contiguous strides
            t = t.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
        assert not t.is_contiguous()
        laid[name] = t.requires_grad_()
    laid["weight"] = case["weight"].detach().permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3).requires_grad_()
    out = call(ops.deform_conv2d, laid)
    assert_same(out, exp)
    go = torch.randn_like(exp)
    got, want = grads(out, laid, go), grads(exp, case, go)
    for name in want:
        assert_same(got[name], want[name], msg=name)


@pytest.mark.parametrize("use_mask", [False, True])
def test_zero_offset_is_conv2d(use_mask):
    case = make_case(
        n=2,
        c_in=6,
        c_out=4,
        groups=2,
        offset_groups=3,
        k=(3, 2),
        stride=(2, 1),
        padding=(1, 1),
        dilation=(1, 2),
        size=(7, 6),
        use_mask=use_mask,
    )
    offset = torch.zeros_like(case["offset"])
    mask = torch.ones_like(case["mask"]) if use_mask else None
    out = ops.deform_conv2d(case["input"], offset, case["weight"], case["bias"], (2, 1), (1, 1), (1, 2), mask)
    exp = F.conv2d(case["input"], case["weight"], case["bias"], (2, 1), (1, 1), (1, 2), groups=2)
    assert_same(out, exp)


@pytest.mark.parametrize(
    "c_in,c_out,groups,offset_groups,size",
    [
        (512, 4, 1, 2, (32, 32)),  # 512 input channels x 3 x 3 taps: several pixel tiles per image in the CPU kernel
        (
            64,
            64,
            64,
            1,
            (24, 24),
        ),  # 64 one-channel groups in one offset group: the loops across channels run full vectors
    ],
    ids=["multi_tile", "depthwise"],
)
def test_float32_vs_torchvision(c_in, c_out, groups, offset_groups, size):
    case = make_case(
        n=2,
        c_in=c_in,
        c_out=c_out,
        groups=groups,
        offset_groups=offset_groups,
        k=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        size=size,
        use_mask=True,
        dtype=torch.float32,
    )
    out, exp = call(ops.deform_conv2d, case), call(torchvision.ops.deform_conv2d, case)
    assert_same(out, exp, rtol=1e-4, atol=1e-4)
    go = torch.randn_like(exp)
    got, want = grads(out, case, go), grads(exp, case, go)
    for name in want:
        assert_same(got[name], want[name], rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("seed", range(4))
def test_matches_torchvision(seed):
    config = random_deform_config(100 + seed)
    config["size"] = (config["size"][0] + 4, config["size"][1] + 5)
    case = make_case(**config, use_mask=seed % 2 == 1, bias=seed != 2, seed=seed)
    assert_same_as_torchvision(case)


def test_only_needed_gradients():
    case = make_case(**AWKWARD, use_mask=True)
    for name in ("input", "offset", "weight", "bias", "mask"):
        case[name].requires_grad_(name == "offset")
    out = call(ops.deform_conv2d, case)
    out.sum().backward()
    assert case["offset"].grad is not None
    assert all(case[k].grad is None for k in ("input", "weight", "bias", "mask"))
    go = torch.ones_like(out)
    grads_ = torch.ops.csfrn.deform_conv2d_backward.default(
        go,
        case["input"],
        case["offset"],
        case["weight"],
        case["mask"],
        [2, 1],
        [1, 0],
        [2, 1],
        [False, True, False, False, False],
    )
    assert [g.numel() for g in grads_] == [0, case["offset"].numel(), 0, 0, 0]
    assert_same(grads_[1], case["offset"].grad)


# ---------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph():
    case = make_case(**AWKWARD, use_mask=True)
    y = torch.randn(2, 6, 5, 4, dtype=F64, requires_grad=True)
    wy = torch.randn(6, 2, 3, 2, dtype=F64, requires_grad=True)

    def f(x, offset, weight, bias, mask, y, wy):
        a = ops.deform_conv2d(x, offset, weight, bias, (2, 1), (1, 0), (2, 1), mask)
        bx, by = ops.dual_deform_conv2d(x, y, offset, weight, wy, None, None, (2, 1), (1, 0), (2, 1), mask)
        return (a.relu() * 2).sum() + bx.sum() + (by**2).sum()

    inputs = [case["input"], case["offset"], case["weight"], case["bias"], case["mask"], y, wy]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    want = f(*inputs)
    assert_same(got, want)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        assert_same(a, b)


# ---------------------------------------------------------------- the dual op
@pytest.mark.parametrize("use_mask", [False, True])
def test_dual_equals_two_calls(backend, use_mask):
    sample = dual_deform_conv2d_sample(
        **AWKWARD, c_y=9, groups_y=3, c_out_y=6, mask=use_mask, seed=5, requires_grad=True
    )
    x, y, off, wx, wy, bx, by, mask = sample.args[:8]
    conv = dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1), mask=mask)
    with routed(backend):
        out_x, out_y = ops.dual_deform_conv2d(x, y, off, wx, wy, bx, by, **conv)
    exp_x = ops.deform_conv2d(x, off, wx, bx, **conv)
    exp_y = ops.deform_conv2d(y, off, wy, by, **conv)
    assert_same(out_x, exp_x)
    assert_same(out_y, exp_y)
    leaves = [t for t in (x, y, off, wx, wy, bx, by, mask) if t is not None]
    gx, gy = torch.randn_like(exp_x), torch.randn_like(exp_y)
    got = torch.autograd.grad((out_x, out_y), leaves, (gx, gy))
    want = torch.autograd.grad((exp_x, exp_y), leaves, (gx, gy))
    for a, b in zip(got, want):
        assert_same(a, b)


def test_dual_one_output_used():
    case = make_case(**AWKWARD, use_mask=False)
    y = torch.randn(2, 3, 5, 4, dtype=F64, requires_grad=True)
    wy = torch.randn(2, 3, 3, 2, dtype=F64, requires_grad=True)
    out_x, _ = ops.dual_deform_conv2d(
        case["input"], y, case["offset"], case["weight"], wy, None, None, (2, 1), (1, 0), (2, 1)
    )
    out_x.sum().backward()
    exp = ops.deform_conv2d(case["input"], case["offset"], case["weight"], None, (2, 1), (1, 0), (2, 1))
    (g_off,) = torch.autograd.grad(exp.sum(), [case["offset"]])
    assert_same(case["offset"].grad, g_off)
    assert wy.grad is None or bool((wy.grad == 0).all())


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("n", [1, 2])
def test_deterministic_cpu_backward(n):
    # n = 1: the image's pixels are split between threads, whose input-gradient parts are added afterwards.
    case = make_case(
        n=n,
        c_in=64,
        c_out=8,
        groups=1,
        offset_groups=2,
        k=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        size=(24, 24),
        use_mask=True,
        dtype=torch.float32,
    )
    y = torch.randn(n, 32, 24, 24, requires_grad=True)
    wy = torch.randn(8, 32, 3, 3, requires_grad=True)
    leaves = [case[k] for k in ("input", "offset", "weight", "bias", "mask")] + [y, wy]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            a = call(ops.deform_conv2d, case)
            bx, by = ops.dual_deform_conv2d(
                case["input"], y, case["offset"], case["weight"], wy, padding=1, mask=case["mask"]
            )
            runs.append(torch.autograd.grad(a.square().sum() + bx.sum() + by.square().sum(), leaves))
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    tv = torchvision.ops.deform_conv2d
    exp = call(tv, case)
    ex = tv(case["input"], case["offset"], case["weight"], None, padding=1, mask=case["mask"])
    ey = tv(y, case["offset"], wy, None, padding=1, mask=case["mask"])
    want = torch.autograd.grad(exp.square().sum() + ex.sum() + ey.square().sum(), leaves)
    for a, b in zip(runs[0], want):
        assert_same(a, b, rtol=1e-3, atol=1e-2)


# ---------------------------------------------------------------- CUDA
@needs_cuda
def test_cuda_autocast_devices_and_determinism():
    case = make_case(**AWKWARD, use_mask=True, dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = call(ops.deform_conv2d, case)
    assert out.dtype == torch.float16
    with pytest.raises(ValueError, match="all tensors must be on one device, got input on cuda:0, weight on cpu"):
        call(ops.deform_conv2d, dict(case, weight=case["weight"].detach().cpu()))
    out = call(ops.deform_conv2d, case)  # the forward outside: older torch also alerts on cuBLAS without a config
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out.sum().backward()  # no atomics left: nothing to alert about
    finally:
        torch.use_deterministic_algorithms(was)


def on(case, device, dtype=None):
    """The case's tensors as fresh leaves on `device` (and `dtype`)."""
    return {
        k: (v.detach().to(device=device, dtype=dtype or v.dtype).requires_grad_() if torch.is_tensor(v) else v)
        for k, v in case.items()
    }


def run_with_grads(case, go):
    out = call(ops.deform_conv2d, case)
    return out, grads(out, case, go.to(out.device, out.dtype))


def assert_cuda_like_cpu(case, **tol):
    """Forward and every gradient of the CUDA kernel against the CPU kernel, on the same float64 case."""
    cpu = on(case, "cpu")
    want_out = call(ops.deform_conv2d, cpu)
    go = torch.randn_like(want_out)
    want = grads(want_out, cpu, go)
    got_out, got = run_with_grads(on(case, "cuda"), go)
    assert got_out.is_cuda and got_out.is_contiguous()
    assert_same(got_out.cpu(), want_out, **tol)
    for name in want:
        assert_same(got[name].cpu(), want[name], msg=name, **tol)


@needs_cuda
@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_cuda_empty_image_with_padding(size):
    # H * W = 0 still has output pixels when padded. The CUDA im2col once read plane[0] of the (empty)
    # input for the corners outside, with weight 0: an illegal address on the device.
    case = make_case(
        n=2,
        c_in=4,
        c_out=3,
        groups=1,
        offset_groups=2,
        k=(1, 1),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        size=size,
        use_mask=True,
        scale=0.5,
    )
    assert_cuda_like_cpu(case)
    out = call(ops.deform_conv2d, on(case, "cuda"))
    torch.cuda.synchronize()
    assert_same(out.cpu(), case["bias"].detach().view(1, -1, 1, 1).expand_as(out.cpu()))


@pytest.mark.parametrize("device", CUDA_KERNELS)
def test_corners_outside_are_never_read(device):
    # An inf in pixel (0, 0) must reach only the samples whose bilinear corners include it. The CUDA im2col
    # once multiplied every corner outside the image by weight 0 and plane[0]: 0 * inf = NaN there.
    case = make_case(
        n=1,
        c_in=2,
        c_out=2,
        groups=1,
        offset_groups=1,
        k=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        size=(12, 12),
        use_mask=True,
        scale=0.5,
    )
    x = case["input"].detach().clone()
    x[:, :, 0, 0] = float("inf")
    case = dict(case, input=x)
    want = call(ops.deform_conv2d, on(case, "cpu")).detach()
    assert int(want.isfinite().sum()) > want.numel() // 2
    (got,) = kernel("deform_conv2d", device)(*on(case, "cpu" if device == "emu" else device).values())
    assert_same(got.detach().cpu(), want, rtol=1e-12, atol=1e-12, equal_nan=True)


@needs_cuda
@pytest.mark.parametrize("layout", ["permuted", "channels_last"])
def test_cuda_memory_layouts_and_empty_batch(layout):
    case = make_case(**AWKWARD, use_mask=True)
    laid = dict(case)
    for name in ("input", "offset", "mask", "weight"):
        t = case[name].detach()
        t = (
            t.contiguous(memory_format=torch.channels_last)
            if layout == "channels_last"
            else t.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
        )
        laid[name] = t
    # .cuda() keeps the strides
    cuda = {k: (v.detach().cuda().requires_grad_() if torch.is_tensor(v) else v) for k, v in laid.items()}
    assert not cuda["input"].is_contiguous()
    go = torch.randn(2, 2, 2, 3, dtype=F64)
    want_out, want = run_with_grads(on(case, "cpu"), go)
    got_out, got = run_with_grads(cuda, go)
    assert_same(got_out.cpu(), want_out)
    for name in want:
        assert_same(got[name].cpu(), want[name], msg=name)
    empty = on(make_case(**dict(AWKWARD, n=0), use_mask=True), "cuda")
    out = call(ops.deform_conv2d, empty)
    assert out.shape == (0, 2, 2, 3) and out.is_cuda
    out.sum().backward()
    assert empty["input"].grad.shape == empty["input"].shape and bool((empty["weight"].grad == 0).all())
    ox, oy = ops.dual_deform_conv2d(
        empty["input"],
        empty["input"],
        empty["offset"],
        empty["weight"],
        empty["weight"],
        padding=(1, 0),
        stride=(2, 1),
        dilation=(2, 1),
        mask=empty["mask"],
    )
    assert ox.shape == oy.shape == (0, 2, 2, 3)
    (ox.sum() + oy.sum()).backward()


@needs_cuda
def test_cuda_several_column_chunks_vs_torchvision():
    # The backward's workspace per image in float64: columns and their gradient (64 channels * 9 taps * 64 * 64
    # pixels * 8 bytes = 18.9 MB each), keys and sort (9.4 MB), samples (6.5 MB): 20 images per 1 GiB chunk, so
    # 31 images make two chunks (16 + 15); the weight gradient adds up across them.
    case = make_case(
        n=31,
        c_in=64,
        c_out=8,
        groups=2,
        offset_groups=2,
        k=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        size=(64, 64),
        use_mask=True,
        device="cuda",
        scale=1.0,
    )
    assert_same_as_torchvision(case)


@needs_cuda
def test_cuda_deterministic_without_alerts():
    import warnings

    case = make_case(**AWKWARD, use_mask=True, device="cuda")
    y = torch.randn(2, 6, 5, 4, dtype=F64, device="cuda", requires_grad=True)
    wy = torch.randn(3, 6, 3, 2, dtype=F64, device="cuda", requires_grad=True)
    leaves = [case[k] for k in ("input", "offset", "weight", "mask")] + [y, wy]
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warnings: older torch also alerts on cuBLAS

    def run():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            full = call(ops.deform_conv2d, case)
            ox, oy = ops.dual_deform_conv2d(
                case["input"], y, case["offset"], case["weight"], wy, None, None, (2, 1), (1, 0), (2, 1), case["mask"]
            )
            got = torch.autograd.grad(full.square().sum() + ox.sum() + oy.square().sum(), leaves)
        assert [str(w.message) for w in caught if "deform" in str(w.message)] == []
        return got

    try:
        first, again = run(), run()
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
    for a, b in zip(first, again):  # every gradient, the input's included: bitwise equal
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device():
    # The kernels must launch on their inputs' device (CUDAGuard), whatever the current device is.
    case = make_case(**AWKWARD, use_mask=True)
    go = torch.randn(2, 2, 2, 3, dtype=F64)
    want_out, want = run_with_grads(on(case, "cpu"), go)
    with torch.cuda.device(0):
        got_out, got = run_with_grads(on(case, "cuda:1"), go)
        assert got_out.device == torch.device("cuda:1")
        d1 = on(case, "cuda:1")
        ox, oy = ops.dual_deform_conv2d(
            d1["input"],
            d1["input"],
            d1["offset"],
            d1["weight"],
            d1["weight"],
            d1["bias"],
            None,
            (2, 1),
            (1, 0),
            (2, 1),
            d1["mask"],
        )
        (ox.sum() + oy.sum()).backward()
    torch.cuda.synchronize(1)
    assert_same(got_out.cpu(), want_out)
    for name in want:
        assert_same(got[name].cpu(), want[name], msg=name)
    assert_same(ox.detach().cpu(), want_out)


def test_autocast_rule_keeps_coordinates_float32():
    """The twin's copy of the C++ wrappers' rule (csrc/autocast/deform_conv_autocast.h; the C++ one runs under the
    emulation: test_cuda_emu.py::test_deform_autocast_keeps_offsets_float32)."""
    from csfrn.ops.deform_conv import autocast_dtype

    for amp in (torch.float16, torch.bfloat16):
        assert [autocast_dtype("cuda", n, amp) for n in ("input", "weight", "bias", "offset", "mask")] == [
            amp,
            amp,
            amp,
            torch.float32,
            torch.float32,
        ]
        assert {autocast_dtype("cpu", n, amp) for n in ("input", "offset", "mask")} == {torch.float32}


def test_cpu_autocast_offsets_float32():
    """Through the dispatcher on the CPU: a bfloat16 offset and mask reach the kernel as float32 (the gradients flow
    back to their dtype), as does everything else on the CPU."""
    case = make_case(**AWKWARD, use_mask=True, dtype=torch.float32)
    off = case["offset"].detach().to(torch.bfloat16).requires_grad_()
    mask = case["mask"].detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.deform_conv2d(case["input"], off, case["weight"], case["bias"], (2, 1), (1, 0), (2, 1), mask)
    exp = ops.deform_conv2d(
        case["input"], off.detach().float(), case["weight"], case["bias"], (2, 1), (1, 0), (2, 1), mask.detach().float()
    )
    assert out.dtype == torch.float32 and torch.equal(out, exp)
    g_off, g_mask = torch.autograd.grad(out.sum(), [off, mask])
    assert g_off.dtype == g_mask.dtype == torch.bfloat16


def test_cpu_autocast_runs_float32():
    case = make_case(**AWKWARD, use_mask=True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.deform_conv2d(
            case["input"].to(torch.bfloat16),
            case["offset"],
            case["weight"],
            case["bias"],
            (2, 1),
            (1, 0),
            (2, 1),
            case["mask"],
        )
    assert out.dtype == torch.float32
    exp = call(ops.deform_conv2d, dict(case, input=case["input"].to(torch.bfloat16).float()))
    assert_same(out, exp)


@pytest.mark.parametrize("dual", [False, True], ids=["single", "dual"])
@pytest.mark.parametrize(
    "device,amp",
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.bfloat16, marks=needs_cuda),
        pytest.param("cuda", torch.float16, marks=needs_cuda),
    ],
)
def test_use_reference_under_autocast(device, amp, dual):
    """The twin path applies the C++ autocast wrapper's rule (csrc/deform_conv_autocast.cpp): every floating-point
    argument but float64 runs in float32 on CPU and in the autocast dtype on CUDA, so a low-precision offset beside
    float32 weights works, and the twin agrees with the kernel, forward and backward."""
    case = on(make_case(**AWKWARD, use_mask=True, dtype=torch.float32), device)
    y = torch.randn(2, 6, 5, 4, generator=torch.Generator().manual_seed(3)).to(device)
    wy = torch.randn(4, 3, 3, 2, generator=torch.Generator().manual_seed(4)).to(device)  # groups 2 for y
    run_dtype = torch.float32 if device == "cpu" else amp
    tol = 1e-4 if run_dtype == torch.float32 else 5e-2

    def run():
        leaves = on(dict(case, offset=case["offset"].to(amp)), device)
        args = (leaves["input"], leaves["offset"], leaves["weight"])
        with torch.autocast(device, dtype=amp):
            if dual:
                outs = ops.dual_deform_conv2d(
                    args[0], y, args[1], args[2], wy, leaves["bias"], None, (2, 1), (1, 0), (2, 1), leaves["mask"]
                )
            else:
                outs = (ops.deform_conv2d(*args, leaves["bias"], (2, 1), (1, 0), (2, 1), leaves["mask"]),)
            loss = sum(o.float().square().sum() for o in outs)
        names = ["input", "offset", "weight", "bias", "mask"]
        return outs, dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))

    outs, got = run()
    with ops.use_reference():
        ref_outs, ref_got = run()
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype == run_dtype
        assert_same(r.float(), o.float(), rtol=tol, atol=tol * max(1.0, float(o.detach().abs().max())))
    for name in got:
        assert ref_got[name].dtype == got[name].dtype
        if run_dtype == torch.float32:  # low-precision gradients differ by rounding wherever a sample crosses
            assert_same(ref_got[name], got[name], rtol=1e-4, atol=1e-3, msg=name)  # a grid line
        else:
            assert bool(ref_got[name].isfinite().all())


AUTOCAST_DEVICES = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.bfloat16, marks=needs_cuda),
    pytest.param("cuda", torch.float16, marks=needs_cuda),
]


@pytest.mark.parametrize("device,amp", AUTOCAST_DEVICES)
def test_backward_inside_autocast_stays_float32(device, amp):
    """A float32 forward's backward run inside torch.autocast: the kernels' own matmuls must not be autocast (they
    would hand half-precision columns to the float32 scatter kernel, or silently round the gradients)."""
    case = make_case(**AWKWARD, use_mask=True, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(8)
    y = torch.randn(2, 6, 5, 4, generator=gen).to(device).requires_grad_()
    wy = torch.randn(4, 3, 3, 2, generator=gen).to(device).requires_grad_()  # groups 2 for y
    leaves = [case[k] for k in ("input", "offset", "weight", "bias", "mask")] + [y, wy]

    def loss():
        out = call(ops.deform_conv2d, case)
        ox, oy = ops.dual_deform_conv2d(
            case["input"], y, case["offset"], case["weight"], wy, None, None, (2, 1), (1, 0), (2, 1), case["mask"]
        )
        return out.square().sum() + (ox * oy[:, :2]).sum()

    want = torch.autograd.grad(loss(), leaves)
    first = loss()
    with torch.autocast(device, dtype=amp):
        got = torch.autograd.grad(first, leaves)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert_same(g, w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input
def _bad_cases():
    base = make_case(**AWKWARD, use_mask=True)
    base = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in base.items()}
    yield (
        "offset channels",
        dict(offset=base["offset"][:, :35]),
        r"offset must have 2 \* offset_groups \* kh \* kw channels.*got 35",
    )
    yield (
        "offset size",
        dict(offset=base["offset"][:, :, :1]),
        r"offset must have spatial size \[H_out, W_out\] = \[2, 3\].*got \[1, 3\]",
    )
    yield "offset batch", dict(offset=base["offset"][:1]), r"offset must have batch size 2"
    yield (
        "mask size",
        dict(mask=base["mask"][..., :2]),
        r"mask must have spatial size \[H_out, W_out\] = \[2, 3\].*got \[2, 2\]",
    )
    yield (
        "mask channels",
        dict(mask=base["mask"][:, :17]),
        r"mask must have offset_groups \* kh \* kw = 18 channels, got 17",
    )
    yield (
        "weight channels",
        dict(weight=torch.randn(2, 4, 3, 2, dtype=F64)),
        r"weight.shape\[1\] \(C_in / groups\) must divide the 6 channels of input",
    )
    yield (
        "out channels",
        dict(weight=torch.randn(3, 3, 3, 2, dtype=F64), bias=None),
        r"weight.shape\[0\] \(C_out\) must be divisible by groups = 2",
    )
    yield (
        "offset groups",
        dict(offset=torch.randn(2, 48, 2, 3, dtype=F64), mask=None),
        r"offset_groups = offset.shape\[1\] / \(2 \* kh \* kw\) = 4 must divide the 6 channels of input",
    )
    yield "bias", dict(bias=torch.randn(3, dtype=F64)), r"bias must be a 1-D tensor of size 2"
    # Zero channels / an empty kernel once divided by zero in the C++ checks (SIGFPE, the process died).
    yield "no channels", dict(input=base["input"][:, :0]), r"input must have at least one channel"
    yield (
        "empty kernel",
        dict(weight=torch.randn(2, 3, 0, 2, dtype=F64)),
        r"weight must have a kernel size \[kh, kw\] of at least \[1, 1\]",
    )
    yield "dtype", dict(offset=base["offset"].float()), r"all floating-point tensors must share one dtype"
    yield "device", dict(weight=base["weight"].to("meta")), r"all tensors must be on one device"
    yield "integer input", dict(input=base["input"].long()), r"input must be a floating-point tensor"
    yield "rank", dict(input=base["input"][0]), r"input must be a 4-D tensor \[N, C_in, H, W\]"
    yield "stride", dict(stride=(0, 1)), r"stride must be >= 1, got \[0, 1\]"
    yield "output size", dict(padding=(0, 0), dilation=(3, 3)), r"the output size must be positive"


BAD = list(_bad_cases())


@pytest.mark.parametrize("name,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, change, message):
    case = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in make_case(**AWKWARD, use_mask=True).items()}
    case.update(change)
    with routed(backend), pytest.raises(ValueError, match=message):
        call(ops.deform_conv2d, case)


def _bad_dual_cases():
    x = torch.randn(2, 6, 5, 4, dtype=F64)
    y = torch.randn(2, 4, 5, 4, dtype=F64)
    off = torch.randn(2, 24, 2, 3, dtype=F64)  # offset_groups 2
    wx, wy = torch.randn(2, 3, 3, 2, dtype=F64), torch.randn(2, 4, 3, 2, dtype=F64)
    base = dict(x=x, y=y, offset=off, weight_x=wx, weight_y=wy)
    yield (
        "y size",
        dict(base, y=torch.randn(2, 4, 5, 5, dtype=F64)),
        r"y must have the batch and spatial size of x \[N, H, W\] = \[2, 5, 4\]",
    )
    yield (
        "kernel",
        dict(base, weight_y=torch.randn(2, 4, 2, 2, dtype=F64)),
        r"weight_y must have the kernel size of weight_x \[kh, kw\] = \[3, 2\], got \[2, 2\]",
    )
    yield (
        "y offset groups",
        dict(base, y=torch.randn(2, 3, 5, 4, dtype=F64), weight_y=torch.randn(2, 3, 3, 2, dtype=F64)),
        r"offset_groups = .* = 2 must divide the 3 channels of y",
    )
    yield (
        "weight_y channels",
        dict(base, weight_y=torch.randn(2, 3, 3, 2, dtype=F64)),
        r"weight_y.shape\[1\] \(C_in / groups\) must divide the 4 channels of y",
    )
    yield "y dtype", dict(base, y=y.float()), r"all floating-point tensors must share one dtype"


BAD_DUAL = list(_bad_dual_cases())


@pytest.mark.parametrize("name,args,message", BAD_DUAL, ids=[b[0] for b in BAD_DUAL])
def test_bad_dual_input(backend, name, args, message):
    with routed(backend), pytest.raises(ValueError, match=message):
        ops.dual_deform_conv2d(
            args["x"],
            args["y"],
            args["offset"],
            args["weight_x"],
            args["weight_y"],
            stride=(2, 1),
            padding=(1, 0),
            dilation=(2, 1),
        )


def test_bad_input_fake_kernel_and_cpu_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in make_case(**AWKWARD, use_mask=True).items()}
    with FakeTensorMode() as mode:
        fake = {k: (mode.from_tensor(v) if torch.is_tensor(v) else v) for k, v in case.items()}
        fake["offset"] = fake["offset"][:, :35]
        with pytest.raises(ValueError, match=r"offset must have 2 \* offset_groups"):
            call(ops.deform_conv2d, fake)
    with pytest.raises(ValueError, match=r"input must be float32 or float64 on the CPU, got dtype Half"):
        call(ops.deform_conv2d, {k: (v.half() if torch.is_tensor(v) else v) for k, v in case.items()})
    with pytest.raises(ValueError, match=r"stride must be an int or a pair of ints"):
        ops.deform_conv2d(case["input"], case["offset"], case["weight"], stride=(1, 2, 3))


# ---------------------------------------------------------------- layouts of the offset and the mask
def _laid_coords(sample, layout, input_layout="channels_last"):
    """The sample with its input(s) in input_layout and its offset and mask in layout (tests/op_samples.py: lay)."""
    names = sample.info.arg_names
    inputs = names[:2] if sample.op == "dual_deform_conv2d" else names[:1]
    changes = {n: lay(sample[n], input_layout) for n in inputs}
    changes |= {n: lay(sample[n], layout) for n in ("offset", "mask") if sample[n] is not None}
    return sample.replace(**changes)


def _layout(t):
    """t's strides along its dims of more than one element (a size-1 dim's stride places nothing: a 1 x 1 weight's
    gradient comes back from the kernels' .contiguous() with other strides there than torch.empty_like gives)."""
    return tuple(st if sz > 1 else None for sz, st in zip(t.shape, t.stride()))


@pytest.mark.parametrize("op", ["deform_conv2d", "dual_deform_conv2d"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "permuted"])
@pytest.mark.parametrize(
    "n,k,size", [(2, (3, 2), (5, 4)), (0, (3, 2), (5, 4)), (2, (1, 1), (0, 4))], ids=["plain", "batch0", "H0"]
)
def test_fake_kernels_give_the_kernels_strides(op, layout, n, k, size):
    """Under FakeTensorMode (torch.compile's shapes) the forward and backward ops give every output with the
    strides the CPU kernels give it, for the offset and mask in each layout beside a channels_last input: the
    offset's and the mask's gradients in their memory format, the rest as before; every output mask."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    build = deform_conv2d_sample if op == "deform_conv2d" else dual_deform_conv2d_sample
    sample = _laid_coords(build(n, 6, 2, 2, 3, k, (2, 1), (1, 1), (2, 1), size, seed=5), layout)
    info = sample.info
    args = sample.detached().args
    fwd, bwd = getattr(torch.ops.csfrn, op), getattr(torch.ops.csfrn, info.backward)
    outs = fwd(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    count = len(info.differentiable)
    for mask in ([True] * count, [i % 2 == 1 for i in range(count)]):
        real = [outs, bwd(*info.backward_args(args, outs, sample.grads, mask))]
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if torch.is_tensor(a) else a for a in args]
            fake_grads = [mode.from_tensor(g) for g in sample.grads]
            fake_outs = fwd(*fake_args)
            fake_outs = fake_outs if isinstance(fake_outs, tuple) else (fake_outs,)
            fake = [fake_outs, bwd(*info.backward_args(fake_args, fake_outs, fake_grads, mask))]
        for r, f, what in zip(real, fake, ("outputs", "gradients")):
            for i, (a, b) in enumerate(zip(r, f)):
                assert (a.shape, _layout(a), a.dtype) == (b.shape, _layout(b), b.dtype), (what, i, mask)
        grads = dict(zip(info.differentiable, real[1]))
        for name in ("offset", "mask"):
            if grads[name].numel() and layout == "channels_last":
                assert grads[name].is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.parametrize("op", ["deform_conv2d", "dual_deform_conv2d"])
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_coords_against_twin_and_gradcheck(op, device):
    """float64, a small case with a channels_last input, offset and mask (the emulated CUDA kernels too): the
    outputs and gradients against the twin, the gradients of the offset and mask channels_last, and gradcheck."""
    build = deform_conv2d_sample if op == "deform_conv2d" else dual_deform_conv2d_sample
    base = build(1, 4, 2, 2, 2, (2, 2), (1, 1), (1, 0), (1, 1), (4, 3), seed=6, device=device, requires_grad=True)
    sample = _laid_coords(base, "channels_last")
    sample = sample.replace(**{n: t.detach().requires_grad_() for n, t in sample.leaves().items()})
    check_autograd(sample, device)
    leaves = sample.leaves()
    names = list(leaves)
    assert leaves["offset"].is_contiguous(memory_format=torch.channels_last) and not leaves["offset"].is_contiguous()

    def f(*tensors):
        return kernel(op, device)(*sample.replace(**dict(zip(names, tensors))).args)

    outs = f(*leaves.values())
    grads = torch.autograd.grad(
        [outs[i] for i in sample.info.grad_outputs], [leaves["offset"], leaves["mask"]], list(sample.grads)
    )
    for g in grads:
        assert g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()
    assert torch.autograd.gradcheck(f, list(leaves.values()))


# ---------------------------------------------------------------- the module and the switch
def test_module():
    torch.manual_seed(0)
    m = csfrn.nn.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2).double()
    assert m.weight.shape == (4, 3, 3, 2) and m.bias.shape == (4,)
    assert repr(m) == (
        "DeformConv2d(6, 4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2)"
    )
    assert repr(csfrn.nn.DeformConv2d(3, 5, 3, bias=False)) == (
        "DeformConv2d(3, 5, kernel_size=(3, 3), stride=(1, 1), bias=False)"
    )
    bound = 1 / math.sqrt(3 * 3 * 2)  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(m.weight.detach().abs().max()) <= bound and float(m.bias.detach().abs().max()) <= bound
    assert float(m.weight.detach().std()) > bound / 4
    case = make_case(**AWKWARD, use_mask=True)
    x, off, mask = case["input"], case["offset"], case["mask"]
    off = torch.cat([off, off[:, :12]], 1)[:, :36]
    out = m(x, off, mask)
    exp = torchvision.ops.deform_conv2d(x, off, m.weight, m.bias, (2, 1), (1, 0), (2, 1), mask)
    assert_same(out, exp)
    out.sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None
    with pytest.raises(ValueError, match="in_channels must be divisible by groups"):
        csfrn.nn.DeformConv2d(5, 4, 3, groups=2)


def test_use_reference_routes_to_twin(monkeypatch):
    calls = []
    real = reference.deform_conv2d
    monkeypatch.setattr(reference, "deform_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = make_case(**AWKWARD, use_mask=True)
    with ops.use_reference():
        out = call(ops.deform_conv2d, case)
    assert calls and out.grad_fn is not None and "csfrn" not in type(out.grad_fn).__name__
    assert_same(out, call(ops.deform_conv2d, case))
