"""Pixel-wise pieces of the segmentation losses: logits brought to the labels' size in float32, and a
cross-entropy that keeps the logits' memory format."""

import torch
import torch.nn.functional as F
from torch import nn


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """``logits`` [N, C, h, w] bilinearly upsampled (align_corners=False) to ``size`` (H, W), in float32 whatever
    the autocast dtype (float64 stays float64).

    Under bf16 / fp16 autocast the logits arrive in half precision; upsampling them there would round the
    full-resolution logits the loss sees and, worse, run the backward (a scatter of every output pixel's
    gradient into four input pixels) with half-precision atomics on the GPU: slow, and rounding at every add.
    In float32 the loss is today's float32 loss, to the rounding of the half-precision logits themselves.
    A float32 (or float64) run is unchanged, bit for bit. The memory format (channels_last) is kept.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    # upsample_bilinear2d is on no autocast list: it runs in its input's dtype, float32 here (a test checks it).
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out NHWC (and not also NCHW, as tensors with one channel or one pixel are)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """``F.cross_entropy(logits [N, C, H, W], labels [N, H, W], ignore_index=...)``, the mean over labelled
    pixels. Channels_last logits are taken as their [N*H*W, C] rows (a view): the softmax runs along
    contiguous memory and the gradient comes back channels_last, where the 4-D cross-entropy's would be NCHW
    (a conversion before the next convolution's backward). NCHW logits take the 4-D path, unchanged."""
    if not is_channels_last(logits):
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    rows = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    return F.cross_entropy(rows, labels.reshape(-1), ignore_index=ignore_index)


class PixelCrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss(ignore_index=...)`` over pixels through :func:`pixel_cross_entropy`."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.weight is not None or self.label_smoothing or self.reduction != "mean":
            return super().forward(logits, labels)
        return pixel_cross_entropy(logits, labels, self.ignore_index)
