"""Pure-PyTorch twins of the csfrn kernels: slow, memory-hungry and obviously correct.

Tests compare the kernels with these in float64; ``csfrn.ops.use_reference()`` routes the public functions
here; benchmarks time them beside the kernels.
"""
import torch

from . import _checks


def class_avg_pool(features, labels, num_classes, ignore_index=255):
    """Twin of :func:`csfrn.ops.class_avg_pool`: one index_add per image."""
    _checks.check_class_avg_pool(features, labels, num_classes, ignore_index)
    _checks.check_label_values(labels, num_classes, ignore_index)
    n, d = features.shape[:2]
    sums, counts = [], []
    for i in range(n):
        flat = features[i].reshape(d, -1).t()              # [P, D]
        lab = labels[i].reshape(-1)
        keep = lab != ignore_index
        s = features.new_zeros(num_classes, d).index_add(0, lab[keep], flat[keep])
        c = features.new_zeros(num_classes).index_add(0, lab[keep], features.new_ones(int(keep.sum())))
        sums.append(s)
        counts.append(c)
    sums = torch.stack(sums) if n else features.new_zeros(0, num_classes, d)
    counts = torch.stack(counts) if n else features.new_zeros(0, num_classes)
    means = sums / counts.clamp(min=1).unsqueeze(-1)       # absent classes: 0 / 1 = 0
    return means, counts


def center_distance(embeddings, centers, margins, delta=10.0):
    """Twin of :func:`csfrn.ops.center_distance`: builds the whole [N, K, D, H, W] difference tensor."""
    _checks.check_center_distance(embeddings, centers, margins)
    diff = embeddings.unsqueeze(1) - centers[..., None, None]
    dist = diff.pow(2).sum(2)                              # [N, K, H, W]
    scale = torch.exp(delta * margins)[..., None, None]
    return 1 - torch.exp(-dist * scale)
