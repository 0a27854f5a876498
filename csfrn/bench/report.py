"""One benchmark report: the op benchmarks (class-wise ops at several sizes, and deformable convolution when
``csfrn.bench.deform`` is there), the training-step benchmark and the training step's time by module,
written as ``<out>/<device>-<date>.json`` and ``.md`` plus two PNG charts drawn with Pillow:
``-ops.png`` (time vs size per op and implementation) and ``-step.png`` (the step's time by module).
``benchmarks/report.py`` calls ``main``.
"""
import argparse
import datetime
import json
import math
import os
import re

import torch
from PIL import Image, ImageDraw, ImageFont

from . import ops as ops_bench
from . import train_step
from .timing import device_name, write_json

# (N, D, H, W, K): the class-wise ops at the embedding sizes of 321, 513 and 769 crops (stride 8).
OP_SHAPES = [(2, 32, 41, 41, 19), (2, 32, 65, 65, 19), (2, 32, 97, 97, 19)]
QUICK_OP_SHAPES = [(1, 8, 9, 9, 3), (1, 8, 17, 17, 3)]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


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
def _font(size):
    return ImageFont.load_default(size=size)


def _fmt_ms(v):
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def spread(ys, step, lo, hi):
    """Positions near ``ys`` (same order) at least ``step`` apart, inside [lo, hi] when they fit: end labels
    that do not overlap however close their lines end."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    pos = [0.0] * len(ys)
    prev = -math.inf
    for i in order:                                   # push down
        pos[i] = max(ys[i], lo, prev + step)
        prev = pos[i]
    nxt = math.inf
    for i in reversed(order):                         # then up from the bottom bound
        pos[i] = min(pos[i], hi, nxt - step)
        nxt = pos[i]
    return pos


def line_panel(draw, box, title, series, xlabel, ylabel):
    """Log-log line chart of ``series`` (label -> [(x, y)]) inside ``box`` (x0, y0, x1, y1). Each line's last
    value is written right of the plot, the labels spread apart so none overlaps another. Returns the
    bounding boxes of those end labels."""
    x0, y0, x1, y1 = box
    small, mid = _font(12), _font(14)
    draw.text(((x0 + x1) / 2, y0 + 4), title, fill="black", font=_font(15), anchor="mt")
    # legend entries per row: as many as fit in the panel's width at the longest name
    entry_w = max(draw.textbbox((0, 0), name, font=small)[2] for name in series) + 40
    per_row = max(1, min(len(series), int((x1 - 15 - (x0 + 70)) // entry_w)))
    legend_rows = math.ceil(len(series) / per_row)
    px0, py0, px1, py1 = x0 + 70, y0 + 38 + 16 * legend_rows, x1 - 58, y1 - 50
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts if y > 0]
    lx0, lx1 = math.log10(min(xs)), math.log10(max(xs))
    if lx1 - lx0 < 1e-9:
        lx0, lx1 = lx0 - 0.5, lx1 + 0.5
    pad = 0.05 * (lx1 - lx0)
    lx0, lx1 = lx0 - pad, lx1 + pad
    ly0, ly1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    if ly1 == ly0:
        ly1 += 1

    def to_px(x, y):
        return (px0 + (math.log10(x) - lx0) / (lx1 - lx0) * (px1 - px0),
                py1 - (math.log10(max(y, 10 ** ly0)) - ly0) / (ly1 - ly0) * (py1 - py0))
    draw.rectangle((px0, py0, px1, py1), outline="black")
    for e in range(ly0, ly1 + 1):                                  # decades of ms
        _, py = to_px(10 ** lx0, 10 ** e)
        draw.line((px0, py, px1, py), fill="#dddddd")
        draw.text((px0 - 6, py), f"{10.0 ** e:g}", fill="black", font=small, anchor="rm")
    for x in sorted(set(xs)):
        px, _ = to_px(x, 10 ** ly0)
        draw.line((px, py0, px, py1), fill="#eeeeee")
        draw.text((px, py1 + 4), f"{x:,}", fill="black", font=small, anchor="mt")
    draw.text(((px0 + px1) / 2, y1 - 22), xlabel, fill="black", font=mid, anchor="mt")
    label = Image.new("RGB", (int(py1 - py0), 18), "white")
    ImageDraw.Draw(label).text((label.width / 2, 0), ylabel, fill="black", font=mid, anchor="mt")
    draw._image.paste(label.rotate(90, expand=True), (x0 + 4, int(py0)))
    ends = []
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        coords = [to_px(x, y) for x, y in sorted(pts)]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=3)
        for cx, cy in coords:
            draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=color)
        ends.append((coords[-1], _fmt_ms(sorted(pts)[-1][1]), color))
        # legend in rows between the title and the plot, where it hides no point
        lx = px0 + (i % per_row) * entry_w
        ly = y0 + 30 + 16 * (i // per_row)
        draw.line((lx, ly, lx + 20, ly), fill=color, width=3)
        draw.text((lx + 26, ly), name, fill="black", font=small, anchor="lm")
    # end values right of the plot, spread apart vertically, each joined to its point by a thin line
    label_h = draw.textbbox((0, 0), "0.123", font=small)[3] + 3
    placed = spread([cy for (_, cy), _, _ in ends], label_h, py0 + label_h / 2, py1 - label_h / 2)
    boxes = []
    for ((cx, cy), text, color), ty in zip(ends, placed):
        draw.line((cx + 5, cy, px1 + 4, ty), fill=color, width=1)
        draw.text((px1 + 6, ty), text, fill=color, font=small, anchor="lm")
        boxes.append(draw.textbbox((px1 + 6, ty), text, font=small, anchor="lm"))
    return boxes


def ops_chart(rows, path, title):
    """One log-log panel per (op, pass): median time vs pixels, one line per implementation. Returns the end
    labels' boxes by (op, pass)."""
    panels = {}
    for r in rows:
        panels.setdefault((r["op"], r["pass"]), {}).setdefault(r["impl"], []).append((r["pixels"], r["median_ms"]))
    cols = 2
    rows_n = math.ceil(len(panels) / cols)
    pw, ph = 560, 380
    img = Image.new("RGB", (cols * pw, rows_n * ph + 50), "white")
    draw = ImageDraw.Draw(img)
    draw.text((img.width / 2, 12), title, fill="black", font=_font(18), anchor="mt")
    labels = {}
    for i, ((op, pas), series) in enumerate(sorted(panels.items())):
        x, y = (i % cols) * pw, 50 + (i // cols) * ph
        labels[op, pas] = line_panel(draw, (x, y, x + pw, y + ph), f"{op} ({pas})", series, "pixels (N x H x W)",
                                     "median time (ms, log)")
    img.save(path)
    return labels


def breakdown_chart(parts, path, title):
    """Horizontal bars: for each part of the step, one bar per model (baseline, CSFRN), values written."""
    names = list(dict.fromkeys(k for p in sorted(parts.values(), key=len, reverse=True) for k in p))
    models = list(parts)
    bar, gap = 18, 14
    left, right, top = 150, 140, 80
    width = 1000
    height = top + len(names) * (len(models) * bar + gap) + 70
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    draw.text((width / 2, 12), title, fill="black", font=_font(17), anchor="mt")
    totals = {m: sum(parts[m].values()) for m in models}
    draw.text((width / 2, 38), "   ".join(f"{m}: {totals[m]:,.0f} ms in all" for m in models), fill="black",
              font=font, anchor="mt")
    vmax = max(v for p in parts.values() for v in p.values()) or 1.0
    scale = (width - left - right) / vmax
    y = top
    for name in names:
        draw.text((left - 8, y + len(models) * bar / 2), name, fill="black", font=font, anchor="rm")
        for i, m in enumerate(models):
            v = max(parts[m].get(name, 0.0), 0.0)
            color = COLORS[i % len(COLORS)]
            draw.rectangle((left, y, left + v * scale, y + bar - 3), fill=color)
            draw.text((left + v * scale + 5, y + (bar - 3) / 2), f"{_fmt_ms(v)} ms ({v / totals[m]:.0%})",
                      fill="black", font=small, anchor="lm")
            y += bar
        y += gap
    draw.line((left, top - 4, left, y - gap + 4), fill="black")
    draw.text((left + (width - left - right) / 2, y + 8), "time per training step (ms, median)", fill="black",
              font=font, anchor="mt")
    for i, m in enumerate(models):                                  # legend
        lx = left + 10 + 170 * i
        draw.rectangle((lx, y + 34, lx + 14, y + 48), fill=COLORS[i % len(COLORS)])
        draw.text((lx + 20, y + 41), m, fill="black", font=font, anchor="lm")
    img.save(path)


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
