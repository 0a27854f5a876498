"""Inference on normalised images: whole image, sliding window, multi-scale and flip.

All functions take a model in eval mode whose ``model(x)`` returns logits [N, K, h, w] at the size of ``x``, or a
model plugged with CSFLM (``csfrn.models.CSFLMPlug``), whose ``segment(x)`` gives them
(:func:`csfrn.models.plug.model_logits`).
"""

import math

import torch
import torch.nn.functional as F

from ..models.plug import model_logits
from ..ops._checks import pair

INFERENCE_MODES = ("slide", "whole")  # eval.mode: sliding windows of eval.crop_size, or the whole image


def _windows(length, crop, stride):
    """Start offsets of crop windows covering [0, length): every stride, the last flush with the end."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


@torch.no_grad()
def slide_inference(model, image, num_classes, crop_size, stride, crop_batch=4):
    """Logits of overlapping crop windows, averaged where they overlap (each pixel divided by its window count).

    Args:
        image: [N, 3, H, W] normalised float tensor.
        crop_size, stride: (h, w) pairs (or ints). A crop larger than the image is cut to the image, as
            mmsegmentation's slide inference does (windows ``[max(end - crop, 0), end)``): the model never
            sees padding, and a crop covering the image gives exactly the whole-image logits.
        crop_batch: crops per forward pass: memory is bounded by this, not by the image size.

    Returns:
        logits [N, K, H, W] (float32).
    """
    ch, cw = pair("crop_size", crop_size)
    sh, sw = pair("stride", stride)
    n, _, h, w = image.shape
    # Zero-padding a small image up to the crop would make the model see a mostly-grey picture (a 64 px
    # image in a 769 crop): cut the crop to the image instead.
    ch, cw = min(ch, h), min(cw, w)
    if (h > ch and sh > ch) or (w > cw and sw > cw):
        raise ValueError(
            f"slide inference: stride {(sh, sw)} larger than crop_size {(ch, cw)} would leave pixels "
            f"of the {h}x{w} image outside every window; expected stride <= crop_size"
        )
    boxes = [(y, x) for y in _windows(h, ch, sh) for x in _windows(w, cw, sw)]
    out = image.new_zeros(n, num_classes, h, w, dtype=torch.float32)
    count = image.new_zeros(1, 1, h, w, dtype=torch.float32)
    for i in range(n):
        for start in range(0, len(boxes), crop_batch):
            chunk = boxes[start : start + crop_batch]
            crops = torch.stack([image[i, :, y : y + ch, x : x + cw] for y, x in chunk])
            logits = model_logits(model, crops).float()
            for (y, x), crop_logits in zip(chunk, logits):
                out[i, :, y : y + ch, x : x + cw] += crop_logits
                if i == 0:
                    count[0, 0, y : y + ch, x : x + cw] += 1
    return out / count


@torch.no_grad()
def forward_logits(model, image, num_classes, mode="whole", crop_size=(512, 512), stride=(341, 341), crop_batch=4):
    """Logits at the size of ``image``, whole image or sliding window."""
    if mode == "whole":
        return model_logits(model, image).float()
    if mode == "slide":
        return slide_inference(model, image, num_classes, crop_size, stride, crop_batch)
    raise ValueError(f"inference mode must be one of {list(INFERENCE_MODES)}, got {mode!r}")


@torch.no_grad()
def inference(
    model,
    image,
    num_classes,
    mode="whole",
    crop_size=(512, 512),
    stride=(341, 341),
    crop_batch=4,
    scales=(1.0,),
    flip=False,
    out_size=None,
    base_size=None,
):
    """Class probabilities: softmax averaged over ``scales`` (and horizontal flips when ``flip``).

    Args:
        image: [N, 3, H, W] normalised float tensor.
        scales: image scale factors, relative to the image fitted into ``base_size`` = (long, short) when
            given (mmseg's keep-ratio test resize), else to the image itself.
        out_size: (h, w) of the result; default (H, W) (the label size when images are not pre-resized).

    Returns:
        probabilities [N, K, *out_size] (float32).
    """
    h, w = image.shape[-2:]
    out_size = tuple(out_size) if out_size is not None else (h, w)
    base = 1.0
    if base_size:
        base = min(max(base_size) / max(h, w), min(base_size) / min(h, w))
    probs = None
    for scale in scales:
        size = (max(1, round(h * base * scale)), max(1, round(w * base * scale)))
        x = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        views = [(x, False), (x.flip(-1), True)] if flip else [(x, False)]
        for view, flipped in views:
            logits = forward_logits(model, view, num_classes, mode, crop_size, stride, crop_batch)
            if flipped:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            p = logits.softmax(1)
            probs = p if probs is None else probs + p
    return probs / (len(scales) * (2 if flip else 1))


def inference_from_config(model, image, num_classes, eval_cfg, out_size=None, base_size=None):
    """:func:`inference` with the settings of an :class:`csfrn.engine.config.EvalConfig`."""
    scales = eval_cfg.scales if eval_cfg.multi_scale else [1.0]
    return inference(
        model,
        image,
        num_classes,
        mode=eval_cfg.mode,
        crop_size=eval_cfg.crop_size,
        stride=eval_cfg.stride,
        crop_batch=eval_cfg.crop_batch,
        scales=scales,
        flip=eval_cfg.flip,
        out_size=out_size,
        base_size=base_size,
    )
