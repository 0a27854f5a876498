"""csfrn's modules: CSFLM and AAM."""
from .aam import AAM
from .csflm import CSFLM, CSFLMOutput
from .layers import ConvBNReLU

__all__ = ["AAM", "CSFLM", "CSFLMOutput", "ConvBNReLU"]
