"""Any dataset laid out as root/images/{split}/*, root/masks/{split}/*.png and root/classes.txt (one name a line).

Images and masks pair by file stem; mask values are class ids (line numbers of classes.txt, from 0) or 255.
"""
import os

from ..errors import DataError, MissingPathError
from ._base import SegDataset, make_palette, require_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class FolderDataset(SegDataset):
    def __init__(self, root, split="train", transforms=None):
        super().__init__(root, split, transforms)
        classes_path = os.path.join(root, "classes.txt")
        if not os.path.isfile(classes_path):
            raise MissingPathError(f"FolderDataset: class list not found: expected {classes_path}")
        with open(classes_path) as f:
            self.classes = tuple(line.strip() for line in f if line.strip())
        if not self.classes or len(self.classes) > 255:
            raise DataError(f"FolderDataset: {classes_path} must list 1..255 class names, found {len(self.classes)}")
        self.palette = tuple(make_palette(len(self.classes)))
        image_dir = require_dir(os.path.join(root, "images", split), "FolderDataset images")
        mask_dir = require_dir(os.path.join(root, "masks", split), "FolderDataset masks")
        for name in sorted(os.listdir(image_dir)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            mask_path = os.path.join(mask_dir, stem + ".png")
            if not os.path.isfile(mask_path):
                raise MissingPathError(f"FolderDataset: no mask for {os.path.join(image_dir, name)}: "
                                        f"expected {mask_path}")
            self.samples.append((os.path.join(image_dir, name), mask_path))
        self._check_nonempty(image_dir)
        # The folder is the user's own: check every mask here, not in a DataLoader worker mid-training.
        self.check_samples()
