"""Segmentation models: backbones, heads, the CSFRN segmentor, ``build_model`` and complexity counting."""
from .builder import build_model
from .complexity import complexity, flops_table
from .segmentor import CSFRN

__all__ = ["build_model", "complexity", "flops_table", "CSFRN"]
