"""Benchmark of one training step and of inference, DeepLabv3+ with a dilated ResNet-50c and 19 classes:

  (a) baseline   the plain head (csflm=False)
  (b) csfrn      CSFRN (CSFLM + AAM) on our kernels
  (c) reference  CSFRN under ``csfrn.ops.use_reference()`` (the pure-PyTorch twins)
  (d) torchvision CSFRN with AAM's dual deformable conv made of two ``torchvision.ops.deform_conv2d`` calls

A training step is zero_grad, forward with labels (all losses), backward of their sum, SGD (momentum 0.9)
step; inference is an eval-mode forward under no_grad. All variants run in one process, their repetitions
interleaved (``csfrn.bench.timing.measure``); (b), (c) and (d) share one model, so they run the same weights.
``csfrn bench --what train`` and ``benchmarks/bench_train_step.py`` call ``main``.

The targets are ratios: (b) / (a) step time, and how much our kernels cut CSFRN's extra time over the
baseline: ((c) - (a)) / ((b) - (a)). GFLOPs (paper counting, ``csfrn.models.complexity``) put (b) / (a) in
context: it cannot go below the FLOP ratio when both run at the same rate.
"""
import argparse
import contextlib
import datetime
import os
import statistics
import time
import unittest.mock

import torch
import torch.nn.functional as F

from .. import ops
from ..models import build_model, complexity
from ..nn import AAM
from .timing import device_name, measure, table, write_json

NUM_CLASSES = 19
# Tiny widths for tests and smoke runs: seconds on a CPU, same code paths.
QUICK = dict(width=8, blocks=(1, 1, 1, 1), channels=32, aux_channels=16, embed_dim=8)
VARIANTS = ("baseline", "csfrn", "reference", "torchvision")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def torchvision_dual_deform_conv2d(x, y, offset, weight_x, weight_y, bias_x=None, bias_y=None, stride=1,
                                   padding=0, dilation=1, mask=None):
    """``csfrn.ops.dual_deform_conv2d`` made of two ``torchvision.ops.deform_conv2d`` calls (the peer)."""
    from torchvision.ops import deform_conv2d
    kw = dict(stride=stride, padding=padding, dilation=dilation, mask=mask)
    return deform_conv2d(x, offset, weight_x, bias_x, **kw), deform_conv2d(y, offset, weight_y, bias_y, **kw)


def have_torchvision():
    try:
        import torchvision.ops  # noqa: F401
    except ImportError:
        return False
    return True


def variant_context(name):
    """The context a variant runs in: our kernels, the reference twins, or torchvision's deform conv in AAM
    (AAM calls ``csfrn.ops.dual_deform_conv2d`` through the ``csfrn.ops`` module, so patching it there
    reaches every AAM)."""
    if name == "reference":
        return ops.use_reference()
    if name == "torchvision":
        return unittest.mock.patch.object(ops, "dual_deform_conv2d", torchvision_dual_deform_conv2d)
    return contextlib.nullcontext()


def make_batch(batch, size, device, seed=0):
    """Images and labels made of 8x8 blocks of random classes (every image holds several classes in regions,
    as segmentation labels do; uniform noise labels would hold all 19 in every image), a 5% ignored band."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=g)
    coarse = torch.randint(0, NUM_CLASSES, (batch, 1, 8, 8), generator=g).float()
    labels = F.interpolate(coarse, size=size, mode="nearest")[:, 0].long()
    labels[:, : max(1, size[0] // 20)] = 255
    return images.to(device), labels.to(device)


def build(csflm, quick, device, seed=0):
    torch.manual_seed(seed)
    model = build_model("deeplabv3plus", NUM_CLASSES, backbone="resnet50c", csflm=csflm,
                        **(QUICK if quick else {}))
    if csflm:
        # Fractional offsets, as after some training: the zero initialisation samples exactly on the pixel grid.
        torch.nn.init.uniform_(model.csflm.fuse.offset.bias, -1.0, 1.0)
    return model.to(device)


def train_step_fn(model, optimizer, images, labels, amp=None, context=contextlib.nullcontext):
    """One SGD step: zero_grad, forward with every loss (under autocast when ``amp`` is a dtype), backward,
    step. ``context`` is entered around the whole step."""
    device_type = images.device.type

    def step():
        with context():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
                _, losses = model(images, labels)
                loss = sum(losses.values())
            loss.backward()
            optimizer.step()
    return step


def inference_fn(model, images, amp=None, context=contextlib.nullcontext):
    device_type = images.device.type

    def infer():
        with context(), torch.no_grad(), torch.autocast(device_type, dtype=amp, enabled=amp is not None):
            model(images)
    return infer


def _module_groups(model):
    """Category -> modules whose forward time it counts (a category's time excludes nested categories')."""
    head = []
    for child in model.decode_head.children():
        head.extend(child if isinstance(child, torch.nn.ModuleList) else [child])
    groups = {"backbone": [model.backbone], "head": head,
              "aux head": [model.aux_head] if model.aux_head is not None else [],
              "CSFLM": [model.csflm] if model.csflm is not None else [],
              "AAM": [model.csflm.fuse] if isinstance(getattr(model.csflm, "fuse", None), AAM) else [],
              "losses": [model.seg_loss, model.cac_loss, model.smooth_loss]}
    return {k: v for k, v in groups.items() if v}


def breakdown(model, optimizer, images, labels, amp=None, reps=1, context=contextlib.nullcontext):
    """Training-step time by part (ms, median over ``reps`` steps after one warm-up): the forward time of
    each category of ``_module_groups`` (module hooks; a nested category's time is taken out of its parent's,
    so CSFLM excludes AAM), "other forward" (upsampling, aux cross-entropy, glue), "backward" and "optimizer"."""
    device = images.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    groups = _module_groups(model)
    totals, stack = {}, []

    def enter(name):
        def hook(module, args):
            sync()
            stack.append([name, time.perf_counter(), 0.0])
        return hook

    def leave(module, args, output):
        sync()
        name, t0, children = stack.pop()
        elapsed = time.perf_counter() - t0
        totals[name] = totals.get(name, 0.0) + elapsed - children
        if stack:
            stack[-1][2] += elapsed
    handles = []
    for name, modules in groups.items():
        for m in modules:
            handles += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    model.train()
    samples = []
    try:
        for rep in range(reps + 1):
            totals.clear()
            with context():
                optimizer.zero_grad(set_to_none=True)
                sync()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    _, losses = model(images, labels)
                    loss = sum(losses.values())
                sync()
                t1 = time.perf_counter()
                loss.backward()
                sync()
                t2 = time.perf_counter()
                optimizer.step()
                sync()
                t3 = time.perf_counter()
            if rep == 0:       # warm-up
                continue
            parts = {k: totals.get(k, 0.0) * 1e3 for k in groups}
            parts["other forward"] = (t1 - t0) * 1e3 - sum(parts.values())
            parts["backward"] = (t2 - t1) * 1e3
            parts["optimizer"] = (t3 - t2) * 1e3
            samples.append(parts)
    finally:
        for h in handles:
            h.remove()
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def gflops(quick, size):
    """Paper-counting GFLOPs of the baseline and of CSFRN for one image of ``size`` (meta device: no time)."""
    out = {}
    for name, csflm in (("baseline", False), ("csfrn", True)):
        with torch.device("meta"):
            model = build_model("deeplabv3plus", NUM_CLASSES, backbone="resnet50c", csflm=csflm,
                                **(QUICK if quick else {}))
        out[name] = complexity(model, size)["gflops"]
    return out


def ratios(step):
    """The targets from the median step times (ms) of the variants."""
    base, ours = step["baseline"]["median_ms"], step["csfrn"]["median_ms"]
    out = {"csfrn_over_baseline": ours / base}
    if "reference" in step:
        extra_ours = ours - base
        extra_ref = step["reference"]["median_ms"] - base
        out["extra_ms_csfrn"] = extra_ours
        out["extra_ms_reference"] = extra_ref
        # The ratio means something only when our extra time is positive.
        out["extra_cut"] = extra_ref / extra_ours if extra_ours > 0 else None
    if "torchvision" in step:
        out["torchvision_over_csfrn"] = step["torchvision"]["median_ms"] / ours
    return out


def run(device="cpu", size=None, batch=2, reps=5, amp=None, quick=False, warmup=1, variants=VARIANTS,
        inference=True, infer_size=None, infer_batch=None, log=print):
    """Measures the variants; returns {"meta", "rows", "ratios", "gflops"}.

    Args:
        device: "cpu" or "cuda".
        size: (H, W) of the input; default 321x321 on the CPU, 769x769 on CUDA (33x33 with ``quick``).
        batch: images per step.
        reps: timed repetitions per variant (interleaved), after ``warmup`` untimed ones.
        amp: "none", "bf16" or "fp16" autocast; default bf16 on CUDA, none on the CPU.
        quick: tiny widths and blocks (``QUICK``) for tests.
        variants: the subset of ``VARIANTS`` to run ("baseline" and "csfrn" are always run).
        inference: also time inference.
        infer_size, infer_batch: the input of the inference timing (default: the training batch), e.g.
            (1024, 2048) and 1 for one Cityscapes image in whole-image mode.
    """
    device = torch.device(device)
    if size is None:
        size = 33 if quick else (769 if device.type == "cuda" else 321)
    size = (size, size) if isinstance(size, int) else tuple(size)
    amp = amp or ("bf16" if device.type == "cuda" else "none")
    amp_dtype = AMP_DTYPES[amp]
    variants = [v for v in VARIANTS if v in set(variants) | {"baseline", "csfrn"}]
    if "torchvision" in variants and not have_torchvision():
        log("torchvision is not installed: skipping variant (d), torchvision's deform_conv2d in AAM")
        variants.remove("torchvision")

    images, labels = make_batch(batch, size, device)
    models = {"baseline": build(False, quick, device), "csfrn": build(True, quick, device)}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def model_of(v):
        return "baseline" if v == "baseline" else "csfrn"

    results = {}
    for model in models.values():
        model.train()
    steps = {v: train_step_fn(models[model_of(v)], optimizers[model_of(v)], images, labels, amp_dtype,
                              lambda v=v: variant_context(v)) for v in variants}
    log(f"timing the training step of {', '.join(variants)} ({reps} interleaved repetitions)")
    results["train step"] = measure(steps, device=device, reps=reps, warmup=warmup)
    if inference:
        for model in models.values():
            model.eval()
        infer_images = images
        if infer_size is not None or infer_batch is not None:
            infer_size = tuple(infer_size or size)
            infer_images, _ = make_batch(infer_batch or batch, infer_size, device, seed=1)
        infers = {v: inference_fn(models[model_of(v)], infer_images, amp_dtype, lambda v=v: variant_context(v))
                  for v in variants}
        log(f"timing inference of {', '.join(variants)}")
        results["inference"] = measure(infers, device=device, reps=reps, warmup=warmup)

    rows = []
    for mode, res in results.items():
        base = res["baseline"]["median_ms"]
        for v in variants:
            rows.append({"mode": mode, "variant": v, **res[v], "vs_baseline": res[v]["median_ms"] / base})
    flops = gflops(quick, size)
    meta = {"device": device_name(device), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "time": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S UTC"),
            "model": "deeplabv3plus resnet50c" + (" (quick: tiny widths)" if quick else ""), "quick": quick,
            "classes": NUM_CLASSES, "batch": batch, "size": list(size), "amp": amp, "reps": reps,
            "threads": torch.get_num_threads(), "load_average": _load_average()}
    if inference:
        meta["infer_batch"], meta["infer_size"] = int(infer_images.shape[0]), list(infer_images.shape[-2:])
    return {"meta": meta, "rows": rows, "ratios": ratios(results["train step"]),
            "gflops": {**flops, "ratio": flops["csfrn"] / flops["baseline"]}}


def _load_average():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


COLUMNS = [("mode", "mode", "{}"), ("variant", "variant", "{}"), ("median_ms", "median ms", "{:.1f}"),
           ("min_ms", "min ms", "{:.1f}"), ("max_ms", "max ms", "{:.1f}"), ("peak_mb", "peak MiB", "{:.0f}"),
           ("vs_baseline", "x baseline", "{:.3f}")]


def summary_lines(result):
    r, g = result["ratios"], result["gflops"]
    lines = [f"(b)/(a) step time: {r['csfrn_over_baseline']:.3f}  (GFLOPs ratio {g['ratio']:.3f}: "
             f"{g['csfrn']:.4g} vs {g['baseline']:.4g} per image)"]
    if "extra_cut" in r:
        cut = "n/a (no extra time)" if r["extra_cut"] is None else f"{r['extra_cut']:.2f}x"
        lines.append(f"CSFRN's extra time over the baseline: ours {r['extra_ms_csfrn']:.1f} ms, reference "
                     f"{r['extra_ms_reference']:.1f} ms; ((c)-(a))/((b)-(a)) = {cut}")
    if "torchvision_over_csfrn" in r:
        lines.append(f"(d)/(b) step time (torchvision deform conv in AAM): {r['torchvision_over_csfrn']:.3f}")
    return lines


def parse_size(text):
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"size must be H or HxW, got {text!r}")
    return (parts[0], parts[-1])


def add_arguments(parser):
    """The options of this benchmark (``csfrn bench --what train`` and ``benchmarks/bench_train_step.py``)."""
    parser.add_argument("--size", type=parse_size, default=None, help="H or HxW (default 321 CPU, 769 CUDA)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default=None, choices=list(AMP_DTYPES), help="default bf16 on CUDA, none on CPU")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-inference", dest="inference", action="store_false")
    parser.add_argument("--infer-size", type=parse_size, default=None,
                        help="H or HxW of the inference input (default: the training size)")
    parser.add_argument("--infer-batch", type=int, default=None, help="images per inference (default --batch)")
    parser.add_argument("--quick", action="store_true", help="tiny model and size, for tests")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default torch's); 1 keeps a shared, loaded CPU from stalling every "
                             "parallel op on a descheduled thread")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write the results to DIR/train_step-<device>.json (default: no file)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results to FILE (instead of --out's)")
    return parser


def main(argv=None, parser=None):
    parser = add_arguments(parser or argparse.ArgumentParser(prog="benchmarks/bench_train_step.py",
                                                             description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    if args.out and not args.json:
        args.json = os.path.join(args.out, f"train_step-{torch.device(args.device).type}.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(args.device, args.size, args.batch, args.reps, args.amp, args.quick, variants=args.variants,
                 inference=args.inference, infer_size=args.infer_size, infer_batch=args.infer_batch)
    m = result["meta"]
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    print(f"{m['model']}, {m['classes']} classes, N={m['batch']} 3x{m['size'][0]}x{m['size'][1]}, amp {m['amp']}, "
          f"on {m['device']}, torch {m['torch']}, median of {m['reps']} (load average {m['load_average']}, "
          f"{time.perf_counter() - start:.0f} s in all)")
    print("\n".join(summary_lines(result)))
    print(table(result["rows"], COLUMNS))
    return result


if __name__ == "__main__":
    main()
