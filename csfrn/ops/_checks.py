"""Argument checks shared by the reference twins and the fake kernels. The C++ kernels make the same checks
with the same words (csrc/common/checks.h, class_ops_checks.h, deform_conv_checks.h), so an error reads alike
whichever path raised it."""

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
        raise ValueError(
            f"labels must have shape [N, H, W] = {expected} to match features {_shape(features)}, got {_shape(labels)}"
        )
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
        raise ValueError(
            f"centers must have shape [N, K, D] with N = {n} and D = {d} from embeddings "
            f"{_shape(embeddings)}, got {_shape(centers)}"
        )
    if list(margins.shape) != [n, centers.shape[1]]:
        raise ValueError(
            f"margins must have shape [N, K] = {[n, centers.shape[1]]} to match centers "
            f"{_shape(centers)}, got {_shape(margins)}"
        )
    check_same_device(embeddings=embeddings, centers=centers, margins=margins)
    check_same_dtype(embeddings=embeddings, centers=centers, margins=margins)


def check_label_values(labels, num_classes, ignore_index):
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must be in [0, num_classes={num_classes}) or equal ignore_index={ignore_index}, "
            f"got label value {value}"
        )


# ---------------------------------------------------------------- deformable convolution
def pair(name, value, minimum=None, error=ValueError, expected="an int or a pair of ints"):
    """An int or a pair of ints -> a list of two ints (stride / padding / dilation here; sizes and strides in
    (height, width) elsewhere in csfrn). Anything else, or a value below ``minimum``, raises ``error`` (a
    ``csfrn.errors.UserError`` for what a user typed) naming ``name`` and saying what was ``expected``."""
    if isinstance(value, int) and not isinstance(value, bool):
        vals = [value, value]
    else:
        try:
            vals = [int(v) for v in value]
        except (TypeError, ValueError):
            vals = None
    if vals is None or len(vals) != 2 or (minimum is not None and min(vals) < minimum):
        least = "" if minimum is None else f" >= {minimum}"
        raise error(f"{name} must be {expected}{least}, got {value!r}")
    return vals


def check_deform_branch(input_name, input, weight_name, weight, bias_name, bias):
    """One (input, weight, bias) triple of a deformable convolution. Returns (groups, kh, kw)."""
    check_rank(input_name, input, 4, "[N, C_in, H, W]")
    check_floating(input_name, input)
    check_rank(weight_name, weight, 4, "[C_out, C_in / groups, kh, kw]")
    c_in, wc = input.shape[1], weight.shape[1]
    if c_in < 1:
        raise ValueError(f"{input_name} must have at least one channel, got shape {_shape(input)}")
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(
            f"{weight_name} must have a kernel size [kh, kw] of at least [1, 1], got shape {_shape(weight)}"
        )
    if wc < 1 or c_in % wc != 0:
        raise ValueError(
            f"{weight_name}.shape[1] (C_in / groups) must divide the {c_in} channels of {input_name}, "
            f"got {weight_name} shape {_shape(weight)}"
        )
    groups = c_in // wc
    if weight.shape[0] % groups != 0:
        raise ValueError(
            f"{weight_name}.shape[0] (C_out) must be divisible by groups = {groups}, "
            f"got {weight_name} shape {_shape(weight)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"{bias_name} must be a 1-D tensor of size {weight.shape[0]} ({weight_name}.shape[0]), "
            f"got shape {_shape(bias)}"
        )
    return groups, weight.shape[2], weight.shape[3]


def check_deform_offset(input, offset, mask, kh, kw, stride, padding, dilation, input_name="input"):
    """The offset / mask of a deformable convolution against its input. Returns (offset_groups, h_out, w_out)."""
    for name, v, least in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if min(v) < least:
            raise ValueError(f"{name} must be >= {least}, got {list(v)}")
    n, c_in, h, w = input.shape
    h_out = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    w_out = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"the output size must be positive, got [{h_out}, {w_out}] from {input_name} size [{h}, {w}], "
            f"kernel [{kh}, {kw}], stride {list(stride)}, padding {list(padding)}, "
            f"dilation {list(dilation)}"
        )
    check_rank("offset", offset, 4, "[N, 2 * offset_groups * kh * kw, H_out, W_out]")
    taps = kh * kw
    oc = offset.shape[1]
    if oc < 1 or oc % (2 * taps) != 0:
        raise ValueError(
            f"offset must have 2 * offset_groups * kh * kw channels, a positive multiple of "
            f"2 * {kh} * {kw} = {2 * taps}, got {oc}"
        )
    offset_groups = oc // (2 * taps)
    if c_in % offset_groups != 0:
        raise ValueError(
            f"offset_groups = offset.shape[1] / (2 * kh * kw) = {offset_groups} must divide the "
            f"{c_in} channels of {input_name}"
        )
    if offset.shape[0] != n:
        raise ValueError(f"offset must have batch size {n} like {input_name}, got shape {_shape(offset)}")
    if list(offset.shape[2:]) != [h_out, w_out]:
        raise ValueError(
            f"offset must have spatial size [H_out, W_out] = {[h_out, w_out]} (the output size), "
            f"got {list(offset.shape[2:])}"
        )
    if mask is not None:
        check_rank("mask", mask, 4, "[N, offset_groups * kh * kw, H_out, W_out]")
        if mask.shape[1] != offset_groups * taps:
            raise ValueError(
                f"mask must have offset_groups * kh * kw = {offset_groups * taps} channels, got {mask.shape[1]}"
            )
        if mask.shape[0] != n:
            raise ValueError(f"mask must have batch size {n} like {input_name}, got shape {_shape(mask)}")
        if list(mask.shape[2:]) != [h_out, w_out]:
            raise ValueError(
                f"mask must have spatial size [H_out, W_out] = {[h_out, w_out]} (the output size), "
                f"got {list(mask.shape[2:])}"
            )
    return offset_groups, h_out, w_out


def check_deform_coords(input_name, input, offset, mask):
    """The offset and mask: on the input's device, in its dtype or in float32 beside a float16 / bfloat16 input
    (CUDA autocast keeps sampling positions float32); the mask in the offset's dtype."""
    check_same_device(**{input_name: input, "offset": offset}, **_present(mask=mask))
    if not (input.dtype in (torch.float16, torch.bfloat16) and offset.dtype == torch.float32):
        check_same_dtype(**{input_name: input, "offset": offset})
    if mask is not None:
        check_same_dtype(offset=offset, mask=mask)


def deform_channels_last(input):
    """Whether a deform conv's output and the input's gradient are channels_last: when the input is channels_last
    and not also contiguous (the kernels' rule, csrc/common/deform_conv_checks.h)."""
    return not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)


def deform_memory_format(input):
    return torch.channels_last if deform_channels_last(input) else torch.contiguous_format


def _present(**tensors):
    return {name: t for name, t in tensors.items() if t is not None}


def check_deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation):
    """Returns the output shape [N, C_out, H_out, W_out]."""
    _, kh, kw = check_deform_branch("input", input, "weight", weight, "bias", bias)
    _, h_out, w_out = check_deform_offset(input, offset, mask, kh, kw, stride, padding, dilation)
    check_deform_coords("input", input, offset, mask)
    present = _present(input=input, weight=weight, bias=bias)
    check_same_device(**present)
    check_same_dtype(**present)
    return [input.shape[0], weight.shape[0], h_out, w_out]


def check_dual_deform_conv2d(x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation):
    """Returns the two output shapes."""
    _, kh, kw = check_deform_branch("x", x, "weight_x", weight_x, "bias_x", bias_x)
    _, kh_y, kw_y = check_deform_branch("y", y, "weight_y", weight_y, "bias_y", bias_y)
    if [kh_y, kw_y] != [kh, kw]:
        raise ValueError(f"weight_y must have the kernel size of weight_x [kh, kw] = {[kh, kw]}, got {[kh_y, kw_y]}")
    if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"y must have the batch and spatial size of x [N, H, W] = "
            f"{[x.shape[0], x.shape[2], x.shape[3]]}, got shape {_shape(y)}"
        )
    offset_groups, h_out, w_out = check_deform_offset(x, offset, mask, kh, kw, stride, padding, dilation, "x")
    if y.shape[1] % offset_groups != 0:
        raise ValueError(
            f"offset_groups = offset.shape[1] / (2 * kh * kw) = {offset_groups} must divide the "
            f"{y.shape[1]} channels of y"
        )
    check_deform_coords("x", x, offset, mask)
    present = _present(x=x, y=y, weight_x=weight_x, weight_y=weight_y, bias_x=bias_x, bias_y=bias_y)
    check_same_device(**present)
    check_same_dtype(**present)
    n = x.shape[0]
    return [n, weight_x.shape[0], h_out, w_out], [n, weight_y.shape[0], h_out, w_out]
