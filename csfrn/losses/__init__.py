"""Losses of CSFRN: Lovasz hinge, CAC (Eq. 4), margin smoothness (Eq. 5) and OHEM cross-entropy; logits upsampled in
float32 for them; ``Eq7Loss``, the weighted sum of Eq. 7 that the models return."""

from .cac import CACLoss, ClassIndex, SmoothLoss, class_index
from .eq7 import DEFAULT_LOSS_WEIGHTS, SUPERVISIONS, Eq7Loss
from .labels import check_labels, check_model_labels, labels_checked
from .lovasz import lovasz_hinge, lovasz_softmax
from .ohem import OhemCrossEntropy
from .pixel import PixelCrossEntropy, pixel_cross_entropy, upsample_logits

__all__ = [
    "lovasz_hinge",
    "lovasz_softmax",
    "CACLoss",
    "SmoothLoss",
    "OhemCrossEntropy",
    "ClassIndex",
    "class_index",
    "upsample_logits",
    "pixel_cross_entropy",
    "PixelCrossEntropy",
    "check_labels",
    "check_model_labels",
    "labels_checked",
    "Eq7Loss",
    "DEFAULT_LOSS_WEIGHTS",
    "SUPERVISIONS",
]
