"""Cityscapes (gtFine): leftImg8bit/{split}/{city}/*_leftImg8bit.png with gtFine/{split}/{city}/ labels."""

import glob
import os

import numpy as np

from ..errors import MissingPathError
from ._base import IGNORE_INDEX, SegDataset, lut_from_pairs, require_dir

# cityscapesScripts labels.py: label id -> train id (255: not evaluated). License plate has id -1, which a
# uint8 labelIds PNG stores as 255, so 255 maps to ignore as well.
ID_TO_TRAINID = {
    0: 255,
    1: 255,
    2: 255,
    3: 255,
    4: 255,
    5: 255,
    6: 255,
    7: 0,
    8: 1,
    9: 255,
    10: 255,
    11: 2,
    12: 3,
    13: 4,
    14: 255,
    15: 255,
    16: 255,
    17: 5,
    18: 255,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    29: 255,
    30: 255,
    31: 16,
    32: 17,
    33: 18,
    255: 255,
}
TRAINID_TO_ID = {t: i for i, t in ID_TO_TRAINID.items() if t != 255}

CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)


def train_ids_to_label_ids(train_ids):
    """uint8 array of train ids -> Cityscapes label ids (what the official test server expects); 255 -> 0."""
    lut = np.zeros(256, dtype=np.uint8)
    for t, i in TRAINID_TO_ID.items():
        lut[t] = i
    return lut[np.asarray(train_ids, dtype=np.uint8)]


class Cityscapes(SegDataset):
    """19-class Cityscapes. Uses ``*_gtFine_labelTrainIds.png`` when present, else maps
    ``*_gtFine_labelIds.png`` through the official id -> trainId table."""

    classes = CLASSES
    palette = PALETTE

    def __init__(self, root, split="train", transforms=None):
        super().__init__(root, split, transforms)
        image_dir = require_dir(os.path.join(root, "leftImg8bit", split), "Cityscapes images")
        label_dir = require_dir(os.path.join(root, "gtFine", split), "Cityscapes gtFine labels")
        for image_path in sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png"))):
            city = os.path.basename(os.path.dirname(image_path))
            stem = os.path.basename(image_path)[: -len("_leftImg8bit.png")]
            train_ids = os.path.join(label_dir, city, f"{stem}_gtFine_labelTrainIds.png")
            label_ids = os.path.join(label_dir, city, f"{stem}_gtFine_labelIds.png")
            if os.path.isfile(train_ids):
                self.samples.append((image_path, train_ids))
            elif os.path.isfile(label_ids):
                self.samples.append((image_path, label_ids))
            else:
                raise MissingPathError(f"Cityscapes: no label for {image_path}: expected {train_ids} or {label_ids}")
        self._check_nonempty(f"{image_dir}/<city>/*_leftImg8bit.png")

    def label_lut(self, label_path):
        if label_path.endswith("_labelTrainIds.png"):
            return lut_from_pairs({**{k: k for k in range(19)}, IGNORE_INDEX: IGNORE_INDEX})
        return lut_from_pairs(ID_TO_TRAINID)
