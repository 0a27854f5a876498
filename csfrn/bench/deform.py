"""Deformable convolution benchmark: csfrn.ops.deform_conv2d vs its reference twin vs
torchvision.ops.deform_conv2d vs a dense F.conv2d of the same shape (the floor a deformable convolution
can approach: same matmul flops, no sampling), forward and forward + backward, time and peak memory, all in
one interleaved run. Shapes:

- generic: N=2, 512 -> 256 channels, 97 x 97, 3 x 3, padding 1.
- AAM at Cityscapes training size (769 crop, stride 8 -> 97 x 97), N=2, one shared offset field (18 channels):
  deform conv a on X (32 -> 32) and deform conv b on Y (512 -> 512). Timed as dual_deform_conv2d, as two
  deform_conv2d calls, as two torchvision calls and as two dense convolutions.

The floor: the dense convolution's flops, 2 * N * C_out * C_in * 9 * H * W per pass (x 3 for forward +
backward: the input and weight gradients are one matmul each), over the float32 matmul rate. On the CPU that
rate is measured at the start of the run (:func:`csfrn.bench.timing.cpu_ceilings`); figures for the machines
we ran on are in ``benchmarks/results/``.

The CUDA kernels' launch plan (csfrn/bench/deform_plan.py) is printed first: for the GPU shape N=8, 512 -> 256,
97 x 97, 3 x 3 in float32 and bf16, single and dual, every kernel's bytes and flops, the floor of the call at a
card's ceilings (``--card``) and the expected time; the JSON holds it under "plan", beside the measurement.

The twin materialises every bilinear gather; at full size it takes seconds and gigabytes, so it runs once
(``twin_reps``, default 1) or not at all (``--no-twin``).
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F
import torchvision

from .. import ops
from ..engine.step import AMP_DTYPES
from ..ops import reference
from . import deform_plan
from .timing import cpu_ceilings, device_name, measure, table, write_json


def _shapes(quick, batch=None):
    if quick:
        return dict(n=batch or 1, size=33, generic=(64, 32), aam=((16, 16), (64, 64)))
    return dict(n=batch or 2, size=97, generic=(512, 256), aam=((32, 32), (512, 512)))


def _flops(n, c_in, c_out, size, taps=9):
    return 2.0 * n * c_out * c_in * taps * size * size


def _tensors(n, c_in, c_out, size, device, gen):
    x = torch.randn(n, c_in, size, size, generator=gen).to(device)
    w = (torch.randn(c_out, c_in, 3, 3, generator=gen) / (3 * c_in**0.5)).to(device)
    b = torch.zeros(c_out).to(device)
    return x, w, b


def _fwd_bwd(fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()

    return run


def _autocast(fn, device, amp):
    """fn under torch.autocast to ``amp`` (a dtype), as a mixed-precision training step runs it: our kernels
    compute in that dtype, torchvision's deform_conv2d casts itself back to float32 (its autocast rule)."""
    if amp is None:
        return fn

    def run():
        with torch.autocast(device.type, dtype=amp):
            return fn()

    return run


def _first(outs):
    return outs[0] if isinstance(outs, tuple) else outs


def _measure_case(case, impls, leaves, device, reps, twin_reps, amp=None):
    """impls: name -> fn returning output(s). Twins run in their own (short) measurement."""
    rows = []
    impls = {k: _autocast(f, device, amp) for k, f in impls.items()}
    # The dtype each implementation returns (under autocast torchvision's deform conv runs in float32).
    with torch.no_grad():
        dtypes = {k: str(_first(f()).dtype).replace("torch.", "") for k, f in impls.items()}
    for mode in ("fwd", "fwd+bwd"):
        wrap = _no_grad if mode == "fwd" else (lambda fn: _fwd_bwd(fn, leaves))
        main = {k: wrap(f) for k, f in impls.items() if not k.startswith("twin")}
        twins = {k: wrap(f) for k, f in impls.items() if k.startswith("twin")}
        results = measure(main, device=device, reps=reps)
        if twins:
            results.update(measure(twins, device=device, reps=twin_reps))
        for name, r in results.items():
            rows.append(dict(case=case, mode=mode, impl=name, **r, out_dtype=dtypes[name]))
    return rows


def run(device="cpu", reps=3, quick=False, twin=True, twin_reps=1, amp=None, batch=None, matmul_gflops=None):
    """Returns one row per (case, mode, implementation): median / min / max ms, peak MiB and the output dtype.
    ``amp``: None (float32) or a dtype to run every implementation under autocast with. ``batch``: N (default
    2, 1 with ``quick``)."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    s = _shapes(quick, batch)
    n, size = s["n"], s["size"]
    rows = []

    # Generic.
    c_in, c_out = s["generic"]
    x, w, b = _tensors(n, c_in, c_out, size, dev, gen)
    off = (torch.randn(n, 18, size, size, generator=gen) * 2).to(dev)
    leaves = [t.requires_grad_() for t in (x, w, b, off)]
    impls = {
        "ours": lambda: ops.deform_conv2d(x, off, w, b, padding=1),
        "torchvision": lambda: torchvision.ops.deform_conv2d(x, off, w, b, padding=1),
        "dense conv2d": lambda: F.conv2d(x, w, b, padding=1),
    }
    if twin:
        impls["twin"] = lambda: reference.deform_conv2d(x, off, w, b, padding=1)
    case = f"generic N={n} {c_in}->{c_out} {size}x{size}"
    flops = _flops(n, c_in, c_out, size)
    for r in _measure_case(case, impls, leaves, dev, reps, twin_reps, amp):
        r["gflop"] = flops * (1 if r["mode"] == "fwd" else 3) / 1e9
        rows.append(r)

    # AAM: one offset field, X (a) and Y (b).
    (cx, cxo), (cy, cyo) = s["aam"]
    xa, wa, ba = _tensors(n, cx, cxo, size, dev, gen)
    ya, wb, bb = _tensors(n, cy, cyo, size, dev, gen)
    off = (torch.randn(n, 18, size, size, generator=gen) * 2).to(dev)
    leaves = [t.requires_grad_() for t in (xa, wa, ba, ya, wb, bb, off)]
    impls = {
        "ours dual": lambda: ops.dual_deform_conv2d(xa, ya, off, wa, wb, ba, bb, padding=1),
        "ours 2 calls": lambda: (
            ops.deform_conv2d(xa, off, wa, ba, padding=1),
            ops.deform_conv2d(ya, off, wb, bb, padding=1),
        ),
        "torchvision 2 calls": lambda: (
            torchvision.ops.deform_conv2d(xa, off, wa, ba, padding=1),
            torchvision.ops.deform_conv2d(ya, off, wb, bb, padding=1),
        ),
        "dense conv2d 2 calls": lambda: (F.conv2d(xa, wa, ba, padding=1), F.conv2d(ya, wb, bb, padding=1)),
    }
    if twin:
        impls["twin dual"] = lambda: reference.dual_deform_conv2d(xa, ya, off, wa, wb, ba, bb, padding=1)
    case = f"AAM N={n} X {cx}->{cxo} + Y {cy}->{cyo} {size}x{size}"
    flops = _flops(n, cx, cxo, size) + _flops(n, cy, cyo, size)
    for r in _measure_case(case, impls, leaves, dev, reps, twin_reps, amp):
        r["gflop"] = flops * (1 if r["mode"] == "fwd" else 3) / 1e9
        rows.append(r)

    peak = matmul_gflops if amp is None else None  # the floor is float32's
    for r in rows:
        r["floor_ms"] = r["gflop"] / peak * 1e3 if peak else None
    return rows


def ratios(rows):
    """The figures the targets are stated in, per (case, mode)."""
    by = {(r["case"], r["mode"], r["impl"]): r["median_ms"] for r in rows}
    out = []
    for case, mode in dict.fromkeys((r["case"], r["mode"]) for r in rows):

        def t(impl):
            return by.get((case, mode, impl))

        ours = t("ours") or t("ours dual")
        tv = t("torchvision") or t("torchvision 2 calls")
        dense = t("dense conv2d") or t("dense conv2d 2 calls")
        item = dict(case=case, mode=mode, torchvision_over_ours=tv / ours, ours_over_dense=ours / dense)
        if t("ours 2 calls"):
            item["separate_over_dual"] = t("ours 2 calls") / t("ours dual")
        out.append(item)
    return out


def add_arguments(parser):
    """The options of this benchmark (``csfrn bench --what deform`` and ``benchmarks/bench_deform_conv.py``)."""
    p = parser
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per implementation (interleaved)")
    p.add_argument("--twin-reps", type=int, default=1, help="repetitions of the (slow) reference twin")
    p.add_argument("--no-twin", action="store_true", help="skip the reference twin")
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    p.add_argument(
        "--amp",
        default="none",
        choices=list(AMP_DTYPES),
        help="run every implementation under autocast to this dtype (default: float32)",
    )
    p.add_argument("--batch", type=int, default=None, help="N of every shape (default 2, 1 with --quick)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write rows, ratios and the machine to DIR/deform_conv_<device>[-<amp>].json (default: no file)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write them to FILE (instead of --out's)")
    p.add_argument(
        "--card",
        default=None,
        choices=sorted(deform_plan.CARDS),
        help="the GPU whose ceilings the CUDA launch plan's floor is computed at (default: the CUDA device's own "
        f"when it is one of these, else {deform_plan.DEFAULT_CARD})",
    )
    return parser


def print_plans(plans):
    """The CUDA launch plans: per kernel, then each call's floor and expected time."""
    for p in plans:
        print(f"CUDA plan, {p['op']} fwd+bwd, {p['shape']}, {p['dtype']}, at {p['card']} ({p['card_source']}):")
        print(
            table(
                p["kernels"],
                [
                    ("phase", "pass", "{}"),
                    ("kernel", "kernel", "{}"),
                    ("launches", "launches", "{}"),
                    ("mbytes", "MB moved", "{:.0f}"),
                    ("gflop", "GFLOP", "{:.1f}"),
                    ("lane_bytes", "B/lane", "{}"),
                    ("maccesses", "M accesses", "{:.0f}"),
                    ("floor_ms", "floor ms", "{:.3f}"),
                    ("expected_ms", "expected ms", "{:.3f}"),
                ],
            )
        )
        print(
            f"  whole call: {p['mbytes']:.0f} MB, {p['gflop']:.0f} GFLOP; floor {p['floor_ms']:.2f} ms, "
            f"expected {p['expected_ms']:.2f} ms"
        )


def main(argv=None, parser=None):
    args = add_arguments(
        parser or argparse.ArgumentParser(prog="benchmarks/bench_deform_conv.py", description=__doc__.splitlines()[0])
    ).parse_args(argv)
    if args.out and not args.json:
        suffix = "" if args.amp == "none" else f"-{args.amp}"
        args.json = os.path.join(args.out, f"deform_conv_{torch.device(args.device).type}{suffix}.json")

    card = args.card or deform_plan.card_of(args.device)
    plans = deform_plan.gpu_plans(card)
    print_plans(plans)
    amp = AMP_DTYPES[args.amp]
    peak = cpu_ceilings()["matmul_gflops_fp32"] if torch.device(args.device).type == "cpu" else None
    rows = run(
        args.device,
        reps=args.reps,
        quick=args.quick,
        twin=not args.no_twin,
        twin_reps=args.twin_reps,
        amp=amp,
        batch=args.batch,
        matmul_gflops=peak,
    )
    rat = ratios(rows)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; autocast {args.amp}")
    for r in rows:
        if r["impl"] in ("dense conv2d", "dense conv2d 2 calls") and r["floor_ms"] is not None:
            print(
                f"floor {r['case']} {r['mode']}: {r['gflop']:.1f} GFLOP / {peak:.0f} GFLOP/s (measured now) = "
                f"{r['floor_ms']:.0f} ms"
            )
    print(
        table(
            rat,
            [
                ("case", "case", "{}"),
                ("mode", "pass", "{}"),
                ("torchvision_over_ours", "torchvision/ours", "{:.1f}x"),
                ("ours_over_dense", "ours/dense", "{:.2f}x"),
                ("separate_over_dual", "separate/dual", "{:.2f}x"),
            ],
        )
    )
    if args.json:
        write_json(
            args.json,
            dict(
                device=device_name(args.device),
                torch=torch.__version__,
                amp=args.amp,
                matmul_gflops_fp32=peak,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                reps=args.reps,
                rows=rows,
                ratios=rat,
                plan=plans,
            ),
        )
        print(f"wrote {args.json}")
    print(
        table(
            rows,
            [
                ("case", "case", "{}"),
                ("mode", "pass", "{}"),
                ("impl", "impl", "{}"),
                ("median_ms", "median ms", "{:.1f}"),
                ("min_ms", "min ms", "{:.1f}"),
                ("peak_mb", "peak MiB", "{:.0f}"),
                ("gflop", "GFLOP", "{:.1f}"),
                ("out_dtype", "output dtype", "{}"),
            ],
        )
    )
    return rows


if __name__ == "__main__":
    main()
