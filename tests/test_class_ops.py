"""class_avg_pool and center_distance: what the sample-driven checks (tests/test_ops.py: kernel vs twin on every
device, gradcheck, opcheck) do not cover: larger cases, counts by hand, the CPU kernels' vector paths and register
blocks, edge cases, torch.compile, autocast, determinism, bad input, and the CUDA kernels' particulars."""

import os
import subprocess
import sys

import pytest
import torch

import csfrn.ops as ops
from conftest import CUDA_KERNELS, DEVICES, needs_cuda
from csfrn.ops import reference
from op_samples import (
    BAD_LABELS,
    F64,
    OPS,
    center_distance_sample,
    check_autograd,
    check_ops,
    class_avg_pool_sample,
    kernel,
    output_masks,
    random_labels,
    routed,
    torch_device,
    twin,
)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def distance_inputs(n, d, h, w, k, seed, dtype=F64, device="cpu"):
    """embeddings, centers, margins of a center_distance sample."""
    return list(center_distance_sample(n, d, h, w, k, seed=seed, dtype=dtype, device=device).args[:3])


# ---------------------------------------------------------------- both ops, larger than the samples
@pytest.mark.parametrize(
    "n,d,h,w,k",
    [(3, 4, 33, 65, 19), (2, 33, 6, 7, 256), (1, 3, 5, 6, 171)],
    ids=["pixel_chunks", "256_classes", "171_classes"],
)
def test_larger_cases_match_twin(n, d, h, w, k):
    """More than one pixel chunk of the CPU kernels, 256 classes with 33 channels, more classes than pixels
    (float64, as in tests/test_ops.py)."""
    check_autograd(class_avg_pool_sample(n, d, h, w, k, absent=(2,), seed=k, requires_grad=True), "cpu")
    check_autograd(center_distance_sample(n, d, h, w, k, delta=3.5, seed=k, requires_grad=True), "cpu")


# ---------------------------------------------------------------- class_avg_pool
def test_class_avg_pool_counts_by_hand():
    features = torch.arange(2 * 4 * 1, dtype=torch.float64).reshape(1, 2, 2, 2)  # channels 0..3, 4..7
    labels = torch.tensor([[[0, 2], [255, 2]]])
    means, counts = ops.class_avg_pool(features, labels, 3)
    assert counts.tolist() == [[1.0, 0.0, 2.0]]
    assert means.tolist() == [[[0.0, 4.0], [0.0, 0.0], [2.0, 6.0]]]


def test_class_avg_pool_empty_batch_and_all_ignored():
    means, counts = ops.class_avg_pool(torch.randn(0, 4, 3, 3), torch.zeros(0, 3, 3, dtype=torch.long), 5)
    assert means.shape == (0, 5, 4) and counts.shape == (0, 5)
    features = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.full((2, 3, 3), 255)
    labels[1, 0, 0] = 3
    means, counts = ops.class_avg_pool(features, labels, 5)
    assert counts[0].sum() == 0 and (means[0] == 0).all()
    torch.testing.assert_close(means[1, 3], features[1, :, 0, 0])
    (grad,) = torch.autograd.grad(means.sum(), features)
    assert grad[0].abs().sum() == 0 and grad[1, :, 0, 0].eq(1).all()


def test_twin_no_channels():
    """D = 0: the twin, like the kernels, returns [N, K, 0] means (it once reshaped to the ambiguous (D, -1))."""
    check_autograd(class_avg_pool_sample(2, 0, 4, 5, 4, requires_grad=True), "cpu")


def test_class_avg_pool_custom_ignore_index_and_float32():
    features, labels = class_avg_pool_sample(2, 4, 6, 6, 3, ignore_index=-1, dtype=torch.float32, seed=3).args[:2]
    means, counts = ops.class_avg_pool(features, labels, 3, ignore_index=-1)
    ref_means, ref_counts = reference.class_avg_pool(features, labels, 3, ignore_index=-1)
    torch.testing.assert_close(means, ref_means)
    torch.testing.assert_close(counts, ref_counts)
    assert means.dtype == counts.dtype == torch.float32


VECTOR_CASES = [  # (N, D, H, W, K, ignore_index): float32 NCHW takes the AVX-512 loops where torch runs AVX-512
    (2, 16, 50, 53, 19, 255),  # two pixel chunks, the second ending in a partial 16-pixel tile
    (1, 33, 9, 7, 31, 255),  # 16-channel blocks plus a leftover channel; K + 1 = 32 rows fill the permute table
    (2, 48, 11, 13, 32, 3),  # K + 1 = 33: the lookup's portable loop; ignore_index inside [0, K)
    (1, 20, 17, 19, 150, 255),
    (2, 16, 4, 3, 1, 255),  # fewer pixels than one tile
]


def check_float32_pool(n, d, h, w, k, ignore_index, seed=0, blocky=False, channel_stride=1):
    """float32 kernel vs the float64 twin on the same (upcast) inputs."""
    sample = class_avg_pool_sample(
        n,
        d,
        h,
        w,
        k,
        absent=(0,) if k > 2 else (),
        channel_stride=channel_stride,
        seed=seed,
        dtype=torch.float32,
        requires_grad=True,
    )
    features, labels = sample.args[:2]
    if blocky:  # runs of one class, as real label maps have: consecutive pixels hit the same class row
        labels = labels[:, :, :1].expand(n, h, w).contiguous()
    labels[labels == 255] = ignore_index
    means, counts = ops.class_avg_pool(features, labels, k, ignore_index)
    f64 = features.detach().double().requires_grad_()
    ref_means, ref_counts = reference.class_avg_pool(f64, labels, k, ignore_index)
    torch.testing.assert_close(means.double(), ref_means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(counts.double(), ref_counts, rtol=0, atol=0)
    upstream = sample.grads[0]
    (grad,) = torch.autograd.grad(means, features, upstream)
    (ref_grad,) = torch.autograd.grad(ref_means, f64, upstream.double())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def check_bad_label_positions():
    """A bad label anywhere (first, middle or last lane of an 8-label vector, the partial last vector, a second
    pixel chunk) is reported with its value; an ignore_index outside [0, K), negative too, is not."""
    f = torch.randn(1, 2, 61, 67)  # 4087 pixels: two chunks, the last vector partial
    for ignore_index in (255, -1):
        for position in (0, 7, 8, 2051, 4080, 4086):
            for value in (5, -3, 1 << 40):
                labels = torch.randint(0, 5, (1, 61, 67))
                labels.view(-1)[::13] = ignore_index
                labels.view(-1)[position] = value
                with pytest.raises(ValueError, match=f"value {value}$"):
                    ops.class_avg_pool(f, labels, 5, ignore_index)
        labels.view(-1)[position] = ignore_index
        means, counts = ops.class_avg_pool(f, labels, 5, ignore_index)
        assert counts.sum() == (labels != ignore_index).sum()


def test_class_avg_pool_bad_label_positions():
    check_bad_label_positions()


@pytest.mark.parametrize("n,d,h,w,k,ignore_index", VECTOR_CASES)
@pytest.mark.parametrize("blocky", [False, True])
def test_class_avg_pool_float32_vector_paths(n, d, h, w, k, ignore_index, blocky):
    check_float32_pool(n, d, h, w, k, ignore_index, seed=k, blocky=blocky)
    check_float32_pool(n, d, h, w, k, ignore_index, seed=k + 1, channel_stride=2)


def test_class_avg_pool_float32_portable_loops():
    """The same checks with torch (and so our kernels) limited to AVX2: the loops every other CPU runs."""
    code = (
        "import test_class_ops as t, torch; assert torch.backends.cpu.get_cpu_capability() != 'AVX512';"
        "[t.check_float32_pool(*c, blocky=b) for c in t.VECTOR_CASES for b in (False, True)];"
        "t.check_bad_label_positions()"
    )
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY="avx2",
        PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("device", [*DEVICES, "twin"])
def test_class_avg_pool_validate_false_ignores_bad_labels(device):
    """validate=False: a pixel whose label is outside [0, K) and not ignore_index (any int64, at the first, a middle
    or the last pixel) is ignored exactly like ignore_index: the same means and counts bit for bit, a zero gradient
    there. validate=True, given explicitly, still raises naming the value."""
    run = twin("class_avg_pool") if device == "twin" else kernel("class_avg_pool", device)
    sample = class_avg_pool_sample(2, 4, 9, 11, 5, seed=51, device="cpu" if device == "twin" else device)
    features, labels = sample.args[:2]
    upstream = sample.grads[0]

    def pool(lab, validate):
        f = features.clone().requires_grad_()
        means, counts = run(f, lab, 5, 255, validate)
        return means, counts, torch.autograd.grad(means, f, upstream)[0]

    for value in BAD_LABELS:
        for position in (0, 101, labels.numel() - 1):
            bad, ignored = labels.clone(), labels.clone()
            bad.view(-1)[position], ignored.view(-1)[position] = value, 255
            got, want = pool(bad, False), pool(ignored, True)
            for a, b in zip(got, want):
                assert torch.equal(a, b), (value, position)
            assert got[2].reshape(2, 4, -1)[position // 99, :, position % 99].eq(0).all()
            with pytest.raises(ValueError, match=f"got label value {value}$"):
                run(features, bad, 5, 255, True)


@pytest.mark.parametrize("op", ["class_avg_pool", "center_distance"])
def test_outputs_written_in_full(op):
    """The CPU kernels make their outputs with at::empty: under torch.use_deterministic_algorithms torch fills
    such memory with NaN, so an element a kernel does not write (an absent class's mean, an empty image's counts,
    a gradient) shows. Every sample, float64 and float32, every output mask."""
    assert torch.utils.deterministic.fill_uninitialized_memory
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for dtype in (F64, torch.float32):
            for sample in OPS[op].sample_inputs("cpu", dtype, requires_grad=False):
                check_ops(sample, "cpu", masks=output_masks(sample))
    finally:
        torch.use_deterministic_algorithms(before)


# ---------------------------------------------------------------- center_distance
BLOCK_CASES = [  # (N, D, H, W, K): the CPU kernels' register blocks and every leftover path
    (2, 32, 23, 29, 19),  # 3 pixel chunks, the last 155 pixels (two 64-pixel groups + 27); K = 8 + 8 + 2 + 1
    (1, 20, 17, 31, 11),  # 16 channels + 4 past the last group of 16; 4 channel rows past the blocks of 8
    (1, 16, 16, 16, 8),  # whole blocks only
]


@pytest.mark.parametrize("n,d,h,w,k", BLOCK_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_center_distance_register_blocks(n, d, h, w, k, dtype, layout):
    sample = center_distance_sample(n, d, h, w, k, seed=n * 100 + d + k, dtype=dtype)
    embeddings, centers, margins = sample.args[:3]
    embeddings = embeddings.contiguous(memory_format=layout)
    upstream = sample.grads[0].double()
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for mask in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        inputs = [t.detach().requires_grad_(m) for t, m in zip((embeddings, centers, margins), mask)]
        phi = ops.center_distance(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = torch.autograd.grad(phi, wanted, upstream.to(dtype))
        ref_inputs = [t.detach().double().requires_grad_(m) for t, m in zip(inputs, mask)]
        ref = reference.center_distance(*ref_inputs)
        ref_grads = torch.autograd.grad(ref, [t for t in ref_inputs if t.requires_grad], upstream)
        torch.testing.assert_close(phi.double(), ref, **tol)
        for got, want in zip(grads, ref_grads):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), want, **tol)


def test_center_distance_layouts_and_edge_cases():
    embeddings, centers, margins = distance_inputs(2, 6, 7, 8, 4, seed=13)
    cl = embeddings.contiguous(memory_format=torch.channels_last).requires_grad_()
    phi = ops.center_distance(cl, centers, margins)
    torch.testing.assert_close(phi, reference.center_distance(embeddings, centers, margins))
    (grad,) = torch.autograd.grad(phi.sum(), cl)
    (want,) = torch.autograd.grad(
        reference.center_distance(embeddings.requires_grad_(), centers, margins).sum(), embeddings
    )
    torch.testing.assert_close(grad, want)
    # batch 0 and no classes
    assert ops.center_distance(torch.randn(0, 3, 4, 4), torch.randn(0, 2, 3), torch.randn(0, 2)).shape == (0, 2, 4, 4)
    for n, d in ((0, 3), (2, 0)):  # the backward of an empty batch / no channels once failed in a reshape
        inputs = [
            torch.randn(n, d, 4, 4, requires_grad=True),
            torch.randn(n, 2, d, requires_grad=True),
            torch.randn(n, 2, requires_grad=True),
        ]
        grads = torch.autograd.grad(ops.center_distance(*inputs).sum(), inputs)
        assert [gr.shape for gr in grads] == [t.shape for t in inputs]
        assert all(bool(gr.eq(0).all()) for gr in grads)
    e = torch.randn(1, 3, 4, 4, requires_grad=True)
    phi = ops.center_distance(e, torch.randn(1, 0, 3), torch.randn(1, 0))
    assert phi.shape == (1, 0, 4, 4)
    (grad,) = torch.autograd.grad(phi.sum(), e)
    assert grad.eq(0).all()
    # phi is 0 at the centre and grows to 1 far away
    e = torch.zeros(1, 2, 1, 2)
    e[0, :, 0, 1] = 100.0
    phi = ops.center_distance(e, torch.zeros(1, 1, 2), torch.zeros(1, 1))
    assert phi[0, 0, 0, 0] == 0 and phi[0, 0, 0, 1] == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_center_distance_no_classes_zero_gradient_with_inf(device, dtype):
    """K = 0: phi is empty, so every gradient is zero, also where an embedding is inf (not inf * 0 = NaN)."""
    e, s, m = distance_inputs(2, 3, 4, 5, 0, seed=19, dtype=dtype, device=device)
    e[0, 1, 2, 3], e[1, 0, 0, 0] = float("inf"), float("-inf")
    e, s, m = e.requires_grad_(), s.requires_grad_(), m.requires_grad_()
    (phi,) = kernel("center_distance", device)(e, s, m, 10.0)
    assert phi.shape == (2, 0, 4, 5)
    grads = torch.autograd.grad(phi.sum(), [e, s, m])
    assert [g.shape for g in grads] == [e.shape, s.shape, m.shape]
    assert bool(grads[0].eq(0).all())


# ---------------------------------------------------------------- op machinery
def test_torch_compile_fullgraph():
    def centre_loss(embeddings, margin_map, labels):
        stacked = torch.cat([embeddings, margin_map], 1)
        means, counts = ops.class_avg_pool(stacked, labels, 5)
        phi = ops.center_distance(embeddings, means[..., :-1], means[..., -1])
        return (phi * counts[..., None, None]).mean()

    g = seeded(4)
    embeddings = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    margin_map = torch.randn(2, 1, 6, 6, generator=g, requires_grad=True)
    labels = random_labels(g, 2, 6, 6, 5)
    compiled = torch.compile(centre_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(embeddings, margin_map, labels)
    grads = torch.autograd.grad(loss, (embeddings, margin_map))
    want = centre_loss(embeddings, margin_map, labels)
    want_grads = torch.autograd.grad(want, (embeddings, margin_map))
    torch.testing.assert_close(loss, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "device,amp",
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.bfloat16, marks=needs_cuda),
        pytest.param("cuda", torch.float16, marks=needs_cuda),
    ],
)
def test_float32_inside_autocast_stays_float32(device, amp):
    """Neither op has an autocast rule, so float32 inputs run in float32 inside torch.autocast, and so must the
    backward: the kernels' own ATen calls (the CUDA centre-distance matmuls) must not be autocast."""
    features, labels = class_avg_pool_sample(2, 6, 9, 11, 5, seed=27, dtype=torch.float32, device=device).args[:2]
    sample = center_distance_sample(2, 6, 9, 11, 5, seed=28, dtype=torch.float32, device=device)
    dist, up = sample.args[:3], sample.grads[0]

    def run():
        f = features.clone().requires_grad_()
        inputs = [t.clone().requires_grad_() for t in dist]
        means, counts = ops.class_avg_pool(f, labels, 5)
        phi = ops.center_distance(*inputs, delta=2.0)
        grads = torch.autograd.grad((means * means).sum() + (phi * up).sum(), [f, *inputs])
        return [means, counts, phi, *grads]

    want = run()
    with torch.autocast(device, dtype=amp):
        got = run()
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_use_reference_routes_to_twins(monkeypatch):
    called = []
    monkeypatch.setattr(reference, "center_distance", lambda *a, **k: called.append(1) or torch.zeros(1))
    inputs = distance_inputs(1, 2, 3, 3, 2, seed=0)
    with ops.use_reference():
        ops.center_distance(*inputs)
    ops.center_distance(*inputs)
    assert called == [1]


def test_deterministic_across_thread_counts():
    features, labels = class_avg_pool_sample(2, 16, 70, 70, 19, seed=17, dtype=torch.float32).args[:2]
    inputs = [t.requires_grad_() for t in distance_inputs(2, 16, 70, 70, 19, seed=18, dtype=torch.float32)]
    before = torch.get_num_threads()

    def run():
        means = ops.class_avg_pool(features, labels, 19)[0]
        phi = ops.center_distance(*inputs)
        return (means, phi, *torch.autograd.grad(phi.square().sum(), inputs))

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, before))
        many = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- bad input
def test_class_avg_pool_bad_input(backend):
    ctx = routed(backend)
    f = torch.randn(2, 3, 4, 5)
    labels = torch.zeros(2, 4, 5, dtype=torch.long)
    with ctx:
        bad = labels.clone()
        bad[1, 2, 3] = 7
        with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=4\).*ignore_index=255.*value 7"):
            ops.class_avg_pool(f, bad, 4)
        bad[1, 2, 3] = -3
        with pytest.raises(ValueError, match="value -3"):
            ops.class_avg_pool(f, bad, 4)
        with pytest.raises(ValueError, match="labels must be an int64 tensor, got dtype torch.int32"):
            ops.class_avg_pool(f, labels.int(), 4)
        with pytest.raises(ValueError, match=r"features must be a 4-D tensor \[N, D, H, W\], got shape \[3, 4, 5\]"):
            ops.class_avg_pool(f[0], labels, 4)
        with pytest.raises(ValueError, match=r"labels must have shape \[N, H, W\] = \[2, 4, 5\].*got \[2, 5, 4\]"):
            ops.class_avg_pool(f, labels.transpose(1, 2), 4)
        with pytest.raises(ValueError, match="features must be a floating-point tensor"):
            ops.class_avg_pool(f.long(), labels, 4)
        with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
            ops.class_avg_pool(f, labels, 0)


def test_center_distance_bad_input(backend):
    ctx = routed(backend)
    e, s, m = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 3), torch.randn(2, 5)
    with ctx:
        with pytest.raises(
            ValueError, match=r"centers must have shape \[N, K, D\] with N = 2 and D = 3.*got \[2, 5, 4\]"
        ):
            ops.center_distance(e, torch.randn(2, 5, 4), m)
        with pytest.raises(ValueError, match=r"margins must have shape \[N, K\] = \[2, 5\].*got \[2, 4\]"):
            ops.center_distance(e, s, torch.randn(2, 4))
        with pytest.raises(ValueError, match=r"centers must be a 3-D tensor \[N, K, D\]"):
            ops.center_distance(e, s[0], m)
        with pytest.raises(ValueError, match="share one dtype.*embeddings torch.float32.*centers torch.float64"):
            ops.center_distance(e, s.double(), m)


def test_device_mismatch_is_named():
    e, s, m = torch.randn(2, 3, 4, 4, device="meta"), torch.randn(2, 5, 3), torch.randn(2, 5)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.center_distance(e, s, m)
    with pytest.raises(ValueError, match="one device.*features on meta.*labels on cpu"):
        reference.class_avg_pool(torch.randn(1, 2, 3, 3, device="meta"), torch.zeros(1, 3, 3, dtype=torch.long), 2)


def big_class_case(n=2, seed=41):
    """301 x 301 labels: classes of 70000 (above float16's 65504), 257 (not a bfloat16: rounds to 256), 19741 and
    2 pixels, 601 ignored, shuffled per image; and the exact pooling gradient for an upstream gradient of 4096."""
    g = seeded(seed)
    sizes = torch.tensor([70000, 257, 19741, 2, 601])
    slots = torch.tensor([0, 1, 2, 3, 255]).repeat_interleave(sizes)
    labels = torch.stack([slots[torch.randperm(slots.numel(), generator=g)] for _ in range(n)]).view(n, 301, 301)
    features = torch.randn(n, 3, 301, 301, generator=g, dtype=torch.float64)
    per_class = torch.cat([4096.0 / sizes[:4].double(), torch.zeros(1, dtype=torch.float64)])
    grad = per_class[labels.clamp(max=4)].unsqueeze(1).expand(n, 3, 301, 301)
    return features, labels, grad


def check_big_classes(device, dtype):
    features, labels, want = big_class_case()
    f = features.to(device, dtype).requires_grad_()
    means, counts = ops.class_avg_pool(f, labels.to(device), 4)
    assert means.dtype == counts.dtype == dtype
    ref_means, ref_counts = reference.class_avg_pool(f.detach().double().cpu(), labels, 4)
    torch.testing.assert_close(means.double().cpu(), ref_means, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(counts.cpu(), ref_counts.to(dtype), rtol=0, atol=0)  # in dtype, as documented
    (got,) = torch.autograd.grad(means, f, torch.full_like(means, 4096))
    # exact counts in the accumulation type: the float64 gradient rounded once to dtype, bit for bit
    assert torch.equal(got.cpu(), want.to(dtype))


def test_class_avg_pool_counts_beyond_half_precision_cpu():
    """The CPU kernels run float32 / float64 only, where the counts are exact: the backward's path for them."""
    check_big_classes("cpu", torch.float32)
    # the op's own counts are in the accumulation type (exact), the public function's in the features' dtype
    for dtype in (torch.float16, torch.bfloat16):
        features = torch.empty(2, 3, 4, 5, device="meta", dtype=dtype)
        labels = torch.empty(2, 4, 5, device="meta", dtype=torch.long)
        assert torch.ops.csfrn.class_avg_pool.default(features, labels, 3, 255)[1].dtype == torch.float32
        assert ops.class_avg_pool(features, labels, 3)[1].dtype == dtype


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_class_avg_pool_counts_beyond_half_precision(dtype):
    """A class of 70000 pixels (inf as a float16 count) and one of 257 (256 as a bfloat16 count): the backward
    divides by exact counts, so it gives the float64 gradient rounded to dtype."""
    check_big_classes("cuda", dtype)


# ---------------------------------------------------------------- the CUDA kernels
@pytest.mark.parametrize("device", CUDA_KERNELS)
@pytest.mark.parametrize("ignore_index", [255, -1])
@pytest.mark.parametrize("value", [5, -3, 1 << 40])
def test_class_avg_pool_bad_labels_on_cuda(device, ignore_index, value):
    """A bad label anywhere (first, middle, last pixel) is an error with the CPU kernel's words."""
    features = class_avg_pool_sample(2, 3, 17, 19, 5, seed=29, device=device).args[0]
    for position in (0, 300, 2 * 17 * 19 - 1):
        labels = random_labels(seeded(position), 2, 17, 19, 5, ignore_index)
        labels.view(-1)[position] = value
        with pytest.raises(ValueError) as want:
            ops.class_avg_pool(features.cpu(), labels, 5, ignore_index)
        with pytest.raises(ValueError) as got:
            kernel("class_avg_pool", device)(features, labels.to(torch_device(device)), 5, ignore_index)
        assert str(got.value).splitlines()[0] == str(want.value).splitlines()[0]
        assert f"value {value}" in str(got.value)


def _laid(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # same values, non-contiguous strides
        return t.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    return t


def _both_ops_with_grads(features, labels, k, embeddings, centers, margins, g):
    """Outputs and input gradients of both ops, with fixed random upstream gradients drawn from g."""
    means, counts = ops.class_avg_pool(features, labels, k)
    up = torch.randn(means.shape, generator=g, dtype=torch.float64).to(means.device, means.dtype)
    grad_f = torch.autograd.grad((means * up).sum(), features)
    phi = ops.center_distance(embeddings, centers, margins)
    up = torch.randn(phi.shape, generator=g, dtype=torch.float64).to(phi.device, phi.dtype)
    grad_d = torch.autograd.grad((phi * up).sum(), (embeddings, centers, margins))
    return [t.detach().cpu() for t in (means, counts, phi, *grad_f, *grad_d)]


@needs_cuda
@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
def test_cuda_layouts_many_chunks_and_empty(layout):
    # 130 x 150 pixels: many pixel chunks of the CUDA pooling (77 of 256 on an H100); non-contiguous labels too.
    features, labels = class_avg_pool_sample(2, 5, 130, 150, 7, absent=(2,), seed=41).args[:2]
    dist = distance_inputs(2, 4, 130, 150, 7, seed=42)
    want = _both_ops_with_grads(
        features.clone().requires_grad_(), labels, 7, *[t.clone().requires_grad_() for t in dist], seeded(5)
    )
    f = _laid(features.cuda(), layout).requires_grad_()
    lab = labels.cuda().transpose(1, 2).contiguous().transpose(1, 2)
    e = _laid(dist[0].cuda(), layout).requires_grad_()
    got = _both_ops_with_grads(f, lab, 7, e, *[t.cuda().requires_grad_() for t in dist[1:]], seeded(5))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # empty batch and empty images, forward and backward
    for n, h in ((0, 4), (2, 0)):
        f = torch.randn(n, 3, h, 5, dtype=torch.float64, device="cuda", requires_grad=True)
        lab = torch.zeros(n, h, 5, dtype=torch.long, device="cuda")
        d = [t.cuda().requires_grad_() for t in distance_inputs(n, 3, h, 5, 4, seed=1)]
        got = _both_ops_with_grads(f, lab, 4, *d, seeded(6))
        want = _both_ops_with_grads(
            f.detach().cpu().requires_grad_(), lab.cpu(), 4, *[t.detach().cpu().requires_grad_() for t in d], seeded(6)
        )
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device():
    # The kernels (and the label check) must run on their inputs' device, whatever the current device is.
    features, labels = class_avg_pool_sample(2, 5, 9, 11, 6, seed=43).args[:2]
    dist = distance_inputs(2, 4, 9, 11, 6, seed=44)
    want = _both_ops_with_grads(
        features.clone().requires_grad_(), labels, 6, *[t.clone().requires_grad_() for t in dist], seeded(7)
    )
    with torch.cuda.device(0):
        got = _both_ops_with_grads(
            features.to("cuda:1").requires_grad_(),
            labels.to("cuda:1"),
            6,
            *[t.to("cuda:1").requires_grad_() for t in dist],
            seeded(7),
        )
        with pytest.raises(ValueError, match="value 6"):
            ops.class_avg_pool(features.to("cuda:1"), labels.to("cuda:1").fill_(6), 6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
