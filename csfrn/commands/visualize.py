"""``csfrn visualize``: the paper's Figure 3 (phi-distance maps of query pixels) of a checkpoint's model."""

import os

from ..engine.outputs import refuse_or_remove, writable_file
from ..errors import UsageError
from ._common import add_config_options, add_overwrite

PARSER = {"help": "the paper's Figure 3: phi-distance maps of query pixels"}
EXAMPLES = ["csfrn visualize --checkpoint runs/demo/best.pth --out fig3.png --indices 0 1 2"]


def add_arguments(parser):
    add_config_options(parser)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--out",
        required=True,
        help="PNG file to write (its folders are created); a folder "
        "(existing, ending in / or without an extension) gets figure3.png",
    )
    parser.add_argument("--split", help="dataset split (default: data.val_split)")
    parser.add_argument("--indices", type=int, nargs="+", default=[0], help="dataset items to draw")
    parser.add_argument(
        "--points",
        nargs="+",
        metavar="Y,X",
        help="query pixels, numbered rings in red, green, blue (default: one per large class)",
    )
    parser.add_argument(
        "--scale", type=int, default=None, help="integer upscaling of the tiles (default: tiles at least 128 px wide)"
    )
    add_overwrite(parser, "replace an existing picture")


def parse_points(values):
    """--points Y,X ... -> [(y, x), ...]."""
    try:
        points = [tuple(int(v) for v in p.split(",")) for p in values]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 for p in points):
        raise UsageError(f"--points takes Y,X pairs of integers, got {' '.join(values)}")
    return points


def picture_path(out):
    """--out of visualize: a PNG file, or a folder (existing, ending in /, or without an extension) that gets
    figure3.png."""
    from PIL import Image  # here, not at the top: csfrn --help stays quick

    if out.endswith(("/", os.sep)) or os.path.isdir(out) or not os.path.splitext(out)[1]:
        out = os.path.join(out, "figure3.png")
    if os.path.splitext(out)[1].lower() not in Image.registered_extensions():
        raise UsageError(f"--out {out}: unknown picture extension {os.path.splitext(out)[1]} (use .png)")
    return out


def run(args):
    points = parse_points(args.points) if args.points else None
    if args.scale is not None and args.scale < 1:
        raise UsageError(f"--scale must be a positive integer, got {args.scale}")
    path = writable_file(picture_path(args.out), "--out")
    if not args.overwrite:  # with it the picture is replaced once the new one is drawn
        refuse_or_remove([path], False, f"--out {path}", "a picture")
    try:
        path = visualize_checkpoint(
            args.checkpoint, path, args.split, args.indices, points, args.scale, args.config, args.overrides
        )
    except ValueError as err:  # indices / points out of range, a model without CSFLM, a bad extension
        raise UsageError(str(err))
    print(f"wrote {path}")
    return 0


def visualize_checkpoint(
    checkpoint, path, split=None, indices=(0,), points=None, scale=None, config=None, overrides=()
):
    """``csfrn visualize``: Figure 3 (:func:`csfrn.engine.visualize.visualize_dataset`) of the checkpoint's model
    on items ``indices`` of ``split`` (default ``data.val_split``), written to ``path``; ``config`` /
    ``overrides`` are layered on the checkpoint's config. Returns the path written."""
    # here, not at the top: csfrn visualize --help imports no torch
    from ..data import build_dataset
    from ..data.transforms import eval_transforms
    from ..engine.checkpoint import load_model_from_checkpoint
    from ..engine.visualize import visualize_dataset

    model, cfg = load_model_from_checkpoint(checkpoint, device=None, config=config, overrides=overrides)
    dataset = build_dataset(
        cfg.data, split or cfg.data.val_split, eval_transforms(), num_classes=cfg.model.num_classes, seed=cfg.train.seed
    )
    return visualize_dataset(
        model,
        dataset,
        indices,
        path,
        dataset.palette,
        next(model.parameters()).device,
        points,
        delta=cfg.model.delta,
        scale=scale,
    )
