"""Pure-PyTorch twins of the csfrn kernels: slow, memory-hungry and obviously correct.

Tests compare the kernels with these in float64; ``csfrn.ops.use_reference()`` routes the public functions
here; benchmarks time them beside the kernels.
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _checks

IntPair = Union[int, Tuple[int, int]]  # one value for both sides, or (height, width)


def class_avg_pool(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255, validate: bool = True
) -> Tuple[Tensor, Tensor]:
    """Twin of :func:`csfrn.ops.class_avg_pool`: one index_add per image."""
    _checks.check_class_avg_pool(features, labels, num_classes, ignore_index)
    if validate:
        _checks.check_label_values(labels, num_classes, ignore_index)
    n, d = features.shape[:2]
    sums, counts = [], []
    for i in range(n):
        flat = features[i].reshape(d, labels[i].numel()).t()  # [P, D] (explicit P: D may be 0)
        lab = labels[i].reshape(-1)
        keep = (lab >= 0) & (lab < num_classes) & (lab != ignore_index)  # bad labels (validate=False): ignored
        s = features.new_zeros(num_classes, d).index_add(0, lab[keep], flat[keep])
        c = features.new_zeros(num_classes).index_add(0, lab[keep], features.new_ones(int(keep.sum())))
        sums.append(s)
        counts.append(c)
    sums = torch.stack(sums) if n else features.new_zeros(0, num_classes, d)
    counts = torch.stack(counts) if n else features.new_zeros(0, num_classes)
    means = sums / counts.clamp(min=1).unsqueeze(-1)  # absent classes: 0 / 1 = 0
    return means, counts


def center_distance(embeddings: Tensor, centers: Tensor, margins: Tensor, delta: float = 10.0) -> Tensor:
    """Twin of :func:`csfrn.ops.center_distance`: builds the whole [N, K, D, H, W] difference tensor."""
    _checks.check_center_distance(embeddings, centers, margins)
    diff = embeddings.unsqueeze(1) - centers[..., None, None]
    dist = diff.pow(2).sum(2)  # [N, K, H, W]
    scale = torch.exp(delta * margins)[..., None, None]
    return 1 - torch.exp(-dist * scale)


# ---------------------------------------------------------------- deformable convolution
def _sampling_positions(offset, kh, kw, stride, padding, dilation):
    """Sampling rows and columns [N, G, K, H_out, W_out] of every tap (offset layout: (dy, dx) per tap)."""
    n, _, h_out, w_out = offset.shape
    taps = kh * kw
    off = offset.reshape(n, offset.shape[1] // (2 * taps), taps, 2, h_out, w_out)
    dev, dt = offset.device, offset.dtype
    base_y = (torch.arange(h_out, device=dev, dtype=dt) * stride[0] - padding[0])[:, None]
    base_x = (torch.arange(w_out, device=dev, dtype=dt) * stride[1] - padding[1])[None, :]
    tap_y = (torch.arange(kh, device=dev, dtype=dt) * dilation[0]).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=dev, dtype=dt) * dilation[1]).repeat(kh)
    py = base_y + tap_y[:, None, None] + off[:, :, :, 0]
    px = base_x + tap_x[:, None, None] + off[:, :, :, 1]
    return py, px


def _deform_columns(input, py, px, mask):
    """Bilinear samples (zeros outside) of every channel at every tap: [N, C * K, L], rows ordered (c, k), in the
    input's dtype (positions, weights and products in the offset's)."""
    n, c, h, w = input.shape
    _, g, taps, h_out, w_out = py.shape
    cg = c // g
    if h * w == 0:  # nothing to sample: every tap reads the zero padding
        return input.new_zeros(n, c * taps, h_out * w_out)
    valid = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0, x0 = torch.floor(py), torch.floor(px)
    ly, lx = py - y0, px - x0
    flat = input.reshape(n, g, cg, h * w)
    cols = 0
    for dy, dx, wgt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0.long() + dy, x0.long() + dx
        ok = valid & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(n, g, 1, taps * h_out * w_out)
        idx = idx.expand(n, g, cg, taps * h_out * w_out)
        v = flat.gather(3, idx).reshape(n, g, cg, taps, h_out, w_out)
        cols = cols + v * (wgt * ok)[:, :, None]
    if mask is not None:
        cols = cols * mask.reshape(n, g, 1, taps, h_out, w_out)
    # float32 positions and weights beside a half / bfloat16 input (autocast) give float32 products here; the
    # kernels round their columns to the input's dtype.
    return cols.reshape(n, c * taps, h_out * w_out).to(input.dtype)


def _grouped_matmul(weight, cols, bias, h_out, w_out):
    o, cg = weight.shape[:2]
    n = cols.shape[0]
    groups = cols.shape[1] // (cg * weight.shape[2] * weight.shape[3])
    rows = cols.shape[1] // groups
    out = torch.matmul(weight.reshape(groups, o // groups, rows), cols.reshape(n, groups, rows, h_out * w_out))
    out = out.reshape(n, o, h_out, w_out)
    return out if bias is None else out + bias[:, None, None]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Twin of :func:`csfrn.ops.deform_conv2d`: explicit bilinear gathers per tap, then a matmul."""
    stride, padding, dilation = (
        _checks.pair(k, v) for k, v in (("stride", stride), ("padding", padding), ("dilation", dilation))
    )
    _checks.check_deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation)
    kh, kw = weight.shape[2:]
    py, px = _sampling_positions(offset, kh, kw, stride, padding, dilation)
    cols = _deform_columns(input, py, px, mask)
    return _grouped_matmul(weight, cols, bias, *offset.shape[2:])


def dual_deform_conv2d(
    x: Tensor,
    y: Tensor,
    offset: Tensor,
    weight_x: Tensor,
    weight_y: Tensor,
    bias_x: Optional[Tensor] = None,
    bias_y: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Twin of :func:`csfrn.ops.dual_deform_conv2d`: one set of sampling positions, two gathers, two matmuls."""
    stride, padding, dilation = (
        _checks.pair(k, v) for k, v in (("stride", stride), ("padding", padding), ("dilation", dilation))
    )
    _checks.check_dual_deform_conv2d(x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation)
    kh, kw = weight_x.shape[2:]
    py, px = _sampling_positions(offset, kh, kw, stride, padding, dilation)
    h_out, w_out = offset.shape[2:]
    out_x = _grouped_matmul(weight_x, _deform_columns(x, py, px, mask), bias_x, h_out, w_out)
    out_y = _grouped_matmul(weight_y, _deform_columns(y, py, px, mask), bias_y, h_out, w_out)
    return out_x, out_y
