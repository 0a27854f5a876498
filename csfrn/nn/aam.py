"""AAM, the Adaptive Aggregation Module (paper Figure 2)."""

from typing import Optional

import math

import torch
from torch import nn

from .. import ops
from .layers import ConvBNReLU


class AAM(nn.Module):
    """Aggregates the C-S features X (embeddings) with the head's features Y through one shared offset field.

    E = conv3x3(concat[X, Y]) -> 18 offsets (one (dy, dx) pair per tap of a 3x3 kernel), initialised to zero
    so that training starts from plain 3x3 convs, as DCN does. X' and Y' are 3x3 deformable convs (padding 1)
    of X and Y that sample at the same offsets (one ``csfrn.ops.dual_deform_conv2d`` call); X' keeps X's
    channels and Y' keeps Y's. F = conv1x1(concat[X', Y']) + BN + ReLU.

    Choices the paper leaves open: no modulation mask (DCNv1, as Figure 2 shows offsets only); the deformable
    convs have no bias and no BN / ReLU of their own (the 1x1 fuse conv and its BN absorb both).

    Args:
        x_channels: channels of X (the embedding width D).
        y_channels: channels of Y (the head width, 512).
        out_channels: channels of F (default y_channels).
    """

    def __init__(self, x_channels: int = 32, y_channels: int = 512, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = out_channels or y_channels
        self.offset = nn.Conv2d(x_channels + y_channels, 2 * 3 * 3, 3, padding=1)
        self.weight_x = nn.Parameter(torch.empty(x_channels, x_channels, 3, 3))
        self.weight_y = nn.Parameter(torch.empty(y_channels, y_channels, 3, 3))
        self.fuse = ConvBNReLU(x_channels + y_channels, out_channels, 1)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        for w in (self.weight_x, self.weight_y):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Conv2d's default

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        offset = self.offset(torch.cat([x, y], dim=1))
        x2, y2 = ops.dual_deform_conv2d(x, y, offset, self.weight_x, self.weight_y, padding=1)
        return self.fuse(torch.cat([x2, y2], dim=1))

    def extra_repr(self):
        return f"x_channels={self.weight_x.shape[0]}, y_channels={self.weight_y.shape[0]}, shared 3x3 offsets"
