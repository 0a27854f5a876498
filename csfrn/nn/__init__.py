"""csfrn's modules: DeformConv2d, CSFLM and AAM."""

from .aam import AAM
from .csflm import CSFLM, CSFLMOutput
from .deform_conv import DeformConv2d
from .layers import ConvBNReLU, resize_to

__all__ = ["AAM", "CSFLM", "CSFLMOutput", "ConvBNReLU", "DeformConv2d", "resize_to"]
