"""Losses of CSFRN: Lovasz hinge, CAC (Eq. 4), margin smoothness (Eq. 5) and OHEM cross-entropy."""
from .cac import CACLoss, ClassIndex, SmoothLoss, class_index
from .labels import check_labels, check_model_labels, labels_checked
from .lovasz import lovasz_hinge, lovasz_softmax
from .ohem import OhemCrossEntropy

__all__ = ["lovasz_hinge", "lovasz_softmax", "CACLoss", "SmoothLoss", "OhemCrossEntropy", "ClassIndex", "class_index",
           "check_labels", "check_model_labels", "labels_checked"]
