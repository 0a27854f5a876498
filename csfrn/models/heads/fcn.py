"""FCN head (mmsegmentation FCNHead, num_convs=2, concat_input=False) and the auxiliary FCN head."""

from torch import nn

from ...nn import ConvBNReLU
from .base import DecodeHead


class FCNHead(DecodeHead):
    """Two 3x3 conv + BN + ReLU on the last stage (2048 -> 512 -> 512), no input concat."""

    def __init__(self, in_channels, num_classes, channels=512, num_convs=2):
        super().__init__(channels, num_classes)
        convs = [ConvBNReLU(in_channels[-1] if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)

    def context(self, feats):
        return self.convs(feats[-1])


class AuxHead(nn.Module):
    """Auxiliary FCN head on stage 3 (1024 -> 256 -> classes): one 3x3 conv + BN + ReLU, dropout, 1x1."""

    def __init__(self, in_channels, num_classes, channels=256, dropout=0.1):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.conv(x)))
