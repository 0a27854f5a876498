"""A synthetic segmentation set generated from a seed (no files): textured shapes on a textured background.

Classes come in pairs that share a mean colour and differ only in texture (stripe orientation / period,
checkerboard), every image gets a random global colour shift, and every pixel Gaussian noise. A single pixel
therefore says little about its class; the texture around it and the consistency of a whole shape do. This is
the situation CSFRN's consistency losses are about, at a size a CPU can train in minutes.
"""

import math

import torch

from ..errors import ConfigError
from ._base import make_palette

# (kind, angle in degrees, period in pixels); background (class 0) gets the first texture at low contrast.
# Up to 19 classes (Cityscapes' count); classes 2k+1 and 2k+2 share MEAN_COLOURS[k].
TEXTURES = (
    ("stripes", 0, 4),
    ("stripes", 90, 4),
    ("checker", 0, 6),
    ("stripes", 45, 6),
    ("stripes", 0, 8),
    ("stripes", 90, 8),
    ("checker", 45, 4),
    ("stripes", 135, 6),
    ("stripes", 45, 4),
    ("stripes", 135, 4),
    ("checker", 0, 10),
    ("stripes", 0, 12),
    ("stripes", 90, 12),
    ("checker", 45, 8),
    ("stripes", 45, 10),
    ("stripes", 135, 10),
    ("checker", 0, 4),
    ("stripes", 60, 6),
)
MEAN_COLOURS = (
    (170, 110, 100),
    (100, 150, 170),
    (150, 160, 90),
    (160, 110, 160),
    (120, 170, 120),
    (190, 150, 90),
    (110, 110, 180),
    (180, 120, 130),
    (130, 180, 180),
)
SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _texture(kind, angle, period, ys, xs):
    theta = math.radians(angle)
    u = xs * math.cos(theta) + ys * math.sin(theta)
    if kind == "stripes":
        return torch.sign(torch.sin(2 * math.pi * u / period))
    v = -xs * math.sin(theta) + ys * math.cos(theta)
    return torch.sign(torch.sin(math.pi * u / (period / 2)) * torch.sin(math.pi * v / (period / 2)))


class Synthetic(torch.utils.data.Dataset):
    """``length`` images of ``size`` x ``size`` with ``num_classes`` classes (0 = background), item i generated
    from (seed, split, i) alone, so any process regenerates any item identically."""

    def __init__(
        self, split="train", transforms=None, seed=0, size=64, length=256, num_classes=5, noise=30.0, max_shapes=4
    ):
        if split not in SPLIT_OFFSETS:
            raise ConfigError(f"Synthetic: split must be one of {tuple(SPLIT_OFFSETS)}, got {split!r}")
        if not 2 <= num_classes <= 1 + 2 * len(MEAN_COLOURS):
            raise ConfigError(f"Synthetic: num_classes must be in [2, {1 + 2 * len(MEAN_COLOURS)}], got {num_classes}")
        if size < 16:
            raise ConfigError(f"Synthetic: size must be at least 16, got {size}")
        self.split, self.transforms, self.seed = split, transforms, seed
        self.size, self.length, self.noise, self.max_shapes = size, length, noise, max_shapes
        self.classes = ("background",) + tuple(
            f"{kind}{angle}/{period}-c{(k - 1) // 2}"
            for k, (kind, angle, period) in enumerate(TEXTURES[: num_classes - 1], start=1)
        )
        self.palette = tuple(make_palette(num_classes))

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return self.length

    def load(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"Synthetic: index {index} out of range for length {self.length}")
        g = torch.Generator().manual_seed(self.seed * 7_919 + SPLIT_OFFSETS[self.split] + index)
        s = self.size
        ys, xs = torch.meshgrid(
            torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij"
        )
        label = torch.zeros(s, s, dtype=torch.int64)
        # Background: grey with a weak texture and a smooth random tint.
        image = torch.full((3, s, s), 128.0) + 12 * _texture(*TEXTURES[0], ys, xs)
        tint = torch.nn.functional.interpolate(
            torch.randn(1, 3, 4, 4, generator=g) * 20, size=(s, s), mode="bilinear", align_corners=False
        )[0]
        image += tint
        for _ in range(int(torch.randint(1, self.max_shapes + 1, (1,), generator=g))):
            k = int(torch.randint(1, self.num_classes, (1,), generator=g))
            cy, cx = (torch.rand(2, generator=g) * s).tolist()
            ry, rx = (s * (0.12 + 0.2 * torch.rand(2, generator=g))).tolist()
            ellipse = bool(torch.rand(1, generator=g) < 0.5)
            # The shape lies inside its bounding box: compute it there only (same values, less work).
            box = (
                slice(max(0, math.floor(cy - ry)), max(0, min(s, math.ceil(cy + ry) + 1))),
                slice(max(0, math.floor(cx - rx)), max(0, min(s, math.ceil(cx + rx) + 1))),
            )
            by, bx = ys[box], xs[box]
            if ellipse:
                mask = ((by - cy) / ry) ** 2 + ((bx - cx) / rx) ** 2 <= 1
            else:
                mask = ((by - cy).abs() <= ry) & ((bx - cx).abs() <= rx)
            kind, angle, period = TEXTURES[k - 1]
            # A random phase keeps the texture from being a fixed pixel-position code.
            oy, ox = (torch.rand(2, generator=g) * period).tolist()
            colour = torch.tensor(MEAN_COLOURS[(k - 1) // 2], dtype=torch.float32)[:, None, None]
            pattern = colour + 45 * _texture(kind, angle, period, by + oy, bx + ox)
            image[(slice(None),) + box] = torch.where(mask, pattern, image[(slice(None),) + box])
            label[box][mask] = k
        image += (torch.rand(3, 1, 1, generator=g) - 0.5) * 60  # per-image colour shift
        image += torch.randn(3, s, s, generator=g) * self.noise  # per-pixel noise
        return image.round().clamp(0, 255).to(torch.uint8), label

    def __getitem__(self, index):
        image, label = self.load(index)
        if self.transforms is not None:
            return self.transforms(image, label)
        return image, label
