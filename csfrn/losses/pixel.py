"""Pixel-wise pieces of the segmentation losses: logits brought to the labels' size in float32, and a
cross-entropy that keeps the logits' memory format."""

import torch
import torch.nn.functional as F
from torch import nn


UPSAMPLE_METHODS = ("gemm", "interpolate")


def upsample_logits(logits: torch.Tensor, size, method=None) -> torch.Tensor:
    """``logits`` [N, C, h, w] bilinearly upsampled (align_corners=False) to ``size`` (H, W), in float32 whatever
    the autocast dtype (float64 stays float64).

    Under bf16 / fp16 autocast the logits arrive in half precision; upsampling them there would round the
    full-resolution logits the loss sees and, worse, run the backward (a scatter of every output pixel's
    gradient into four input pixels) with half-precision atomics on the GPU: slow, and rounding at every add.
    In float32 the loss is today's float32 loss, to the rounding of the half-precision logits themselves.
    The memory format (channels_last) is kept.

    ``method``: "gemm" (the default on CUDA) or "interpolate" (``F.interpolate``, the default elsewhere: a
    float32 or float64 run on the CPU is unchanged, bit for bit). "gemm" does the same interpolation as two
    products with the [H, h] and [W, w] matrices of bilinear weights (two non-zeros a row), so its backward is
    two more products: no scattered atomics (upsample_bilinear2d's CUDA backward adds each of the N C H W
    output gradients into four input pixels with atomics, about 250 adds per input pixel at 97 -> 769, which
    serialise), and the same gradient bit for bit on every call, where the atomic scatter's varies from call to
    call. It is ``F.interpolate``'s interpolation with the same two-tap weights (the products add exact zeros),
    the source positions computed in float64 (F.interpolate's are float32 for float32 logits: about 1e-5
    relative apart at 97 -> 769). Its cost at N=8, 19 classes, 97 -> 769: about 20 GFLOP forward and 20
    backward in float32 (TF32 where ``torch.backends.cuda.matmul.allow_tf32`` says so, as for every float32
    product). A non-finite logit spreads along its row and column (0 x inf), where F.interpolate's stays
    local: the loss is non-finite either way.
    """
    if method is not None and method not in UPSAMPLE_METHODS:
        raise ValueError(f"upsample_logits: method is {method!r}, expected one of {UPSAMPLE_METHODS} or None")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    if method is None:
        method = "gemm" if logits.is_cuda else "interpolate"
    if method == "gemm":
        return _upsample_by_gemm(logits, tuple(size))
    # upsample_bilinear2d is on no autocast list: it runs in its input's dtype, float32 here (a test checks it).
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def bilinear_weights(out_size: int, in_size: int, like: torch.Tensor) -> torch.Tensor:
    """[out_size, in_size] in ``like``'s dtype and device: row o holds the two weights with which bilinear
    interpolation (align_corners=False, as upsample_bilinear2d) takes output position o from the input (one
    weight of 1 where both taps are the last pixel). Built on the device with elementwise ops: no host sync."""
    dst = torch.arange(out_size, device=like.device, dtype=torch.float64)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)  # the source index, clamped at the border
    i0 = src.floor().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    frac = (src - i0)[:, None]
    cols = torch.arange(in_size, device=like.device, dtype=torch.float64)
    weights = (cols == i0[:, None]) * (1 - frac) + (cols == i1[:, None]) * frac
    return weights.to(like.dtype)


def _upsample_by_gemm(x: torch.Tensor, size) -> torch.Tensor:
    n, c, h, w = x.shape
    height, width = size
    along_h, along_w = bilinear_weights(height, h, x), bilinear_weights(width, w, x)
    # In x's dtype (float32 / float64): autocast would run these products in half precision.
    with torch.autocast(x.device.type, enabled=False):
        if is_channels_last(x):
            rows = x.permute(0, 2, 3, 1)  # [N, h, w, C], contiguous
            t = torch.matmul(along_w, rows)  # [N, h, W, C]
            out = torch.matmul(along_h, t.reshape(n, h, width * c))  # [N, H, W * C]
            return out.view(n, height, width, c).permute(0, 3, 1, 2)
        return torch.matmul(along_h, torch.matmul(x, along_w.t()))


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
