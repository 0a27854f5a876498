"""Every chart csfrn draws, with matplotlib (the Agg backend: files only, no display): training curves
(``csfrn plot``), the confusion matrix (``csfrn eval``), dataset browsing (``csfrn browse``) and the ablation plot
(``csfrn ablate``). :func:`pyplot` and :func:`save_png` are the helpers the benchmark report's charts
(benchmarks/report.py) draw with too.

matplotlib is optional (``pip install 'csfrn[plot]'``, which ``make`` installs); :func:`pyplot` raises a one-line
:class:`csfrn.errors.MissingDependencyError` without it. This module imports it only when a chart is drawn.
"""

import math
import os

import numpy as np
from PIL import Image

from .errors import MissingDependencyError

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib  # optional (the plot extra): imported by the charts that need it
    except ImportError:
        raise MissingDependencyError(
            "drawing charts needs matplotlib, which is not installed: "
            "pip install 'csfrn[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # optional, as above

    return plt


def save_png(fig, path):
    """Write the figure as a 256-colour PNG (a fraction of the size of matplotlib's RGBA, the same look for charts)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    pyplot().close(fig)
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


# ---------------------------------------------------------------- training curves (csfrn plot)
# metrics.jsonl keys of a train record that are not loss terms
NOT_LOSSES = ("kind", "iter", "lr", "it/s", "images/s", "max_mem_gib", "data_time", "step_time", "grad_norm", "clipped")


def training_curves(runs, path):
    """One panel per loss term (``loss`` first), one for the learning rate and one for val mIoU (the EMA's dashed
    when there is one), each against iterations; ``runs``: {label: [metrics.jsonl records]}, overlaid in
    colours named in one legend. Returns ``path``."""
    plt = pyplot()
    terms = []
    for records in runs.values():
        for r in records:
            if r.get("kind", "train") == "train":
                terms += [
                    k for k, v in r.items() if k not in NOT_LOSSES and isinstance(v, (int, float)) and k not in terms
                ]
    terms = sorted(terms, key=lambda k: k != "loss")  # stable: the loss first, the terms as logged
    panels = [(t, f"{t}" + (" (sum of the terms)" if t == "loss" else "")) for t in terms]
    panels += [("lr", "learning rate"), ("mIoU", "val mIoU (%)")]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 2.7 * rows + 0.5), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (_key, title) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for i, (label, records) in enumerate(runs.items()):
        color = COLORS[i % len(COLORS)]
        train = [r for r in records if r.get("kind", "train") == "train"]
        val = [r for r in records if r.get("kind") == "val"]
        for ax, (key, _) in zip(axes.flat, panels):
            if key == "mIoU":
                pts = [(r["iter"], 100 * r["mIoU"]) for r in val if r.get("mIoU") is not None]
                ema = [(r["iter"], 100 * r["ema_mIoU"]) for r in val if r.get("ema_mIoU") is not None]
                if pts:
                    ax.plot(*zip(*pts), "o-", color=color, markersize=3, label=label)
                if ema:
                    ax.plot(*zip(*ema), "s--", color=color, markersize=3, alpha=0.8)
            else:
                pts = [(r["iter"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), "-", color=color, linewidth=1.3, label=label)
    if any(r.get("ema_mIoU") is not None for records in runs.values() for r in records):
        axes.flat[len(panels) - 1].set_title("val mIoU (%), EMA dashed", fontsize=10)
    handles = [plt.Line2D([], [], color=COLORS[i % len(COLORS)], linewidth=2) for i in range(len(runs))]
    fig.legend(handles, list(runs), loc="upper center", ncol=min(len(runs), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (2.7 * rows + 0.5)))
    return save_png(fig, path)


# ---------------------------------------------------------------- confusion matrix (csfrn eval)
def confusion_chart(cm, classes, path, title="confusion matrix"):
    """The confusion matrix normalised per ground-truth row (each row sums to 1 where the class occurs), class
    names on both axes, values written in the cells when there are few classes. Returns ``path``."""
    plt = pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(max(4.5, 0.42 * k + 2.5), 24)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=list(classes), fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{title} (rows normalised)", fontsize=10)
    if k <= 25:
        for g in range(k):
            for p in range(k):
                if rows[g, 0] > 0:
                    ax.text(
                        p,
                        g,
                        f"{norm[g, p]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[g, p] > 0.5 else "black",
                    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return save_png(fig, path)


# ---------------------------------------------------------------- dataset browsing (csfrn browse)
def mask_picture(image, label, palette, classes, path, title="", alpha=0.5, ignore_index=255):
    """The image beside the image with its mask blended in the dataset's palette (ignored pixels left
    unblended), and a legend of the classes present. ``image`` uint8 [H, W, 3], ``label`` [H, W] class ids."""
    plt = pyplot()
    from matplotlib.patches import Patch  # optional (the plot extra)

    image = np.asarray(image, dtype=np.uint8)
    label = np.asarray(label)
    lut = np.zeros((256, 3), dtype=np.float32)
    lut[: len(palette)] = np.asarray(palette, dtype=np.float32)
    colour = lut[label.clip(0, 255).astype(np.uint8)]
    keep = (label != ignore_index)[..., None]
    blend = np.where(keep, image * (1 - alpha) + colour * alpha, image).round().astype(np.uint8)
    h, w = label.shape
    ids = [int(k) for k in np.unique(label) if k != ignore_index]
    aspect = h / w
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4 * aspect + 1.3))
    for ax, picture, name in zip(axes, (image, blend), ("image", "mask blended")):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [
        Patch(
            facecolor=np.asarray(palette[k]) / 255.0,
            edgecolor="black",
            label=classes[k] if k < len(classes) else f"class {k}",
        )
        for k in ids
    ]
    if (label == ignore_index).any():
        handles.append(Patch(facecolor="white", edgecolor="black", label="ignored (not blended)"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.01 + 0.05 * math.ceil(len(handles) / 4), 1, 1))
    return save_png(fig, path)


# ---------------------------------------------------------------- ablation (csfrn ablate)
def ablation_chart(summary, intervals, path):
    """Per variant one dot per seed (mIoU), a bar at the mean and a vertical line for the 95% t-interval of the
    mean (``intervals``: name -> (mean, low, high)); under each name the paired difference to the baseline and
    its interval, red when it excludes 0 below, green above. Returns ``path``."""
    plt = pyplot()
    entries = list(summary["variants"].items())
    fig, ax = plt.subplots(figsize=(max(4.5, 1.45 * len(entries) + 1.2), 4.0))
    ax.set_title(f"mIoU % ({summary['split']} split): dots seeds, bar mean, line 95% CI", fontsize=10)
    ax.set_ylabel("mIoU (%)")
    ax.grid(axis="y", alpha=0.3)
    base = summary["variants"].get("baseline", {}).get("mean")
    if base is not None and not math.isnan(base):
        ax.axhline(base, color="#bbbbbb", linewidth=1, zorder=0)
    labels = []
    for i, (name, e) in enumerate(entries):
        vals = list(e["mIoU"].values())
        xs = [i - 0.12 + (j - (len(vals) - 1) / 2) * 0.05 for j in range(len(vals))]
        ax.plot(xs, vals, "o", color=COLORS[0], markersize=4)
        mean, low, high = intervals[name]
        if not math.isnan(mean):
            ax.hlines(mean, i - 0.3, i + 0.15, color="black", linewidth=2.5)
        if not math.isnan(low):
            ax.errorbar([i + 0.15], [mean], yerr=[[mean - low], [high - mean]], color="black", capsize=4, linewidth=1.5)
        label = name
        d = e.get("diff")
        if d and not math.isnan(d["mean"]):
            label += f"\n{d['mean']:+.2f}"
            if not math.isnan(d["low"]):
                label += f"\n[{d['low']:+.2f}, {d['high']:+.2f}]"
        labels.append(label)
    ax.set_xticks(range(len(entries)), labels=labels, fontsize=8)
    for tick, (_, e) in zip(ax.get_xticklabels(), entries):
        d = e.get("diff")
        if d and not math.isnan(d.get("low", math.nan)):
            tick.set_color("#c82828" if d["high"] < 0 else "#1e8c1e" if d["low"] > 0 else "#555555")
    ax.set_xlim(-0.6, len(entries) - 0.4)
    ax.set_xlabel("under the names: paired difference to the baseline [95% CI]", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
