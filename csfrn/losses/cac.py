"""Class-aware consistency loss (CAC, paper Eq. 4) and the margin smoothness loss (Eq. 5)."""

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .lovasz import lovasz_hinge_rows

BINARY_LOSSES = ("lovasz", "bce")


def resize_labels(labels, size):
    """Labels [N, H, W] brought to ``size`` (h, w) by nearest neighbour (no-op when already that size)."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be a 3-D tensor [N, H, W], got shape {list(labels.shape)}")
    if tuple(labels.shape[1:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def compact_labels(labels, ignore_index):
    """Renumbers the classes present in the batch 0..K-1 (so per-class tensors have K, not all, classes).

    Returns (compact labels with ignored pixels set to K, K, original class ids [K]).
    """
    values = torch.unique(labels)  # sorted; the ignore index dropped after (no masked copy)
    present = values[values != ignore_index]
    k = present.numel()
    compact = torch.searchsorted(present, labels.clamp(min=0).contiguous())
    return compact.masked_fill_(labels == ignore_index, k), k, present


class ClassIndex(NamedTuple):
    """Labels at the embedding size with their classes numbered 0..k-1 (``class_index``)."""

    compact: torch.Tensor  # [N, h, w] int64: 0..k-1, ignored pixels k
    k: int  # number of class slots
    present: torch.Tensor  # [k] the original id of each slot
    ignore_index: int


def class_index(
    labels: torch.Tensor, size: Tuple[int, int], ignore_index: int = 255, num_classes: Optional[int] = None
) -> ClassIndex:
    """``resize_labels`` then a numbering of the classes, once for every loss of a step: CACLoss and SmoothLoss
    take the result in place of labels, so the segmentor resizes and renumbers once (it is the same for both).

    With ``num_classes`` (what the models pass) the numbering is static: slot k is class k for every class of
    the model, present in the batch or not, and ignored pixels go to slot ``num_classes``. No ``torch.unique``,
    no shape that depends on the labels' values and so no host sync: a training step stays one graph under
    ``torch.compile`` and never waits for the GPU. Without it, the classes present in the batch are renumbered
    (``compact_labels``; fewer slots, one host sync). The losses are the same either way: a class absent from
    an image takes no part in its loss.
    """
    labels = resize_labels(labels, size)
    if num_classes is None:
        compact, k, present = compact_labels(labels, ignore_index)
        return ClassIndex(compact, k, present, ignore_index)
    compact = labels.masked_fill(labels == ignore_index, num_classes)
    return ClassIndex(compact, num_classes, torch.arange(num_classes, device=labels.device), ignore_index)


def _index(labels, size, ignore_index):
    """The ClassIndex of ``labels`` (raw labels [N, H, W] or a ClassIndex made for this size and ignore_index)."""
    if isinstance(labels, ClassIndex):
        if tuple(labels.compact.shape[1:]) != tuple(size) or labels.ignore_index != ignore_index:
            raise ValueError(
                f"the ClassIndex was made for size {list(labels.compact.shape[1:])} and ignore_index "
                f"{labels.ignore_index}, the loss needs {list(size)} and {ignore_index}"
            )
        return labels
    return class_index(labels, size, ignore_index)


def full_precision(*tensors):
    """float16 / bfloat16 tensors (autocast outputs) as float32, others (and None) as they are. The class-wise
    losses always run in float32 or wider: in float16 a class count saturates at 65504 pixels (its gradient
    would silently vanish), bfloat16 rounds counts above 256, and exp(delta * m) overflows float16 for m > 1.1."""
    return [t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def mean_over_present(values, counts):
    """values [N, K] per (image, class): the mean over each image's present classes, then over the images
    that have any; 0 (still attached to the graph) when no image has a labelled pixel. Masks rather than
    boolean indexing: no data-dependent shape, no host sync."""
    present = counts > 0
    per_class = torch.where(present, values, torch.zeros_like(values))
    k_n = present.sum(dim=1)
    has = k_n > 0
    per_image = per_class.sum(dim=1) / k_n.clamp(min=1).to(values.dtype)
    return (per_image * has).sum() / has.sum().clamp(min=1).to(values.dtype)


class CACLoss(nn.Module):
    """Class-aware consistency loss (Eq. 4).

    For every image n and every class k present in it: centre s_k and margin m_k are the means of the
    embeddings and of the margin map over the pixels of k (ONE ``csfrn.ops.class_avg_pool`` call over both
    stacked on the channel axis); phi = 1 - exp(-||b - s_k||^2 exp(delta m_k)) (``csfrn.ops.center_distance``);
    a binary loss pushes phi -> 0 on pixels of k and phi -> 1 on the image's other labelled pixels. Ignored
    pixels take part in nothing (neither centres nor the binary losses). Averaged over the present classes
    of an image, then over the images.

    binary="lovasz": Lovasz hinge on logits 2 (1 - phi) - 1 with target 1 on pixels of k, all (n, k) pairs as
    rows of one vectorised call (SpatialEmbeddings' use of it). binary="bce": binary cross-entropy on phi with
    target 0 on pixels of k and 1 elsewhere, averaged over the image's labelled pixels (Table 4).

    Gradients flow into the centres and margins too (they are differentiable means), as in SpatialEmbeddings.

    Called as ``loss(embeddings [N, D, h, w], margin_map [N, 1, h, w] or None, labels [N, H, W])``; labels of
    another size are resized to (h, w) by nearest neighbour; margin_map None fixes every margin at 0
    (Table 5's "w/o margin"). ``labels`` may also be a ``class_index(labels, (h, w), ignore_index)``.
    """

    def __init__(self, delta: float = 10.0, binary: str = "lovasz", ignore_index: int = 255):
        super().__init__()
        if binary not in BINARY_LOSSES:
            raise ValueError(f"unknown binary loss {binary!r}; choose one of {list(BINARY_LOSSES)}")
        self.delta, self.binary, self.ignore_index = float(delta), binary, ignore_index

    def forward(
        self, embeddings: torch.Tensor, margin_map: Optional[torch.Tensor], labels: Union[torch.Tensor, ClassIndex]
    ) -> torch.Tensor:
        if embeddings.dim() != 4:
            raise ValueError(f"embeddings must be a 4-D tensor [N, D, h, w], got shape {list(embeddings.shape)}")
        n, d, h, w = embeddings.shape
        if margin_map is not None and list(margin_map.shape) != [n, 1, h, w]:
            raise ValueError(f"margin_map must have shape [N, 1, h, w] = {[n, 1, h, w]}, got {list(margin_map.shape)}")
        compact, k = _index(labels, (h, w), self.ignore_index)[:2]
        embeddings, margin_map = full_precision(embeddings, margin_map)
        if k == 0:  # nothing labelled in the whole batch
            zero = embeddings.sum() * 0.0
            return zero if margin_map is None else zero + margin_map.sum() * 0.0
        stacked = embeddings if margin_map is None else torch.cat([embeddings, margin_map], dim=1)
        # compact labels are in [0, k] by construction: no check, so no host sync (validate=False)
        means, counts = ops.class_avg_pool(stacked, compact, k, ignore_index=k, validate=False)
        centers = means[..., :d].contiguous()
        margins = means[..., d] if margin_map is not None else means.new_zeros(n, k)
        phi = ops.center_distance(embeddings, centers, margins.contiguous(), self.delta)  # [N, K, h, w]

        # Every (image, class slot) pair is a row, present or not (static shapes: no nonzero, no host sync);
        # mean_over_present leaves the absent pairs out of the loss and of the gradient.
        rows = phi.reshape(n * k, h * w)  # [N*K, h*w]
        flat = compact.reshape(n, 1, h * w)
        positive = (flat == torch.arange(k, device=compact.device)[None, :, None]).reshape(n * k, h * w)
        valid = (flat != k).expand(n, k, h * w).reshape(n * k, h * w)
        if self.binary == "lovasz":
            row_loss = lovasz_hinge_rows(1.0 - 2.0 * rows, positive, valid)
        else:
            # phi is NaN only in a diverged run, where binary_cross_entropy would raise (a device assert on CUDA):
            # it gets a finite stand-in, and the NaN reaches the loss through a zero-weighted sum, so the
            # training loop reports it; no host sync on the way.
            target = (~positive).to(rows.dtype)
            bce = F.binary_cross_entropy(rows.nan_to_num(nan=0.5), target, reduction="none") * valid
            row_loss = bce.sum(dim=1) / valid.sum(dim=1).clamp(min=1) + rows.sum(dim=1) * 0.0
        return mean_over_present(row_loss.reshape(n, k), counts)


class SmoothLoss(nn.Module):
    """Margin smoothness loss (Eq. 5): per image, the mean over present classes k of the mean over the pixels
    of k of (c_ij - m_k)^2, with m_k the class mean of the margin map; then the mean over images.

    As SpatialEmbeddings does for its sigma, m_k is detached: the loss pulls every c_ij towards its class
    mean without moving the mean. (For this loss the two are the same gradient: the derivative through m_k
    is proportional to sum_ij (c_ij - m_k) = 0.)

    Called as ``loss(margin_map [N, 1, h, w], labels [N, H, W])``; labels are resized like CACLoss's (or given
    as a ``class_index``).
    """

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, margin_map: torch.Tensor, labels: Union[torch.Tensor, ClassIndex]) -> torch.Tensor:
        if margin_map.dim() != 4 or margin_map.shape[1] != 1:
            raise ValueError(f"margin_map must be a 4-D tensor [N, 1, h, w], got shape {list(margin_map.shape)}")
        n, _, h, w = margin_map.shape
        compact, k = _index(labels, (h, w), self.ignore_index)[:2]
        (margin_map,) = full_precision(margin_map)
        if k == 0:
            return margin_map.sum() * 0.0
        means, counts = ops.class_avg_pool(margin_map.detach(), compact, k, ignore_index=k, validate=False)
        table = torch.cat([means[..., 0], means.new_zeros(n, 1)], dim=1)  # ignored -> 0
        m_pix = table.gather(1, compact.reshape(n, -1)).reshape(n, 1, h, w)
        sq_means, _ = ops.class_avg_pool((margin_map - m_pix).pow(2), compact, k, ignore_index=k, validate=False)
        return mean_over_present(sq_means[..., 0], counts)
