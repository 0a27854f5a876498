"""DeepLabv3+ head (mmsegmentation DepthwiseSeparableASPPHead): image pooling + 1x1 + three depthwise-separable
atrous branches, a 3x3 bottleneck, then a decoder that adds 48-channel low-level features of stage 1.

The context feature (what CSFLM takes and replaces) is the ASPP bottleneck output, at the backbone's output
stride; the decoder upsamples it to stride 4.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ...nn import ConvBNReLU, resize_to
from .base import DecodeHead


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU (mmcv DepthwiseSeparableConvModule)."""

    def __init__(self, in_channels, out_channels, dilation=1):
        super().__init__(
            ConvBNReLU(in_channels, in_channels, 3, dilation=dilation, groups=in_channels),
            ConvBNReLU(in_channels, out_channels, 1),
        )


class DeepLabV3PlusHead(DecodeHead):
    """Args: dilations of the three atrous branches: (12, 24, 36) at output stride 8, (6, 12, 18) at 16."""

    def __init__(self, in_channels, num_classes, channels=512, dilations=(12, 24, 36), c1_channels=48):
        super().__init__(channels, num_classes)
        c = in_channels[-1]
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(c, channels, 1))
        self.aspp = nn.ModuleList(
            [ConvBNReLU(c, channels, 1)] + [SeparableConvBNReLU(c, channels, d) for d in dilations]
        )
        self.bottleneck = ConvBNReLU((len(dilations) + 2) * channels, channels, 3)
        self.c1_bottleneck = ConvBNReLU(in_channels[0], c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(
            SeparableConvBNReLU(channels + c1_channels, channels), SeparableConvBNReLU(channels, channels)
        )

    def context(self, feats):
        x = feats[-1]
        pooled = resize_to(self.image_pool(x), x)
        return self.bottleneck(torch.cat([pooled] + [branch(x) for branch in self.aspp], dim=1))

    def decode(self, a, feats):
        c1 = self.c1_bottleneck(feats[0])
        a = F.interpolate(a, size=c1.shape[2:], mode="bilinear", align_corners=False)
        return self.sep_bottleneck(torch.cat([a, c1], dim=1))
