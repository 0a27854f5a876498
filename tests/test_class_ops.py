"""class_avg_pool and center_distance: kernels vs reference twins (float64, fresh random inputs), gradients,
opcheck, torch.compile, layouts, edge cases, bad input, and CUDA vs CPU."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import csfrn.ops as ops
from csfrn.ops import reference

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def random_labels(gen, n, h, w, k, ignore_frac=0.2, absent=()):
    labels = torch.randint(0, k, (n, h, w), generator=gen)
    for c in absent:                       # move absent classes' pixels to another class (or ignore)
        labels[labels == c] = (c + 1) % k if k > len(absent) + 1 else 255
    ignore = torch.rand(n, h, w, generator=gen) < ignore_frac
    return labels.masked_fill(ignore, 255)


def seeded(seed):
    g = torch.Generator().manual_seed(seed)
    return g


CASES = [  # (N, D, H, W, K)
    (2, 5, 7, 9, 1),
    (2, 8, 13, 11, 7),
    (3, 4, 33, 65, 19),     # more than one pixel chunk
    (1, 3, 5, 6, 171),      # more classes than pixels: most are absent
    (2, 33, 6, 7, 256),
]


# ---------------------------------------------------------------- class_avg_pool
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,d,h,w,k", CASES)
def test_class_avg_pool_matches_reference(seed, n, d, h, w, k):
    g = seeded(seed * 1000 + k)
    features = torch.randn(n, d, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    labels = random_labels(g, n, h, w, k, absent=(0,) if k > 2 else ())
    means, counts = ops.class_avg_pool(features, labels, k)
    ref_means, ref_counts = reference.class_avg_pool(features, labels, k)
    torch.testing.assert_close(means, ref_means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(counts, ref_counts, rtol=0, atol=0)
    if k > 2:
        assert (counts[:, 0] == 0).all() and (means[:, 0] == 0).all()
    upstream = torch.randn(means.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((means * upstream).sum(), features)
    (ref_grad,) = torch.autograd.grad((ref_means * upstream).sum(), features)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_class_avg_pool_counts_by_hand():
    features = torch.arange(2 * 4 * 1, dtype=torch.float64).reshape(1, 2, 2, 2)   # channels 0..3, 4..7
    labels = torch.tensor([[[0, 2], [255, 2]]])
    means, counts = ops.class_avg_pool(features, labels, 3)
    assert counts.tolist() == [[1.0, 0.0, 2.0]]
    assert means.tolist() == [[[0.0, 4.0], [0.0, 0.0], [2.0, 6.0]]]


def test_class_avg_pool_gradcheck():
    g = seeded(7)
    features = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = random_labels(g, 2, 4, 5, 4)
    assert torch.autograd.gradcheck(lambda f: ops.class_avg_pool(f, labels, 4)[0], (features,))


@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced"])
def test_class_avg_pool_layouts(layout):
    g = seeded(11)
    base = torch.randn(2, 6, 9, 10, generator=g, dtype=torch.float64)
    labels = random_labels(g, 2, 9, 10, 5)
    if layout == "channels_last":
        features = base.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        features = base.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)    # H and W strides swapped
    else:
        features = torch.randn(2, 12, 9, 20, generator=g, dtype=torch.float64)[:, ::2, :, ::2]
        base = features.contiguous()
    assert not features.is_contiguous()
    features.requires_grad_(True)
    means, counts = ops.class_avg_pool(features, labels, 5)
    ref_means, ref_counts = reference.class_avg_pool(base, labels, 5)
    torch.testing.assert_close(means, ref_means)
    torch.testing.assert_close(counts, ref_counts)
    (grad,) = torch.autograd.grad(means.sum(), features)
    (ref_grad,) = torch.autograd.grad(reference.class_avg_pool(base.requires_grad_(), labels, 5)[0].sum(), base)
    torch.testing.assert_close(grad, ref_grad)


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


def test_class_avg_pool_custom_ignore_index_and_float32():
    g = seeded(3)
    features = torch.randn(2, 4, 6, 6, generator=g)
    labels = torch.randint(-1, 3, (2, 6, 6), generator=g)
    means, counts = ops.class_avg_pool(features, labels, 3, ignore_index=-1)
    ref_means, ref_counts = reference.class_avg_pool(features, labels, 3, ignore_index=-1)
    torch.testing.assert_close(means, ref_means)
    torch.testing.assert_close(counts, ref_counts)
    assert means.dtype == counts.dtype == torch.float32


VECTOR_CASES = [  # (N, D, H, W, K, ignore_index): float32 NCHW takes the AVX-512 loops where torch runs AVX-512
    (2, 16, 50, 53, 19, 255),   # two pixel chunks, the second ending in a partial 16-pixel tile
    (1, 33, 9, 7, 31, 255),     # 16-channel blocks plus a leftover channel; K + 1 = 32 rows fill the permute table
    (2, 48, 11, 13, 32, 3),     # K + 1 = 33: the lookup's portable loop; ignore_index inside [0, K)
    (1, 20, 17, 19, 150, 255),
    (2, 16, 4, 3, 1, 255),      # fewer pixels than one tile
]


def check_float32_pool(n, d, h, w, k, ignore_index, seed=0, blocky=False, channel_stride=1):
    """float32 kernel vs the float64 twin on the same (upcast) inputs."""
    g = seeded(seed)
    features = torch.randn(n, d * channel_stride, h, w, generator=g)[:, ::channel_stride].requires_grad_()
    labels = random_labels(g, n, h, w, k, absent=(0,) if k > 2 else ())
    if blocky:   # runs of one class, as real label maps have: consecutive pixels hit the same class row
        labels = labels[:, :, :1].expand(n, h, w).contiguous()
    labels[labels == 255] = ignore_index
    means, counts = ops.class_avg_pool(features, labels, k, ignore_index)
    f64 = features.detach().double().requires_grad_()
    ref_means, ref_counts = reference.class_avg_pool(f64, labels, k, ignore_index)
    torch.testing.assert_close(means.double(), ref_means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(counts.double(), ref_counts, rtol=0, atol=0)
    upstream = torch.randn(means.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(means, features, upstream.float())
    (ref_grad,) = torch.autograd.grad(ref_means, f64, upstream)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def check_bad_label_positions():
    """A bad label anywhere (first, middle or last lane of an 8-label vector, the partial last vector, a second
    pixel chunk) is reported with its value; an ignore_index outside [0, K), negative too, is not."""
    f = torch.randn(1, 2, 61, 67)                            # 4087 pixels: two chunks, the last vector partial
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
    code = ("import test_class_ops as t, torch; assert torch.backends.cpu.get_cpu_capability() != 'AVX512';"
            "[t.check_float32_pool(*c, blocky=b) for c in t.VECTOR_CASES for b in (False, True)];"
            "t.check_bad_label_positions()")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------- center_distance
def distance_inputs(g, n, d, h, w, k, dtype=torch.float64):
    embeddings = torch.randn(n, d, h, w, generator=g, dtype=dtype)
    centers = torch.randn(n, k, d, generator=g, dtype=dtype) * 0.5
    margins = torch.randn(n, k, generator=g, dtype=dtype) * 0.1
    return embeddings, centers, margins


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,d,h,w,k", CASES)
def test_center_distance_matches_reference(seed, n, d, h, w, k):
    g = seeded(seed * 1000 + k + 1)
    inputs = [t.requires_grad_() for t in distance_inputs(g, n, d, h, w, k)]
    delta = [10.0, 1.0, 3.5][seed]
    phi = ops.center_distance(*inputs, delta=delta)
    ref = reference.center_distance(*inputs, delta=delta)
    torch.testing.assert_close(phi, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(phi.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((phi * upstream).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


BLOCK_CASES = [  # (N, D, H, W, K): the CPU kernels' register blocks and every leftover path
    (2, 32, 23, 29, 19),    # 3 pixel chunks, the last 155 pixels (two 64-pixel groups + 27); K = 8 + 8 + 2 + 1
    (1, 20, 17, 31, 11),    # 16 channels + 4 past the last group of 16; 4 channel rows past the blocks of 8
    (1, 16, 16, 16, 8),     # whole blocks only
]


@pytest.mark.parametrize("n,d,h,w,k", BLOCK_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_center_distance_register_blocks(n, d, h, w, k, dtype, layout):
    g = seeded(n * 100 + d + k)
    embeddings, centers, margins = (t.to(dtype) for t in distance_inputs(g, n, d, h, w, k))
    embeddings = embeddings.contiguous(memory_format=layout)
    upstream = torch.randn(n, k, h, w, generator=g, dtype=torch.float64)
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


def test_center_distance_gradcheck():
    g = seeded(5)
    inputs = [t.requires_grad_() for t in distance_inputs(g, 2, 3, 4, 3, 3)]
    assert torch.autograd.gradcheck(lambda e, s, m: ops.center_distance(e, s, m, delta=2.0), inputs)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True)])
def test_center_distance_partial_gradients(mask):
    g = seeded(9)
    inputs = list(distance_inputs(g, 2, 4, 5, 5, 3))
    for t, m in zip(inputs, mask):
        t.requires_grad_(m)
    phi = ops.center_distance(*inputs)
    wanted = [t for t, m in zip(inputs, mask) if m]
    (got,) = torch.autograd.grad(phi.sum(), wanted)
    ref_inputs = [t.detach().requires_grad_(m) for t, m in zip(inputs, mask)]
    (want,) = torch.autograd.grad(reference.center_distance(*ref_inputs).sum(),
                                  [t for t, m in zip(ref_inputs, mask) if m])
    torch.testing.assert_close(got, want)


def test_center_distance_layouts_and_edge_cases():
    g = seeded(13)
    embeddings, centers, margins = distance_inputs(g, 2, 6, 7, 8, 4)
    cl = embeddings.contiguous(memory_format=torch.channels_last).requires_grad_()
    phi = ops.center_distance(cl, centers, margins)
    torch.testing.assert_close(phi, reference.center_distance(embeddings, centers, margins))
    (grad,) = torch.autograd.grad(phi.sum(), cl)
    (want,) = torch.autograd.grad(reference.center_distance(embeddings.requires_grad_(), centers, margins).sum(),
                                  embeddings)
    torch.testing.assert_close(grad, want)
    # batch 0 and no classes
    assert ops.center_distance(torch.randn(0, 3, 4, 4), torch.randn(0, 2, 3), torch.randn(0, 2)).shape == (0, 2, 4, 4)
    for n, d in ((0, 3), (2, 0)):  # the backward of an empty batch / no channels once failed in a reshape
        inputs = [torch.randn(n, d, 4, 4, requires_grad=True), torch.randn(n, 2, d, requires_grad=True),
                  torch.randn(n, 2, requires_grad=True)]
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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_center_distance_no_classes_zero_gradient_with_inf(device, dtype):
    """K = 0: phi is empty, so every gradient is zero, also where an embedding is inf (not inf * 0 = NaN)."""
    e = torch.randn(2, 3, 4, 5, dtype=dtype)
    e[0, 1, 2, 3], e[1, 0, 0, 0] = float("inf"), float("-inf")
    e = e.to(device).requires_grad_()
    s = torch.randn(2, 0, 3, dtype=dtype, device=device, requires_grad=True)
    m = torch.randn(2, 0, dtype=dtype, device=device, requires_grad=True)
    phi = ops.center_distance(e, s, m)
    assert phi.shape == (2, 0, 4, 5)
    grads = torch.autograd.grad(phi.sum(), [e, s, m])
    assert [g.shape for g in grads] == [e.shape, s.shape, m.shape]
    assert bool(grads[0].eq(0).all())


# ---------------------------------------------------------------- op machinery
def test_opcheck_both_ops():
    g = seeded(21)
    features = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = random_labels(g, 2, 4, 5, 4)
    torch.library.opcheck(torch.ops.csfrn.class_avg_pool.default, (features, labels, 4, 255))
    inputs = [t.requires_grad_() for t in distance_inputs(g, 2, 3, 4, 5, 4)]
    torch.library.opcheck(torch.ops.csfrn.center_distance.default, (*inputs, 10.0))


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


def test_no_double_backward():
    """A second derivative through either op is an error, never a silent zero (as for the deform ops)."""
    g = seeded(23)
    features = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    means, _ = ops.class_avg_pool(features, random_labels(g, 2, 4, 5, 4), 4)
    (gf,) = torch.autograd.grad(means.square().sum(), features, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward is not supported"):
        torch.autograd.grad(gf.sum(), features)
    inputs = [t.requires_grad_() for t in distance_inputs(g, 2, 3, 4, 5, 4)]
    (ge,) = torch.autograd.grad(ops.center_distance(*inputs, delta=0.5).sum(), inputs[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward is not supported"):
        torch.autograd.grad(ge.sum(), inputs)


@pytest.mark.parametrize("device,amp", [("cpu", torch.bfloat16),
                                        pytest.param("cuda", torch.bfloat16, marks=needs_cuda),
                                        pytest.param("cuda", torch.float16, marks=needs_cuda)])
def test_float32_inside_autocast_stays_float32(device, amp):
    """Neither op has an autocast rule, so float32 inputs run in float32 inside torch.autocast, and so must the
    backward: the kernels' own ATen calls (the CUDA centre-distance matmuls) must not be autocast."""
    g = seeded(27)
    features = torch.randn(2, 6, 9, 11, generator=g).to(device)
    labels = random_labels(g, 2, 9, 11, 5).to(device)
    dist = [t.float().to(device) for t in distance_inputs(g, 2, 6, 9, 11, 5)]
    up = torch.randn(2, 5, 9, 11, generator=g).to(device)

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
    inputs = distance_inputs(seeded(0), 1, 2, 3, 3, 2)
    with ops.use_reference():
        ops.center_distance(*inputs)
    ops.center_distance(*inputs)
    assert called == [1]


def test_deterministic_across_thread_counts():
    g = seeded(17)
    features = torch.randn(2, 16, 70, 70, generator=g)
    labels = random_labels(g, 2, 70, 70, 19)
    inputs = [t.requires_grad_() for t in distance_inputs(g, 2, 16, 70, 70, 19, dtype=torch.float32)]
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
BACKENDS = [pytest.param(contextlib.nullcontext, id="kernel"), pytest.param(ops.use_reference, id="reference")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_avg_pool_bad_input(backend):
    ctx = backend()
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_center_distance_bad_input(backend):
    ctx = backend()
    e, s, m = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 3), torch.randn(2, 5)
    with ctx:
        with pytest.raises(ValueError, match=r"centers must have shape \[N, K, D\] with N = 2 and D = 3.*got \[2, 5, 4\]"):
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
    torch.testing.assert_close(counts.cpu(), ref_counts.to(dtype), rtol=0, atol=0)   # in dtype, as documented
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


# ---------------------------------------------------------------- CUDA vs CPU
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    g = seeded(31)
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2}.get(dtype, 1e-5)
    features = torch.randn(2, 8, 21, 23, generator=g, dtype=torch.float64)
    labels = random_labels(g, 2, 21, 23, 19, absent=(4,))
    cpu = ops.class_avg_pool(features, labels, 19)
    gpu = ops.class_avg_pool(features.to("cuda", dtype), labels.cuda(), 19)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.double().cpu(), a, rtol=tol, atol=tol)
    inputs = distance_inputs(g, 2, 8, 21, 23, 19)
    cpu_in = [t.clone().requires_grad_() for t in inputs]
    gpu_in = [t.to("cuda", dtype).requires_grad_() for t in inputs]
    phi_cpu, phi_gpu = ops.center_distance(*cpu_in), ops.center_distance(*gpu_in)
    torch.testing.assert_close(phi_gpu.double().cpu(), phi_cpu, rtol=tol, atol=tol)
    up = torch.randn(phi_cpu.shape, generator=g, dtype=torch.float64)
    grads_cpu = torch.autograd.grad((phi_cpu * up).sum(), cpu_in)
    grads_gpu = torch.autograd.grad((phi_gpu * up.to("cuda", dtype)).sum(), gpu_in)
    for a, b in zip(grads_cpu, grads_gpu):
        scale = a.abs().max().clamp(min=1)
        torch.testing.assert_close(b.double().cpu() / scale, a / scale, rtol=tol, atol=tol * 4)
    # pooling gradient, and a bad label is an error on the GPU too
    f = features.to("cuda", dtype).requires_grad_()
    (gg,) = torch.autograd.grad(ops.class_avg_pool(f, labels.cuda(), 19)[0].sum(), f)
    fc = features.clone().requires_grad_()
    (gc,) = torch.autograd.grad(ops.class_avg_pool(fc, labels, 19)[0].sum(), fc)
    torch.testing.assert_close(gg.double().cpu(), gc, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="value 19"):
        ops.class_avg_pool(f, labels.cuda().clamp(max=19).fill_(19), 19)


@needs_cuda
def test_cuda_compile_and_opcheck():
    g = seeded(2)
    features = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).cuda().requires_grad_()
    labels = random_labels(g, 2, 4, 5, 4).cuda()
    torch.library.opcheck(torch.ops.csfrn.class_avg_pool.default, (features, labels, 4, 255))
    inputs = [t.cuda().requires_grad_() for t in distance_inputs(g, 2, 3, 4, 5, 4)]
    torch.library.opcheck(torch.ops.csfrn.center_distance.default, (*inputs, 10.0))


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
    g = seeded(41)
    features = torch.randn(2, 5, 130, 150, generator=g, dtype=torch.float64)
    labels = random_labels(g, 2, 130, 150, 7, absent=(2,))
    dist = distance_inputs(g, 2, 4, 130, 150, 7)
    want = _both_ops_with_grads(features.clone().requires_grad_(), labels, 7,
                                *[t.clone().requires_grad_() for t in dist], seeded(5))
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
        d = [t.cuda().requires_grad_() for t in distance_inputs(seeded(1), n, 3, h, 5, 4)]
        got = _both_ops_with_grads(f, lab, 4, *d, seeded(6))
        want = _both_ops_with_grads(f.detach().cpu().requires_grad_(), lab.cpu(), 4,
                                    *[t.detach().cpu().requires_grad_() for t in d], seeded(6))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device():
    # The kernels (and the label check) must run on their inputs' device, whatever the current device is.
    g = seeded(43)
    features = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64)
    labels = random_labels(g, 2, 9, 11, 6)
    dist = distance_inputs(g, 2, 4, 9, 11, 6)
    want = _both_ops_with_grads(features.clone().requires_grad_(), labels, 6,
                                *[t.clone().requires_grad_() for t in dist], seeded(7))
    with torch.cuda.device(0):
        got = _both_ops_with_grads(features.to("cuda:1").requires_grad_(), labels.to("cuda:1"), 6,
                                   *[t.to("cuda:1").requires_grad_() for t in dist], seeded(7))
        with pytest.raises(ValueError, match="value 6"):
            ops.class_avg_pool(features.to("cuda:1"), labels.to("cuda:1").fill_(6), 6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
