"""The CSFRN segmentor: dilated ResNet -> context head -> (CSFLM -> concat or AAM fusion) -> classifier."""

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import Eq7Loss, upsample_logits


class CSFRN(nn.Module):
    """A segmentor (``csfrn.models.build_model`` makes one).

    ``model(images)`` returns logits at the input size; ``model(images, labels)`` returns
    ``(logits, losses)`` where ``losses`` holds the weighted terms of Eq. 7 that apply ("seg", "aux", "cac",
    "smooth", or "mask": ``csfrn.losses.Eq7Loss``), so ``sum(losses.values())`` is the total loss. The auxiliary
    head and CSFLM's class centres run only when labels are given in train mode (inference needs neither). A
    label outside [0, num_classes) that is not ``ignore_index`` is a one-line ValueError naming it (on CUDA that
    check is a host sync: a training loop checks its CPU batches with ``csfrn.losses.check_labels`` and runs the
    step inside ``csfrn.losses.labels_checked()``, as the engine does).

    Args:
        backbone: a module returning the four stage outputs; ``backbone.out_channels`` their widths.
        head: a ``DecodeHead``.
        csflm: a ``CSFLM`` placed after the head's context module, or None for the plain baseline.
        aux_head: the auxiliary FCN head on stage 3, or None.
        criterion: the ``csfrn.losses.Eq7Loss`` that makes the losses (None: its defaults for the head's classes
            and CSFLM's embeddings).
    """

    def __init__(self, backbone, head, csflm=None, aux_head=None, criterion=None):
        super().__init__()
        # first: checkpoints from before Eq7Loss held its mask head here, first in the parameters' order
        self.criterion = (
            criterion
            if criterion is not None
            else Eq7Loss(head.conv_seg.out_channels, csflm.embed.out_channels if csflm is not None else None)
        )
        self.backbone = backbone
        self.decode_head = head
        self.csflm = csflm
        self.aux_head = aux_head
        self.register_load_state_dict_pre_hook(_legacy_mask_head)

    @property
    def num_classes(self):
        return self.decode_head.conv_seg.out_channels

    @staticmethod
    def check_input(images):
        if (
            not isinstance(images, torch.Tensor)
            or images.dim() != 4
            or images.shape[1] != 3
            or not images.is_floating_point()
        ):
            got = f"{list(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
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
        # a bad value is a clear error here, not a device-side assert in the cross-entropy (the training engine
        # checks the CPU batch instead: on CUDA this check is a host sync)
        labels = self.criterion.prepare_labels(images, labels)
        # The logits returned are those the losses take: upsampled in float32 whatever the autocast dtype.
        logits = upsample_logits(logits, images.shape[2:])
        aux = self.aux_head(feats[2]) if self.aux_head is not None and self.training else None
        return logits, self.criterion(labels, logits, aux, out)

    @torch.no_grad()
    def predict_maps(self, images):
        """{"logits": [N, C, H, W], "features": the features that replace the head's A (CSFLM's fused F; the
        head's context output without CSFLM) [N, channels, h, w], "embeddings": C-S features [N, D, h, w] or
        None, "margins": margin map [N, 1, h, w] or None} for an input (paper Figure 3); runs in the module's
        current mode, without gradients."""
        logits, _, out, features = self._run(images)
        return {
            "logits": self._upsample(logits, images.shape[2:]),
            "features": features,
            "embeddings": out.embeddings if out is not None else None,
            "margins": out.margins if out is not None else None,
        }


def _legacy_mask_head(module, state_dict, prefix, *args):
    """A checkpoint from before ``Eq7Loss`` has the mask head's weights under ``mask_head.``: load them into
    ``criterion.mask_head.``."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}mask_head.")]:
        state_dict[f"{prefix}criterion.{key[len(prefix) :]}"] = state_dict.pop(key)
