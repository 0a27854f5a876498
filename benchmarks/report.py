"""One benchmark report: the op benchmarks (class-wise ops at several sizes, and deformable convolution), the
training-step benchmark and the training step's time by module, written as ``<out>/<device>-<date>.json`` and
``.md`` plus two PNG charts drawn with matplotlib (csfrn.plotting's helpers): ``-ops.png`` (time vs size per op
and implementation) and ``-step.png`` (the step's time by module).

    python benchmarks/report.py [--device cuda] [--quick] [--out DIR]

Writes into benchmarks/results/ (next to this script, wherever it is run from) unless --out says otherwise. A
tool of this repository, not of the installed package: it runs the package's benchmarks (``csfrn bench --what
ops | deform | train``) and draws what they measured.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import statistics
import time

import torch

from csfrn import plotting
from csfrn.bench import deform
from csfrn.bench import ops as ops_bench
from csfrn.bench import train_step
from csfrn.bench.timing import device_name, write_json
from csfrn.losses import labels_checked
from csfrn.nn import AAM

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DPI = 100  # matplotlib's default: figure inches x DPI = the PNG's pixels

# (N, D, H, W, K): the class-wise ops at the embedding sizes of 321, 513 and 769 crops (stride 8).
OP_SHAPES = [(2, 32, 41, 41, 19), (2, 32, 65, 65, 19), (2, 32, 97, 97, 19)]
QUICK_OP_SHAPES = [(1, 8, 9, 9, 3), (1, 8, 17, 17, 3)]


# ---------------------------------------------------------------- measurements
def _module_groups(model):
    """Category -> modules whose forward time it counts (a category's time excludes nested categories')."""
    head = []
    for child in model.decode_head.children():
        head.extend(child if isinstance(child, torch.nn.ModuleList) else [child])
    groups = {
        "backbone": [model.backbone],
        "head": head,
        "aux head": [model.aux_head] if model.aux_head is not None else [],
        "CSFLM": [model.csflm] if model.csflm is not None else [],
        "AAM": [model.csflm.fuse] if isinstance(getattr(model.csflm, "fuse", None), AAM) else [],
        "losses": [model.criterion],
    }
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
            with context(), labels_checked():
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
            if rep == 0:  # warm-up
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


def op_rows(device, reps, quick, log=print):
    """Rows {op, pass, impl, pixels, shape, median_ms, min_ms, max_ms, peak_mb} of every op benchmark."""
    log("class-wise ops ...")
    shapes = QUICK_OP_SHAPES if quick else OP_SHAPES
    rows = []
    for r in ops_bench.run(device, reps, shapes=shapes):
        n, h, w = (int(v) for v in re.match(r"N=(\d+) D=\d+ (\d+)x(\d+)", r["shape"]).groups())
        rows.append(
            {
                "op": r["op"],
                "pass": r["pass"],
                "impl": r["impl"],
                "pixels": n * h * w,
                "shape": r["shape"],
                **{k: r[k] for k in ("median_ms", "min_ms", "max_ms", "peak_mb")},
            }
        )
    # The deform benchmark has two sizes: its quick one and its full one.
    for small in (True,) if quick else (True, False):
        log(f"deformable convolution ({'small' if small else 'full'} size) ...")
        for r in deform.run(device=device, reps=reps, quick=small):
            n, h, w = (int(v) for v in re.search(r"N=(\d+).* (\d+)x(\d+)$", r["case"]).groups())
            rows.append(
                {
                    "op": "deform " + r["case"].split()[0],
                    "pass": r["mode"],
                    "impl": r["impl"],
                    "pixels": n * h * w,
                    "shape": r["case"],
                    **{k: r[k] for k in ("median_ms", "min_ms", "max_ms", "peak_mb")},
                }
            )
    return rows


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
        optimizer = train_step.sgd(model)
        out[name] = breakdown(model, optimizer, images, labels, amp, reps)
    return out


# ---------------------------------------------------------------- charts
def spread(ys, step, lo, hi):
    """Positions near ``ys`` (same order) at least ``step`` apart, inside [lo, hi] when they fit: end labels
    that do not overlap however close their lines end."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    pos = [0.0] * len(ys)
    prev = -math.inf
    for i in order:  # push up
        pos[i] = max(ys[i], lo, prev + step)
        prev = pos[i]
    nxt = math.inf
    for i in reversed(order):  # then down from the upper bound
        pos[i] = min(pos[i], hi, nxt - step)
        nxt = pos[i]
    return pos


def _fmt_ms(v):
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def _image_box(artist, renderer, height):
    """A text's bounding box (an annotation's text alone, not its line) in the saved PNG's pixels
    (x0, y0, x1, y1), y down from the top."""
    from matplotlib.text import Text

    b = Text.get_window_extent(artist, renderer)
    return (b.x0, height - b.y1, b.x1, height - b.y0)


def line_charts(panels, path, title, xlabel, ylabel):
    """Log-log line charts, two per row: ``panels`` {panel title: {series label: [(x, y)]}}. Each line's last
    value is written right of its panel, the labels spread apart so that none overlaps another. Returns
    {panel title: [end labels' boxes in the PNG's pixels (x0, y0, x1, y1)]}."""
    plt = plotting.pyplot()
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.8 * cols, 4.0 * rows + 0.5), squeeze=False)
    fig.suptitle(title, fontsize=12)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    ends = {}
    for ax, (name, series) in zip(axes.flat, panels.items()):
        ax.set_title(name, fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=8)
        ends[name] = []
        for i, (label, pts) in enumerate(series.items()):
            pts = sorted(pts)
            color = plotting.COLORS[i % len(plotting.COLORS)]
            ax.plot(
                [x for x, _ in pts],
                [max(y, 1e-9) for _, y in pts],
                "o-",
                color=color,
                linewidth=2,
                markersize=4,
                label=label,
            )
            ends[name].append((pts[-1], color))
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout(rect=(0, 0, 0.93, 0.96))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    height = fig.get_size_inches()[1] * DPI
    boxes = {}
    for ax, name in zip(axes.flat, panels):
        # end values in pixels, right of the axes, spread apart and joined to their points by thin lines
        to_px = ax.transData.transform
        points = [to_px((x, max(y, 1e-9))) for (x, y), _ in ends[name]]
        frame = ax.get_window_extent(renderer)
        label_h = 13
        placed = spread([py for _, py in points], label_h, frame.y0 + label_h / 2, frame.y1 - label_h / 2)
        texts = []
        for ((_x, y), color), (px, py), ty in zip(ends[name], points, placed):
            text = ax.annotate(
                _fmt_ms(y),
                xy=(px, py),
                xycoords="figure pixels",
                xytext=(frame.x1 + 6, ty),
                textcoords="figure pixels",
                color=color,
                fontsize=8,
                va="center",
                arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.6},
                annotation_clip=False,
            )
            texts.append(text)
        fig.canvas.draw()
        boxes[name] = [_image_box(t, renderer, height) for t in texts]
    plotting.save_png(fig, path)
    return boxes


def bar_chart(parts, path, title, xlabel):
    """Horizontal bars: ``parts`` {model: {part: value}}; for each part one bar per model, its value and share of
    the model's total written beside it."""
    plt = plotting.pyplot()
    names = list(dict.fromkeys(k for p in sorted(parts.values(), key=len, reverse=True) for k in p))
    models = list(parts)
    totals = {m: sum(parts[m].values()) or 1.0 for m in models}
    height = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(names) * len(models) / 2 + 2.2))
    for i, m in enumerate(models):
        ys = [n_i + i * height for n_i in range(len(names))]
        vals = [max(parts[m].get(n, 0.0), 0.0) for n in names]
        ax.barh(
            ys,
            vals,
            height=height * 0.9,
            color=plotting.COLORS[i % len(plotting.COLORS)],
            label=f"{m}: {sum(parts[m].values()):,.0f} ms in all",
        )
        for y, v, n in zip(ys, vals, names):
            if n in parts[m]:  # a part the model does not have gets no label
                ax.text(v, y, f" {_fmt_ms(v)} ms ({v / totals[m]:.0%})", va="center", fontsize=8)
    ax.set_yticks([n_i + (len(models) - 1) * height / 2 for n_i in range(len(names))], labels=names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max(v for p in parts.values() for v in p.values()) * 1.25 or 1.0)
    ax.set_title(title, fontsize=11, pad=26)
    ax.legend(fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(models), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return plotting.save_png(fig, path)


def ops_chart(rows, path, title):
    """One log-log panel per (op, pass): median time vs pixels, one line per implementation. Returns the end
    labels' boxes (in the PNG's pixels) by (op, pass)."""
    panels = {}
    for r in rows:
        panels.setdefault((r["op"], r["pass"]), {}).setdefault(r["impl"], []).append((r["pixels"], r["median_ms"]))
    keys = sorted(panels)
    boxes = line_charts(
        {f"{op} ({pas})": panels[op, pas] for op, pas in keys},
        path,
        title,
        "pixels (N x H x W)",
        "median time (ms, log)",
    )
    return {key: boxes[f"{key[0]} ({key[1]})"] for key in keys}


def breakdown_chart(parts, path, title):
    """Horizontal bars: for each part of the step, one bar per model (baseline, CSFRN), values written."""
    bar_chart(parts, path, title, "time per training step (ms, median)")


# ---------------------------------------------------------------- markdown
def md_table(rows, columns):
    lines = [
        "| " + " | ".join(h for _, h, _ in columns) + " |",
        "|" + "|".join("---" if f == "{}" else "---:" for _, _, f in columns) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else f.format(r[k]) for k, _, f in columns) + " |")
    return "\n".join(lines)


OP_COLUMNS = [
    ("op", "op", "{}"),
    ("shape", "shape", "{}"),
    ("pass", "pass", "{}"),
    ("impl", "impl", "{}"),
    ("median_ms", "median ms", "{:.3f}"),
    ("min_ms", "min ms", "{:.3f}"),
    ("max_ms", "max ms", "{:.3f}"),
    ("peak_mb", "peak MiB", "{:.1f}"),
]


def markdown(report, png_names):
    m, step = report["meta"], report["train_step"]
    sm = step["meta"]
    parts = report["breakdown"]
    part_rows = [{"part": k, **{name: parts[name].get(k) for name in parts}} for k in parts["csfrn"]]
    lines = [
        f"# Benchmarks on {m['device']} ({m['date']})",
        "",
        f"torch {m['torch']}, {m['threads']} threads, load average {sm['load_average']} at the step benchmark.",
        "",
        f"## Training step: {sm['model']}, {sm['classes']} classes, N={sm['batch']} "
        f"3x{sm['size'][0]}x{sm['size'][1]}, amp {sm['amp']}, {sm['threads']} threads, median of {sm['reps']}",
        "",
        md_table(step["rows"], train_step.COLUMNS),
        "",
    ]
    lines += [f"- {line}" for line in train_step.summary_lines(step)]
    lines += [
        "",
        "## Training step by module (our kernels; forward parts by module hooks)",
        "",
        md_table(part_rows, [("part", "part", "{}")] + [(k, f"{k} ms", "{:.1f}") for k in parts]),
        "",
        f"![step by module]({png_names['step']})",
        "",
        "## Ops",
        "",
        md_table(report["ops"], OP_COLUMNS),
        "",
        f"![ops]({png_names['ops']})",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point
def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def run(device="cpu", out_dir=RESULTS, reps=5, quick=False, size=None, batch=2, amp=None, step_json=None, log=print):
    """Runs everything, writes the JSON, Markdown and PNGs; returns {"json", "md", "ops_png", "step_png"}.
    ``step_json``: the JSON of an earlier ``bench_train_step.py --json`` run to report instead of running the
    step benchmark again (on the CPU it takes minutes); the breakdown then uses its size, batch and amp."""
    plotting.pyplot()  # the charts need matplotlib: say so before minutes of measuring
    if quick:
        reps = 1
    date = datetime.date.today().isoformat()
    stem = os.path.join(out_dir, f"{slug(device_name(device))}-{date}")
    rows = op_rows(device, reps, quick, log)
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
    report = {
        "meta": {
            "device": device_name(device),
            "torch": torch.__version__,
            "date": date,
            "threads": torch.get_num_threads(),
            "quick": quick,
        },
        "ops": rows,
        "train_step": step,
        "breakdown": parts,
    }
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": stem + ".json", "md": stem + ".md", "ops_png": stem + "-ops.png", "step_png": stem + "-step.png"}
    write_json(paths["json"], report)
    ops_chart(rows, paths["ops_png"], f"Op benchmarks on {report['meta']['device']}, {date}: median time vs size")
    sm = step["meta"]
    breakdown_chart(
        parts,
        paths["step_png"],
        f"Training step by module: {sm['model']}, N={sm['batch']} 3x{sm['size'][0]}x{sm['size'][1]}, "
        f"{report['meta']['device']}",
    )
    with open(paths["md"], "w") as f:
        f.write(
            markdown(report, {"ops": os.path.basename(paths["ops_png"]), "step": os.path.basename(paths["step_png"])})
        )
    return paths


def add_arguments(parser):
    """The options of the report."""
    parser.add_argument(
        "--out",
        default=RESULTS,
        metavar="DIR",
        help="output folder (created): "
        "<device>-<date>.json, .md, -ops.png and -step.png go there (default: benchmarks/results)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=train_step.parse_size, default=None, help="training-step input H or HxW")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", default=None, choices=list(train_step.AMP_DTYPES))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition, for tests")
    parser.add_argument(
        "--step-json",
        default=None,
        help="report this bench_train_step.py JSON instead of running the step benchmark again",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default torch's); 1 keeps a shared, loaded CPU from stalling every "
        "parallel op on a descheduled thread",
    )
    return parser


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="benchmarks/report.py", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = run(args.device, args.out, args.reps, args.quick, args.size, args.batch, args.amp, args.step_json)
    for p in paths.values():
        print(f"wrote {p}")
    return paths


if __name__ == "__main__":
    main()
