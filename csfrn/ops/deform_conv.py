"""Deformable convolution (DCN v1, and v2 with a modulation mask), and the dual form used by AAM.

Each public function runs the fused C++/CUDA op ``torch.ops.csfrn.*``; its fake kernel (shapes for
torch.compile) and its autograd formula, whose backward is an op too, are registered here.
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _autograd, _checks, reference
from ._switch import reference_enabled

IntPair = Union[int, Tuple[int, int]]  # one value for both sides, or (height, width)


# The arguments that carry sampling positions: float32 under CUDA autocast.
COORDS = ("offset", "mask")


def autocast_dtype(device_type, name, amp_dtype):
    """The dtype csrc/autocast/deform_conv_autocast.cpp casts argument ``name`` to under autocast to ``amp_dtype``
    on ``device_type``: CUDA runs the input, weights and biases in the autocast dtype and keeps the offset and mask
    float32 (bf16 would quantise a sampling position at 97 px to about 1/64 px); the CPU kernels run float32."""
    if device_type == "cuda" and name not in COORDS:
        return amp_dtype
    return torch.float32


def _twin_under_autocast(twin, device_type, tensors, **rest):
    """Runs a reference twin as csrc/autocast/deform_conv_autocast.cpp runs the kernel: under autocast on
    ``device_type``, every floating-point tensor on that device but float64 is cast to the dtype
    :func:`autocast_dtype` gives it, and the twin runs with autocast off (the kernel's matmuls are not autocast
    either)."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return twin(**tensors, **rest)
    amp = torch.get_autocast_dtype(device_type)

    def cast(name, t):
        eligible = t is not None and t.is_floating_point() and t.dtype != torch.float64
        return t.to(autocast_dtype(device_type, name, amp)) if eligible and t.device.type == device_type else t

    with torch.autocast(device_type, enabled=False):
        return twin(**{k: cast(k, t) for k, t in tensors.items()}, **rest)


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
    """Deformable 2-D convolution with the semantics of ``torchvision.ops.deform_conv2d``.

    Args:
        input: [N, C_in, H, W] float tensor (any memory format).
        offset: [N, 2 * offset_groups * kh * kw, H_out, W_out]; channel ``2 * (g * kh * kw + k)`` is the row
            shift (dy) and the next one the column shift (dx) of tap ``k = i * kw + j`` for channel group ``g``.
            Samples are bilinear, zero outside the input.
        weight: [C_out, C_in / groups, kh, kw]; groups = C_in / weight.shape[1].
        bias: optional [C_out].
        stride, padding, dilation: int or (int, int).
        mask: optional [N, offset_groups * kh * kw, H_out, W_out] modulation (DCN v2) multiplying each sample.

    Returns:
        [N, C_out, H_out, W_out]. Differentiable with respect to input, offset, weight, bias and mask; only
        the gradients asked for are computed.
    """
    stride, padding, dilation = (
        _checks.pair(k, v) for k, v in (("stride", stride), ("padding", padding), ("dilation", dilation))
    )
    if reference_enabled():
        return _twin_under_autocast(
            reference.deform_conv2d,
            input.device.type,
            dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask),
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
    return torch.ops.csfrn.deform_conv2d.default(input, offset, weight, bias, mask, stride, padding, dilation)


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
    """Two deformable convolutions that share one offset field (and mask), as in AAM.

    Equal to ``(deform_conv2d(x, offset, weight_x, bias_x, ...), deform_conv2d(y, offset, weight_y, bias_y, ...))``,
    but the sampling positions and bilinear weights are computed once for both, and the offset (and mask)
    gradients of both convolutions are accumulated in one pass.

    Args:
        x: [N, C_x, H, W]; y: [N, C_y, H, W] (same N, H, W).
        offset, mask, stride, padding, dilation: as in :func:`deform_conv2d`; offset_groups must divide C_x and C_y.
        weight_x: [C_out_x, C_x / groups_x, kh, kw]; weight_y: [C_out_y, C_y / groups_y, kh, kw] (same kh, kw).
        bias_x, bias_y: optional [C_out_x], [C_out_y].

    Returns:
        (out_x [N, C_out_x, H_out, W_out], out_y [N, C_out_y, H_out, W_out]).
    """
    stride, padding, dilation = (
        _checks.pair(k, v) for k, v in (("stride", stride), ("padding", padding), ("dilation", dilation))
    )
    if reference_enabled():
        return _twin_under_autocast(
            reference.dual_deform_conv2d,
            x.device.type,
            dict(
                x=x, y=y, offset=offset, weight_x=weight_x, weight_y=weight_y, bias_x=bias_x, bias_y=bias_y, mask=mask
            ),
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
    return torch.ops.csfrn.dual_deform_conv2d.default(
        x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation
    )


# ---------------------------------------------------------------- fake kernels (shapes only)
def _weight_grad(weight, needed):
    """A weight's gradient as the kernels give it: contiguous whatever the weight's layout; empty when not needed."""
    return torch.empty_like(weight, memory_format=torch.contiguous_format) if needed else weight.new_empty(0)


def _output_like(input, shape):
    """An output in the input's memory format (the kernels' rule: _checks.deform_channels_last)."""
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=_checks.deform_memory_format(input))


def _grad_like(t, needed):
    """The gradient of an input, the offset or the mask as the kernels write it: in that tensor's memory format, by
    the output's rule (_checks.deform_memory_format: channels_last in, channels_last out); empty when not needed."""
    return torch.empty_like(t, memory_format=_checks.deform_memory_format(t)) if needed else t.new_empty(0)


@torch.library.register_fake("csfrn::deform_conv2d")
def _deform_conv2d_fake(input, offset, weight, bias, mask, stride, padding, dilation):
    shape = _checks.check_deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation)
    return _output_like(input, shape)


@torch.library.register_fake("csfrn::deform_conv2d_backward")
def _deform_conv2d_backward_fake(grad_out, input, offset, weight, mask, stride, padding, dilation, output_mask):
    grads = [_grad_like(input, output_mask[0]), _grad_like(offset, output_mask[1])]
    grads.append(_weight_grad(weight, output_mask[2]))
    grads.append(weight.new_empty(weight.shape[0] if output_mask[3] else 0))
    grads.append(_grad_like(mask, output_mask[4]) if mask is not None else offset.new_empty(0))
    return tuple(grads)


@torch.library.register_fake("csfrn::dual_deform_conv2d")
def _dual_deform_conv2d_fake(x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation):
    shape_x, shape_y = _checks.check_dual_deform_conv2d(
        x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation
    )
    return _output_like(x, shape_x), _output_like(y, shape_y)


@torch.library.register_fake("csfrn::dual_deform_conv2d_backward")
def _dual_deform_conv2d_backward_fake(
    grad_out_x, grad_out_y, x, y, offset, weight_x, weight_y, mask, stride, padding, dilation, output_mask
):
    grads = [_grad_like(x, output_mask[0]), _grad_like(y, output_mask[1]), _grad_like(offset, output_mask[2])]
    grads += [_weight_grad(t, m) for t, m in zip((weight_x, weight_y), output_mask[3:5])]
    grads.append(weight_x.new_empty(weight_x.shape[0] if output_mask[5] else 0))
    grads.append(weight_y.new_empty(weight_y.shape[0] if output_mask[6] else 0))
    grads.append(_grad_like(mask, output_mask[7]) if mask is not None else offset.new_empty(0))
    return tuple(grads)


# ---------------------------------------------------------------- autograd
def _deform_conv2d_setup(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.conv = (stride, padding, dilation)


def _deform_conv2d_backward(ctx, grad_out):
    input, offset, weight, mask = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:5])
    if not any(need):
        return (None,) * 8
    grads = torch.ops.csfrn.deform_conv2d_backward.default(grad_out, input, offset, weight, mask, *ctx.conv, need)
    return tuple(g if m else None for g, m in zip(grads, need)) + (None,) * 3


torch.library.register_autograd("csfrn::deform_conv2d", _deform_conv2d_backward, setup_context=_deform_conv2d_setup)


def _dual_deform_conv2d_setup(ctx, inputs, output):
    x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation = inputs
    ctx.save_for_backward(x, y, offset, weight_x, weight_y, mask)
    ctx.conv = (stride, padding, dilation)


def _dual_deform_conv2d_backward(ctx, grad_out_x, grad_out_y):
    x, y, offset, weight_x, weight_y, mask = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:8])
    if not any(need):
        return (None,) * 11
    grads = torch.ops.csfrn.dual_deform_conv2d_backward.default(
        grad_out_x, grad_out_y, x, y, offset, weight_x, weight_y, mask, *ctx.conv, need
    )
    return tuple(g if m else None for g, m in zip(grads, need)) + (None,) * 3


torch.library.register_autograd(
    "csfrn::dual_deform_conv2d", _dual_deform_conv2d_backward, setup_context=_dual_deform_conv2d_setup
)


_autograd.forbid_double_backward("deform_conv2d_backward", "dual_deform_conv2d_backward")
