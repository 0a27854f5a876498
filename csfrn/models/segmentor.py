"""The CSFRN segmentor: dilated ResNet -> context head -> (CSFLM -> concat or AAM fusion) -> classifier."""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import (CACLoss, PixelCrossEntropy, SmoothLoss, check_model_labels, class_index, lovasz_softmax,
                      pixel_cross_entropy, upsample_logits)

DEFAULT_LOSS_WEIGHTS = {"seg": 1.0, "aux": 0.4, "cac": 0.2, "smooth": 0.2}


def set_losses(module, seg_loss=None, loss_weights=None, delta=10.0, binary="lovasz", ignore_index=255):
    """Gives ``module`` the losses of Eq. 7 (``seg_loss``, ``cac_loss``, ``smooth_loss``) and its
    ``loss_weights`` (DEFAULT_LOSS_WEIGHTS updated by ``loss_weights``; an unknown key is an error)."""
    module.seg_loss = seg_loss or PixelCrossEntropy(ignore_index=ignore_index)
    module.cac_loss = CACLoss(delta=delta, binary=binary, ignore_index=ignore_index)
    module.smooth_loss = SmoothLoss(ignore_index=ignore_index)
    unknown = set(loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown loss_weights keys {sorted(unknown)}; choose from {list(DEFAULT_LOSS_WEIGHTS)}")
    module.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}


class CSFRN(nn.Module):
    """A segmentor (``csfrn.models.build_model`` makes one).

    ``model(images)`` returns logits at the input size; ``model(images, labels)`` returns
    ``(logits, losses)`` where ``losses`` holds the weighted terms of Eq. 7 that apply ("seg", "aux", "cac",
    "smooth"), so ``sum(losses.values())`` is the total loss. The auxiliary head and CSFLM's class centres
    run only when labels are given in train mode (inference needs neither). A label outside [0, num_classes)
    that is not ``ignore_index`` is a one-line ValueError naming it (on CUDA that check is a host sync: a
    training loop checks its CPU batches with ``csfrn.losses.check_labels`` and runs the step inside
    ``csfrn.losses.labels_checked()``, as the engine does).

    Args:
        backbone: a module returning the four stage outputs; ``backbone.out_channels`` their widths.
        head: a ``DecodeHead``.
        csflm: a ``CSFLM`` placed after the head's context module, or None for the plain baseline.
        aux_head: the auxiliary FCN head on stage 3, or None.
        seg_loss: loss on the upsampled logits (CE or OHEM CE).
        loss_weights: weights of "seg", "aux", "cac", "smooth".
        delta, binary: the CAC loss's margin temperature and binary loss.
        mask_head: a 1x1 conv from the embeddings B to class logits: B is then supervised by Lovasz-softmax on
            the class mask (Table 4's "+Aux Loss" row, weight loss_weights["cac"]) instead of CAC + smoothness.
    """

    def __init__(self, backbone, head, csflm=None, aux_head=None, seg_loss=None, loss_weights=None,
                 delta=10.0, binary="lovasz", ignore_index=255, mask_head=None):
        super().__init__()
        self.mask_head = mask_head
        self.backbone = backbone
        self.decode_head = head
        self.csflm = csflm
        self.aux_head = aux_head
        self.ignore_index = ignore_index
        set_losses(self, seg_loss, loss_weights, delta, binary, ignore_index)

    @property
    def num_classes(self):
        return self.decode_head.conv_seg.out_channels

    @staticmethod
    def check_input(images):
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            got = (f"{list(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor)
                   else type(images).__name__)
            raise ValueError(f"images must be a 4-D float tensor [N, 3, H, W] (normalised RGB), got {got}")

    def _run(self, images):
        """Backbone, head and CSFLM: (logits at the head's stride, stage outputs, CSFLM output or None, the features
        that go on to the decoder: CSFLM's fused F, or the head's context output A without CSFLM)."""
        self.check_input(images)
        feats = self.backbone(images)
        a = self.decode_head.context(feats)
        out = None
        if self.csflm is not None:
            out = self.csflm(a)
            a = out.features
        logits = self.decode_head.classify(self.decode_head.decode(a, feats))
        return logits, feats, out, a

    @staticmethod
    def _upsample(logits, size):
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, images, labels=None):
        logits, feats, out, _ = self._run(images)
        if labels is None:
            return self._upsample(logits, images.shape[2:])
        if labels.shape != (images.shape[0],) + images.shape[2:]:
            raise ValueError(f"labels must have shape [N, H, W] = {[images.shape[0], *images.shape[2:]]} to match "
                             f"images {list(images.shape)}, got {list(labels.shape)}")
        labels = labels.long()
        # a bad value is a clear error here, not a device-side assert in the cross-entropy (the training engine
        # checks the CPU batch instead: on CUDA this check is a host sync)
        check_model_labels(labels, logits.shape[1], self.ignore_index)
        w = self.loss_weights
        # The losses take the logits upsampled in float32 whatever the autocast dtype (upsample_logits).
        logits = upsample_logits(logits, images.shape[2:])
        losses = {"seg": w["seg"] * self.seg_loss(logits, labels)}
        if self.aux_head is not None and self.training:
            aux = upsample_logits(self.aux_head(feats[2]), images.shape[2:])
            losses["aux"] = w["aux"] * pixel_cross_entropy(aux, labels, self.ignore_index)
        if out is not None and self.mask_head is not None:
            if self.training:
                index = class_index(labels, out.embeddings.shape[2:], self.ignore_index, self.num_classes)
                target = torch.where(index.compact == index.k, torch.full_like(index.compact, self.ignore_index),
                                     index.present[index.compact.clamp(max=max(index.k - 1, 0))])
                probs = F.softmax(self.mask_head(out.embeddings).float(), dim=1)
                losses["mask"] = w["cac"] * lovasz_softmax(probs, target, self.ignore_index)
        elif out is not None:
            # one resize and renumbering of the labels for both losses
            index = class_index(labels, out.embeddings.shape[2:], self.ignore_index, self.num_classes)
            losses["cac"] = w["cac"] * self.cac_loss(out.embeddings, out.margins, index)
            if out.margins is not None:
                losses["smooth"] = w["smooth"] * self.smooth_loss(out.margins, index)
        return logits, losses

    @torch.no_grad()
    def predict_maps(self, images):
        """{"logits": [N, C, H, W], "features": the features that replace the head's A (CSFLM's fused F; the
        head's context output without CSFLM) [N, channels, h, w], "embeddings": C-S features [N, D, h, w] or
        None, "margins": margin map [N, 1, h, w] or None} for an input (paper Figure 3); runs in the module's
        current mode, without gradients."""
        logits, _, out, features = self._run(images)
        return {"logits": self._upsample(logits, images.shape[2:]), "features": features,
                "embeddings": out.embeddings if out is not None else None,
                "margins": out.margins if out is not None else None}

    def forward_features(self, images):
        """Deprecated alias of :meth:`predict_maps` (timm's ``forward_features`` means the backbone's feature
        map, which this is not); it will be removed in the next release."""
        warnings.warn("CSFRN.forward_features is deprecated and will be removed in the next release; use "
                      "predict_maps (same arguments and result)", FutureWarning, stacklevel=2)
        return self.predict_maps(images)
