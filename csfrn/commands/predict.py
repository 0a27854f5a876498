"""``csfrn predict``: prediction pictures (train ids, colour, overlay, Cityscapes label ids) of images, from a
checkpoint or from a model exported by ``csfrn export`` (.onnx run by onnxruntime, .pt2 by torch.export)."""

import os
import sys

from ..engine.config import load_config
from ..engine.outputs import refuse_or_remove, writable_dir
from ..errors import ConfigError, UnreadableFileError
from ._common import add_config_options, add_overwrite

PARSER = {
    "help": "predict images: train-id, colour and overlay PNGs",
    "description": "Write prediction PNGs (train ids, colour, overlay) for images.",
}
EXAMPLES = ["csfrn predict --checkpoint runs/demo/best.pth --input photos/ --out predictions/"]


def add_arguments(parser):
    add_config_options(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint")
    source.add_argument(
        "--model",
        help="an exported .onnx (run by onnxruntime) or .pt2 (torch.export) file from "
        "csfrn export instead of a checkpoint; its config comes from the file, --config / --set on top",
    )
    parser.add_argument("--input", nargs="+", required=True, help="image files or directories")
    parser.add_argument("--out", required=True, help="output folder")
    add_overwrite(parser, "replace prediction pictures already in --out")
    parser.add_argument(
        "--cityscapes-ids",
        action="store_true",
        help="also write Cityscapes label-id PNGs (trainId -> id) for the official test server",
    )


def run(args):
    from tqdm import tqdm  # here, not at the top: csfrn --help stays quick

    writable_dir(args.out, "--out")
    written, failed, total = predict_files(
        args.input,
        args.out,
        args.checkpoint,
        args.model,
        args.config,
        args.overrides,
        args.cityscapes_ids,
        on_error=lambda path, why: tqdm.write(f"csfrn predict: skipped {path}: {why}", file=sys.stderr),
        overwrite=args.overwrite,
    )
    print(
        f"csfrn predict: {len(written)} of {total} images predicted into {args.out}, {len(failed)} failed",
        file=sys.stderr if failed else sys.stdout,
    )
    return 1 if failed else 0


def predict_files(
    inputs,
    out,
    checkpoint=None,
    onnx_model=None,
    config=None,
    overrides=(),
    cityscapes_ids=False,
    on_error=None,
    overwrite=True,
):
    """``csfrn predict``: the pictures of :func:`csfrn.engine.evaluate.predict` for the image files and folders
    ``inputs``, from a ``checkpoint`` (PyTorch) or an exported model ``onnx_model`` (.onnx run by onnxruntime,
    .pt2 by torch.export; its config stored in the file), with ``config`` / ``overrides`` layered on the model's
    config. ``cityscapes_ids`` also writes Cityscapes label ids. ``overwrite=False`` refuses pictures that exist
    (before any work). Returns (stems written, [(path, message)] of skipped images, the image count)."""
    # here, not at the top: csfrn predict --help imports no torch
    from ..data import DATASETS
    from ..data._base import make_palette
    from ..engine.checkpoint import load_model_from_checkpoint
    from ..engine.evaluate import find_images, predict

    images = find_images(inputs, exclude=out)
    targets = [
        os.path.join(out, f"{stem}_{kind}.png") for _, stem in images for kind in ("trainid", "color", "overlay")
    ]
    if cityscapes_ids:
        targets += [os.path.join(out, "labelIds", f"{stem}.png") for _, stem in images]
    if not overwrite:  # with overwrite each picture is replaced as its new one is written
        refuse_or_remove(targets, False, f"--out {out}", "predictions of these images")
    if onnx_model is not None:
        model, cfg = exported_model_and_config(onnx_model, config, overrides)
        device = "cpu"
    else:
        model, cfg = load_model_from_checkpoint(checkpoint, device=None, config=config, overrides=overrides)
        device = next(model.parameters()).device
    if cityscapes_ids and (cfg.model.num_classes != 19 or cfg.data.dataset != "cityscapes"):
        raise ConfigError(
            f"--cityscapes-ids maps Cityscapes' 19 train ids to label ids, but the model in "
            f"{checkpoint or onnx_model} has {cfg.model.num_classes} classes (data.dataset "
            f"'{cfg.data.dataset}'); add --set data.dataset=cityscapes if they are Cityscapes' "
            "19 train ids"
        )
    # Datasets with a fixed class list carry their palette; the others (folder, synthetic) use make_palette.
    palette = getattr(DATASETS.get(cfg.data.dataset), "palette", None) or make_palette(cfg.model.num_classes)
    written, failed = predict(
        model,
        images,
        out,
        cfg.model.num_classes,
        palette,
        cfg.eval,
        device,
        cfg.data.base_size,
        cityscapes_ids=cityscapes_ids,
        on_error=on_error,
    )
    return written, failed, len(images)


def exported_model_and_config(path, config=None, overrides=None):
    """``csfrn predict --model FILE``: :func:`onnx_model_and_config` for .onnx, a
    :class:`csfrn.deploy.ProgramModel` and its stored config for .pt2; any other suffix is an error naming the
    supported ones."""
    from ..deploy import EXPORT_SUFFIXES, ProgramModel  # here, not at the top: csfrn predict --help imports no torch

    kind = os.path.splitext(path)[1].lower()
    if kind == ".onnx":
        return onnx_model_and_config(path, config, overrides)
    if kind != ".pt2":
        raise ConfigError(
            f"--model {path}: unsupported file type {kind or '(no suffix)'}; expected an exported "
            f"model ending in {' or '.join(EXPORT_SUFFIXES)} (csfrn export)"
        )
    model = ProgramModel(path)
    if model.config is None and config is None:
        raise UnreadableFileError(
            f"{path}: no csfrn config stored in it (exported before configs were stored); "
            f"give --config with its model.num_classes, or export it again with csfrn export"
        )
    base = dict(model.config or {})
    base["train"] = {**base.get("train", {}), "device": "cpu"}
    return model, load_config(config, overrides, base=base)


def onnx_model_and_config(path, config=None, overrides=None):
    """``csfrn predict --model FILE.onnx``: (:class:`csfrn.deploy.OnnxModel`, Config). The config is the one stored
    at export (or the defaults with the file's class count), with ``config`` and ``overrides`` layered on top;
    device cpu."""
    from ..deploy import OnnxModel  # here, not at the top: csfrn predict --help imports no torch

    model = OnnxModel(path)
    saved = model.config
    if saved is None:
        if model.num_classes is None:
            raise UnreadableFileError(
                f"{path}: no csfrn config in its metadata and no static class count in its "
                f"output; export it with csfrn export"
            )
        saved = {"model": {"num_classes": int(model.num_classes)}}
    base = dict(saved)
    base["train"] = {**base.get("train", {}), "device": "cpu"}
    cfg = load_config(config, overrides, base=base)
    if model.num_classes is not None and int(model.num_classes) != cfg.model.num_classes:
        raise ConfigError(
            f"{path} outputs {model.num_classes} classes, the config says model.num_classes={cfg.model.num_classes}"
        )
    return model, cfg
