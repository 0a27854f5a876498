"""Segmentation metrics from a confusion matrix (rows: ground truth, columns: prediction)."""

import csv
import json
import math

import torch


def confusion_matrix(pred, label, num_classes, ignore_index=255):
    """Confusion matrix of integer predictions against labels.

    Args:
        pred: integer tensor of predicted class ids, any shape.
        label: integer tensor of the same shape, values in [0, num_classes) or ``ignore_index``.
        num_classes: K.
        ignore_index: label value whose pixels are not counted.

    Returns:
        int64 [K, K] tensor on ``pred``'s device; ``cm[g, p]`` counts pixels of class g predicted as p.
    """
    if pred.shape != label.shape:
        raise ValueError(f"confusion_matrix: pred has shape {tuple(pred.shape)} but label has {tuple(label.shape)}")
    pred = pred.reshape(-1).long()
    label = label.reshape(-1).long().to(pred.device)
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    bad = (label < 0) | (label >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"confusion_matrix: label value {int(label[bad][0])} is outside [0, {num_classes}) "
            f"and is not the ignore index {ignore_index}"
        )
    bad = (pred < 0) | (pred >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"confusion_matrix: predicted value {int(pred[bad][0])} is outside [0, {num_classes})")
    cm = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes)


def _nanmean(values):
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def summarize(cm):
    """aAcc, mAcc, mIoU (fractions) and per-class IoU / Acc lists of a [K, K] confusion matrix.

    IoU of a class is NaN when it appears neither in the ground truth nor in the prediction (union 0);
    its Acc is NaN when it has no ground-truth pixels. The means skip NaN.
    """
    cm = torch.as_tensor(cm).double().cpu()
    tp = cm.diag()
    gt = cm.sum(1)
    union = gt + cm.sum(0) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))).tolist()
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan"))).tolist()
    total = float(gt.sum())
    return {
        "aAcc": float(tp.sum()) / total if total > 0 else float("nan"),
        "mAcc": _nanmean(acc),
        "mIoU": _nanmean(iou),
        "IoU": iou,
        "Acc": acc,
    }


def _pct(value):
    return "   nan" if math.isnan(value) else f"{100 * value:6.2f}"


def format_table(summary, classes):
    """The per-class IoU / Acc table (percent) followed by the means, as text."""
    width = max([len("Class")] + [len(c) for c in classes])
    lines = [f"{'Class':<{width}} |  IoU   |  Acc  ", "-" * (width + 18)]
    for name, iou, acc in zip(classes, summary["IoU"], summary["Acc"]):
        lines.append(f"{name:<{width}} | {_pct(iou)} | {_pct(acc)}")
    lines.append("-" * (width + 18))
    lines.append(f"aAcc {_pct(summary['aAcc'])}  mAcc {_pct(summary['mAcc'])}  mIoU {_pct(summary['mIoU'])}")
    return "\n".join(lines)


def save_summary(summary, classes, json_path=None, csv_path=None):
    """Write the summary as JSON (NaN as null) and/or as a per-class CSV with a final 'mean' row."""

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return None if isinstance(v, float) and math.isnan(v) else v

    if json_path is not None:
        payload = {k: ([clean(x) for x in v] if isinstance(v, list) else clean(v)) for k, v in summary.items()}
        payload["classes"] = list(classes)
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=2)
    if csv_path is not None:
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "IoU", "Acc"])
            for name, iou, acc in zip(classes, summary["IoU"], summary["Acc"]):
                writer.writerow([name, clean(iou), clean(acc)])
            writer.writerow(["mean", clean(summary["mIoU"]), clean(summary["mAcc"])])


def save_confusion(cm, classes, csv_path):
    """The confusion matrix as CSV: a header row of predicted class names, then one row per ground-truth class
    (its name, then its pixel counts)."""
    cm = torch.as_tensor(cm).cpu().tolist()
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ground truth \\ prediction", *classes])
        for name, row in zip(classes, cm):
            writer.writerow([name, *row])


class FeatureConsistency:
    """Streaming statistics for :func:`feature_consistency` over many batches (a whole split): per class the
    pixel count, the sum of the features and the sum of their squared norms, in float64."""

    def __init__(self, ignore_index=255):
        self.ignore_index = ignore_index
        self.count = self.total = self.sq = None

    def update(self, features, labels):
        """``features`` [N, C, h, w]; ``labels`` [N, H, W] class ids (``ignore_index`` skipped), brought to
        (h, w) by nearest neighbour as the CAC loss does."""
        if features.dim() != 4:
            raise ValueError(f"features must be a 4-D tensor [N, C, h, w], got shape {list(features.shape)}")
        n, c, h, w = features.shape
        labels = torch.as_tensor(labels)
        if labels.dim() != 3 or labels.shape[0] != n:
            raise ValueError(f"labels must be a 3-D tensor [N, H, W] with N = {n}, got shape {list(labels.shape)}")
        if tuple(labels.shape[1:]) != (h, w):
            labels = torch.nn.functional.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0]
        labels = labels.long().reshape(-1).to(features.device)
        x = features.detach().double().permute(0, 2, 3, 1).reshape(-1, c)
        keep = labels != self.ignore_index
        x, labels = x[keep], labels[keep]
        if bool((labels < 0).any()):
            raise ValueError(f"labels hold a negative value {int(labels.min())}")
        k = int(labels.max()) + 1 if labels.numel() else 0
        if self.count is None:
            self.count = torch.zeros(0, dtype=torch.float64)
            self.total = torch.zeros(0, c, dtype=torch.float64)
            self.sq = torch.zeros(0, dtype=torch.float64)
        elif self.total.shape[1] != c:
            raise ValueError(f"features have {c} channels, earlier batches had {self.total.shape[1]}")
        if k > self.count.numel():
            grow = k - self.count.numel()
            self.count = torch.cat([self.count, self.count.new_zeros(grow)])
            self.total = torch.cat([self.total, self.total.new_zeros(grow, c)])
            self.sq = torch.cat([self.sq, self.sq.new_zeros(grow)])
        if k:
            labels_cpu, x = labels.cpu(), x.cpu()
            self.count.index_add_(0, labels_cpu, torch.ones_like(labels_cpu, dtype=torch.float64))
            self.total.index_add_(0, labels_cpu, x)
            self.sq.index_add_(0, labels_cpu, (x * x).sum(1))
        return self

    def result(self):
        """{"intra": mean over classes of the mean squared distance of a class's pixels to its centre,
        "inter": mean Euclidean distance between two class centres (over all pairs of present classes),
        "inter_sq": the mean squared distance between centres, "ratio": inter_sq / intra (Fisher-style:
        between-class over within-class scatter; unchanged when the features are scaled), "classes": the
        number of classes present}. Values are NaN when they are undefined (fewer than two classes, or
        intra 0 for the ratio)."""
        nan = float("nan")
        if self.count is None or not bool((self.count > 0).any()):
            return {"intra": nan, "inter": nan, "inter_sq": nan, "ratio": nan, "classes": 0}
        present = self.count > 0
        count, total, sq = self.count[present], self.total[present], self.sq[present]
        centres = total / count[:, None]
        intra = float((sq / count - (centres * centres).sum(1)).clamp(min=0).mean())
        k = centres.shape[0]
        if k < 2:
            return {"intra": intra, "inter": nan, "inter_sq": nan, "ratio": nan, "classes": k}
        i, j = torch.triu_indices(k, k, 1)
        d2 = ((centres[i] - centres[j]) ** 2).sum(1)
        inter_sq = float(d2.mean())
        return {
            "intra": intra,
            "inter": float(d2.sqrt().mean()),
            "inter_sq": inter_sq,
            "ratio": inter_sq / intra if intra > 0 else nan,
            "classes": k,
        }


def feature_consistency(features, labels, ignore_index=255):
    """How intra-class compact and inter-class separable features are (the paper's claim for its C-S
    features, Figure 3), at the feature resolution.

    Args:
        features: [N, C, h, w] features (a CSFRN's fused features F or embeddings B, a baseline's head output).
        labels: [N, H, W] class ids; resized to (h, w) by nearest neighbour; ``ignore_index`` pixels skipped.

    Returns:
        {"intra", "inter", "inter_sq", "ratio", "classes"} (see :meth:`FeatureConsistency.result`): the class
        centres are the means over all the given pixels of a class (pooled over the images), "intra" the mean
        intra-class variance (mean squared distance to the centre, averaged over classes), "inter" the mean
        distance between centres and "ratio" the mean squared distance between centres over "intra".
    """
    return FeatureConsistency(ignore_index).update(features, labels).result()
