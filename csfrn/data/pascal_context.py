"""PASCAL Context, 59 classes: VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext,
ImageSets/SegmentationContext/{train,val}.txt} (the label PNGs made by mmseg's pascal_context converter)."""

import os

from ..errors import MissingPathError
from ._base import SegDataset, make_palette, reduce_zero_lut, require_dir

CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
    "bag",
    "bed",
    "bench",
    "book",
    "building",
    "cabinet",
    "ceiling",
    "cloth",
    "computer",
    "cup",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "keyboard",
    "light",
    "mountain",
    "mouse",
    "curtain",
    "platform",
    "sign",
    "plate",
    "road",
    "rock",
    "shelves",
    "sidewalk",
    "sky",
    "snow",
    "bedclothes",
    "track",
    "tree",
    "truck",
    "wall",
    "water",
    "window",
    "wood",
)


class PascalContext(SegDataset):
    """Label 0 (background) -> 255 and k -> k - 1, as mmseg's 59-class reduce_zero_label."""

    classes = CLASSES
    palette = tuple(make_palette(59))

    def __init__(self, root, split="train", transforms=None):
        super().__init__(root, split, transforms, splits=("train", "val"))
        voc = require_dir(os.path.join(root, "VOCdevkit", "VOC2010"), "PascalContext VOC2010")
        image_dir = require_dir(os.path.join(voc, "JPEGImages"), "PascalContext images")
        label_dir = require_dir(os.path.join(voc, "SegmentationClassContext"), "PascalContext labels")
        list_path = os.path.join(voc, "ImageSets", "SegmentationContext", f"{split}.txt")
        if not os.path.isfile(list_path):
            raise MissingPathError(f"PascalContext: split list not found: {list_path}")
        with open(list_path) as f:
            names = [line.strip() for line in f if line.strip()]
        for name in names:
            image_path = os.path.join(image_dir, name + ".jpg")
            label_path = os.path.join(label_dir, name + ".png")
            for path in (image_path, label_path):
                if not os.path.isfile(path):
                    raise MissingPathError(f"PascalContext: {list_path} lists {name}, but {path} is missing")
            self.samples.append((image_path, label_path))
        self._check_nonempty(list_path)

    def label_lut(self, label_path):
        return reduce_zero_lut(59)
