"""``csfrn flops``: parameters and GFLOPs (paper counting, :func:`csfrn.models.complexity`) of the model a config
describes, built on the meta device."""

import dataclasses

from ..errors import UsageError
from ._common import add_config_options, config

PARSER = {
    "help": "parameters and GFLOPs of the model a config describes",
    "description": "Parameters and GFLOPs (paper counting, csfrn.models.complexity) of the model that "
    "--config / --set describe: every model key counts (width, blocks, channels, aux_channels, aux, ...); "
    "model.pretrained is never read. The flags below override the config's model keys.",
}
EXAMPLES = ["csfrn flops --config demo --size 512 1024"]

# (flag, model key, type); bool flags set the key to the flag's meaning.
FLAGS = [
    ("--head", "head", str),
    ("--backbone", "backbone", str),
    ("--num-classes", "num_classes", int),
    ("--fusion", "fusion", str),
    ("--embed-dim", "embed_dim", int),
    ("--output-stride", "output_stride", int),
    ("--no-csflm", "csflm=false", bool),
    ("--no-margins", "margins=false", bool),
    ("--multi-grid", "multi_grid=true", bool),
]

# Model keys that change the network's shape, with build_model's defaults: the ones that differ are named in
# the printed line, so the line says which network was counted.
SHAPE_DEFAULTS = {
    "num_classes": 19,
    "width": 64,
    "blocks": None,
    "channels": 512,
    "aux_channels": 256,
    "aux": True,
    "output_stride": 8,
    "multi_grid": False,
    "margins": True,
}


def add_arguments(parser):
    add_config_options(parser)
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        metavar="PIXELS",
        help="input size, H or H W (default: data.crop_size of --config; 512 without --config)",
    )
    for flag, key, kind in FLAGS:
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=f"same as --set model.{key}")
        else:
            parser.add_argument(flag, type=kind, help=f"same as --set model.{key}=...")


def run(args):
    """Count the model of --config / --set / the flags (every model key, ``pretrained`` never read)."""
    for flag, key, kind in FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if kind is bool and value:
            args.overrides.append(f"model.{key}")
        elif kind is not bool and value is not None:
            args.overrides.append(f"model.{key}={value}")
    cfg = config(args)
    size = args.size or (cfg.data.crop_size if args.config else [512])
    if not 1 <= len(size) <= 2 or min(size) < 1:
        raise UsageError(f"--size takes H or H W (positive), got {' '.join(str(v) for v in size)}")
    size = (size[0], size[-1])
    try:
        count_model(dataclasses.asdict(cfg.model), size)
    except ValueError as err:  # an unknown head / output stride that the config let through
        raise UsageError(str(err))
    return 0


def model_name(kwargs):
    """ "deeplabv3plus resnet50c (width 8, blocks [1, 1, 1, 1]) +CSFLM(aam, D=8)" for build_model keywords
    ("smp:Unet +CSFLM(aam, D=8)" for a model.external)."""
    external = kwargs.get("external")
    if external:
        return (
            f"{external['library']}:{external['name']} +CSFLM({external.get('fusion') or 'aam'}, "
            f"D={kwargs.get('embed_dim', 32)})"
        )
    name = f"{kwargs.get('head', 'deeplabv3plus')} {kwargs.get('backbone', 'resnet50c')}"
    shape = [
        f"{key} {list(kwargs[key]) if isinstance(kwargs[key], tuple) else kwargs[key]}"
        for key, default in SHAPE_DEFAULTS.items()
        if key in kwargs and (list(kwargs[key]) if isinstance(kwargs[key], tuple) else kwargs[key]) != default
    ]
    if shape:
        name += f" ({', '.join(shape)})"
    if kwargs.get("csflm", True):
        name += f" +CSFLM({kwargs.get('fusion', 'aam')}, D={kwargs.get('embed_dim', 32)})"
    return name


def count_model(kwargs, size):
    """Build ``build_model(**kwargs)`` (or ``build_external`` for ``kwargs["external"]``, a config's
    ``model.external``) on the meta device (``pretrained`` is never read: counting needs shapes only), count it
    at ``size`` (H, W) with :func:`csfrn.models.complexity`, print one line and return its dict."""
    # here, not at the top: csfrn flops --help imports no torch
    import torch

    from ..models import build_external, build_model, complexity
    from ..models.external import EXTERNAL_MODEL_KEYS

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

    def g(v):  # 178.48, and 0.0213 for a tiny model
        return f"{v:.2f}" if v >= 1 else f"{v:.3g}"

    print(
        f"{model_name(kwargs)} @ {size[0]}x{size[1]}: params {c['params'] / 1e6:.2f} M, GFLOPs {g(c['gflops'])} "
        f"(paper counting), {g(c['gflops_all'])} (FlopCounterMode / 2)"
    )
    return c
