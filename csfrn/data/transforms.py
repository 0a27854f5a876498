"""Joint image / label transforms. Every transform is ``t(image, label, generator=None) -> (image, label)``:
image uint8 (or, after :class:`Normalize`, float32) [3, H, W], label int64 [H, W] with 255 = ignore.

Randomness comes from ``generator`` (a ``torch.Generator``) or, when it is None, from torch's global RNG, so a
run seeded per sample (see csfrn.engine.train) is reproducible across resumes and process counts. Labels are
always resized with nearest neighbour and cropped / flipped with the same parameters as their image.
"""

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ._base import IGNORE_INDEX

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _uniform(low, high, generator):
    return low + (high - low) * float(torch.rand(1, generator=generator))


def resize(image, label, size):
    """Bilinear image, nearest label, to ``size`` = (h, w)."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image, label
    dtype = image.dtype
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    out = out.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else out.to(dtype)
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return out, label


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label, generator=None):
        for t in self.transforms:
            image, label = t(image, label, generator=generator)
        return image, label

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomScale:
    """Rescale by a ratio drawn uniformly from ``ratio_range``; with ``base_size`` = (long, short) the ratio is
    relative to the image first fitted into base_size keeping its aspect ratio (mmseg's Resize + ratio_range)."""

    def __init__(self, ratio_range=(0.75, 2.0), base_size=None):
        self.ratio_range = tuple(ratio_range)
        self.base_size = tuple(base_size) if base_size else None

    def __call__(self, image, label, generator=None):
        h, w = image.shape[-2:]
        scale = _uniform(*self.ratio_range, generator)
        if self.base_size is not None:
            scale *= min(max(self.base_size) / max(h, w), min(self.base_size) / min(h, w))
        return resize(image, label, (max(1, round(h * scale)), max(1, round(w * scale))))

    def __repr__(self):
        return f"RandomScale(ratio_range={self.ratio_range}, base_size={self.base_size})"


class RandomCrop:
    """A random ``size`` = (h, w) window; smaller images are padded first (label with 255, image with
    ``fill``, the ImageNet mean by default so that it normalises to 0)."""

    def __init__(self, size, fill=IMAGENET_MEAN):
        self.size = (int(size[0]), int(size[1]))
        self.fill = fill

    def __call__(self, image, label, generator=None):
        ch, cw = self.size
        h, w = image.shape[-2:]
        if h < ch or w < cw:
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            padded = torch.empty(image.shape[0], h + ph, w + pw, dtype=image.dtype)
            padded[:] = torch.tensor(self.fill, dtype=torch.float32).round().to(image.dtype)[:, None, None]
            padded[:, :h, :w] = image
            image = padded
            label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
            h, w = image.shape[-2:]
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        return image[:, top : top + ch, left : left + cw], label[top : top + ch, left : left + cw]

    def __repr__(self):
        return f"RandomCrop(size={self.size})"


class RandomFlip:
    """Horizontal flip with probability ``p``."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, label, generator=None):
        if float(torch.rand(1, generator=generator)) < self.p:
            return image.flip(-1), label.flip(-1)
        return image, label

    def __repr__(self):
        return f"RandomFlip(p={self.p})"


class PhotoMetricDistortion:
    """mmseg-style jitter of a uint8 image, each part applied with probability 1/2: brightness, contrast,
    saturation (factors in [1 - x, 1 + x]) and hue (shift in [-hue, hue] of a turn). Labels are untouched."""

    def __init__(self, brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, image, label, generator=None):
        # Draw every number whether or not it is used, so the stream of random numbers has a fixed length.
        coins = torch.rand(4, generator=generator).tolist()
        b = _uniform(1 - self.brightness, 1 + self.brightness, generator)
        c = _uniform(1 - self.contrast, 1 + self.contrast, generator)
        s = _uniform(1 - self.saturation, 1 + self.saturation, generator)
        h = _uniform(-self.hue, self.hue, generator)
        if coins[0] < 0.5:
            image = TF.adjust_brightness(image, b)
        if coins[1] < 0.5:
            image = TF.adjust_contrast(image, c)
        if coins[2] < 0.5:
            image = TF.adjust_saturation(image, s)
        if coins[3] < 0.5:
            image = TF.adjust_hue(image, h)
        return image, label

    def __repr__(self):
        return "PhotoMetricDistortion()"


class Normalize:
    """uint8 [0, 255] image -> float32 (x - mean) / std; the label passes through."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, image, label, generator=None):
        return (image.float() - self.mean) / self.std, label

    def __repr__(self):
        return "Normalize()"


def denormalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Inverse of :class:`Normalize` for pictures: float [3, H, W] -> uint8."""
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (image.float().cpu() * s + m).round().clamp(0, 255).to(torch.uint8)


def train_transforms(crop_size, scale_range=(0.75, 2.0), base_size=None, flip=True, photometric=True):
    """The training pipeline of the paper's recipe: scale, crop, flip, jitter, normalise."""
    steps = [RandomScale(scale_range, base_size), RandomCrop(crop_size)]
    if flip:
        steps.append(RandomFlip())
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(Normalize())
    return Compose(steps)


def eval_transforms():
    """Evaluation: normalise only; rescaling happens in inference, which returns logits at the label's size."""
    return Compose([Normalize()])
