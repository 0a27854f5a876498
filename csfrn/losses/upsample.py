"""Logits brought to the labels' size for a loss, in float32."""
import torch
import torch.nn.functional as F


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
    # upsample_bilinear2d is on no autocast list (it runs in its input's dtype); turning autocast off says so
    # and keeps it so should that list change.
    with torch.autocast(logits.device.type, enabled=False):
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
