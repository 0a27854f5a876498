"""COCO-Stuff, 171 classes, in either official layout.

10k:  images/*.jpg, annotations/*.mat (MATLAB 'S', 0 = unlabelled, v = raw id + 1) or annotations/*.png
      (raw ids), imageLists/train.txt | test.txt (split "val" reads test.txt: 10k has no separate val list).
164k: images/{train2017,val2017}/*.jpg, stuffthingmaps_trainval2017/{train2017,val2017}/*.png (raw ids).
Raw ids 0..181 (255 = unlabelled) are mapped to 171 contiguous ids as mmseg's converters do; the 11 COCO thing
ids never used by COCO-Stuff (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90) are ignored.
"""

import glob
import os

import numpy as np

from ..errors import ConfigError, DataError, MissingPathError, UnreadableFileError
from ._base import IGNORE_INDEX, SegDataset, lut_from_pairs, make_palette, require_dir

UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
RAW_TO_TRAIN = {raw: i for i, raw in enumerate(r for r in range(182) if r not in UNUSED_IDS)}

CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
    "banner",
    "blanket",
    "branch",
    "bridge",
    "building-other",
    "bush",
    "cabinet",
    "cage",
    "cardboard",
    "carpet",
    "ceiling-other",
    "ceiling-tile",
    "cloth",
    "clothes",
    "clouds",
    "counter",
    "cupboard",
    "curtain",
    "desk-stuff",
    "dirt",
    "door-stuff",
    "fence",
    "floor-marble",
    "floor-other",
    "floor-stone",
    "floor-tile",
    "floor-wood",
    "flower",
    "fog",
    "food-other",
    "fruit",
    "furniture-other",
    "grass",
    "gravel",
    "ground-other",
    "hill",
    "house",
    "leaves",
    "light",
    "mat",
    "metal",
    "mirror-stuff",
    "moss",
    "mountain",
    "mud",
    "napkin",
    "net",
    "paper",
    "pavement",
    "pillow",
    "plant-other",
    "plastic",
    "platform",
    "playingfield",
    "railing",
    "railroad",
    "river",
    "road",
    "rock",
    "roof",
    "rug",
    "salad",
    "sand",
    "sea",
    "shelf",
    "sky-other",
    "skyscraper",
    "snow",
    "solid-other",
    "stairs",
    "stone",
    "straw",
    "structural-other",
    "table",
    "tent",
    "textile-other",
    "towel",
    "tree",
    "vegetable",
    "wall-brick",
    "wall-concrete",
    "wall-other",
    "wall-panel",
    "wall-stone",
    "wall-tile",
    "wall-wood",
    "water-other",
    "waterdrops",
    "window-blind",
    "window-other",
    "wood",
)
assert len(CLASSES) == len(RAW_TO_TRAIN) == 171


def _read_mat(path):
    try:
        from scipy.io import loadmat  # only the 10k .mat annotations need scipy
    except ImportError as err:
        raise ImportError(f"reading {path} needs scipy (pip install scipy), or convert the .mat files to PNG") from err
    try:
        raw = np.asarray(loadmat(path)["S"], dtype=np.int64)
    except (OSError, ValueError, KeyError) as err:
        raise UnreadableFileError(f"cannot read label {path}: {err}") from err
    if raw.min(initial=0) < 0 or raw.max(initial=0) > 182:
        raise DataError(f"label {path}: value {int(raw.max())} is outside the COCO-Stuff 10k range 0..182")
    return np.where(raw == 0, IGNORE_INDEX, raw - 1).astype(np.uint8)


class COCOStuff(SegDataset):
    classes = CLASSES
    palette = tuple(make_palette(171))

    def __init__(self, root, split="train", transforms=None):
        super().__init__(root, split, transforms)
        if os.path.isdir(os.path.join(root, "imageLists")):
            self._init_10k(root, split)
        elif os.path.isdir(os.path.join(root, "stuffthingmaps_trainval2017")):
            self._init_164k(root, split)
        else:
            raise MissingPathError(
                f"COCOStuff: {root} has neither the 10k layout (imageLists/, images/, annotations/) nor the "
                f"164k layout (images/{{train2017,val2017}}, stuffthingmaps_trainval2017/)"
            )

    def _init_10k(self, root, split):
        list_path = os.path.join(root, "imageLists", "train.txt" if split == "train" else "test.txt")
        if not os.path.isfile(list_path):
            raise MissingPathError(f"COCOStuff 10k: image list not found: {list_path}")
        image_dir = require_dir(os.path.join(root, "images"), "COCOStuff 10k images")
        label_dir = require_dir(os.path.join(root, "annotations"), "COCOStuff 10k annotations")
        with open(list_path) as f:
            names = [line.strip() for line in f if line.strip()]
        for name in names:
            image_path = os.path.join(image_dir, name + ".jpg")
            if not os.path.isfile(image_path):
                raise MissingPathError(f"COCOStuff 10k: {list_path} lists {name}, but {image_path} is missing")
            for ext in (".mat", ".png"):
                label_path = os.path.join(label_dir, name + ext)
                if os.path.isfile(label_path):
                    break
            else:
                raise MissingPathError(
                    f"COCOStuff 10k: no annotation for {name}: expected {os.path.join(label_dir, name)}.mat or .png"
                )
            self.samples.append((image_path, label_path))
        self._check_nonempty(list_path)

    def _init_164k(self, root, split):
        if split == "test":
            raise ConfigError("COCOStuff 164k: there is no labelled test split; use 'train' or 'val'")
        sub = "train2017" if split == "train" else "val2017"
        image_dir = require_dir(os.path.join(root, "images", sub), "COCOStuff 164k images")
        label_dir = require_dir(os.path.join(root, "stuffthingmaps_trainval2017", sub), "COCOStuff 164k labels")
        for image_path in sorted(glob.glob(os.path.join(image_dir, "*.jpg"))):
            stem = os.path.splitext(os.path.basename(image_path))[0]
            label_path = os.path.join(label_dir, stem + ".png")
            if not os.path.isfile(label_path):
                raise MissingPathError(f"COCOStuff 164k: no label for {image_path}: expected {label_path}")
            self.samples.append((image_path, label_path))
        self._check_nonempty(f"{image_dir}/*.jpg")

    def read_label_raw(self, label_path):
        if label_path.endswith(".mat"):
            return _read_mat(label_path)
        return super().read_label_raw(label_path)

    def label_lut(self, label_path):
        return lut_from_pairs({**RAW_TO_TRAIN, **{u: IGNORE_INDEX for u in UNUSED_IDS}, IGNORE_INDEX: IGNORE_INDEX})
