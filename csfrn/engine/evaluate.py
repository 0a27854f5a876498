"""Dataset evaluation (sharded over processes, confusion matrices summed with all_reduce), reports and
prediction pictures (train-id, colour, overlay, Cityscapes label-id PNGs). ``csfrn eval`` and ``csfrn predict``
(checkpoint -> model -> files) are :mod:`csfrn.commands.eval` and :mod:`csfrn.commands.predict`."""

import glob
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..data._base import read_image
from ..data.cityscapes import train_ids_to_label_ids
from ..data.folder import IMAGE_EXTENSIONS
from ..data.transforms import Normalize, denormalize
from ..errors import DataError, MissingPathError
from ..plotting import confusion_chart
from .distributed import all_reduce_sum
from .inference import inference_from_config
from .metrics import FeatureConsistency, confusion_matrix, format_table, save_confusion, save_summary, summarize


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(model, dataset, num_classes, eval_cfg, device, base_size=None, progress=False):
    """mIoU & co. of ``model`` on ``dataset`` (items: normalised image, label).

    Each process takes every world_size-th image; the confusion matrices are summed over processes.

    Returns:
        (summary dict of :func:`csfrn.engine.metrics.summarize`, int64 [K, K] confusion matrix).
    """
    was_training = model.training
    model.eval()
    rank, world = _rank_world()
    count = len(dataset) if eval_cfg.max_images is None else min(len(dataset), eval_cfg.max_images)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for i in tqdm(range(rank, count, world), desc="eval", disable=not progress or rank != 0, leave=False):
        image, label = dataset[i]
        probs = inference_from_config(
            model, image[None].to(device), num_classes, eval_cfg, out_size=tuple(label.shape), base_size=base_size
        )
        cm += confusion_matrix(probs.argmax(1)[0], label.to(device), num_classes)
    all_reduce_sum(cm)
    model.train(was_training)
    return summarize(cm), cm.cpu()


def write_report(summary, classes, out_dir, name="metrics"):
    """Print the per-class table and write ``name``.json / ``name``.csv to ``out_dir``; returns the table."""
    table = format_table(summary, classes)
    os.makedirs(out_dir, exist_ok=True)
    save_summary(summary, classes, os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.csv"))
    return table


def write_confusion(cm, classes, out_dir, title=""):
    """``confusion.csv`` (pixel counts, rows: ground truth) and ``confusion.png`` (rows normalised, class names on
    the axes) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    save_confusion(cm, classes, os.path.join(out_dir, "confusion.csv"))
    confusion_chart(
        cm,
        classes,
        os.path.join(out_dir, "confusion.png"),
        title=f"confusion matrix, {title}" if title else "confusion matrix",
    )


def colorize(train_ids, palette):
    """uint8 [H, W] train ids -> uint8 [H, W, 3] colours (ignore / unknown ids black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[np.asarray(train_ids, dtype=np.uint8)]


def overlay(image_hwc, color_hwc, alpha=0.5):
    return (image_hwc.astype(np.float32) * (1 - alpha) + color_hwc.astype(np.float32) * alpha).round().astype(np.uint8)


def save_prediction(pred, image_hwc, stem, out_dir, palette, cityscapes_ids=False):
    """Write <stem>_trainid.png, <stem>_color.png, <stem>_overlay.png and, for the Cityscapes test server,
    labelIds/<stem>.png (train ids mapped back to label ids). ``stem`` may hold folders ("a/x")."""
    pred = np.asarray(pred, dtype=np.uint8)
    color = colorize(pred, palette)
    base = os.path.join(out_dir, stem)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    Image.fromarray(pred).save(f"{base}_trainid.png")
    Image.fromarray(color).save(f"{base}_color.png")
    Image.fromarray(overlay(image_hwc, color)).save(f"{base}_overlay.png")
    if cityscapes_ids:
        label_path = os.path.join(out_dir, "labelIds", f"{stem}.png")
        os.makedirs(os.path.dirname(label_path), exist_ok=True)
        Image.fromarray(train_ids_to_label_ids(pred)).save(label_path)


def _output_stem(relative):
    stem = os.path.splitext(relative)[0]
    return stem[: -len("_leftImg8bit")] if stem.endswith("_leftImg8bit") else stem


def find_images(inputs, exclude=None):
    """Image files under ``inputs`` (files, or folders searched recursively) with the output stem each gets:
    its path relative to the inputs' common folder, so that ``--out`` mirrors the input tree. Returns
    [(path, stem)].

    Errors (ValueError / FileNotFoundError, naming the path): a missing input, a folder without images, two
    inputs that would write the same outputs (x.png and x.jpg in one folder keep their extension: x_png, x_jpg).
    Files under ``exclude`` (the output folder) are left out, so a second run does not predict its outputs.
    """
    skip = os.path.join(os.path.abspath(exclude), "") if exclude else None
    files, roots = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                f
                for f in glob.glob(os.path.join(glob.escape(item), "**", "*"), recursive=True)
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                and os.path.isfile(f)
                and not (skip and os.path.abspath(f).startswith(skip))
            )
            if not found:
                raise DataError(
                    f"no images in {item} (looked for {' '.join(IMAGE_EXTENSIONS)} files in it and its subfolders)"
                )
            files += found
            roots.append(os.path.abspath(item))
        elif os.path.isfile(item):
            files.append(item)
            roots.append(os.path.dirname(os.path.abspath(item)))
        else:
            raise MissingPathError(f"no such file or directory: {item}")
    root = os.path.commonpath(roots) if roots else ""
    files = list(dict.fromkeys(files))
    rel = [os.path.relpath(os.path.abspath(f), root) for f in files]
    stems = [_output_stem(r) for r in rel]
    counts = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    stems = [f"{s}_{os.path.splitext(r)[1][1:].lower()}" if counts[s] > 1 else s for s, r in zip(stems, rel)]
    seen = {}
    for path, stem in zip(files, stems):
        if stem in seen:
            raise DataError(f"{seen[stem]} and {path} would both write {stem}_*.png; rename one of them")
        seen[stem] = path
    return list(zip(files, stems))


@torch.no_grad()
def predict(
    model,
    images,
    out_dir,
    num_classes,
    palette,
    eval_cfg,
    device,
    base_size=None,
    cityscapes_ids=False,
    progress=True,
    on_error=None,
):
    """Predict every image and write the pictures of :func:`save_prediction` under ``out_dir``.

    ``images``: [(path, stem)] as :func:`find_images` gives, or bare paths (stem: the file name without its
    extension). An unreadable or corrupt image is skipped: ``on_error(path, message)`` is called (default: a
    line on stderr) and the others are written. Returns (stems written, [(path, message)] of skipped images).
    """
    model.eval()
    normalize = Normalize()
    written, failed = [], []
    for item in tqdm(images, desc="predict", disable=not progress):
        path, stem = item if isinstance(item, (tuple, list)) else (item, _output_stem(os.path.basename(item)))
        try:
            image = read_image(path)
        except (OSError, ValueError) as err:
            message = str(err.__cause__ or err)
            failed.append((path, message))
            if on_error is not None:
                on_error(path, message)
            else:
                tqdm.write(f"skipped {path}: {message}", file=sys.stderr)
            continue
        x, _ = normalize(image, None)
        probs = inference_from_config(model, x[None].to(device), num_classes, eval_cfg, base_size=base_size)
        pred = probs.argmax(1)[0].cpu().numpy()
        save_prediction(pred, image.permute(1, 2, 0).numpy(), stem, out_dir, palette, cityscapes_ids)
        written.append(stem)
    return written, failed


@torch.no_grad()
def predict_dataset_grid(models, dataset, indices, path, eval_cfg, device, scale=1):
    """One row per image: image, ground truth, then each model's prediction (``models``: name -> model), under
    a row of column titles."""
    rows = []
    for i in indices:
        image, label = dataset[i]
        tiles = [denormalize(image).permute(1, 2, 0).numpy(), colorize(label.numpy(), dataset.palette)]
        for model in models.values():
            model.eval()
            probs = inference_from_config(model, image[None].to(device), dataset.num_classes, eval_cfg)
            tiles.append(colorize(probs.argmax(1)[0].cpu().numpy(), dataset.palette))
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1))
    grid = np.concatenate(rows, 0)
    body = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    canvas = Image.new("RGB", (body.width, body.height + 14), (255, 255, 255))
    canvas.paste(body, (0, 14))
    draw = ImageDraw.Draw(canvas)
    tile = body.width // (2 + len(models))
    for c, title in enumerate(["image", "ground truth", *models]):
        draw.text((c * tile + 2, 1), title, fill=(0, 0, 0))
    canvas.save(path)
    return path


@torch.no_grad()
def dataset_feature_consistency(model, dataset, device, max_images=None, progress=False):
    """:func:`csfrn.engine.metrics.feature_consistency` over a split (whole images, one at a time; the class
    centres pooled over the split): {"F": scores of the features that reach the decoder (CSFLM's fused F, or
    the baseline head's output A), "B": scores of CSFRN's embeddings B (absent without CSFLM)}."""
    was_training = model.training
    model.eval()
    stats = {"F": FeatureConsistency(), "B": FeatureConsistency()}
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    for i in tqdm(range(count), desc="consistency", disable=not progress, leave=False):
        image, label = dataset[i]
        out = model.predict_maps(image[None].to(device))
        stats["F"].update(out["features"], label[None])
        if out["embeddings"] is not None:
            stats["B"].update(out["embeddings"], label[None])
    model.train(was_training)
    return {name: s.result() for name, s in stats.items() if s.count is not None}


def format_consistency(scores):
    """One line per feature kind: intra-class variance, centre distance and their ratio."""
    names = {"F": "features F (reaching the decoder)", "B": "embeddings B (C-S features)"}
    return "\n".join(
        f"feature consistency, {names.get(k, k)}: intra-class variance {v['intra']:.4g}, "
        f"centre distance {v['inter']:.4g}, separability (centre dist^2 / intra) {v['ratio']:.4g}"
        for k, v in scores.items()
    )
