"""Parameter and FLOP counts the way the paper reports them (Table 2 / Table 3), and the ``csfrn flops`` CLI.

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
import argparse
import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import ops  # noqa: F401  (registers torch.ops.csfrn.*)
from ..nn import AAM


def _conv_flops(module, inputs, output):
    k = module.weight[0].numel()                 # in_channels / groups * kh * kw
    return output.numel() * (k + (module.bias is not None))


def _aam_flops(module, inputs, output):
    # the dual deformable conv: 3x3, stride 1, padding 1, so one output per input pixel of X and of Y
    n, _, h, w = inputs[0].shape
    return n * h * w * (module.weight_x.shape[0] * module.weight_x[0].numel()
                        + module.weight_y.shape[0] * module.weight_y[0].numel())


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

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ReLU, AAM) + _POOLS)]
    try:
        counter = FlopCounterMode(display=False,
                                  custom_mapping={torch.ops.csfrn.dual_deform_conv2d: _dual_deform_flop})
        with torch.no_grad(), counter:
            model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {"params": sum(q.numel() for q in model.parameters()), "gflops": total[0] / 1e9,
            "gflops_all": counter.get_total_flops() / 2 / 1e9}


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


def flops_table(rows, size=(512, 512), num_classes=19):
    """Counts for model specs (dicts of ``build_model`` keywords, built on the meta device); returns
    [(spec, counts)]."""
    from .builder import build_model
    out = []
    for spec in rows:
        spec = {"num_classes": num_classes, **spec}
        with torch.device("meta"):
            model = build_model(**spec)
        out.append((spec, complexity(model, size)))
    return out


# Model keys that change the network's shape, with build_model's defaults: the ones that differ are named in
# the printed line, so the line says which network was counted.
SHAPE_DEFAULTS = {"num_classes": 19, "width": 64, "blocks": None, "channels": 512, "aux_channels": 256, "aux": True,
                  "output_stride": 8, "multi_grid": False, "margins": True}


def model_name(kwargs):
    """"deeplabv3plus resnet50c (width 8, blocks [1, 1, 1, 1]) +CSFLM(aam, D=8)" for build_model keywords
    ("smp:Unet +CSFLM(aam, D=8)" for a model.external)."""
    external = kwargs.get("external")
    if external:
        return (f"{external['library']}:{external['name']} +CSFLM({external.get('fusion') or 'aam'}, "
                f"D={kwargs.get('embed_dim', 32)})")
    name = f"{kwargs.get('head', 'deeplabv3plus')} {kwargs.get('backbone', 'resnet50c')}"
    shape = [f"{key} {list(kwargs[key]) if isinstance(kwargs[key], tuple) else kwargs[key]}"
             for key, default in SHAPE_DEFAULTS.items()
             if key in kwargs and (list(kwargs[key]) if isinstance(kwargs[key], tuple) else kwargs[key]) != default]
    if shape:
        name += f" ({', '.join(shape)})"
    if kwargs.get("csflm", True):
        name += f" +CSFLM({kwargs.get('fusion', 'aam')}, D={kwargs.get('embed_dim', 32)})"
    return name


def count_model(kwargs, size):
    """Build ``build_model(**kwargs)`` on the meta device (``pretrained`` is never read: counting needs shapes
    only), count it at ``size`` (H, W), print one line and return :func:`complexity`'s dict."""
    from .builder import build_model
    from .external import EXTERNAL_MODEL_KEYS, build_external
    kwargs = {**kwargs, "pretrained": None}
    external = kwargs.pop("external", None)
    if kwargs.get("blocks") is not None:
        kwargs["blocks"] = tuple(kwargs["blocks"])
    with torch.device("meta"):
        if external is not None:
            model = build_external(external, **{k: kwargs[k] for k in EXTERNAL_MODEL_KEYS if k in kwargs})
        else:
            model = build_model(**kwargs)
    c = complexity(model, size)
    if external is not None:
        kwargs = {"external": external, "embed_dim": kwargs.get("embed_dim", 32)}
    def g(v):                                          # 178.48, and 0.0213 for a tiny model
        return f"{v:.2f}" if v >= 1 else f"{v:.3g}"
    print(f"{model_name(kwargs)} @ {size[0]}x{size[1]}: params {c['params'] / 1e6:.2f} M, GFLOPs {g(c['gflops'])} "
          f"(paper counting), {g(c['gflops_all'])} (FlopCounterMode / 2)")
    return c


def main(argv=None):
    """``python -m csfrn.models.complexity --head deeplabv3plus --backbone resnet50c --size 512 [--no-csflm]
    [--fusion concat]``: the paper's models by name. ``csfrn flops --config X`` counts the model a config
    describes (every model key)."""
    from .heads import HEADS
    from .backbones import ARCHS
    parser = argparse.ArgumentParser(prog="python -m csfrn.models.complexity",
                                     description="parameters and GFLOPs of a CSFRN model "
                                     "(paper counting: mmcv convention, aux head excluded)")
    parser.add_argument("--head", default="deeplabv3plus", choices=sorted(HEADS))
    parser.add_argument("--backbone", default="resnet50c", choices=sorted(ARCHS))
    parser.add_argument("--size", type=int, nargs="+", default=[512], help="H [W] of the input")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--no-csflm", dest="csflm", action="store_false", help="the plain head baseline")
    parser.add_argument("--fusion", default="aam", choices=["aam", "concat"])
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--no-margins", dest="margins", action="store_false")
    parser.add_argument("--output-stride", type=int, default=8, choices=[8, 16])
    parser.add_argument("--multi-grid", action="store_true")
    args = parser.parse_args(argv)
    if len(args.size) > 2:
        parser.error(f"--size takes H or H W, got {len(args.size)} numbers")
    size = tuple(args.size) if len(args.size) == 2 else (args.size[0], args.size[0])
    return count_model(dict(head=args.head, num_classes=args.num_classes, backbone=args.backbone,
                            csflm=args.csflm, fusion=args.fusion, embed_dim=args.embed_dim, margins=args.margins,
                            output_stride=args.output_stride, multi_grid=args.multi_grid), size)


if __name__ == "__main__":
    main()
