"""One benchmark report: the op benchmarks (class-wise ops at several sizes, and deformable convolution when
``csfrn.bench.deform`` is there), the training-step benchmark and the training step's time by module,
written as ``<out>/<device>-<date>.json`` and ``.md`` plus two PNG charts drawn with matplotlib:
``-ops.png`` (time vs size per op and implementation) and ``-step.png`` (the step's time by module).
``benchmarks/report.py`` calls ``main``.
"""
import argparse
import datetime
import json
import os
import re

import torch

from .. import plotting
from . import ops as ops_bench
from . import train_step
from .timing import device_name, write_json

# (N, D, H, W, K): the class-wise ops at the embedding sizes of 321, 513 and 769 crops (stride 8).
OP_SHAPES = [(2, 32, 41, 41, 19), (2, 32, 65, 65, 19), (2, 32, 97, 97, 19)]
QUICK_OP_SHAPES = [(1, 8, 9, 9, 3), (1, 8, 17, 17, 3)]


# ---------------------------------------------------------------- measurements
def op_rows(device, reps, quick, log=print):
    """Rows {op, pass, impl, pixels, shape, median_ms, min_ms, max_ms, peak_mb} of every op benchmark."""
    log("class-wise ops ...")
    shapes = QUICK_OP_SHAPES if quick else OP_SHAPES
    rows = []
    for r in ops_bench.run(device, reps, shapes=shapes):
        n, h, w = (int(v) for v in re.match(r"N=(\d+) D=\d+ (\d+)x(\d+)", r["shape"]).groups())
        rows.append({"op": r["op"], "pass": r["pass"], "impl": r["impl"], "pixels": n * h * w,
                     "shape": r["shape"], **{k: r[k] for k in ("median_ms", "min_ms", "max_ms", "peak_mb")}})
    try:
        from . import deform
    except ImportError:
        log("csfrn.bench.deform is not there: no deformable convolution rows")
        return rows, False
    # The deform benchmark has two sizes: its quick one and its full one.
    for small in ((True,) if quick else (True, False)):
        log(f"deformable convolution ({'small' if small else 'full'} size) ...")
        for r in deform.run(device=device, reps=reps, quick=small):
            n, h, w = (int(v) for v in re.search(r"N=(\d+).* (\d+)x(\d+)$", r["case"]).groups())
            rows.append({"op": "deform " + r["case"].split()[0], "pass": r["mode"], "impl": r["impl"],
                         "pixels": n * h * w, "shape": r["case"],
                         **{k: r[k] for k in ("median_ms", "min_ms", "max_ms", "peak_mb")}})
    return rows, True


def step_breakdown(device, size, batch, amp, quick, reps):
    """{"baseline": {part: ms}, "csfrn": {part: ms}} (our kernels)."""
    amp = train_step.AMP_DTYPES[amp or ("bf16" if torch.device(device).type == "cuda" else "none")]
    if size is None:
        size = 33 if quick else (769 if torch.device(device).type == "cuda" else 321)
    size = (size, size) if isinstance(size, int) else tuple(size)
    images, labels = train_step.make_batch(batch, size, device)
    out = {}
    for name, csflm in (("baseline", False), ("csfrn", True)):
        model = train_step.build(csflm, quick, device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        out[name] = train_step.breakdown(model, optimizer, images, labels, amp, reps)
    return out


# ---------------------------------------------------------------- charts
def ops_chart(rows, path, title):
    """One log-log panel per (op, pass): median time vs pixels, one line per implementation. Returns the end
    labels' boxes (in the PNG's pixels) by (op, pass)."""
    panels = {}
    for r in rows:
        panels.setdefault((r["op"], r["pass"]), {}).setdefault(r["impl"], []).append((r["pixels"], r["median_ms"]))
    keys = sorted(panels)
    boxes = plotting.line_charts({f"{op} ({pas})": panels[op, pas] for op, pas in keys}, path, title,
                                 "pixels (N x H x W)", "median time (ms, log)")
    return {key: boxes[f"{key[0]} ({key[1]})"] for key in keys}


def breakdown_chart(parts, path, title):
    """Horizontal bars: for each part of the step, one bar per model (baseline, CSFRN), values written."""
    plotting.bar_chart(parts, path, title, "time per training step (ms, median)")


# ---------------------------------------------------------------- markdown
def md_table(rows, columns):
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if f == "{}" else "---:" for _, _, f in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else f.format(r[k]) for k, _, f in columns) + " |")
    return "\n".join(lines)


OP_COLUMNS = [("op", "op", "{}"), ("shape", "shape", "{}"), ("pass", "pass", "{}"), ("impl", "impl", "{}"),
              ("median_ms", "median ms", "{:.3f}"), ("min_ms", "min ms", "{:.3f}"), ("max_ms", "max ms", "{:.3f}"),
              ("peak_mb", "peak MiB", "{:.1f}")]


def markdown(report, png_names):
    m, step = report["meta"], report["train_step"]
    sm = step["meta"]
    parts = report["breakdown"]
    part_rows = [{"part": k, **{name: parts[name].get(k) for name in parts}} for k in parts["csfrn"]]
    lines = [f"# Benchmarks on {m['device']} ({m['date']})", "",
             f"torch {m['torch']}, {m['threads']} threads, load average {sm['load_average']} at the step "
             "benchmark.", "",
             f"## Training step: {sm['model']}, {sm['classes']} classes, N={sm['batch']} "
             f"3x{sm['size'][0]}x{sm['size'][1]}, amp {sm['amp']}, {sm['threads']} threads, median of {sm['reps']}", "",
             md_table(step["rows"], train_step.COLUMNS), ""]
    lines += [f"- {line}" for line in train_step.summary_lines(step)]
    lines += ["", "## Training step by module (our kernels; forward parts by module hooks)", "",
              md_table(part_rows, [("part", "part", "{}")] + [(k, f"{k} ms", "{:.1f}") for k in parts]), "",
              f"![step by module]({png_names['step']})", "",
              "## Ops", "", md_table(report["ops"], OP_COLUMNS), "", f"![ops]({png_names['ops']})", ""]
    if not report["deform_included"]:
        lines += ["(csfrn.bench.deform not available: no deformable convolution rows.)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point
def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def run(device="cpu", out_dir=None, reps=5, quick=False, size=None, batch=2,
        amp=None, step_json=None, log=print):
    """Runs everything, writes the JSON, Markdown and PNGs; returns {"json", "md", "ops_png", "step_png"}.
    ``step_json``: the JSON of an earlier ``bench_train_step.py --json`` run to report instead of running the
    step benchmark again (on the CPU it takes minutes); the breakdown then uses its size, batch and amp."""
    if out_dir is None:
        raise ValueError("report.run needs out_dir, the folder the report goes to")
    plotting.pyplot()   # the charts need matplotlib: say so before minutes of measuring
    if quick:
        reps = 1
    date = datetime.date.today().isoformat()
    stem = os.path.join(out_dir, f"{slug(device_name(device))}-{date}")
    rows, deform_included = op_rows(device, reps, quick, log)
    if step_json:
        with open(step_json) as f:
            step = json.load(f)
        size, batch, amp = tuple(step["meta"]["size"]), step["meta"]["batch"], step["meta"]["amp"]
        quick = step["meta"].get("quick", False)
    else:
        log("training step ...")
        step = train_step.run(device, size, batch, reps, amp, quick, log=log)
    log("training step by module ...")
    parts = step_breakdown(device, size, batch, amp, quick, max(1, reps // 2))
    report = {"meta": {"device": device_name(device), "torch": torch.__version__, "date": date,
                       "threads": torch.get_num_threads(), "quick": quick},
              "ops": rows, "deform_included": deform_included, "train_step": step, "breakdown": parts}
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": stem + ".json", "md": stem + ".md", "ops_png": stem + "-ops.png", "step_png": stem + "-step.png"}
    write_json(paths["json"], report)
    ops_chart(rows, paths["ops_png"], f"Op benchmarks on {report['meta']['device']}, {date}: median time vs size")
    sm = step["meta"]
    breakdown_chart(parts, paths["step_png"],
                    f"Training step by module: {sm['model']}, N={sm['batch']} 3x{sm['size'][0]}x{sm['size'][1]}, "
                    f"{report['meta']['device']}")
    with open(paths["md"], "w") as f:
        f.write(markdown(report, {"ops": os.path.basename(paths["ops_png"]),
                                  "step": os.path.basename(paths["step_png"])}))
    return paths


def add_arguments(parser):
    """The options of the report (``csfrn bench --what report`` and ``benchmarks/report.py``)."""
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created): "
                        "<device>-<date>.json, .md, -ops.png and -step.png go there")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=train_step.parse_size, default=None, help="training-step input H or HxW")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", default=None, choices=list(train_step.AMP_DTYPES))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition, for tests")
    parser.add_argument("--step-json", default=None, help="report this bench_train_step.py JSON instead of "
                        "running the step benchmark again")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default torch's); 1 keeps a shared, loaded CPU from stalling every "
                             "parallel op on a descheduled thread")
    return parser


def main(argv=None, parser=None):
    parser = add_arguments(parser or argparse.ArgumentParser(prog="benchmarks/report.py",
                                                             description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = run(args.device, args.out, args.reps, args.quick, args.size, args.batch, args.amp, args.step_json)
    for p in paths.values():
        print(f"wrote {p}")
    return paths


if __name__ == "__main__":
    main()
