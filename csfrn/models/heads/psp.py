"""PSPNet head (mmsegmentation PSPHead): pyramid pooling with bins 1, 2, 3, 6, then a 3x3 bottleneck."""

import torch
from torch import nn

from ...nn import ConvBNReLU, resize_to
from .base import DecodeHead


class PSPHead(DecodeHead):
    def __init__(self, in_channels, num_classes, channels=512, bins=(1, 2, 3, 6)):
        super().__init__(channels, num_classes)
        c = in_channels[-1]
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBNReLU(c, channels, 1)) for b in bins)
        self.bottleneck = ConvBNReLU(c + len(bins) * channels, channels, 3)

    def context(self, feats):
        x = feats[-1]
        pooled = [resize_to(p(x), x) for p in self.ppm]
        return self.bottleneck(torch.cat([x] + pooled, dim=1))
