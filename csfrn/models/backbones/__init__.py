from .resnet import ARCHS, LoadReport, ResNet, build_backbone, load_pretrained

__all__ = ["ARCHS", "LoadReport", "ResNet", "build_backbone", "load_pretrained"]
