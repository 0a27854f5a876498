"""Argument checks shared by the reference twins and the fake kernels. The C++ kernels make the same checks
with the same words (csrc/common/checks.h), so an error reads alike whichever path raised it."""
import torch


def _shape(t):
    return list(t.shape)


def check_floating(name, t):
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_rank(name, t, rank, layout):
    if t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got shape {_shape(t)}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_same_dtype(**tensors):
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name} {dt}" for name, dt in dtypes.items())
        raise ValueError(f"all floating-point tensors must share one dtype, got {listing}")


def check_class_avg_pool(features, labels, num_classes, ignore_index):
    check_rank("features", features, 4, "[N, D, H, W]")
    check_floating("features", features)
    check_rank("labels", labels, 3, "[N, H, W]")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor, got dtype {labels.dtype}")
    expected = [features.shape[0], features.shape[2], features.shape[3]]
    if list(labels.shape) != expected:
        raise ValueError(f"labels must have shape [N, H, W] = {expected} to match features {_shape(features)}, "
                         f"got {_shape(labels)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    check_same_device(features=features, labels=labels)


def check_center_distance(embeddings, centers, margins):
    check_rank("embeddings", embeddings, 4, "[N, D, H, W]")
    check_rank("centers", centers, 3, "[N, K, D]")
    check_rank("margins", margins, 2, "[N, K]")
    for name, t in (("embeddings", embeddings), ("centers", centers), ("margins", margins)):
        check_floating(name, t)
    n, d = embeddings.shape[0], embeddings.shape[1]
    if centers.shape[0] != n or centers.shape[2] != d:
        raise ValueError(f"centers must have shape [N, K, D] with N = {n} and D = {d} from embeddings "
                         f"{_shape(embeddings)}, got {_shape(centers)}")
    if list(margins.shape) != [n, centers.shape[1]]:
        raise ValueError(f"margins must have shape [N, K] = {[n, centers.shape[1]]} to match centers "
                         f"{_shape(centers)}, got {_shape(margins)}")
    check_same_device(embeddings=embeddings, centers=centers, margins=margins)
    check_same_dtype(embeddings=embeddings, centers=centers, margins=margins)


def check_label_values(labels, num_classes, ignore_index):
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"labels must be in [0, num_classes={num_classes}) or equal ignore_index={ignore_index}, "
                         f"got label value {value}")
