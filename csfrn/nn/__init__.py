"""csfrn's modules."""
from .deform_conv import DeformConv2d

__all__ = ["DeformConv2d"]
