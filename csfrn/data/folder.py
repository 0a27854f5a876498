"""Any dataset laid out as root/images/{split}/*, root/masks/{split}/*.png and root/classes.txt (one name a line).

Images and masks pair by file stem; mask values are class ids (line numbers of classes.txt, from 0) or 255
(ignore); 1-bit masks read as 0 / 1. A split is any folder name under images/. Two classes with masks of
0 / 255 only (a common binary format) is an error unless ``binary_255=True`` (``data.binary_255``), which reads
255 as class 1.
"""

import os

import numpy as np

from ..errors import DataError, MissingPathError
from ._base import IGNORE_INDEX, SegDataset, identity_lut, lut_from_pairs, make_palette, require_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class FolderDataset(SegDataset):
    def __init__(self, root, split="train", transforms=None, binary_255=False):
        super().__init__(root, split, transforms, splits=None)
        classes_path = os.path.join(root, "classes.txt")
        if not os.path.isfile(classes_path):
            raise MissingPathError(f"FolderDataset: class list not found: expected {classes_path}")
        with open(classes_path) as f:
            self.classes = tuple(line.strip() for line in f if line.strip())
        if not self.classes or len(self.classes) > 255:
            raise DataError(f"FolderDataset: {classes_path} must list 1..255 class names, found {len(self.classes)}")
        if binary_255 and len(self.classes) != 2:
            raise DataError(
                f"FolderDataset: data.binary_255 reads masks of 0 / 255 as two classes, but "
                f"{classes_path} lists {len(self.classes)}; expected 2 class names"
            )
        self.binary_255 = binary_255
        self.palette = tuple(make_palette(len(self.classes)))
        images_root = os.path.join(root, "images")
        if os.path.isdir(images_root) and not os.path.isdir(os.path.join(images_root, split)):
            found = sorted(d for d in os.listdir(images_root) if os.path.isdir(os.path.join(images_root, d)))
            raise MissingPathError(
                f"FolderDataset: split {split!r} does not exist: no folder {images_root}/{split} "
                f"(splits found: {', '.join(found) or 'none'}; data.train_split / "
                f"data.val_split / --split)"
            )
        image_dir = require_dir(os.path.join(images_root, split), "FolderDataset images")
        mask_dir = require_dir(os.path.join(root, "masks", split), "FolderDataset masks")
        for name in sorted(os.listdir(image_dir)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            mask_path = os.path.join(mask_dir, stem + ".png")
            if not os.path.isfile(mask_path):
                raise MissingPathError(
                    f"FolderDataset: no mask for {os.path.join(image_dir, name)}: expected {mask_path}"
                )
            self.samples.append((os.path.join(image_dir, name), mask_path))
        self._check_nonempty(image_dir)
        # The folder is the user's own: check every mask here, not in a DataLoader worker mid-training.
        seen = self.check_samples()
        if len(self.classes) == 2 and not binary_255 and seen[IGNORE_INDEX] and not seen[1]:
            raise DataError(
                f"FolderDataset: the masks in {mask_dir} hold only the values "
                f"{', '.join(map(str, np.flatnonzero(seen)))} and {classes_path} lists 2 classes "
                f"({', '.join(self.classes)}): 255 means 'ignore', so class 1 ({self.classes[1]}) "
                f"would never be trained; set data.binary_255: true to read 255 as class 1, or "
                f"relabel the masks to 0 / 1"
            )

    def label_lut(self, label_path):
        if self.binary_255:
            return lut_from_pairs({0: 0, 1: 1, IGNORE_INDEX: 1})
        return identity_lut(self.num_classes)
