"""ADE20K (ADEChallengeData2016): images/{training,validation}/*.jpg, annotations/{training,validation}/*.png."""

import glob
import os

from ..errors import MissingPathError
from ._base import SegDataset, make_palette, reduce_zero_lut, require_dir

CLASSES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)
SPLIT_DIRS = {"train": "training", "val": "validation", "test": "testing"}


class ADE20K(SegDataset):
    """150-class ADE20K; annotation 0 (other) -> 255, k -> k - 1. The test split (release_test/testing or
    images/testing) has no annotations: its labels are all ignore."""

    classes = CLASSES
    palette = tuple(make_palette(150))

    def __init__(self, root, split="train", transforms=None):
        super().__init__(root, split, transforms)
        sub = SPLIT_DIRS[split]
        image_dir = require_dir(os.path.join(root, "images", sub), "ADE20K images")
        label_dir = os.path.join(root, "annotations", sub)
        if split != "test":
            require_dir(label_dir, "ADE20K annotations")
        for image_path in sorted(glob.glob(os.path.join(image_dir, "*.jpg"))):
            stem = os.path.splitext(os.path.basename(image_path))[0]
            label_path = os.path.join(label_dir, stem + ".png")
            if split == "test":
                self.samples.append((image_path, label_path if os.path.isfile(label_path) else None))
            elif not os.path.isfile(label_path):
                raise MissingPathError(f"ADE20K: no annotation for {image_path}: expected {label_path}")
            else:
                self.samples.append((image_path, label_path))
        self._check_nonempty(f"{image_dir}/*.jpg")

    def label_lut(self, label_path):
        return reduce_zero_lut(150)
