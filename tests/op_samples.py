"""The inputs of the csfrn ops, one generator per op, and the adapters that run an op on a device.

    OPS[op].sample_inputs(device, dtype, requires_grad) -> SampleInput, ...

yields a handful of small cases of ``op`` (edge cases included), each drawn from its own seeded generator: fresh
random values, the same on every run. Every correctness, gradcheck and opcheck test of the op iterates over it
(tests/test_ops.py); specialised tests build their inputs with the same builders (``class_avg_pool_sample`` ...).

Vocabulary (tests/conftest.py): the *kernel* is our C++/CUDA op, the *twin* its pure-PyTorch reference
(csfrn/ops/reference.py). Devices: "cpu", "cuda", and "emu", the CUDA kernels compiled for the host
(tests/cuda_emu.py: ``torch.ops.csfrn_emu.*`` on CPU tensors, given autograd here as the library gives it to
``torch.ops.csfrn.*``). ``kernel(op, device)`` and ``twin(op)`` take the op's arguments in its schema's order
(csrc/op_schemas.h), as ``SampleInput.args`` holds them, and return a tuple of outputs.
"""

import contextlib
import dataclasses
import itertools

import torch

import csfrn.ops as ops
from csfrn.ops import reference

F64 = torch.float64


# ---------------------------------------------------------------- samples
@dataclasses.dataclass
class SampleInput:
    """One call of ``op``: ``args`` in the schema's order, ``grads`` the upstream gradients of its differentiable
    outputs (drawn with the inputs, in their dtype and on their device), ``name`` what the case exercises."""

    op: str
    args: tuple
    grads: tuple
    name: str

    @property
    def info(self):
        return OPS[self.op]

    def __getitem__(self, name):
        return self.args[self.info.arg_names.index(name)]

    def replace(self, **changes):
        """A copy with the named arguments replaced."""
        args = list(self.args)
        for name, value in changes.items():
            args[self.info.arg_names.index(name)] = value
        return dataclasses.replace(self, args=tuple(args))

    def leaves(self):
        """The differentiable arguments that require grad, by name."""
        return {n: self[n] for n in self.info.differentiable if torch.is_tensor(self[n]) and self[n].requires_grad}

    def output_mask(self):
        """The backward op's output mask for what requires grad; all gradients when nothing does (and always for
        class_avg_pool_backward, which has no mask)."""
        mask = [torch.is_tensor(self[n]) and self[n].requires_grad for n in self.info.differentiable]
        return mask if any(mask) and self.op != "class_avg_pool" else [True] * len(mask)

    def detached(self, device=None, dtype=None, requires_grad=False):
        """The tensors detached (the same storage and strides; copies where moved or cast), floating-point ones
        cast to ``dtype`` where given; they require grad where ``requires_grad`` and they did."""

        def conv(t):
            if not torch.is_tensor(t):
                return t
            out = t.detach().to(device=device or t.device, dtype=dtype if t.is_floating_point() and dtype else t.dtype)
            return out.requires_grad_(requires_grad and t.requires_grad)

        return dataclasses.replace(self, args=tuple(map(conv, self.args)), grads=tuple(map(conv, self.grads)))

    def __repr__(self):
        return f"<{self.op} sample {self.name!r}>"


def lay(t, layout):
    """Same values, other strides: channels_last, H and W strides swapped ("permuted"), or every other element of
    a wider tensor ("sliced"). 3-D tensors (labels) get the permuted / sliced treatment on their last two dims."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    return t.contiguous()


def torch_device(device):
    """The emulated CUDA kernels run on CPU tensors."""
    return "cpu" if device == "emu" else device


class _Draw:
    """Tensors drawn from one seeded generator in float64, rounded to dtype, moved to the device, then laid out."""

    def __init__(self, seed, device, dtype):
        self.g = torch.Generator().manual_seed(seed)
        self.device, self.dtype = torch_device(device), dtype

    def __call__(self, *shape, scale=1.0, shift=0.0, uniform=False, layout="nchw"):
        t = (
            torch.rand(*shape, generator=self.g, dtype=F64)
            if uniform
            else torch.randn(*shape, generator=self.g, dtype=F64)
        )
        return lay((t * scale + shift).to(self.dtype).to(self.device), layout)

    def labels(self, n, h, w, k, ignore_index=255, ignore_frac=0.2, absent=(), ignored_images=(), layout="nchw"):
        labels = random_labels(self.g, n, h, w, k, ignore_index, ignore_frac, absent, ignored_images)
        return lay(labels.to(self.device), layout)


def random_labels(g, n, h, w, k, ignore_index=255, ignore_frac=0.2, absent=(), ignored_images=()):
    """Random classes in [0, k), the first and the last one present (unless absent), the classes in ``absent``
    moved to the next class (or ignored when no other is left), about ``ignore_frac`` of the pixels and every
    pixel of the images in ``ignored_images`` set to ``ignore_index``."""
    labels = torch.randint(0, k, (n, h, w), generator=g)
    labels.view(-1)[::13] = 0
    labels.view(-1)[5::17] = k - 1
    for c in absent:
        labels[labels == c] = (c + 1) % k if k > len(absent) + 1 else ignore_index
    labels = labels.masked_fill(torch.rand(n, h, w, generator=g) < ignore_frac, ignore_index)
    for i in ignored_images:
        labels[i] = ignore_index
    return labels


def _finish(op, args, grads, name, requires_grad, grad_of):
    """Sets requires_grad on the differentiable tensors (those in ``grad_of``, all by default)."""
    sample = SampleInput(op, tuple(args), tuple(grads), name)
    if requires_grad:
        for n in OPS[op].differentiable:
            t = sample[n]
            if torch.is_tensor(t) and (grad_of is None or n in grad_of):
                t.requires_grad_()
    return sample


# Label values outside [0, K) for any K <= 10^6 and ignore_index in {255, -1, 0..K-1}: the extremes of int64 too.
BAD_LABELS = (10**6, -3, 1 << 40, -(1 << 40), 2**63 - 1, -(2**63))


def plant_bad_labels(labels, values=BAD_LABELS, start=3, step=7):
    """labels with pixels start, start + step, ... (of the flattened batch) set to ``values`` in turn."""
    labels = labels.clone()
    flat = labels.view(-1)
    spots = torch.arange(start, max(start, flat.numel()), step)
    flat[spots] = torch.tensor(values, dtype=labels.dtype).repeat(len(spots) // len(values) + 1)[: len(spots)]
    return labels


def class_avg_pool_sample(
    n,
    d,
    h,
    w,
    k,
    *,
    ignore_index=255,
    ignore_frac=0.2,
    absent=(),
    ignored_images=(),
    layout="nchw",
    channel_stride=1,
    bad=False,
    validate=True,
    seed=0,
    device="cpu",
    dtype=F64,
    requires_grad=False,
    name="",
):
    """features [N, D, H, W] (every ``channel_stride``-th channel of a wider tensor where > 1), labels [N, H, W]
    (see random_labels; with ``bad`` every 7th pixel holds a value of BAD_LABELS, for validate=False), and the
    upstream gradient of the means [N, K, D]."""
    r = _Draw(seed, device, dtype)
    features = r(n, d * channel_stride, h, w, layout=layout)[:, ::channel_stride]
    labels = r.labels(n, h, w, k, ignore_index, ignore_frac, absent, ignored_images)
    labels = lay(plant_bad_labels(labels) if bad else labels, layout)
    grad_means = r(n, k, d, layout=layout)
    return _finish(
        "class_avg_pool",
        (features, labels, k, ignore_index, validate),
        (grad_means,),
        name or f"{n}x{d}x{h}x{w}, K={k}",
        requires_grad,
        None,
    )


def center_distance_sample(
    n,
    d,
    h,
    w,
    k,
    *,
    delta=10.0,
    layout="nchw",
    seed=0,
    device="cpu",
    dtype=F64,
    requires_grad=False,
    grad_of=None,
    name="",
):
    """embeddings [N, D, H, W], centres [N, K, D] (scaled by 0.5), margins [N, K] in [-0.3, 0.1) (so that
    exp(delta * margin) stays moderate), and the upstream gradient of phi [N, K, H, W]."""
    r = _Draw(seed, device, dtype)
    embeddings = r(n, d, h, w, layout=layout)
    centers = r(n, k, d, scale=0.5)
    margins = r(n, k, uniform=True, scale=0.4, shift=-0.3)
    grad_phi = r(n, k, h, w, layout=layout)
    return _finish(
        "center_distance",
        (embeddings, centers, margins, float(delta)),
        (grad_phi,),
        name or f"{n}x{d}x{h}x{w}, K={k}",
        requires_grad,
        grad_of,
    )


def _deform_parts(
    r, n, c_in, c_out, groups, offset_groups, k, stride, padding, dilation, size, mask, bias, scale, layout
):
    """input, offset (none for offset_groups None), weight, bias, mask and the upstream gradient of one deformable
    convolution, drawn by r."""
    taps = k[0] * k[1]
    h_out, w_out = ((size[i] + 2 * padding[i] - (dilation[i] * (k[i] - 1) + 1)) // stride[i] + 1 for i in range(2))
    return dict(
        input=r(n, c_in, *size, layout=layout),
        offset=(r(n, 2 * offset_groups * taps, h_out, w_out, scale=scale, layout=layout) if offset_groups else None),
        weight=r(c_out, c_in // groups, *k, layout=layout),
        bias=r(c_out) if bias else None,
        mask=r(n, offset_groups * taps, h_out, w_out, uniform=True, layout=layout) if mask else None,
        grad=r(n, c_out, h_out, w_out, layout=layout),
    )


def deform_conv2d_sample(
    n,
    c_in,
    c_out,
    groups,
    offset_groups,
    k,
    stride,
    padding,
    dilation,
    size,
    *,
    mask=True,
    bias=True,
    scale=2.0,
    layout="nchw",
    seed=0,
    device="cpu",
    dtype=F64,
    requires_grad=False,
    grad_of=None,
    name="",
):
    """input [N, C_in, H, W], offset [N, 2 * offset_groups * kh * kw, H_out, W_out] (N(0, scale^2): samples fall
    between pixels and outside), weight [C_out, C_in / groups, kh, kw], bias [C_out] or None, mask (uniform in
    [0, 1)) or None, and the upstream gradient of the output."""
    x = _deform_parts(
        _Draw(seed, device, dtype),
        n,
        c_in,
        c_out,
        groups,
        offset_groups,
        k,
        stride,
        padding,
        dilation,
        size,
        mask,
        bias,
        scale,
        layout,
    )
    args = (x["input"], x["offset"], x["weight"], x["bias"], x["mask"], list(stride), list(padding), list(dilation))
    return _finish("deform_conv2d", args, (x["grad"],), name or f"{c_in}->{c_out}, k={k}", requires_grad, grad_of)


def dual_deform_conv2d_sample(
    n,
    c_in,
    c_out,
    groups,
    offset_groups,
    k,
    stride,
    padding,
    dilation,
    size,
    *,
    c_y=None,
    c_out_y=None,
    groups_y=None,
    mask=True,
    bias=True,
    scale=2.0,
    layout="nchw",
    seed=0,
    device="cpu",
    dtype=F64,
    requires_grad=False,
    name="",
):
    """As deform_conv2d_sample for x, plus y [N, c_y, H, W] (default c_in channels) with weight_y
    [c_out_y, c_y / groups_y, kh, kw] (default: groups, and ``groups`` more output channels than x)."""
    r = _Draw(seed, device, dtype)
    c_y, groups_y = c_y or c_in, groups_y or groups
    c_out_y = c_out + groups if c_out_y is None else c_out_y
    x = _deform_parts(
        r, n, c_in, c_out, groups, offset_groups, k, stride, padding, dilation, size, mask, bias, scale, layout
    )
    y = _deform_parts(
        r, n, c_y, c_out_y, groups_y, None, k, stride, padding, dilation, size, False, bias, scale, layout
    )  # the offset and mask are x's
    args = (
        x["input"],
        y["input"],
        x["offset"],
        x["weight"],
        y["weight"],
        x["bias"],
        y["bias"],
        x["mask"],
        list(stride),
        list(padding),
        list(dilation),
    )
    return _finish(
        "dual_deform_conv2d",
        args,
        (x["grad"], y["grad"]),
        name or f"{c_in}+{c_y}->{c_out}+{c_out_y}, k={k}",
        requires_grad,
        None,
    )


def toggle_mask(sample, seed=0):
    """A deform sample without its mask, or with one (offset_groups * kh * kw = offset channels / 2, uniform in
    [0, 1), requiring grad where the offset does)."""
    offset = sample["offset"]
    if sample["mask"] is not None:
        return dataclasses.replace(sample.replace(mask=None), name=f"{sample.name}, mask dropped")
    n, _, h_out, w_out = offset.shape
    mask = (
        torch.rand(n, offset.shape[1] // 2, h_out, w_out, generator=torch.Generator().manual_seed(seed), dtype=F64)
        .to(offset.dtype)
        .to(offset.device)
        .requires_grad_(offset.requires_grad)
    )
    return dataclasses.replace(sample.replace(mask=mask), name=f"{sample.name}, with a mask")


def deform_config(n, c_in, c_out, groups, offset_groups, k, stride, padding, dilation, size):
    """A deformable convolution's configuration, as the builders above take it."""
    return dict(
        n=n,
        c_in=c_in,
        c_out=c_out,
        groups=groups,
        offset_groups=offset_groups,
        k=k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        size=size,
    )


def random_deform_config(seed):
    """A random small configuration (groups, offset groups, kernel, stride, padding, dilation and size)."""
    g = torch.Generator().manual_seed(seed)

    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    groups, offset_groups, n_c = r(1, 2), r(1, 2), r(1, 2)
    k = (r(1, 3), r(1, 3))
    n, c_out = r(1, 2), groups * r(1, 2)
    return deform_config(
        n,
        groups * offset_groups * n_c,
        c_out,
        groups,
        offset_groups,
        k,
        (r(1, 2), r(1, 2)),
        (r(0, 2), r(0, 2)),
        (r(1, 2), r(1, 2)),
        (r(4, 7), r(4, 7)),
    )


DEFORM = dict(  # n, c_in, c_out, groups, offset_groups, (kh, kw), stride, padding, dilation, (H, W)
    # every parameter differs along H and W; two channels per group and offset group
    awkward=deform_config(2, 6, 2, 2, 3, (3, 2), (2, 1), (1, 0), (2, 1), (5, 4)),
    # one or two channels per group (the CPU kernel loops across the groups of an offset group), one offset group
    depthwise=deform_config(2, 4, 8, 4, 2, (3, 2), (1, 2), (1, 1), (1, 1), (5, 6)),
    depthwise1=deform_config(1, 5, 5, 5, 1, (2, 3), (1, 1), (0, 1), (2, 1), (6, 5)),
    pairs=deform_config(1, 8, 4, 4, 2, (3, 3), (1, 1), (1, 1), (1, 1), (5, 5)),  # two channels per group
    conv3x3=deform_config(1, 4, 2, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), (5, 6)),
    conv1x1=deform_config(1, 3, 5, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), (4, 9)),
    wide=deform_config(1, 2, 2, 1, 2, (2, 3), (2, 2), (2, 1), (1, 3), (9, 8)),
    rand1=random_deform_config(1),
    rand2=random_deform_config(2),
)


# ---------------------------------------------------------------- the generators
def class_avg_pool_samples(device, dtype, requires_grad):
    cases = [
        dict(n=2, d=5, h=7, w=9, k=1, name="one class"),
        dict(n=2, d=8, h=13, w=11, k=7, absent=(0,), name="class 0 absent"),
        dict(n=1, d=3, h=5, w=6, k=171, name="more classes than pixels"),
        dict(n=2, d=17, h=4, w=5, k=9, name="17 channels"),
        dict(n=2, d=4, h=3, w=5, k=5, ignored_images=(0,), name="image 0 all ignored"),
        dict(n=2, d=4, h=6, w=6, k=3, ignore_index=-1, name="ignore_index -1"),
        dict(n=2, d=4, h=6, w=5, k=4, ignore_index=2, name="ignore_index inside [0, K)"),
        dict(n=2, d=6, h=9, w=10, k=5, layout="channels_last", name="channels_last"),
        dict(n=2, d=3, h=7, w=5, k=4, layout="permuted", name="permuted"),
        dict(n=1, d=3, h=1, w=60, k=4, layout="sliced", name="one row, sliced"),
        dict(n=2, d=4, h=5, w=6, k=3, channel_stride=2, name="every other channel"),
        dict(n=0, d=4, h=3, w=3, k=5, name="no images"),
        dict(n=2, d=5, h=7, w=9, k=6, bad=True, validate=False, name="bad labels ignored (validate=False)"),
        dict(
            n=2,
            d=3,
            h=6,
            w=7,
            k=4,
            ignore_index=-1,
            bad=True,
            validate=False,
            layout="channels_last",
            name="bad labels, ignore_index -1, channels_last (validate=False)",
        ),
    ]
    for i, case in enumerate(cases):
        yield class_avg_pool_sample(**case, seed=100 + i, device=device, dtype=dtype, requires_grad=requires_grad)


def center_distance_samples(device, dtype, requires_grad):
    cases = [
        dict(n=2, d=5, h=7, w=9, k=1, delta=10.0, name="one class"),
        dict(n=2, d=8, h=5, w=6, k=7, delta=1.0, name="delta 1"),
        dict(n=1, d=4, h=6, w=5, k=19, delta=3.5, name="19 classes, delta 3.5"),
        dict(n=2, d=6, h=7, w=8, k=4, layout="channels_last", name="channels_last"),
        dict(n=2, d=3, h=5, w=4, k=3, layout="permuted", name="permuted"),
        dict(n=1, d=5, h=3, w=6, k=2, layout="sliced", name="sliced"),
        dict(n=2, d=4, h=5, w=5, k=3, grad_of=("embeddings",), name="grad of embeddings only"),
        dict(n=2, d=4, h=5, w=5, k=3, grad_of=("centers",), name="grad of centers only"),
        dict(n=2, d=4, h=5, w=5, k=3, grad_of=("margins",), name="grad of margins only"),
        dict(n=2, d=3, h=4, w=5, k=0, name="no classes"),
        dict(n=0, d=3, h=4, w=4, k=2, name="no images"),
    ]
    for i, case in enumerate(cases):
        yield center_distance_sample(**case, seed=200 + i, device=device, dtype=dtype, requires_grad=requires_grad)


def deform_conv2d_samples(device, dtype, requires_grad):
    cases = [
        dict(DEFORM["awkward"], name="awkward"),
        dict(DEFORM["awkward"], mask=False, bias=False, name="awkward, no mask, no bias"),
        *[
            dict(DEFORM[c], mask=m, name=f"{c}{'' if m else ', no mask'}")
            for c in ("rand1", "rand2", "depthwise", "depthwise1", "pairs")
            for m in (True, False)
        ],
        dict(DEFORM["conv3x3"], mask=False, name="3x3, no mask"),
        dict(DEFORM["conv1x1"], bias=False, name="1x1, no bias"),
        dict(DEFORM["wide"], name="wide dilation"),
        dict(DEFORM["awkward"], layout="channels_last", name="channels_last"),
        dict(DEFORM["awkward"], layout="permuted", mask=False, name="permuted, no mask"),
        dict(DEFORM["conv3x3"], layout="sliced", bias=False, name="sliced, no bias"),
        dict(DEFORM["awkward"], grad_of=("offset",), name="grad of offset only"),
        dict(DEFORM["awkward"], n=0, name="no images"),
        dict(DEFORM["awkward"], c_out=0, name="no output channels"),
    ]
    for i, case in enumerate(cases):
        yield deform_conv2d_sample(**case, seed=300 + i, device=device, dtype=dtype, requires_grad=requires_grad)


def dual_deform_conv2d_samples(device, dtype, requires_grad):
    cases = [
        dict(DEFORM["awkward"], name="awkward"),
        dict(DEFORM["awkward"], c_y=9, groups_y=3, c_out_y=6, mask=False, name="y with 3 groups, no mask"),
        dict(DEFORM["depthwise"], mask=False, bias=False, name="depthwise, no mask, no bias"),
        dict(
            n=1,
            c_in=2,
            c_out=2,
            groups=1,
            offset_groups=2,
            k=(2, 2),
            stride=(1, 1),
            padding=(1, 0),
            dilation=(1, 1),
            size=(3, 4),
            name="tiny",
        ),
        dict(DEFORM["wide"], name="wide dilation"),
        dict(DEFORM["awkward"], layout="channels_last", name="channels_last"),
        dict(DEFORM["depthwise"], layout="sliced", name="sliced"),
        dict(DEFORM["conv3x3"], n=0, name="no images"),
    ]
    for i, case in enumerate(cases):
        yield dual_deform_conv2d_sample(**case, seed=400 + i, device=device, dtype=dtype, requires_grad=requires_grad)


# ---------------------------------------------------------------- the ops
def _pool_backward_args(args, outputs, grads, mask):
    features, labels, _, ignore_index = args[:4]
    return grads[0].contiguous(), labels, outputs[1], ignore_index  # as csfrn/ops/class_ops.py calls it


def _distance_backward_args(args, outputs, grads, mask):
    return (grads[0].contiguous(), *args[:4], list(mask))


def _deform_backward_args(args, outputs, grads, mask):
    input, offset, weight, bias, m, stride, padding, dilation = args
    return grads[0], input, offset, weight, m, stride, padding, dilation, list(mask)


def _dual_backward_args(args, outputs, grads, mask):
    x, y, offset, weight_x, weight_y, bias_x, bias_y, m, stride, padding, dilation = args
    return (*grads, x, y, offset, weight_x, weight_y, m, stride, padding, dilation, list(mask))


def _tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """``arg_names``: the schema's arguments; ``differentiable``: those with gradients, in the order the backward
    op returns them; ``grad_outputs``: the outputs with gradients; ``exact_outputs``: outputs compared exactly
    (pixel counts); ``public`` / ``reference``: csfrn.ops' function and its twin, in the schema's order."""

    name: str
    arg_names: tuple
    differentiable: tuple
    sample_inputs: object
    public: object
    reference: object
    backward_args: object
    grad_outputs: tuple = (0,)
    exact_outputs: tuple = ()

    @property
    def backward(self):
        return f"{self.name}_backward"


OPS = {
    info.name: info
    for info in [
        OpInfo(
            "class_avg_pool",
            ("features", "labels", "num_classes", "ignore_index", "validate"),
            ("features",),
            class_avg_pool_samples,
            ops.class_avg_pool,
            reference.class_avg_pool,
            _pool_backward_args,
            exact_outputs=(1,),
        ),
        OpInfo(
            "center_distance",
            ("embeddings", "centers", "margins", "delta"),
            ("embeddings", "centers", "margins"),
            center_distance_samples,
            ops.center_distance,
            reference.center_distance,
            _distance_backward_args,
        ),
        OpInfo(
            "deform_conv2d",
            ("input", "offset", "weight", "bias", "mask", "stride", "padding", "dilation"),
            ("input", "offset", "weight", "bias", "mask"),
            deform_conv2d_samples,
            lambda i, o, w, b, m, s, p, d: ops.deform_conv2d(i, o, w, b, s, p, d, m),
            lambda i, o, w, b, m, s, p, d: reference.deform_conv2d(i, o, w, b, s, p, d, m),
            _deform_backward_args,
        ),
        OpInfo(
            "dual_deform_conv2d",
            ("x", "y", "offset", "weight_x", "weight_y", "bias_x", "bias_y", "mask", "stride", "padding", "dilation"),
            ("x", "y", "offset", "weight_x", "weight_y", "bias_x", "bias_y", "mask"),
            dual_deform_conv2d_samples,
            lambda x, y, o, wx, wy, bx, by, m, s, p, d: ops.dual_deform_conv2d(x, y, o, wx, wy, bx, by, s, p, d, m),
            lambda x, y, o, wx, wy, bx, by, m, s, p, d: reference.dual_deform_conv2d(
                x, y, o, wx, wy, bx, by, s, p, d, m
            ),
            _dual_backward_args,
            grad_outputs=(0, 1),
        ),
    ]
}


# ---------------------------------------------------------------- kernel and twin
def emulation():
    """torch.ops.csfrn_emu, built on first use (tests/cuda_emu.py)."""
    import cuda_emu

    return cuda_emu.load()


class _Emulated(torch.autograd.Function):
    """An emulated forward op with its emulated backward op as the gradient, as csfrn/ops/ wires the real ones."""

    @staticmethod
    def forward(ctx, info, *args):
        outputs = _tuple(getattr(emulation(), info.name)(*args))
        ctx.info, ctx.args, ctx.outputs = info, args, outputs
        if info.name == "class_avg_pool":  # csfrn.ops.class_avg_pool's counts are in the features' dtype
            outputs = (outputs[0], outputs[1].to(args[0].dtype))
        ctx.mark_non_differentiable(*[o for i, o in enumerate(outputs) if i not in info.grad_outputs])
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        info = ctx.info
        index = [info.arg_names.index(n) for n in info.differentiable]
        need = [ctx.needs_input_grad[1 + i] for i in index]
        result = [None] * (1 + len(ctx.args))
        if any(need):
            backward_args = info.backward_args(ctx.args, ctx.outputs, [grads[i] for i in info.grad_outputs], need)
            got = _tuple(getattr(emulation(), info.backward)(*backward_args))
            for i, g, m in zip(index, got, need):
                result[1 + i] = g if m else None
        return tuple(result)


def kernel(op, device):
    """Our op on ``device``: csfrn.ops' function (the C++/CUDA kernels, with their autograd), or on "emu" the
    emulated CUDA kernels with the same autograd. Takes the schema's arguments, returns a tuple."""
    info = OPS[op]
    if device == "emu":
        return lambda *args: _Emulated.apply(info, *args)
    return lambda *args: _tuple(info.public(*args))


def twin(op):
    """The op's reference twin (csfrn/ops/reference.py), with the schema's arguments; returns a tuple."""
    info = OPS[op]
    return lambda *args: _tuple(info.reference(*args))


def routed(backend):
    """A block in which csfrn.ops' functions run ``backend`` ("kernel" or "twin")."""
    return ops.use_reference() if backend == "twin" else contextlib.nullcontext()


def raw_ops(device):
    """The registered ops themselves: torch.ops.csfrn, or torch.ops.csfrn_emu on "emu"."""
    return emulation() if device == "emu" else torch.ops.csfrn


# ---------------------------------------------------------------- checks
# Tolerance of a kernel in dtype against the twin in float64 on the same (rounded) values: relative, and absolute
# times the tensor's largest |value|. The CUDA kernels accumulate in float32 but round their outputs (and deform
# conv its column buffers) to the dtype: float32 2e-6 (17 eps), float16 2e-3 (2 eps), bfloat16 1.6e-2 (2 eps); the
# worst errors seen on the emulation are about a tenth of that. On a GPU, cuBLAS and FMA contraction round
# differently from the host.
TOL = {
    "cpu": {F64: 1e-12, torch.float32: 2e-6},
    "emu": {F64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
    "cuda": {F64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1},
}


def assert_matches(got, want, tol, what=""):
    """got: a kernel's output (in its dtype, anywhere); want: the float64 twin's."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(
        got.detach().cpu().to(want.dtype), want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}"
    )


def expected(sample, by="twin"):
    """The outputs of the twin (or ``by="kernel"``: of the CPU kernel) on the sample's values in float64 on the CPU,
    and its gradients (for the sample's upstream gradients, in float64) of every differentiable argument, by name:
    a missing bias gets the gradient of a zero bias, a missing mask none (its gradient comes back empty)."""
    info = sample.info
    wide = sample.detached(device="cpu", dtype=F64)
    args, leaves = list(wide.args), {}
    for name in info.differentiable:
        i = info.arg_names.index(name)
        if args[i] is None and name.startswith("bias"):
            weight = args[info.arg_names.index(name.replace("bias", "weight"))]
            args[i] = weight.new_zeros(weight.shape[0])
        if args[i] is not None:
            leaves[name] = args[i].requires_grad_()
    outputs = (twin(sample.op) if by == "twin" else kernel(sample.op, "cpu"))(*args)
    diff = [(outputs[i], g) for i, g in zip(info.grad_outputs, wide.grads) if outputs[i].requires_grad]
    grads = [None] * len(leaves)  # an empty twin output may hang on no argument
    if diff:
        outs, ups = zip(*diff)
        grads = torch.autograd.grad(outs, list(leaves.values()), ups, allow_unused=True)
    grads = {n: (torch.zeros_like(t) if g is None else g) for (n, t), g in zip(leaves.items(), grads)}
    return [o.detach() for o in outputs], grads


def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_outputs(info, got, want, dtype, tol, what="", raw=False):
    """Outputs in dtype; the pixel counts exact, in the accumulation type from the op itself (``raw``: the
    backward divides by them), in dtype from csfrn.ops."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if i in info.exact_outputs:
            assert a.dtype == (_acc_dtype(dtype) if raw else dtype), f"{what}output {i} in {a.dtype}"
            assert torch.equal(a.cpu().to(b.dtype), b), f"{what}output {i} not exact"
        else:
            assert a.dtype == dtype, f"{what}output {i} in {a.dtype}"
            assert_matches(a, b, tol, f"{what}output {i}")


def check_autograd(sample, device, tol=None, by="twin"):
    """kernel(op, device) against the twin (see expected): outputs, and through autograd the gradients of the
    arguments that require grad."""
    info = sample.info
    dtype = sample.args[0].dtype
    tol = tol or TOL[device][dtype]
    want, want_grads = expected(sample, by)
    got = kernel(sample.op, device)(*sample.args)
    assert all(o.device == sample.args[0].device for o in got), f"{sample}: outputs on another device"
    check_outputs(info, got, want, dtype, tol, f"{sample}: ")
    leaves = sample.leaves()
    if leaves:
        grads = torch.autograd.grad([got[i] for i in info.grad_outputs], list(leaves.values()), list(sample.grads))
        for (name, t), g in zip(leaves.items(), grads):
            assert g.dtype == t.dtype and g.device == t.device, f"{sample}: grad of {name}"
            assert_matches(g, want_grads[name], tol, f"{sample}: grad of {name}")


def output_masks(sample):
    """Every output mask of the sample's backward op (class_avg_pool_backward has none)."""
    if sample.op == "class_avg_pool":
        return [[True]]
    return [list(m) for m in itertools.product([False, True], repeat=len(sample.info.differentiable))]


def check_ops(sample, device, masks=None, tol=None, by="twin"):
    """The registered forward op, and its backward op with each output mask in ``masks`` (default: the sample's,
    see SampleInput.output_mask), on ``device`` against the twin on the same values in float64. Gradients not asked
    for come back empty, and so does a missing mask's."""
    info = sample.info
    dtype = sample.args[0].dtype
    tol = tol or TOL[device][dtype]
    want, want_grads = expected(sample, by)
    plain = sample.detached()
    raw = raw_ops(device)
    got = _tuple(getattr(raw, info.name)(*plain.args))
    check_outputs(info, got, want, dtype, tol, f"{sample}: ", raw=True)
    for mask in masks or [sample.output_mask()]:
        grads = _tuple(getattr(raw, info.backward)(*info.backward_args(plain.args, got, plain.grads, mask)))
        assert len(grads) == len(info.differentiable)
        for name, g, m in zip(info.differentiable, grads, mask):
            if m and name in want_grads:
                assert g.dtype == dtype, f"{sample}: grad of {name} in {g.dtype}"
                assert_matches(g, want_grads[name], tol, f"{sample}: grad of {name}, mask {mask}")
            else:
                assert g.numel() == 0, f"{sample}: grad of {name} not asked for, mask {mask}"
