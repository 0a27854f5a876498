from .resnet import ARCHS, LoadReport, ResNet, build_backbone, load_pretrained
from .timm_backbone import TIMM_PREFIX, TimmBackbone, is_timm

__all__ = [
    "ARCHS",
    "LoadReport",
    "ResNet",
    "TIMM_PREFIX",
    "TimmBackbone",
    "build_backbone",
    "is_timm",
    "load_pretrained",
]
