"""Parameter and FLOP counts the way the paper reports them (Table 2 / Table 3); ``csfrn flops`` (a config's
model counted, :mod:`csfrn.commands.flops`) prints them.

"gflops" follows mmcv's ``get_model_complexity_info`` as the paper used it (with SyncBN, which that counter
does not know): per conv, multiply-accumulates plus one add per output element when it has a bias; one per
ReLU output element; one per pooling input element. BatchNorm, interpolation, softmax and the non-local
block's matmuls are not counted, and the auxiliary head is left out (it does not run in eval mode). AAM's
two deformable 3x3 convs count as ordinary convs of the same shape (their offset conv is an ordinary conv).
"gflops_all" is ``torch.utils.flop_counter.FlopCounterMode``'s total / 2 (a multiply-add as one); it counts
``csfrn.ops.dual_deform_conv2d`` as its two convolutions of the same shape (the bilinear sampling not counted).

Counting needs only shapes, so models built on the meta device (``with torch.device("meta"):``) count in
no time and with no memory.
"""

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import ops  # noqa: F401  (registers torch.ops.csfrn.*)
from ..nn import AAM


def _conv_flops(module, inputs, output):
    k = module.weight[0].numel()  # in_channels / groups * kh * kw
    return output.numel() * (k + (module.bias is not None))


def _aam_flops(module, inputs, output):
    # the dual deformable conv: 3x3, stride 1, padding 1, so one output per input pixel of X and of Y
    n, _, h, w = inputs[0].shape
    return (
        n
        * h
        * w
        * (
            module.weight_x.shape[0] * module.weight_x[0].numel()
            + module.weight_y.shape[0] * module.weight_y[0].numel()
        )
    )


def _dual_deform_flop(x_shape, y_shape, offset_shape, wx_shape, wy_shape, *args, out_shape=None, **kwargs):
    # FlopCounterMode counts a multiply-add as 2
    return sum(2 * math.prod(out) * math.prod(w[1:]) for out, w in zip(out_shape, (wx_shape, wy_shape)))


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _count(module, inputs, output):
    if isinstance(module, nn.Conv2d):
        return _conv_flops(module, inputs, output)
    if isinstance(module, nn.ReLU):
        return output.numel()
    if isinstance(module, _POOLS):
        return inputs[0].numel()
    if isinstance(module, AAM):
        return _aam_flops(module, inputs, output)
    return 0


def complexity(model, size=(512, 512)):
    """{"params": every parameter (aux head included, as the paper counts), "gflops": the paper's count for
    one image of ``size`` (see the module docstring), "gflops_all": FlopCounterMode's total / 2}.

    Runs one eval-mode forward pass under ``torch.no_grad`` on the model's device (meta works) and
    restores the model's mode.
    """
    if isinstance(size, int):
        size = (size, size)
    p = next(model.parameters())
    images = torch.zeros(1, 3, *size, dtype=p.dtype, device=p.device)
    was_training = model.training
    model.eval()
    total = [0]

    def hook(module, inputs, output):
        total[0] += _count(module, inputs, output)

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ReLU, AAM) + _POOLS)
    ]
    try:
        counter = FlopCounterMode(display=False, custom_mapping={torch.ops.csfrn.dual_deform_conv2d: _dual_deform_flop})
        with torch.no_grad(), counter:
            model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        "params": sum(q.numel() for q in model.parameters()),
        "gflops": total[0] / 1e9,
        "gflops_all": counter.get_total_flops() / 2 / 1e9,
    }


def training_flops(model, images_shape, device="meta"):
    """FLOPs (a multiply-add as two) of one training step of ``model`` on a batch of ``images_shape``
    [N, 3, H, W]: 3x those of its training forward with labels (aux head and losses included) by
    ``FlopCounterMode``, on the meta device (shapes only: no time, no memory). The backward counts as twice
    the forward, the usual convention of utilisation figures (FlopCounterMode's own backward formulas count
    the dilated convolutions' input gradients as several times their forward). ``model(images, labels)``
    returns ``(outputs, losses)``; AAM's dual deformable conv counts as its two convolutions; the optimizer
    step is not counted."""
    images = torch.zeros(images_shape, device=device)
    labels = torch.zeros((images_shape[0],) + tuple(images_shape[2:]), dtype=torch.long, device=device)
    was_training = model.training
    model.train()
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.csfrn.dual_deform_conv2d: _dual_deform_flop})
    try:
        with torch.no_grad(), counter:
            model(images, labels)
    finally:
        model.train(was_training)
    return 3 * counter.get_total_flops()
