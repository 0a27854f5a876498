"""Non-local head (mmsegmentation NLHead): 3x3 conv, embedded-Gaussian non-local block, 3x3 conv, then a 3x3
conv over the concat with the head's input."""

import torch
from torch import nn

from ...nn import ConvBNReLU
from .base import DecodeHead


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018; mmcv NonLocal2d, reduction 2, use_scale).

    y = softmax(theta(x)^T phi(x) / sqrt(C')) g(x); out = x + BN(conv1x1(y)). The output BN starts at zero
    (mmcv's zeros_init) so the block starts as the identity.
    """

    def __init__(self, channels, reduction=2):
        super().__init__()
        inter = channels // reduction
        self.inter = inter
        self.g = nn.Conv2d(channels, inter, 1)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.conv_out = nn.Sequential(nn.Conv2d(inter, channels, 1, bias=False), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.conv_out[1].weight)

    def forward(self, x):
        n, _, h, w = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)  # [N, HW, C']
        theta = self.theta(x).flatten(2).transpose(1, 2)  # [N, HW, C']
        phi = self.phi(x).flatten(2)  # [N, C', HW]
        attn = torch.softmax(theta @ phi / self.inter**0.5, dim=-1)
        y = (attn @ g).transpose(1, 2).reshape(n, self.inter, h, w)
        return x + self.conv_out(y)


class NLHead(DecodeHead):
    def __init__(self, in_channels, num_classes, channels=512):
        super().__init__(channels, num_classes)
        c = in_channels[-1]
        self.conv1 = ConvBNReLU(c, channels, 3)
        self.nl_block = NonLocal2d(channels)
        self.conv2 = ConvBNReLU(channels, channels, 3)
        self.conv_cat = ConvBNReLU(c + channels, channels, 3)

    def context(self, feats):
        x = feats[-1]
        out = self.conv2(self.nl_block(self.conv1(x)))
        return self.conv_cat(torch.cat([x, out], dim=1))
