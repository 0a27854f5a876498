"""What every dataset shares: file reading with clear errors, label look-up tables, the item contract.

Item i of a dataset without transforms is ``(image, label)``: image uint8 [3, H, W], label int64 [H, W] whose
values are class ids in [0, K) or 255 (ignore).
"""

import os
import sys

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError, MissingPathError, UnreadableFileError

IGNORE_INDEX = 255


def require_dir(path, what):
    if not os.path.isdir(path):
        raise MissingPathError(f"{what}: expected a directory at {path} (check data.root and the split name)")
    return path


_FLOAT_NOTED = set()  # processes print the float-image note once


def _float_image(img, path):
    """A float image (Pillow mode F) in [0, 1] -> uint8 0..255 (with a note, once); outside [0, 1] an error."""
    values = np.asarray(img, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(values).all() and low >= 0 and high <= 1):
        raise UnreadableFileError(
            f"cannot read image {path}: a floating-point image with values in "
            f"[{low:.4g}, {high:.4g}]; expected values in [0, 1] (scaled to 0..255), or an "
            f"8-bit image"
        )
    if "float" not in _FLOAT_NOTED:
        _FLOAT_NOTED.add("float")
        print(
            f"note: {path} is a floating-point image: its values in [0, 1] are scaled to 0..255 (so are those of "
            f"other float images)",
            file=sys.stderr,
            flush=True,
        )
    return np.round(values * 255).astype(np.uint8)


def read_image(path):
    """RGB image file -> uint8 tensor [3, H, W]; an unreadable file is an error naming it. A 16-bit greyscale
    file (PNG / TIFF, Pillow modes I;16 and I) is scaled from 0..65535 to 0..255, not clipped to white; a float
    one (mode F, e.g. a 32-bit TIFF) from [0, 1] to 0..255, and refused outside [0, 1]."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I;16") or img.mode == "I":
                grey = np.clip(np.round(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
                array = np.repeat(grey[..., None], 3, axis=-1)
            elif img.mode == "F":
                array = np.repeat(_float_image(img, path)[..., None], 3, axis=-1)
            else:
                array = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as err:
        if isinstance(err, UnreadableFileError):
            raise
        raise UnreadableFileError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_label_png(path):
    """Single-channel (L, P, I, I;16, or 1-bit "1", read as 0 / 1) label PNG -> uint8 numpy array [H, W] of the
    stored values."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise ValueError(f"expected a single-channel label image, got mode {img.mode}")
            array = np.asarray(img)
    except (OSError, ValueError) as err:
        raise UnreadableFileError(f"cannot read label {path}: {err}") from err
    if array.max(initial=0) > 255 or array.min(initial=0) < 0:
        raise DataError(f"label {path}: values must lie in 0..255, found {int(array.min())}..{int(array.max())}")
    return array.astype(np.uint8)


def lut_from_pairs(pairs, default=-1):
    """A 256-entry look-up table raw value -> class id; ``default`` (-1) marks values that may not occur."""
    lut = np.full(256, default, dtype=np.int64)
    for raw, mapped in pairs.items():
        lut[raw] = mapped
    return lut


def identity_lut(num_classes):
    """Values < num_classes are class ids, 255 is ignore, anything else is an error."""
    return lut_from_pairs({**{k: k for k in range(num_classes)}, IGNORE_INDEX: IGNORE_INDEX})


def reduce_zero_lut(num_classes):
    """mmseg's reduce_zero_label: 0 -> ignore, k -> k - 1 (k <= num_classes), 255 stays ignore."""
    return lut_from_pairs(
        {0: IGNORE_INDEX, **{k: k - 1 for k in range(1, num_classes + 1)}, IGNORE_INDEX: IGNORE_INDEX}
    )


def _ranges(values):
    """[0, 1, 2, 3, 255] -> '0..3 or 255'."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts[:-1]) + (" or " if len(parts) > 1 else "") + parts[-1] if parts else "nothing"


def apply_lut(raw, lut, path):
    mapped = lut[raw]
    bad = mapped < 0
    if bad.any():
        value = int(raw[bad][0])
        raise DataError(
            f"label {path}: value {value} is not a valid class id here (expected {_ranges(np.flatnonzero(lut >= 0))})"
        )
    return torch.from_numpy(mapped)


def make_palette(num_classes):
    """Distinct colours by the PASCAL VOC bit-interleaving scheme (class k's bits spread over R, G, B)."""
    palette = []
    for k in range(num_classes):
        r = g = b = 0
        c = k + 1  # skip black, which reads as "nothing" in pictures
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette


class SegDataset(torch.utils.data.Dataset):
    """A list of (image path, label path or None) pairs read with a label look-up table.

    Subclasses set ``classes``, ``palette`` and ``self.samples`` and implement :meth:`read_label_raw` when
    labels are not plain PNGs. A sample whose label path is None (unlabelled test split) gets an all-ignore label.
    """

    classes = ()
    palette = ()

    def __init__(self, root, split, transforms=None, splits=("train", "val", "test")):
        if splits is not None and split not in splits:
            raise ConfigError(
                f"{type(self).__name__}: split {split!r} does not exist; expected one of "
                f"{', '.join(splits)} (data.train_split / data.val_split / --split)"
            )
        if root is None or not os.path.isdir(root):
            raise MissingPathError(
                f"{type(self).__name__}: dataset root {root} does not exist (data.root: expected "
                f"the folder that holds the dataset)"
            )
        self.root = root
        self.split = split
        self.transforms = transforms
        self.samples = []

    @property
    def num_classes(self):
        return len(self.classes)

    def label_lut(self, label_path):
        return identity_lut(self.num_classes)

    def read_label_raw(self, label_path):
        return read_label_png(label_path)

    def _check_nonempty(self, where):
        if not self.samples:
            raise DataError(f"{type(self).__name__}: no images found for split '{self.split}' in {where}")

    def __len__(self):
        return len(self.samples)

    def check_samples(self):
        """Read every label (and every image header) once, in this process: a bad label value, a label whose
        size differs from its image's or an unreadable file is reported here, before a DataLoader worker
        meets it in the middle of training. Costs one label decode per sample. Returns which raw label values
        (0..255) occur, as a bool array."""
        seen = np.zeros(256, dtype=bool)
        for image_path, label_path in self.samples:
            try:
                with Image.open(image_path) as img:
                    width, height = img.size
            except (OSError, ValueError) as err:
                raise UnreadableFileError(f"cannot read image {image_path}: {err}") from err
            if label_path is None:
                continue
            raw = self.read_label_raw(label_path)
            seen[np.unique(raw)] = True
            label = apply_lut(raw, self.label_lut(label_path), label_path)
            if tuple(label.shape) != (height, width):
                raise DataError(
                    f"label {label_path} has size {tuple(label.shape)} but image {image_path} has "
                    f"{(height, width)} (expected the same height and width)"
                )
        return seen

    def load(self, index):
        """(image, label) before transforms."""
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        if label_path is None:
            return image, torch.full(image.shape[1:], IGNORE_INDEX, dtype=torch.int64)
        label = apply_lut(self.read_label_raw(label_path), self.label_lut(label_path), label_path)
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise DataError(
                f"label {label_path} has size {tuple(label.shape)} but image {image_path} has {tuple(image.shape[1:])}"
            )
        return image, label

    def __getitem__(self, index):
        image, label = self.load(index)
        if self.transforms is not None:
            return self.transforms(image, label)
        return image, label
