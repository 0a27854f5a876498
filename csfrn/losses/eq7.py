"""``Eq7Loss``: the weighted loss terms of paper Eq. 7 for a segmentation model with CSFLM, in one module, used by
csfrn's own models (``CSFRN``) and by the models ``add_csflm`` plugs CSFLM into."""

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from .cac import CACLoss, SmoothLoss, class_index
from .labels import check_model_labels
from .lovasz import lovasz_softmax
from .ohem import OhemCrossEntropy
from .pixel import PixelCrossEntropy, pixel_cross_entropy, upsample_logits

DEFAULT_LOSS_WEIGHTS = {"seg": 1.0, "aux": 0.4, "cac": 0.2, "smooth": 0.2}
# How CSFLM's embeddings B are supervised: "cac", the paper's CAC + smoothness losses; "mask", Table 4's "+Aux Loss".
SUPERVISIONS = ("cac", "mask")


class Eq7Loss(nn.Module):
    """The losses of Eq. 7 as a dict of weighted terms that apply, so ``sum(losses.values())`` is the total loss.

    ``loss(labels, logits, aux=None, csflm=None)``: ``labels`` [N, H, W] from :meth:`prepare_labels`; ``logits``
    [N, K, h, w] (upsampled bilinearly in float32 to the labels' size when smaller: ``upsample_logits``); ``aux``
    the auxiliary head's logits or None; ``csflm`` CSFLM's output (``csfrn.nn.CSFLMOutput``) or None. Terms:

    - "seg": ``seg_loss`` on the logits (cross-entropy, or OHEM cross-entropy with ``ohem``), weight "seg";
    - "aux": cross-entropy on ``aux``, in train mode only, weight "aux";
    - with ``csflm`` and ``supervision="cac"``: "cac" (Eq. 4) and, when CSFLM has margins, "smooth" (Eq. 5),
      weights "cac" and "smooth";
    - with ``csflm`` and ``supervision="mask"``, in train mode only: "mask", Lovasz-softmax on the class mask at
      B's size of a 1x1 classifier on B (``mask_head``, Table 4's "+Aux Loss" row), weight "cac"; no CAC or
      smoothness loss.

    Args:
        num_classes: classes of the logits (labels outside [0, num_classes) that are not ``ignore_index`` are errors).
        embed_dim: width of CSFLM's embeddings B (for the mask head); None for a model without CSFLM.
        supervision: one of :data:`SUPERVISIONS`.
        seg_loss: the loss on the logits; None: cross-entropy, or OHEM cross-entropy (``ohem``, ``thresh``,
            ``min_kept``) with ``ohem``.
        loss_weights: overrides of :data:`DEFAULT_LOSS_WEIGHTS` (an unknown key is an error).
        binary, delta: the CAC loss's binary loss ("lovasz" or "bce") and margin temperature.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: Optional[int] = None,
        supervision: str = "cac",
        seg_loss: Optional[nn.Module] = None,
        ohem: bool = False,
        thresh: float = 0.7,
        min_kept: int = 100000,
        loss_weights: Optional[Mapping[str, float]] = None,
        binary: str = "lovasz",
        delta: float = 10.0,
        ignore_index: int = 255,
    ):
        super().__init__()
        if supervision not in SUPERVISIONS:
            raise ValueError(f"unknown csflm_supervision {supervision!r}; choose one of {list(SUPERVISIONS)}")
        unknown = set(loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss_weights keys {sorted(unknown)}; choose from {list(DEFAULT_LOSS_WEIGHTS)}")
        # The mask head first: a CSFRN registers this module first, so its parameters keep the place in the
        # optimizer's order that they had when the mask head was an attribute of the model itself.
        self.mask_head = nn.Conv2d(embed_dim, num_classes, 1) if supervision == "mask" and embed_dim else None
        if seg_loss is None:
            seg_loss = (
                OhemCrossEntropy(thresh, min_kept, ignore_index)
                if ohem
                else PixelCrossEntropy(ignore_index=ignore_index)
            )
        self.seg_loss = seg_loss
        self.cac_loss = CACLoss(delta=delta, binary=binary, ignore_index=ignore_index)
        self.smooth_loss = SmoothLoss(ignore_index=ignore_index)
        self.num_classes, self.supervision, self.ignore_index = num_classes, supervision, ignore_index
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}

    def prepare_labels(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` as int64, checked against ``images`` [N, 3, H, W]: shape [N, H, W] and values (a one-line
        ValueError naming the first bad one; skipped inside ``csfrn.losses.labels_checked()``, where the training
        engine has checked the CPU batch: on CUDA the check is a host sync)."""
        if labels.shape != (images.shape[0],) + images.shape[2:]:
            raise DataError(
                f"labels must have shape [N, H, W] = {[images.shape[0], *images.shape[2:]]} to match "
                f"images {list(images.shape)}, got {list(labels.shape)}"
            )
        labels = labels.long()
        check_model_labels(labels, self.num_classes, self.ignore_index)
        return labels

    def forward(
        self, labels: torch.Tensor, logits: torch.Tensor, aux: Optional[torch.Tensor] = None, csflm=None
    ) -> dict:
        w = self.loss_weights
        size = labels.shape[1:]
        losses = {"seg": w["seg"] * self.seg_loss(upsample_logits(logits, size), labels)}
        if aux is not None and self.training:
            losses["aux"] = w["aux"] * pixel_cross_entropy(upsample_logits(aux, size), labels, self.ignore_index)
        if csflm is None:
            return losses
        if self.mask_head is not None:
            if self.training:
                losses["mask"] = w["cac"] * self._mask_loss(csflm.embeddings, labels)
            return losses
        # one resize and renumbering of the labels for both losses
        index = class_index(labels, csflm.embeddings.shape[2:], self.ignore_index, self.num_classes)
        losses["cac"] = w["cac"] * self.cac_loss(csflm.embeddings, csflm.margins, index)
        if csflm.margins is not None:
            losses["smooth"] = w["smooth"] * self.smooth_loss(csflm.margins, index)
        return losses

    def _mask_loss(self, embeddings, labels):
        """Lovasz-softmax of the mask head's class probabilities on B against the labels at B's size."""
        index = class_index(labels, embeddings.shape[2:], self.ignore_index, self.num_classes)
        target = torch.where(
            index.compact == index.k,
            torch.full_like(index.compact, self.ignore_index),
            index.present[index.compact.clamp(max=max(index.k - 1, 0))],
        )
        probs = F.softmax(self.mask_head(embeddings).float(), dim=1)
        return lovasz_softmax(probs, target, self.ignore_index)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, supervision={self.supervision!r}, loss_weights={self.loss_weights}"
