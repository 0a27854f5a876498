"""Decode heads, each ending in ``channels`` (512) features before its classifier, and the auxiliary head."""

from .base import DecodeHead
from .deeplabv3plus import DeepLabV3PlusHead
from .fcn import AuxHead, FCNHead
from .nl import NLHead, NonLocal2d
from .psp import PSPHead

HEADS = {"fcn": FCNHead, "psp": PSPHead, "nonlocal": NLHead, "deeplabv3plus": DeepLabV3PlusHead}

__all__ = ["HEADS", "AuxHead", "DecodeHead", "DeepLabV3PlusHead", "FCNHead", "NLHead", "NonLocal2d", "PSPHead"]
