"""Small building blocks shared by the modules and heads."""

import torch
import torch.nn.functional as F
from torch import nn


def resize_to(t, like):
    """``t`` [N, C, h, w] bilinearly resized (align_corners=False) to the spatial size of ``like``, in the
    memory format of ``like``. A 1x1 map (image pooling) is broadcast, which is what bilinear upsampling of one
    pixel gives, exactly: its [N, C, 1, 1] strides do not say channels_last, so interpolate would write NCHW
    and the concat after it would turn the whole context back to NCHW."""
    size = like.shape[2:]
    if tuple(t.shape[2:]) != (1, 1):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    nhwc = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return t.expand(-1, -1, *size).contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


class ConvBNReLU(nn.Sequential):
    """conv (no bias: BN follows) + BatchNorm + ReLU; mmcv's ConvModule, keys ``0`` / ``1`` / ``2``."""

    def __init__(self, in_channels, out_channels, kernel_size=1, dilation=1, groups=1):
        padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(
                in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
