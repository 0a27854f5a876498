"""Online hard example mining cross-entropy (OCNet / HRNet OhemCrossEntropy semantics)."""

import torch
import torch.nn.functional as F
from torch import nn


class OhemCrossEntropy(nn.Module):
    """Cross-entropy over the hard pixels only.

    Keeps every labelled pixel whose predicted probability of its true class is below ``thresh``; when that
    is fewer than ``min_kept``, keeps the ``min_kept`` pixels of lowest true-class probability instead (all
    labelled pixels when there are fewer). ``min_kept`` counts over the whole batch, as OCNet / HRNet do
    (mmsegmentation's OHEMPixelSampler counts it per image). Returns the mean CE over the kept pixels; the
    selection itself carries no gradient.

    Called as ``loss(logits [N, C, H, W], labels [N, H, W])`` with logits already at the labels' size.
    """

    def __init__(self, thresh: float = 0.7, min_kept: int = 100000, ignore_index: int = 255):
        super().__init__()
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"thresh must be in (0, 1], got {thresh}")
        if min_kept < 0:
            raise ValueError(f"min_kept must be >= 0, got {min_kept}")
        self.thresh, self.min_kept, self.ignore_index = float(thresh), int(min_kept), ignore_index

    def kept_mask(self, logits, labels):
        """[N, H, W] bool: the pixels the loss keeps. Static shapes only (no boolean indexing, no count read on
        the host), so a training step on a GPU does not wait for it: every pixel is ranked by its true-class
        probability (ignored pixels last, at +inf; a stable sort keeps pixel order among ties) and the
        ``max(#below thresh, min(min_kept, #labelled))`` lowest ranks are kept."""
        with torch.no_grad():
            valid = labels != self.ignore_index
            prob = torch.softmax(logits.float(), dim=1)
            prob = prob.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
            prob = prob.masked_fill(~valid, float("inf")).flatten()
            below = ((prob < self.thresh) & valid.flatten()).sum()
            keep = torch.maximum(below, valid.sum().clamp(max=self.min_kept))
            order = torch.sort(prob, stable=True).indices
            rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return (rank < keep).view_as(valid)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or labels.shape != (logits.shape[0],) + logits.shape[2:]:
            raise ValueError(
                f"logits must be [N, C, H, W] and labels [N, H, W] of the same N, H, W, got "
                f"{list(logits.shape)} and {list(labels.shape)}"
            )
        mask = self.kept_mask(logits, labels)
        pixel = F.cross_entropy(
            logits, torch.where(mask, labels, self.ignore_index), ignore_index=self.ignore_index, reduction="sum"
        )
        return pixel / mask.sum().clamp(min=1)
