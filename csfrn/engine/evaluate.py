"""Dataset evaluation (sharded over processes, confusion matrices summed with all_reduce), reports and
prediction pictures (train-id, colour, overlay, Cityscapes label-id PNGs)."""
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..data.cityscapes import train_ids_to_label_ids
from .distributed import all_reduce_sum
from .inference import inference_from_config
from .metrics import confusion_matrix, format_table, save_summary, summarize


def _rank_world():
    import torch.distributed as dist
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
        probs = inference_from_config(model, image[None].to(device), num_classes, eval_cfg,
                                      out_size=tuple(label.shape), base_size=base_size)
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


def colorize(train_ids, palette):
    """uint8 [H, W] train ids -> uint8 [H, W, 3] colours (ignore / unknown ids black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[np.asarray(train_ids, dtype=np.uint8)]


def overlay(image_hwc, color_hwc, alpha=0.5):
    return (image_hwc.astype(np.float32) * (1 - alpha) + color_hwc.astype(np.float32) * alpha).round().astype(np.uint8)


def save_prediction(pred, image_hwc, stem, out_dir, palette, cityscapes_ids=False):
    """Write <stem>_trainid.png, <stem>_color.png, <stem>_overlay.png and, for the Cityscapes test server,
    labelIds/<stem>.png (train ids mapped back to label ids)."""
    os.makedirs(out_dir, exist_ok=True)
    pred = np.asarray(pred, dtype=np.uint8)
    color = colorize(pred, palette)
    Image.fromarray(pred).save(os.path.join(out_dir, f"{stem}_trainid.png"))
    Image.fromarray(color).save(os.path.join(out_dir, f"{stem}_color.png"))
    Image.fromarray(overlay(image_hwc, color)).save(os.path.join(out_dir, f"{stem}_overlay.png"))
    if cityscapes_ids:
        os.makedirs(os.path.join(out_dir, "labelIds"), exist_ok=True)
        Image.fromarray(train_ids_to_label_ids(pred)).save(os.path.join(out_dir, "labelIds", f"{stem}.png"))


@torch.no_grad()
def predict(model, image_paths, out_dir, num_classes, palette, eval_cfg, device, base_size=None,
            cityscapes_ids=False, progress=True):
    """Predict every image file and write the pictures of :func:`save_prediction`; returns the stems written."""
    from ..data._base import read_image
    from ..data.transforms import Normalize

    model.eval()
    normalize = Normalize()
    stems = []
    for path in tqdm(image_paths, desc="predict", disable=not progress):
        image = read_image(path)
        x, _ = normalize(image, None)
        probs = inference_from_config(model, x[None].to(device), num_classes, eval_cfg, base_size=base_size)
        pred = probs.argmax(1)[0].cpu().numpy()
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem.endswith("_leftImg8bit"):
            stem = stem[: -len("_leftImg8bit")]
        save_prediction(pred, image.permute(1, 2, 0).numpy(), stem, out_dir, palette, cityscapes_ids)
        stems.append(stem)
    return stems


@torch.no_grad()
def predict_dataset_grid(models, dataset, indices, path, eval_cfg, device, scale=1):
    """One row per image: image, ground truth, then each model's prediction (``models``: name -> model), under
    a row of column titles."""
    from ..data.transforms import denormalize

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
