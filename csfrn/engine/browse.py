"""``csfrn browse`` and ``csfrn plot``: look at a dataset's images with their masks, and at training curves."""

import json
import os

import torch

from .. import plotting
from ..data import build_dataset
from ..data._base import make_palette
from ..data.transforms import denormalize, train_transforms
from ..errors import DataError, MissingPathError, UsageError


def browse_dataset(cfg, split, out_dir, n=16, augmented=False):
    """Write ``out_dir/<index>.png`` for the first ``n`` items of ``split`` of the dataset ``cfg.data`` names:
    the image beside the image with its mask blended in the dataset's palette, and a legend of the classes
    present. ``augmented``: after the training transforms (scale, crop, flip, photometric jitter as
    ``cfg.data`` sets them; item i drawn with the seed ``train.seed + i``, so a second run draws the same).
    Returns the paths written."""

    plotting.pyplot()  # before the dataset is read
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    d = cfg.data
    dataset = build_dataset(d, split, num_classes=cfg.model.num_classes, seed=cfg.train.seed)
    if len(dataset) == 0:
        raise DataError(f"split '{split}' of dataset '{d.dataset}' has no items")
    palette = getattr(dataset, "palette", None) or make_palette(dataset.num_classes)
    classes = list(getattr(dataset, "classes", None) or [f"class {k}" for k in range(dataset.num_classes)])
    transforms = train_transforms(d.crop_size, d.scale_range, d.base_size, d.flip, d.photometric) if augmented else None
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(min(n, len(dataset))):
        image, label = dataset[i]
        if transforms is not None:
            image, label = transforms(image, label, generator=torch.Generator().manual_seed(cfg.train.seed + i))
            image = denormalize(image)
        h, w = label.shape
        title = f"{d.dataset} {split} #{i} ({h}x{w}{', training transforms' if augmented else ''})"
        path = os.path.join(out_dir, f"{split}_{i:04d}.png")
        plotting.mask_picture(image.permute(1, 2, 0).numpy(), label.numpy(), palette, classes, path, title)
        paths.append(path)
    return paths


def read_metrics(work_dir):
    """The records of ``work_dir/metrics.jsonl`` (a run's folder, or the file itself)."""
    path = work_dir if os.path.isfile(work_dir) else os.path.join(work_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise MissingPathError(f"{work_dir}: no metrics.jsonl (expected the work_dir of a csfrn train run)")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: not JSON ({err.msg}); expected one record per line") from None
            if not isinstance(record, dict) or "iter" not in record:
                raise DataError(f"{path} line {number}: expected a record with an 'iter' key")
            records.append(record)
    if not records:
        raise DataError(f"{path} holds no records yet (the run logs every train.log_interval iterations)")
    return records


def _labels(work_dirs):
    """Legend names: each folder's name, or its path where two runs share a name."""
    names = [os.path.basename(os.path.normpath(w)) or w for w in work_dirs]
    return [w if names.count(n) > 1 else n for w, n in zip(work_dirs, names)]


def plot_runs(work_dirs, out):
    """``csfrn plot``: loss terms, lr and val mIoU against iterations from each run's metrics.jsonl, overlaid
    (:func:`csfrn.plotting.training_curves`). Returns the path written."""

    plotting.pyplot()
    if os.path.splitext(out)[1].lower() != ".png":
        raise UsageError(f"--out {out}: expected a .png file")
    runs = {label: read_metrics(w) for label, w in zip(_labels(work_dirs), work_dirs)}
    return plotting.training_curves(runs, out)
