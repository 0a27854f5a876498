"""The training step at device speed, checked on the CPU: float32 upsampling for the losses, channels_last kept
end to end, no graph break from our code under torch.compile, no host sync inside a step that does not log, and
the same losses eager / channels_last / compiled."""

import contextlib
import json
import os
import unittest.mock

import pytest
import torch
import torch.nn.functional as F

import csfrn.losses.eq7
import csfrn.losses.pixel
from csfrn.engine import speed
from csfrn.engine.config import load_config
from csfrn.engine.train import train
from csfrn.models import build_model

from conftest import needs_cuda, tiny_overrides

CL = torch.channels_last
TINY = dict(width=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8, embed_dim=8)


def tiny_csfrn(fusion="aam", seed=0):
    torch.manual_seed(seed)
    model = build_model("deeplabv3plus", 4, fusion=fusion, **TINY)
    if fusion == "aam":  # fractional offsets, as after some training (zero offsets sample the pixel grid)
        torch.nn.init.uniform_(model.csflm.fuse.offset.bias, -1.0, 1.0)
    return model.train()


def batch(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, 3, (n, size, size), generator=g)  # class 3 absent: a slot with no pixel
    labels[:, :3] = 255
    return images, labels


def losses_and_grads(model, images, labels, step=None, seed=0):
    """The losses of one forward (dropout masks drawn from ``seed``) and the gradients of their sum, by
    parameter name; ``step`` runs the forward (default ``model``)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    _, losses = (model if step is None else step)(images, labels)
    sum(losses.values()).backward()
    return (
        {k: v.detach() for k, v in losses.items()},
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    )


# ---------------------------------------------------------------- float32 upsampling for the losses
def _old_upsample(logits, size):
    """The upsampling before float32 upsampling: in the logits' own dtype."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def test_float32_upsampling_changes_nothing_in_a_float32_run(ops_path):
    """Measured on the CPU: in float32 the losses and every gradient are those of the upsampling in the logits'
    dtype, bit for bit (the only change is for half-precision logits)."""
    images, labels = batch()
    model = tiny_csfrn()
    new = losses_and_grads(model, images, labels)
    with unittest.mock.patch.object(csfrn.models.segmentor, "upsample_logits", _old_upsample):
        old = losses_and_grads(model, images, labels)
    assert set(new[0]) == {"seg", "aux", "cac", "smooth"}
    for a, b in zip(new, old):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_losses_upsample_in_float32_under_autocast(ops_path):
    """Under bf16 autocast the seg and aux logits reach the upsampling as bf16 and leave it (and enter the loss)
    as float32; the losses match the float32 run to the rounding of bf16 logits."""
    images, labels = batch()
    model = tiny_csfrn(fusion="concat")
    seen = []
    real = F.interpolate

    def spy(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        if kwargs.get("mode") == "bilinear" and tuple(out.shape[2:]) == tuple(images.shape[2:]):
            seen.append(out.dtype)
        return out

    with torch.no_grad():
        want = {k: v.item() for k, v in model(images, labels)[1].items()}
        with (
            unittest.mock.patch.object(csfrn.losses.pixel.F, "interpolate", spy),
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            logits, got = model(images, labels)
    assert seen == [torch.float32, torch.float32]  # seg and aux
    assert logits.dtype == torch.float32
    for k, v in got.items():
        assert v.dtype == torch.float32
        assert v.item() == pytest.approx(want[k], rel=0.03, abs=1e-3), k
    bf16 = torch.randn(2, 4, 5, 5).to(torch.bfloat16).to(memory_format=CL)
    up = csfrn.losses.upsample_logits(bf16, (9, 9))
    assert up.dtype == torch.float32 and up.is_contiguous(memory_format=CL)
    assert torch.equal(up, _old_upsample(bf16.float(), (9, 9)))


# The GPU default: the same interpolation as two products with matrices of bilinear weights (no atomics).
UPSAMPLE_CASES = [(7, 5, 53, 41), (5, 5, 17, 17), (17, 9, 5, 4), (1, 3, 6, 7), (2, 1, 9, 4), (24, 24, 193, 193)]


def _upsampled(x, size, method):
    x = x.detach().requires_grad_()
    out = csfrn.losses.upsample_logits(x, size, method=method)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    return out, torch.autograd.grad(out, x, g)[0]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gemm_upsampling_is_bilinear_interpolation(layout):
    """method="gemm" is F.interpolate (bilinear, align_corners=False) up, down, to and from one pixel, square
    or not: float64 to 1e-12 in value and gradient; float32 within 2e-6 of the float64 result (F.interpolate's
    own float32 source positions are off by about 1e-5 at these sizes: ours are computed in float64). The
    output and the input's gradient keep the input's memory format."""
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    for h, w, height, width in UPSAMPLE_CASES:
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w), dtype=torch.float64)
        x = x.contiguous(memory_format=fmt)
        want, want_grad = _upsampled(x, (height, width), "interpolate")
        got, got_grad = _upsampled(x, (height, width), "gemm")
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)
        if h * w > 1 and layout == "channels_last":
            assert got.is_contiguous(memory_format=CL) and got_grad.is_contiguous(memory_format=CL)
        else:
            assert got.is_contiguous()
        got32, got32_grad = _upsampled(x.float(), (height, width), "gemm")
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), want, rtol=0, atol=2e-6)
        torch.testing.assert_close(got32_grad.double(), want_grad, rtol=0, atol=2e-6 * max(1, height * width / (h * w)))


def test_gemm_upsampling_weights_are_two_taps_that_sum_to_one():
    """Each row of the weights: at most two non-zeros, on neighbouring input positions, summing to 1."""
    for out_size, in_size in ((769, 97), (5, 17), (7, 1), (1, 4)):
        m = csfrn.losses.pixel.bilinear_weights(out_size, in_size, torch.empty(0, dtype=torch.float64))
        assert m.shape == (out_size, in_size)
        torch.testing.assert_close(m.sum(1), torch.ones(out_size, dtype=torch.float64), rtol=0, atol=1e-15)
        for row in m:
            taps = row.nonzero().flatten()
            assert 1 <= len(taps) <= 2 and taps.max() - taps.min() <= 1


def test_gemm_upsampling_stays_float32_under_autocast_and_has_no_sync_or_graph_break():
    """Under bf16 autocast the products run in float32 (autocast would make them bf16), with no host sync, and
    the upsampling compiles as one graph."""
    x = torch.randn(2, 4, 6, 5).to(torch.bfloat16)
    want = csfrn.losses.upsample_logits(x.float(), (13, 11), method="gemm")
    with torch.autocast("cpu", dtype=torch.bfloat16), no_host_sync():
        got = csfrn.losses.upsample_logits(x, (13, 11), method="gemm")
    assert got.dtype == torch.float32 and torch.equal(got, want)
    explained = torch._dynamo.explain(lambda t: csfrn.losses.upsample_logits(t, (13, 11), method="gemm"))(x.float())
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_upsampling_method_default_and_bad_value():
    """On the CPU the default is F.interpolate (a float32 run unchanged, bit for bit); a method that is neither
    is a one-line error naming it."""
    x = torch.randn(1, 2, 3, 3)
    assert torch.equal(csfrn.losses.upsample_logits(x, (7, 7)), _old_upsample(x, (7, 7)))
    for size in ((7, 7), (3, 3)):  # also where there is nothing to upsample: a wrong method is never ignored
        with pytest.raises(ValueError, match="method is 'bicubic', expected one of"):
            csfrn.losses.upsample_logits(x, size, method="bicubic")


@needs_cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gemm_upsampling_is_the_cuda_default_and_deterministic(layout):
    """On CUDA the losses upsample by "gemm" (the default there): F.interpolate's values and gradients (to the
    float32 rounding of its source positions), and the same gradient bit for bit on every call, at the loss's
    shape (19 classes, 97 -> 769)."""
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 19, 97, 97, device="cuda").contiguous(memory_format=fmt)
    g = torch.randn(2, 19, 769, 769, device="cuda")

    def run(fn):
        t = x.detach().requires_grad_()
        out = fn(t)
        return out, torch.autograd.grad(out, t, g)[0]

    ref, ref_grad = run(lambda t: F.interpolate(t.double(), (769, 769), mode="bilinear", align_corners=False))
    seen = []
    real = csfrn.losses.pixel._upsample_by_gemm
    with unittest.mock.patch.object(csfrn.losses.pixel, "_upsample_by_gemm", lambda *a: seen.append(1) or real(*a)):
        got, got_grad = run(lambda t: csfrn.losses.upsample_logits(t, (769, 769)))
    assert seen == [1]
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), ref_grad, rtol=1e-5, atol=1e-4)
    assert got.is_contiguous(memory_format=fmt) and got_grad.is_contiguous(memory_format=fmt)
    again = run(lambda t: csfrn.losses.upsample_logits(t, (769, 769)))
    assert torch.equal(again[0], got) and torch.equal(again[1], got_grad)


# ---------------------------------------------------------------- channels_last end to end
def _channels_last(t):
    """Not a 4-D float tensor, or one whose channels are innermost (channels_last, or a channel slice of a
    channels_last tensor, as the gradient of a concat is), or one with a single channel or pixel."""
    if not (isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()):
        return True
    return t.shape[1] == 1 or t.shape[2] * t.shape[3] == 1 or t.stride(1) == 1


def channels_last_violations(model, images, labels):
    """Names of the modules whose 4-D float inputs or outputs (forward) or output gradients (backward) are not
    channels_last, and of the 4-D parameters whose gradients are not, after one training step."""
    bad = []

    def check(name, what, tensors):
        if not all(_channels_last(t) for t in tensors):
            bad.append(f"{name} {what}")

    def hook(name):
        def fn(module, args, output):
            check(name, "input", args)
            outs = output if isinstance(output, tuple) else (output,)
            check(name, "output", outs)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g, name=name: check(name, "output gradient", (g,)))

        return fn

    handles = [m.register_forward_hook(hook(n or "model")) for n, m in model.named_modules()]
    try:
        _, losses = model(images, labels)
        sum(losses.values()).backward()
    finally:
        for h in handles:
            h.remove()
    bad += [
        f"{n} weight gradient"
        for n, p in model.named_parameters()
        if p.dim() == 4 and not p.grad.is_contiguous(memory_format=CL)
    ]
    return bad


@pytest.mark.parametrize(
    "fusion",
    [
        "concat",
        # fusion="aam": the deformable convs' outputs and gradients (offset and mask included) in channels_last too.
        "aam",
    ],
)
def test_channels_last_is_kept_through_forward_and_backward(fusion, ops_path):
    """Every module of CSFRN (backbone, head, CSFLM, AAM, aux head, losses) takes and gives channels_last
    tensors, forward and backward: no hidden copy back to NCHW."""
    images, labels = batch()
    model = tiny_csfrn(fusion).to(memory_format=CL)
    assert channels_last_violations(model, images.to(memory_format=CL), labels) == []


def test_a_step_with_gemm_upsampling_keeps_channels_last_and_the_losses(ops_path):
    """CSFRN's training step with the losses' upsampling by "gemm" (the CUDA default), here on the CPU: the
    losses and gradients of F.interpolate's step to float32 rounding, and channels_last kept throughout."""
    images, labels = batch()
    model = tiny_csfrn().to(memory_format=CL)
    images = images.to(memory_format=CL)
    want = losses_and_grads(model, images, labels)
    calls = []

    def gemm(logits, size):
        calls.append(tuple(logits.shape[2:]))
        return csfrn.losses.upsample_logits(logits, size, method="gemm")

    with (
        unittest.mock.patch.object(csfrn.models.segmentor, "upsample_logits", gemm),
        unittest.mock.patch.object(csfrn.losses.eq7, "upsample_logits", gemm),
    ):
        got = losses_and_grads(model, images, labels)
        assert channels_last_violations(model, images, labels) == []
    assert calls[:3] == [(8, 8), (32, 32), (4, 4)], calls  # seg, seg at full size (returned as it is), aux
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_channels_last_check_sees_a_hidden_copy(ops_path):
    """The check above fails when a module's output goes back to NCHW (a .contiguous() after a conv)."""
    images, labels = batch()
    model = tiny_csfrn("concat").to(memory_format=CL)
    embed = model.csflm.embed
    embed.register_forward_hook(lambda module, args, output: output.contiguous())
    bad = channels_last_violations(model, images.to(memory_format=CL), labels)
    assert "csflm.embed output" in bad


# ---------------------------------------------------------------- torch.compile
def _ours(frame):
    return os.sep + "csfrn" + os.sep in frame.filename and os.sep + "tests" + os.sep not in frame.filename


def test_csfrn_training_forward_has_no_graph_break(ops_path):
    """The whole training forward of CSFRN (AAM, CAC and smooth losses included) is one graph for
    torch.compile: no .item(), bool(tensor), nonzero or unique from our code."""
    torch._dynamo.reset()
    images, labels = batch(size=24)
    explained = torch._dynamo.explain(tiny_csfrn("aam"))(images, labels)
    ours = [r.reason.splitlines()[0] for r in explained.break_reasons if any(_ours(f) for f in r.user_stack)]
    assert ours == []
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_same_losses_eager_channels_last_and_compiled(ops_path):
    """Two SGD steps of a tiny CSFRN give the same losses eager, in channels_last and compiled (dynamo and AOT
    autograd, the graphs inductor would take; inductor's code generation is left to the GPU benchmark)."""
    images, labels = batch(size=24)
    runs = {}
    for name in ("eager", "channels_last", "compiled"):
        torch._dynamo.reset()
        model = tiny_csfrn("concat")
        x = images
        if name == "channels_last":
            model, x = model.to(memory_format=CL), images.to(memory_format=CL)
        step = torch.compile(model, backend="aot_eager") if name == "compiled" else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runs[name] = []
        for _ in range(2):
            losses, _ = losses_and_grads(model, x, labels, step)
            optimizer.step()
            runs[name].append(losses)
    for name in ("channels_last", "compiled"):
        for got, want in zip(runs[name], runs["eager"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- no host sync inside a training step
class HostSync(AssertionError):
    pass


def _raising(name):
    def fn(*args, **kwargs):
        raise HostSync(f"{name} inside a training step that does not log")

    return fn


def _is_mask(index):
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@contextlib.contextmanager
def no_host_sync():
    """Every way Python code reads a device value, or makes a shape from one, raises: .item(), .cpu(),
    .tolist(), .numpy(), bool / float / int / index of a tensor, nonzero, unique, masked_select and boolean-mask
    indexing."""
    get, put = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def getitem(self, index):
        if _is_mask(index):
            raise HostSync("boolean-mask indexing (a data-dependent shape) inside a training step")
        return get(self, index)

    def setitem(self, index, value):
        if _is_mask(index):
            raise HostSync("boolean-mask assignment inside a training step")
        return put(self, index, value)

    patches = [
        unittest.mock.patch.object(torch.Tensor, name, _raising(f"Tensor.{name}"))
        for name in (
            "item",
            "cpu",
            "tolist",
            "numpy",
            "__bool__",
            "__float__",
            "__int__",
            "__index__",
            "nonzero",
            "unique",
            "masked_select",
        )
    ]
    patches += [
        unittest.mock.patch.object(torch, name, _raising(f"torch.{name}"))
        for name in ("nonzero", "unique", "masked_select")
    ]
    patches += [
        unittest.mock.patch.object(torch.Tensor, "__getitem__", getitem),
        unittest.mock.patch.object(torch.Tensor, "__setitem__", setitem),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def test_no_host_sync_check_catches_one():
    with no_host_sync():
        x = torch.ones(3)
        for sync in (
            lambda: x.sum().item(),
            lambda: bool(x.any()),
            lambda: x[x > 0],
            lambda: torch.unique(x),
            lambda: float(x[0]),
            lambda: x.nonzero(),
        ):
            with pytest.raises(HostSync):
                sync()


def run_trapped(tmp_path, extra=(), iters=3, log_interval=3):
    """``csfrn.engine.train`` on the tiny CSFRN with ``no_host_sync`` on from the moment each non-logging
    iteration's batch is on the device to the request for the next batch. Returns the trapped iterations and
    the metrics records."""
    cfg = load_config(None, tiny_overrides(tmp_path, iters, [f"train.log_interval={log_interval}", *extra]))
    state = {"it": 0, "trap": None, "trapped": []}
    real_to_device, real_next = speed.to_device, speed.StepTimes.next_batch

    def release():
        if state["trap"] is not None:
            state["trap"].__exit__(None, None, None)
            state["trap"] = None

    def next_batch(self, batches):
        release()
        return real_next(self, batches)

    def to_device(*args, **kwargs):
        out = real_to_device(*args, **kwargs)
        state["it"] += 1
        it = state["it"]
        if it % log_interval and it != iters:
            state["trap"] = no_host_sync()
            state["trap"].__enter__()
            state["trapped"].append(it)
        return out

    try:
        with (
            unittest.mock.patch.object(speed, "to_device", to_device),
            unittest.mock.patch.object(speed.StepTimes, "next_batch", next_batch),
        ):
            train(cfg)
    finally:
        release()
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        return state["trapped"], [json.loads(line) for line in f]


def test_no_host_sync_inside_a_training_step_that_does_not_log(tmp_path, ops_path):
    """A training step of CSFRN (forward with every loss, backward, SGD, the lr schedule, the loop's own
    bookkeeping) reads no device value: the losses are read only at the log interval, with the data and step
    times beside them."""
    trapped, records = run_trapped(tmp_path / "run")
    assert trapped == [1, 2]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["iter"] for r in train_records] == [3]
    r = train_records[0]
    assert {"seg", "aux", "cac", "smooth", "loss", "data_ms", "step_ms", "images/s"} <= set(r)
    assert 0 <= r["data_ms"] < r["step_ms"]


@pytest.mark.parametrize(
    "extra",
    [["model.ohem=true", "model.min_kept=50"], ["model.csflm_supervision=mask"]],
    ids=["ohem", "mask-supervision"],
)
def test_no_host_sync_with_the_other_losses(tmp_path, extra, ops_path):
    """OHEM's selection and the mask supervision's Lovasz-softmax keep static shapes too."""
    trapped, records = run_trapped(tmp_path / "run", extra)
    assert trapped == [1, 2]
    r = [r for r in records if r["kind"] == "train"][0]
    assert ("mask" in r) == ("model.csflm_supervision=mask" in extra)


@pytest.mark.parametrize("accumulate, clip_grad", [(1, None), (2, 1.0)])
def test_no_host_sync_in_an_fp16_step_with_a_fused_optimizer(accumulate, clip_grad, ops_path):
    """train.amp=fp16: the GradScaler's inf check stays a device tensor when the optimizer is fused (csfrn
    train fuses it on a GPU, ``csfrn.engine.optim.fused_on``); an unfused one reads it on the host before its
    step, which the trap must catch (so this test can fail). On the CPU, with torch's CPU scaler and fp16
    autocast, the same code paths run."""
    from csfrn.engine.step import train_step
    from csfrn.losses import labels_checked

    images, labels = batch(n=4)
    for fused in (False, True):
        model = tiny_csfrn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        with contextlib.nullcontext() if fused else pytest.raises(HostSync):
            with no_host_sync(), labels_checked():  # the engine checks the CPU batch before the copy
                losses, _ = train_step(model, images, labels, optimizer, scaler, torch.float16, accumulate, clip_grad)
        if fused:
            assert all(torch.isfinite(v) for v in losses.values())
            assert scaler.get_scale() == 2.0**10  # no inf: the scale stays (it grows after growth_interval)


# ---------------------------------------------------------------- the engine's settings
def test_engine_settings():
    assert speed.use_channels_last(None, "cpu") is False and speed.use_channels_last(None, "cuda") is True
    assert speed.use_channels_last(True, "cpu") is True and speed.use_channels_last(False, "cuda") is False
    assert [speed.compile_mode(v) for v in (False, True, "max-autotune")] == [None, "default", "max-autotune"]
    module = torch.nn.Linear(2, 2)
    assert speed.maybe_compile(module, False) is module
    assert speed.maybe_compile(module, True)._orig_mod is module
    assert speed.loader_options(0, "cpu", 2) == {"num_workers": 0, "pin_memory": False}
    assert speed.loader_options(3, "cuda", 4) == {
        "num_workers": 3,
        "pin_memory": True,
        "persistent_workers": True,
        "prefetch_factor": 4,
    }
    images, labels = speed.to_device(torch.randn(2, 3, 4, 5), torch.zeros(2, 4, 5), "cpu", channels_last=True)
    assert images.is_contiguous(memory_format=CL) and labels.shape == (2, 4, 5)


def test_engine_trains_in_channels_last(tmp_path, ops_path):
    """train.channels_last=true on the CPU: the model's conv weights and the batches are channels_last (the
    checkpointed weights load into an NCHW model as well)."""
    seen = []
    real = speed.to_device

    def to_device(*args, **kwargs):
        images, labels = real(*args, **kwargs)
        seen.append(images.is_contiguous(memory_format=CL))
        return images, labels

    cfg = load_config(None, tiny_overrides(tmp_path, 2, ["train.channels_last=true"]))
    with unittest.mock.patch.object(speed, "to_device", to_device):
        model = train(cfg)["model"]
    assert seen == [True, True]
    assert model.backbone.conv1[0].weight.is_contiguous(memory_format=CL)
