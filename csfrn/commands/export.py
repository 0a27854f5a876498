"""``csfrn export``: a checkpoint's inference graph to ONNX (.onnx) or torch.export (.pt2), checked against
PyTorch on random images."""

import os
import sys
import time

from ..engine.outputs import writable_file
from ..errors import ConfigError, OutputExistsError
from ._common import add_config_options, add_overwrite

PARSER = {
    "help": "export a checkpoint to ONNX or torch.export (.pt2)",
    "description": "Export a checkpoint's inference graph to ONNX (.onnx, deformable convs as DeformConv) or "
    "torch.export (.pt2), checked against PyTorch.",
}
EXAMPLES = ["csfrn export --checkpoint runs/demo/best.pth --out model.onnx --size 512 512"]

# The largest difference from PyTorch (absolute, on the logits) an exported model may show.
TOLERANCE = 1e-4


def add_arguments(parser):
    add_config_options(parser)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="FILE.onnx or FILE.pt2")
    parser.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="input size of the export")
    parser.add_argument("--opset", type=int, default=19, help="ONNX opset (at least 19, the first with DeformConv)")
    parser.add_argument("--dynamic", action="store_true", help="batch, height and width dynamic")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch on random images")
    add_overwrite(parser, "replace an existing --out file")


def run(args):
    writable_file(args.out, "--out")
    return export_from_checkpoint(
        args.checkpoint,
        args.out,
        args.size,
        opset=args.opset,
        dynamic=args.dynamic,
        check=not args.no_check,
        overwrite=args.overwrite,
        config=args.config,
        overrides=args.overrides,
    )


def check_sizes(size, dynamic):
    """The input sizes an export is checked at: its own, and for a dynamic export a second, different one."""
    h, w = size
    return [(h, w), (h + 32, w + 64)] if dynamic else [(h, w)]


def export_from_checkpoint(
    checkpoint,
    out,
    size,
    opset=19,
    dynamic=False,
    check=True,
    overwrite=False,
    config=None,
    overrides=None,
    stream=None,
):
    """``csfrn export``: the checkpoint's model exported to ``out`` (.onnx or .pt2, with
    :func:`csfrn.deploy.export_onnx` / :func:`csfrn.deploy.export_program`) and, unless ``check`` is False,
    compared with PyTorch on random images (batch 2 when dynamic). Returns the exit status: 0, or 1 when the
    exported model differs from PyTorch by more than :data:`TOLERANCE`."""
    # here, not at the top: csfrn export --help imports no torch
    from .. import deploy
    from ..engine.checkpoint import load_model_from_checkpoint

    stream = stream or sys.stdout
    kind = os.path.splitext(out)[1].lower()
    if kind not in deploy.EXPORT_SUFFIXES:
        raise ConfigError(f"--out {out}: the file name must end in .onnx (ONNX) or .pt2 (torch.export)")
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a directory; give a file name ending in {kind}")
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(f"--out {out} exists; add --overwrite to replace it")
    size = deploy.image_size("--size", size)
    if kind == ".onnx":
        deploy.require_onnx(runtime=check)  # a missing extra is said before the model is loaded
    model, cfg = load_model_from_checkpoint(checkpoint, config=config, overrides=overrides)
    start = time.perf_counter()
    if kind == ".onnx":
        deploy.export_onnx(model, out, size, opset=opset, dynamic=dynamic, config=cfg)
        counts = deploy.op_types(deploy.load_onnx(out))
        what = f"ONNX opset {opset}, {counts.get('DeformConv', 0)} DeformConv nodes"
    else:
        deploy.export_program(model, out, size, dynamic=dynamic, config=cfg)
        what = "torch.export program"
    shape = "dynamic batch, height and width" if dynamic else f"input 1x3x{size[0]}x{size[1]}"
    print(f"csfrn export: wrote {out} ({what}, {shape}) in {time.perf_counter() - start:.1f} s", file=stream)
    if not check:
        return 0
    sizes = check_sizes(size, dynamic)
    batch = 2 if dynamic else 1
    diff = (deploy.check_onnx if kind == ".onnx" else deploy.check_program)(model, out, sizes, batch=batch)
    runner = "onnxruntime" if kind == ".onnx" else "torch.export.load"
    at = ", ".join(f"{b}x3x{h}x{w}" for (h, w), b in zip(sizes, [batch] * len(sizes)))
    ok = diff <= TOLERANCE
    print(
        f"csfrn export: {runner} vs PyTorch on random images ({at}): max abs difference {diff:.2e} "
        f"({'within' if ok else 'OVER'} {TOLERANCE:g})",
        file=stream if ok else sys.stderr,
    )
    return 0 if ok else 1
