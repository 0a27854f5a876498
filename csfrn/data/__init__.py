"""Datasets (one file each), joint transforms and the synthetic set.

Every dataset is ``Dataset(root, split="train"|"val"|"test", transforms=None)`` (Synthetic: no root, a seed) and
has ``classes`` and ``palette``; item i is ``(image uint8 [3, H, W], label int64 [H, W], 255 = ignore)``.
"""

from ..errors import ConfigError
from . import transforms
from ._base import IGNORE_INDEX, SegDataset
from .ade20k import ADE20K
from .cityscapes import Cityscapes
from .coco_stuff import COCOStuff
from .folder import FolderDataset
from .pascal_context import PascalContext
from .synthetic import Synthetic

DATASETS = {
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "coco_stuff": COCOStuff,
    "pascal_context": PascalContext,
    "folder": FolderDataset,
    "synthetic": Synthetic,
}


def build_dataset(data_cfg, split, transforms=None, num_classes=None, seed=0):
    """The dataset named by ``data_cfg.dataset`` (a :class:`csfrn.engine.config.DataConfig`)."""
    name = data_cfg.dataset
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    if name == "synthetic":
        length = data_cfg.length if split == "train" else data_cfg.val_length
        return Synthetic(
            split=split,
            transforms=transforms,
            seed=seed,
            size=data_cfg.size,
            length=length,
            num_classes=num_classes or 5,
        )
    if name == "folder":
        return FolderDataset(data_cfg.root, split=split, transforms=transforms, binary_255=data_cfg.binary_255)
    return DATASETS[name](data_cfg.root, split=split, transforms=transforms)


__all__ = [
    "ADE20K",
    "COCOStuff",
    "Cityscapes",
    "DATASETS",
    "FolderDataset",
    "IGNORE_INDEX",
    "PascalContext",
    "SegDataset",
    "Synthetic",
    "build_dataset",
    "transforms",
]
