"""Segmentation models: backbones (csfrn's ResNets, timm's through ``timm:<name>``), heads, the CSFRN segmentor,
``build_model``, complexity counting, ``add_csflm`` (CSFLM plugged into other models) and ``build_external``
(another library's model with CSFLM, from a config's ``model.external``)."""

from .builder import build_model
from .complexity import complexity
from .external import build_external
from .plug import CSFLMPlug, add_csflm
from .segmentor import CSFRN

__all__ = ["add_csflm", "build_external", "build_model", "complexity", "CSFLMPlug", "CSFRN"]
