"""Small building blocks shared by the modules and heads."""
from torch import nn


class ConvBNReLU(nn.Sequential):
    """conv (no bias: BN follows) + BatchNorm + ReLU; mmcv's ConvModule, keys ``0`` / ``1`` / ``2``."""

    def __init__(self, in_channels, out_channels, kernel_size=1, dilation=1, groups=1):
        padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))
