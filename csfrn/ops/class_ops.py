"""Class-wise kernels of CSFLM: class average pooling (centres and margins) and Gaussian centre distances.

Each public function runs the fused C++/CUDA op ``torch.ops.csfrn.*``; its fake kernel (shapes for
torch.compile) and its autograd formula, whose backward is an op too, are registered here.
"""

from typing import Tuple

import torch
from torch import Tensor

from . import _autograd, _checks, reference
from ._switch import reference_enabled


def class_avg_pool(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255, validate: bool = True
) -> Tuple[Tensor, Tensor]:
    """Per-image mean feature vector of every class.

    Args:
        features: [N, D, H, W] float tensor (any memory format).
        labels: [N, H, W] int64 tensor, values in [0, num_classes) or ``ignore_index``.
        num_classes: K.
        ignore_index: label value that takes part in nothing.
        validate: True: a label outside [0, num_classes) that is not ``ignore_index`` raises a one-line
            ValueError naming its value; on CUDA that check is one device-to-host sync. False: no check and no
            sync; such pixels are ignored exactly like ``ignore_index`` (in no class's mean or count, zero
            gradient), and no label value, however large or negative, makes the kernels read or write out of
            bounds. For labels already checked (``check_labels`` on the CPU batch) or in range by
            construction (the losses' renumbered labels).

    Returns:
        (means, counts): means [N, K, D], ``means[n, k] = sum_{p: labels[n, p] = k} features[n, :, p] / counts[n, k]``
        (zeros where class k is absent from image n); counts [N, K], the pixel count of each class, in the
        dtype of ``features``. Differentiable with respect to ``features``.
    """
    if reference_enabled():
        return reference.class_avg_pool(features, labels, num_classes, ignore_index, validate)
    # The op's counts are in the accumulation type (exact: the backward divides by them); ours in the features'.
    means, counts = torch.ops.csfrn.class_avg_pool.default(features, labels, num_classes, ignore_index, bool(validate))
    return means, counts.to(features.dtype)


def check_labels(labels: Tensor, num_classes: int, ignore_index: int = 255) -> None:
    """The label check of ``class_avg_pool(validate=True)``, alone: a one-line ValueError naming the first value
    of ``labels`` outside [0, num_classes) that is not ``ignore_index``.

    Meant for a CPU label batch before it goes to the device (the training engine calls it there): on a CUDA
    tensor it works too, but the host then waits for the GPU (one device-to-host sync).
    """
    _checks.check_label_values(labels, num_classes, ignore_index)


def center_distance(embeddings: Tensor, centers: Tensor, margins: Tensor, delta: float = 10.0) -> Tensor:
    """Gaussian distance of every pixel embedding to every class centre, with class-aware margins.

    ``phi[n, k, i, j] = 1 - exp(-||embeddings[n, :, i, j] - centers[n, k]||^2 * exp(delta * margins[n, k]))``

    Args:
        embeddings: [N, D, H, W] float tensor (C-S features).
        centers: [N, K, D] class centres, same dtype.
        margins: [N, K] class margins, same dtype.
        delta: margin temperature (the paper uses 10).

    Returns:
        phi [N, K, H, W] in [0, 1). Differentiable with respect to all three tensors; no [N, K, D, H, W]
        tensor is ever made.
    """
    if reference_enabled():
        return reference.center_distance(embeddings, centers, margins, delta)
    return torch.ops.csfrn.center_distance.default(embeddings, centers, margins, float(delta))


# ---------------------------------------------------------------- fake kernels (shapes only)
def _acc_dtype(dtype):
    """The kernels' accumulation type (at::toOpMathType)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("csfrn::class_avg_pool")
def _class_avg_pool_fake(features, labels, num_classes, ignore_index, validate=True):
    _checks.check_class_avg_pool(features, labels, num_classes, ignore_index)
    n, d = features.shape[0], features.shape[1]
    return features.new_empty(n, num_classes, d), features.new_empty(n, num_classes, dtype=_acc_dtype(features.dtype))


@torch.library.register_fake("csfrn::class_avg_pool_backward")
def _class_avg_pool_backward_fake(grad_means, labels, counts, ignore_index):
    n, _, d = grad_means.shape
    return grad_means.new_empty(n, d, labels.shape[1], labels.shape[2])


@torch.library.register_fake("csfrn::center_distance")
def _center_distance_fake(embeddings, centers, margins, delta):
    _checks.check_center_distance(embeddings, centers, margins)
    n, _, h, w = embeddings.shape
    return embeddings.new_empty(n, centers.shape[1], h, w)


@torch.library.register_fake("csfrn::center_distance_backward")
def _center_distance_backward_fake(grad_phi, embeddings, centers, margins, delta, output_mask):
    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty(0)

    return tuple(like(t, m) for t, m in zip((embeddings, centers, margins), output_mask))


# ---------------------------------------------------------------- autograd
def _memory_format(t):
    """channels_last for an NHWC tensor, else contiguous_format."""
    nhwc = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


# The kernels write the features' gradient NCHW whatever the features' layout; the backward hands it on in
# the features' memory format, so that a channels_last model gets channels_last gradients (the copy is a
# no-op once a kernel writes in its input's format).
def _class_avg_pool_setup(ctx, inputs, output):
    features, labels, _, ignore_index, _ = inputs
    ctx.save_for_backward(labels, output[1])
    ctx.ignore_index = ignore_index
    ctx.memory_format = _memory_format(features)


def _class_avg_pool_backward(ctx, grad_means, grad_counts):
    labels, counts = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0]:
        grad_features = torch.ops.csfrn.class_avg_pool_backward.default(
            grad_means.contiguous(), labels, counts, ctx.ignore_index
        ).contiguous(memory_format=ctx.memory_format)
    return grad_features, None, None, None, None


torch.library.register_autograd("csfrn::class_avg_pool", _class_avg_pool_backward, setup_context=_class_avg_pool_setup)


def _center_distance_setup(ctx, inputs, output):
    embeddings, centers, margins, delta = inputs
    ctx.save_for_backward(embeddings, centers, margins)
    ctx.delta = delta
    ctx.memory_format = _memory_format(embeddings)


def _center_distance_backward(ctx, grad_phi):
    embeddings, centers, margins = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if not any(mask):
        return None, None, None, None
    grads = torch.ops.csfrn.center_distance_backward.default(
        grad_phi.contiguous(), embeddings, centers, margins, ctx.delta, mask
    )
    if mask[0]:
        grads = (grads[0].contiguous(memory_format=ctx.memory_format),) + tuple(grads[1:])
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None,)


torch.library.register_autograd(
    "csfrn::center_distance", _center_distance_backward, setup_context=_center_distance_setup
)

_autograd.forbid_double_backward("class_avg_pool_backward", "center_distance_backward")
