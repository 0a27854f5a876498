"""Segmentation models: backbones, heads, the CSFRN segmentor, ``build_model``, complexity counting and
``add_csflm`` (CSFLM plugged into other models)."""
from .builder import build_model
from .complexity import complexity, flops_table
from .plug import CSFLMPlug, add_csflm
from .segmentor import CSFRN

__all__ = ["add_csflm", "build_model", "complexity", "flops_table", "CSFLMPlug", "CSFRN"]
