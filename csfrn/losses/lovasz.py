"""Binary Lovasz hinge (Berman, Triki, Blaschko, CVPR 2018), vectorised over rows: one sort for everything."""

from typing import Optional

import torch


def lovasz_hinge(
    logits: torch.Tensor, labels: torch.Tensor, per_image: bool = True, ignore_index: Optional[int] = None
) -> torch.Tensor:
    """Binary Lovasz hinge loss, a convex surrogate of 1 - IoU of the positive class.

    Args:
        logits: [B, ...] real scores (positive means class 1); per_image treats each of the B leading entries
            as one image, whatever its trailing shape ([B, P], [B, H, W], ...).
        labels: same shape, values in {0, 1} (or ``ignore_index``).
        per_image: the mean over images of each image's loss (Berman's default for this function);
            False: one loss over all pixels flattened together.
        ignore_index: label value whose pixels take part in nothing.

    Returns:
        scalar loss. An image with no valid pixel contributes 0 (Berman's ``lovasz_hinge_flat`` on an empty
        image) and still counts in the mean over images.

    How the rows stay in one sort: every row is sorted by its hinge errors; ignored pixels get error -inf so
    they sort behind all valid pixels of their row, are counted as negatives there (which leaves the Jaccard
    values of the valid prefix unchanged) and are multiplied by relu(-inf) = 0.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits and labels must have one shape, got {list(logits.shape)} and {list(labels.shape)}")
    if logits.dim() == 0:
        raise ValueError("logits must have a leading batch dimension [B, ...], got a scalar")
    if logits.numel() == 0:  # no image, or images without pixels
        return logits.sum() * 0.0
    rows = logits.shape[0] if per_image else 1
    logits, labels = logits.reshape(rows, -1), labels.reshape(rows, -1)
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    return lovasz_hinge_rows(logits, labels == 1, valid).mean()


def lovasz_hinge_rows(logits, positive, valid):
    """The Lovasz hinge of every row of ``logits`` [R, P] (one sort for all rows), as a [R] tensor.

    ``positive`` / ``valid`` are [R, P] bool masks: the target class, and the pixels that take part.
    Half-precision logits (autocast) are taken in float32: the running counts of Berman's Alg. 1 pass 256,
    which float16 / bfloat16 cannot count to exactly.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    gt = (positive & valid).to(logits.dtype)
    signs = 2.0 * gt - 1.0
    errors = (1.0 - logits * signs).masked_fill(~valid, float("-inf"))
    errors_sorted, perm = torch.sort(errors, dim=1, descending=True)
    gt_sorted = torch.gather(gt, 1, perm)
    grad = _lovasz_grad(gt_sorted)
    return (torch.relu(errors_sorted) * grad).sum(dim=1)


def _lovasz_grad(gt_sorted):
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors, row by row (Berman's Alg. 1).

    One cumsum serves both running counts: the negatives seen so far are the position minus the positives
    (all exact integers in float32 up to 2^24 pixels per row).
    """
    positives = gt_sorted.cumsum(dim=1)
    gts = gt_sorted.sum(dim=1, keepdim=True)
    seen = torch.arange(1, gt_sorted.shape[1] + 1, dtype=gt_sorted.dtype, device=gt_sorted.device)
    jaccard = 1.0 - (gts - positives) / (gts + seen - positives)
    return torch.diff(jaccard, dim=1, prepend=jaccard.new_zeros(jaccard.shape[0], 1))


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Lovasz-softmax loss (Berman et al. 2018) of class probabilities [N, C, h, w] against labels [N, h, w],
    over all pixels together, averaged over the classes present in the labels (Berman's classes='present').

    Static shapes only (no boolean indexing, no torch.unique), so a training step on a GPU does not wait for it:
    every class is one row of one sort, ignored pixels get error -1 and sort behind every valid one (whose
    errors are >= 0), where they count as negatives (which leaves the Jaccard values of the valid prefix
    unchanged) and add 0; a class with no labelled pixel has no weight in the mean.
    """
    if probs.dim() != 4 or labels.shape != (probs.shape[0],) + probs.shape[2:]:
        raise ValueError(
            f"probs must be [N, C, h, w] and labels [N, h, w], got {list(probs.shape)} and {list(labels.shape)}"
        )
    c = probs.shape[1]
    p = probs.float().permute(1, 0, 2, 3).reshape(c, -1)  # [C, P]
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    classes = torch.arange(c, device=labels.device)
    fg = ((labels[None] == classes[:, None]) & valid).to(p.dtype)  # [C, P]
    errors = (fg - p).abs().masked_fill(~valid, -1.0)
    errors_sorted, perm = torch.sort(errors, dim=1, descending=True)
    grad = _lovasz_grad(torch.gather(fg, 1, perm))
    per_class = (errors_sorted.clamp(min=0) * grad).sum(dim=1)
    present = (fg.sum(dim=1) > 0).to(p.dtype)
    return (per_class * present).sum() / present.sum().clamp(min=1)
