"""Benchmark of one training step and of inference, DeepLabv3+ with a dilated ResNet-50c and 19 classes:

  (a) baseline   the plain head (csflm=False)
  (b) csfrn      CSFRN (CSFLM + AAM) on our kernels
  (c) reference  CSFRN under ``csfrn.ops.use_reference()`` (the pure-PyTorch twins)
  (d) torchvision CSFRN with AAM's dual deformable conv made of two ``torchvision.ops.deform_conv2d`` calls

and the training-speed variants: ``baseline`` and ``csfrn`` with a suffix ``-cl`` (model and batch in
channels_last), ``-compiled`` (``torch.compile``) or ``-cl-compiled`` (both), and the peer users would pick
instead, ``tv-deeplabv3``: torchvision's ``deeplabv3_resnet50`` (random init, aux head) trained the same way
(same batch, seg + 0.4 aux cross-entropy on float32 logits), ``tv-deeplabv3-cl`` in channels_last. Every
training row gives step ms, images/s, peak memory, achieved TFLOP/s (3x the training forward's FLOPs,
``csfrn.models.complexity.training_flops``) and its share of the device's ceiling (the measured bf16 matrix
product on a GPU under bf16, float32 otherwise; ``--ceiling-tflops`` gives it). ``--engine-iters N`` also runs
``csfrn.engine.train`` (what ``csfrn train`` runs) on the synthetic set at the same shape and reports its data
time per step beside the compute time.

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
import copy
import datetime
import json
import os
import tempfile
import time
import unittest.mock

import torch
import torch.nn.functional as F

from .. import ops
from ..engine.config import load_config
from ..engine.optim import fused_on
from ..engine.step import AMP_DTYPES
from ..engine.train import train
from ..losses import labels_checked
from ..models import build_model, complexity
from ..models.complexity import training_flops
from .timing import cpu_ceilings, device_name, gpu_ceilings, measure, table, write_json

NUM_CLASSES = 19
# Tiny widths for tests and smoke runs: seconds on a CPU, same code paths.
QUICK = dict(width=8, blocks=(1, 1, 1, 1), channels=32, aux_channels=16, embed_dim=8)
DEFAULT_VARIANTS = ("baseline", "csfrn", "reference", "torchvision")
SPEED_VARIANTS = (
    "baseline-cl",
    "baseline-compiled",
    "baseline-cl-compiled",
    "csfrn-cl",
    "csfrn-compiled",
    "csfrn-cl-compiled",
    "tv-deeplabv3",
    "tv-deeplabv3-cl",
)
VARIANTS = DEFAULT_VARIANTS + SPEED_VARIANTS


def torchvision_dual_deform_conv2d(
    x, y, offset, weight_x, weight_y, bias_x=None, bias_y=None, stride=1, padding=0, dilation=1, mask=None
):
    """``csfrn.ops.dual_deform_conv2d`` made of two ``torchvision.ops.deform_conv2d`` calls (the peer)."""
    from torchvision.ops import deform_conv2d  # here: the torchvision peers are optional (have_torchvision)

    kw = dict(stride=stride, padding=padding, dilation=dilation, mask=mask)
    return deform_conv2d(x, offset, weight_x, bias_x, **kw), deform_conv2d(y, offset, weight_y, bias_y, **kw)


def have_torchvision():
    try:
        import torchvision.ops  # noqa: F401  (this is the check)
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
    model = build_model("deeplabv3plus", NUM_CLASSES, backbone="resnet50c", csflm=csflm, **(QUICK if quick else {}))
    if csflm:
        # Fractional offsets, as after some training: the zero initialisation samples exactly on the pixel grid.
        torch.nn.init.uniform_(model.csflm.fuse.offset.bias, -1.0, 1.0)
    return model.to(device)


def sgd(model):
    """The benchmark's optimizer for every variant: SGD with momentum, fused on a GPU as ``csfrn train`` runs it."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=fused_on(model.parameters()) or None)


def train_step_fn(model, optimizer, images, labels, amp=None, context=contextlib.nullcontext):
    """One SGD step: zero_grad, forward with every loss (under autocast when ``amp`` is a dtype), backward,
    step. ``context`` is entered around the whole step."""
    device_type = images.device.type

    def step():
        # The labels are made in range (make_batch): no per-step check, as in the engine's loop.
        with context(), labels_checked():
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


def gflops(quick, size):
    """Paper-counting GFLOPs of the baseline and of CSFRN for one image of ``size`` (meta device: no time)."""
    out = {}
    for name, csflm in (("baseline", False), ("csfrn", True)):
        with torch.device("meta"):
            model = build_model(
                "deeplabv3plus", NUM_CLASSES, backbone="resnet50c", csflm=csflm, **(QUICK if quick else {})
            )
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


def parse_variant(name):
    """``"csfrn-cl-compiled"`` -> ("csfrn", channels_last=True, compiled=True)."""
    base, channels_last, compiled = name, False, False
    if base.endswith("-compiled"):
        base, compiled = base[: -len("-compiled")], True
    if base.endswith("-cl"):
        base, channels_last = base[: -len("-cl")], True
    return base, channels_last, compiled


class TorchvisionPeer(torch.nn.Module):
    """torchvision's ``deeplabv3_resnet50`` (random init, aux head, ``NUM_CLASSES``) with our models' training
    interface: ``peer(images, labels)`` -> (logits, {"seg": CE, "aux": 0.4 CE}) on float32 logits (torchvision
    upsamples them to the input size inside its forward, in the autocast dtype)."""

    def __init__(self, quick=False):
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_resnet50  # optional, as above

        self.model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True)

    def forward(self, images, labels=None):
        out = self.model(images)
        if labels is None:
            return out["out"]
        seg = F.cross_entropy(out["out"].float(), labels, ignore_index=255)
        aux = F.cross_entropy(out["aux"].float(), labels, ignore_index=255)
        return out["out"], {"seg": seg, "aux": 0.4 * aux}


def build_variant(name, quick, device, models):
    """The module a variant trains: a copy of its base model (``models`` caches the base ones, so every
    variant of a base starts from the same weights), in channels_last when asked. "reference" and
    "torchvision" share CSFRN's module itself, as before."""
    base, channels_last, _ = parse_variant(name)
    key = "csfrn" if base in ("reference", "torchvision") else base
    if key not in models:
        if key == "tv-deeplabv3":
            torch.manual_seed(0)
            models[key] = TorchvisionPeer(quick).to(device)
        else:
            models[key] = build(key == "csfrn", quick, device)
    if name == key or base in ("reference", "torchvision"):
        return models[key]
    model = copy.deepcopy(models[key])
    return model.to(memory_format=torch.channels_last) if channels_last else model


def step_flops(name, quick, size, batch):
    """Training FLOPs of one step of a variant (meta device)."""
    base = parse_variant(name)[0]
    with torch.device("meta"):
        if base == "tv-deeplabv3":
            model = TorchvisionPeer(quick)
        else:
            model = build_model(
                "deeplabv3plus", NUM_CLASSES, backbone="resnet50c", csflm=base != "baseline", **(QUICK if quick else {})
            )
    return training_flops(model, (batch, 3, *size))


def ceiling_tflops(device, amp):
    """The device's matrix-product ceiling in TFLOP/s: bf16 (under bf16 / fp16 autocast) or float32 without
    TF32 on a GPU, float32 on the CPU (at torch's current thread count); and what was measured."""
    if torch.device(device).type == "cuda":
        c = gpu_ceilings(reps=5)
        key = "matmul_tflops_bf16" if amp != "none" else "matmul_tflops_fp32"
        return c[key], key
    return cpu_ceilings()["matmul_gflops_fp32"] / 1e3, "matmul_tflops_fp32"


def run(
    device="cpu",
    size=None,
    batch=2,
    reps=5,
    amp=None,
    quick=False,
    warmup=1,
    variants=DEFAULT_VARIANTS,
    inference=True,
    infer_size=None,
    infer_batch=None,
    ceiling=None,
    compile_mode="default",
    engine_iters=0,
    engine_workers=2,
    log=print,
):
    """Measures the variants; returns {"meta", "rows", "ratios", "gflops", "train", "ceiling"} (and "engine"
    with ``engine_iters``).

    Args:
        device: "cpu" or "cuda".
        size: (H, W) of the input; default 321x321 on the CPU, 769x769 on CUDA (33x33 with ``quick``).
        batch: images per step.
        reps: timed repetitions per variant (interleaved), after ``warmup`` untimed ones (compiled variants
            compile in an extra untimed call first).
        amp: "none", "bf16" or "fp16" autocast; default bf16 on CUDA, none on the CPU.
        quick: tiny widths and blocks (``QUICK``) for tests (the torchvision peer keeps its size).
        variants: a subset of ``VARIANTS`` ("baseline" and "csfrn" are always run).
        inference: also time inference (eager variants only: evaluation is eager unless eval.compile).
        infer_size, infer_batch: the input of the inference timing (default: the training batch), e.g.
            (1024, 2048) and 1 for one Cityscapes image in whole-image mode.
        ceiling: the device's ceiling in TFLOP/s (default: measured now, ``ceiling_tflops``).
        compile_mode: torch.compile's mode for the compiled variants.
        engine_iters: also train that many iterations through ``csfrn.engine.train`` (baseline and CSFRN, the
            engine's default memory format) and report data and compute time per step; 0: not.
        engine_workers: data.num_workers of that run.
    """
    device = torch.device(device)
    if size is None:
        size = 33 if quick else (769 if device.type == "cuda" else 321)
    size = (size, size) if isinstance(size, int) else tuple(size)
    amp = amp or ("bf16" if device.type == "cuda" else "none")
    amp_dtype = AMP_DTYPES[amp]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    variants = [v for v in VARIANTS if v in set(variants) | {"baseline", "csfrn"}]
    if not have_torchvision():
        dropped = [v for v in variants if parse_variant(v)[0] in ("torchvision", "tv-deeplabv3")]
        if dropped:
            log(f"torchvision is not installed: skipping {', '.join(dropped)}")
        variants = [v for v in variants if v not in dropped]

    images, labels = make_batch(batch, size, device)
    images_cl = images.to(memory_format=torch.channels_last)
    bases, models, optimizers, steps = {}, {}, {}, {}
    for v in variants:
        model = build_variant(v, quick, device, bases).train()
        _, channels_last, compiled = parse_variant(v)
        models[v] = model
        key = id(model)
        if key not in optimizers:
            optimizers[key] = sgd(model)
        net = torch.compile(model, mode=compile_mode) if compiled else model
        steps[v] = train_step_fn(
            net,
            optimizers[key],
            images_cl if channels_last else images,
            labels,
            amp_dtype,
            lambda v=v: variant_context(v),
        )
    for v in variants:
        if parse_variant(v)[2]:
            log(f"compiling {v}")
            t0 = time.perf_counter()
            steps[v]()
            log(f"  {time.perf_counter() - t0:.0f} s")

    results = {}
    log(f"timing the training step of {', '.join(variants)} ({reps} interleaved repetitions)")
    results["train step"] = measure(steps, device=device, reps=reps, warmup=warmup)
    eager = [v for v in variants if not parse_variant(v)[2]]
    if inference:
        for model in models.values():
            model.eval()
        infer_images = images
        if infer_size is not None or infer_batch is not None:
            infer_size = tuple(infer_size or size)
            infer_images, _ = make_batch(infer_batch or batch, infer_size, device, seed=1)
        infer_cl = infer_images.to(memory_format=torch.channels_last)
        infers = {
            v: inference_fn(
                models[v], infer_cl if parse_variant(v)[1] else infer_images, amp_dtype, lambda v=v: variant_context(v)
            )
            for v in eager
        }
        log(f"timing inference of {', '.join(eager)}")
        results["inference"] = measure(infers, device=device, reps=reps, warmup=warmup)

    if ceiling is None:
        ceiling, ceiling_what = ceiling_tflops(device, amp)
    else:
        ceiling_what = "given"
    flops = {v: step_flops(v, quick, size, batch) for v in variants}
    rows, train = [], {}
    for mode, res in results.items():
        base = res["baseline"]["median_ms"]
        for v in res:
            row = {
                "mode": mode,
                "variant": v,
                **res[v],
                "vs_baseline": res[v]["median_ms"] / base,
                "images_s": batch * 1e3 / res[v]["median_ms"],
            }
            if mode == "train step":
                row["tflops"] = flops[v] / (res[v]["median_ms"] * 1e-3) / 1e12
                row["mfu"] = row["tflops"] / ceiling
                train[v] = {
                    "step_ms": row["median_ms"],
                    "images_s": row["images_s"],
                    "peak_mb": row["peak_mb"],
                    "tflops": row["tflops"],
                    "mfu": row["mfu"],
                    "step_tflop": flops[v] / 1e12,
                }
            rows.append(row)
    paper = gflops(quick, size)
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S UTC"),
        "model": "deeplabv3plus resnet50c" + (" (quick: tiny widths)" if quick else ""),
        "quick": quick,
        "classes": NUM_CLASSES,
        "batch": batch,
        "size": list(size),
        "amp": amp,
        "reps": reps,
        "compile_mode": compile_mode,
        "threads": torch.get_num_threads(),
        "load_average": _load_average(),
    }
    if inference:
        meta["infer_batch"], meta["infer_size"] = int(infer_images.shape[0]), list(infer_images.shape[-2:])
    result = {
        "meta": meta,
        "rows": rows,
        "ratios": ratios(results["train step"]),
        "gflops": {**paper, "ratio": paper["csfrn"] / paper["baseline"]},
        "train": train,
        "ceiling": {"tflops": ceiling, "what": ceiling_what},
    }
    if engine_iters:
        result["engine"] = {
            name: engine_times(name == "csfrn", quick, size, batch, engine_iters, device, amp, engine_workers, log)
            for name in ("baseline", "csfrn")
        }
    return result


def engine_times(csflm, quick, size, batch, iters, device, amp, workers, log=print):
    """Train ``iters`` iterations through ``csfrn.engine.train`` (``csfrn train``'s loop: data loader, copies,
    the engine's memory format and settings) on the synthetic set at ``size``; {"data_ms", "step_ms",
    "compute_ms", "images_s"} per step over the second half of the run (the first half warms up)."""
    model = QUICK if quick else {}
    overrides = [
        f"model.csflm={'true' if csflm else 'false'}",
        f"model.num_classes={NUM_CLASSES}",
        "model.head=deeplabv3plus",
        "model.backbone=resnet50c",
        "model.pretrained=null",
        *[f"model.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in model.items()],
        "data.dataset=synthetic",
        f"data.size={max(size)}",
        f"data.length={batch * iters}",
        "data.val_length=1",
        f"data.crop_size=[{size[0]},{size[1]}]",
        "data.scale_range=[1.0,1.0]",
        f"data.batch_size={batch}",
        f"data.num_workers={workers}",
        f"train.iters={iters}",
        f"train.log_interval={max(iters // 2, 1)}",
        "train.eval_interval=0",
        f"train.amp={amp}",
        f"train.device={torch.device(device).type}",
        f"train.checkpoint_interval={iters}",
        "train.tensorboard=false",
        "train.progress=false",
        "eval.mode=whole",
        "eval.max_images=1",
    ]
    log(f"training {'CSFRN' if csflm else 'the baseline'} {iters} iterations through csfrn.engine.train")
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = load_config(None, overrides + [f"train.work_dir={work_dir}"])
        train(cfg)
        with open(os.path.join(work_dir, "metrics.jsonl")) as f:
            last = [r for r in map(json.loads, f) if r["kind"] == "train"][-1]
    return {
        "data_ms": last["data_ms"],
        "step_ms": last["step_ms"],
        "compute_ms": last["step_ms"] - last["data_ms"],
        "images_s": last["images/s"],
    }


def _load_average():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


COLUMNS = [
    ("mode", "mode", "{}"),
    ("variant", "variant", "{}"),
    ("median_ms", "median ms", "{:.1f}"),
    ("min_ms", "min ms", "{:.1f}"),
    ("max_ms", "max ms", "{:.1f}"),
    ("peak_mb", "peak MiB", "{:.0f}"),
    ("images_s", "images/s", "{:.3g}"),
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("mfu", "of ceiling", "{:.1%}"),
    ("vs_baseline", "x baseline", "{:.3f}"),
]


def summary_lines(result):
    r, g = result["ratios"], result["gflops"]
    lines = [
        f"(b)/(a) step time: {r['csfrn_over_baseline']:.3f}  (GFLOPs ratio {g['ratio']:.3f}: "
        f"{g['csfrn']:.4g} vs {g['baseline']:.4g} per image)"
    ]
    if "extra_cut" in r:
        cut = "n/a (no extra time)" if r["extra_cut"] is None else f"{r['extra_cut']:.2f}x"
        lines.append(
            f"CSFRN's extra time over the baseline: ours {r['extra_ms_csfrn']:.1f} ms, reference "
            f"{r['extra_ms_reference']:.1f} ms; ((c)-(a))/((b)-(a)) = {cut}"
        )
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
    parser.add_argument(
        "--reps",
        "--iters",
        dest="reps",
        type=int,
        default=5,
        help="timed steps per variant (interleaved; default %(default)s)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default=None, choices=list(AMP_DTYPES), help="default bf16 on CUDA, none on CPU")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=list(VARIANTS) + ["all"],
        help="default: %(default)s; 'all': every variant",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the -compiled variants")
    parser.add_argument(
        "--ceiling-tflops",
        type=float,
        default=None,
        help="the device's ceiling in TFLOP/s (default: measured now, bf16 matmul on a GPU under "
        "autocast, float32 otherwise)",
    )
    parser.add_argument(
        "--engine-iters",
        type=int,
        default=0,
        help="also train N iterations of the baseline and CSFRN through csfrn train's loop and "
        "report data time per step beside compute time (default: 0, not)",
    )
    parser.add_argument("--engine-workers", type=int, default=2, help="data.num_workers of that run")
    parser.add_argument("--no-inference", dest="inference", action="store_false")
    parser.add_argument(
        "--infer-size",
        type=parse_size,
        default=None,
        help="H or HxW of the inference input (default: the training size)",
    )
    parser.add_argument("--infer-batch", type=int, default=None, help="images per inference (default --batch)")
    parser.add_argument("--quick", action="store_true", help="tiny model and size, for tests")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default torch's); 1 keeps a shared, loaded CPU from stalling every "
        "parallel op on a descheduled thread",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write the results to DIR/train_step-<device>.json (default: no file)",
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results to FILE (instead of --out's)")
    return parser


def main(argv=None, parser=None):
    parser = add_arguments(
        parser or argparse.ArgumentParser(prog="benchmarks/bench_train_step.py", description=__doc__.split("\n\n")[0])
    )
    args = parser.parse_args(argv)
    if args.out and not args.json:
        args.json = os.path.join(args.out, f"train_step-{torch.device(args.device).type}.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    variants = VARIANTS if "all" in args.variants else args.variants
    result = run(
        args.device,
        args.size,
        args.batch,
        args.reps,
        args.amp,
        args.quick,
        variants=variants,
        inference=args.inference,
        infer_size=args.infer_size,
        infer_batch=args.infer_batch,
        ceiling=args.ceiling_tflops,
        compile_mode=args.compile_mode,
        engine_iters=args.engine_iters,
        engine_workers=args.engine_workers,
    )
    m = result["meta"]
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    print(
        f"{m['model']}, {m['classes']} classes, N={m['batch']} 3x{m['size'][0]}x{m['size'][1]}, amp {m['amp']}, "
        f"on {m['device']}, torch {m['torch']}, median of {m['reps']} (load average {m['load_average']}, "
        f"{time.perf_counter() - start:.0f} s in all)"
    )
    print("\n".join(summary_lines(result)))
    print(f"ceiling {result['ceiling']['tflops']:.3g} TFLOP/s ({result['ceiling']['what']})")
    for name, e in result.get("engine", {}).items():
        print(
            f"through csfrn train ({name}): {e['step_ms']:.1f} ms per step, data {e['data_ms']:.1f} ms beside "
            f"compute {e['compute_ms']:.1f} ms, {e['images_s']:.3g} images/s"
        )
    print(table(result["rows"], COLUMNS))
    return result


if __name__ == "__main__":
    main()
