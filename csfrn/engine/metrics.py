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
        raise ValueError(f"confusion_matrix: label value {int(label[bad][0])} is outside [0, {num_classes}) "
                         f"and is not the ignore index {ignore_index}")
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
