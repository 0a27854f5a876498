"""DeformConv2d: a deformable convolution layer whose offsets (and mask) come from the caller."""

import math
from typing import Optional

import torch
from torch import nn

from ..ops import _checks, deform_conv2d
from ..ops.deform_conv import IntPair


class DeformConv2d(nn.Module):
    """Deformable 2-D convolution with learnable weight and bias (torchvision.ops.DeformConv2d's interface).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: int or (kh, kw).
        stride, padding, dilation: int or pair.
        groups: channel groups of the convolution; must divide in_channels and out_channels.
        bias: learn an additive bias.

    ``forward(input, offset, mask=None)``: offset [N, 2 * offset_groups * kh * kw, H_out, W_out], optional mask
    [N, offset_groups * kh * kw, H_out, W_out]; see :func:`csfrn.ops.deform_conv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        if groups < 1 or in_channels % groups != 0:
            raise ValueError(f"in_channels must be divisible by groups, got in_channels={in_channels}, groups={groups}")
        if out_channels % groups != 0:
            raise ValueError(
                f"out_channels must be divisible by groups, got out_channels={out_channels}, groups={groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(_checks.pair("kernel_size", kernel_size))
        self.stride = tuple(_checks.pair("stride", stride))
        self.padding = tuple(_checks.pair("padding", padding))
        self.dilation = tuple(_checks.pair("dilation", dilation))
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The initialisation of nn.Conv2d and torchvision's DeformConv2d.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return deform_conv2d(
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def __repr__(self):
        s = (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s + ")"
