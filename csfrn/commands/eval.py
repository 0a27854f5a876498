"""``csfrn eval``: a checkpoint's model on a dataset split: the per-class table, reports, the confusion matrix and
the feature-consistency scores."""

import os

from ..engine.outputs import refuse_or_remove, writable_dir
from ..errors import ConfigError
from ._common import add_config_options, add_overwrite

PARSER = {"help": "evaluate a checkpoint on a dataset split"}
EXAMPLES = ["csfrn eval --checkpoint runs/demo/best.pth --split test --out runs/demo/test"]


def add_arguments(parser):
    add_config_options(parser)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", help="dataset split (default: data.val_split)")
    parser.add_argument("--out", help="folder for eval_<split>.json / .csv (default: the checkpoint's folder)")
    add_overwrite(parser, "replace eval_<split>.json / .csv in --out")
    parser.add_argument(
        "--no-consistency",
        action="store_true",
        help="skip the feature-consistency scores "
        "(intra-class variance, centre distance and their ratio of the features F and embeddings "
        "B; one more pass)",
    )


def run(args):
    writable_dir(args.out or os.path.dirname(os.path.abspath(args.checkpoint)), "--out")
    evaluate_checkpoint(
        args.checkpoint,
        args.split,
        args.out,
        not args.no_consistency,
        args.config,
        args.overrides,
        overwrite=args.overwrite,
    )
    return 0


def evaluate_checkpoint(
    checkpoint, split=None, out=None, consistency=True, config=None, overrides=(), log=print, overwrite=True
):
    """``csfrn eval``: the checkpoint's model (its own config, ``config`` and ``overrides`` on top) on ``split``
    (default ``data.val_split``); under torchrun every process evaluates a shard and the confusion matrices are
    summed. Writes ``eval_<split>.json`` / ``.csv`` and the confusion matrix (``confusion.csv``: pixel counts;
    ``confusion.png``: normalised per ground-truth class) to ``out`` (default: beside the checkpoint), logs a header
    (checkpoint, iteration, split, image count), the table, unless ``consistency=False`` the feature-consistency
    scores, and the paths written. ``overwrite=False`` refuses existing reports (before any work). Returns the
    summary."""
    # here, not at the top: csfrn eval --help imports no torch
    from ..data import build_dataset
    from ..data.transforms import eval_transforms
    from ..engine.checkpoint import load_checkpoint, load_model_from_checkpoint
    from ..engine.distributed import cleanup, init_distributed
    from ..engine.evaluate import (
        dataset_feature_consistency,
        evaluate,
        format_consistency,
        write_confusion,
        write_report,
    )
    from ..plotting import pyplot

    pyplot()  # confusion.png needs matplotlib: say so before the evaluation runs
    state = load_checkpoint(checkpoint)
    model, cfg = load_model_from_checkpoint(checkpoint, device=None, config=config, overrides=overrides, state=state)
    split = split or cfg.data.val_split
    out = out or os.path.dirname(os.path.abspath(checkpoint))
    reports = [os.path.join(out, f"eval_{split}.{ext}") for ext in ("json", "csv")]
    confusion = [os.path.join(out, name) for name in ("confusion.csv", "confusion.png")]
    info = init_distributed(cfg.train.device)
    try:
        if info.is_main and not overwrite:  # with overwrite they are replaced once the new ones are ready
            refuse_or_remove(reports + confusion, False, f"--out {out}", f"an evaluation of split '{split}'")
        model.to(info.device)
        dataset = build_dataset(
            cfg.data, split, eval_transforms(), num_classes=cfg.model.num_classes, seed=cfg.train.seed
        )
        if dataset.num_classes != cfg.model.num_classes:
            raise ConfigError(
                f"checkpoint {checkpoint} has {cfg.model.num_classes} classes, dataset "
                f"'{cfg.data.dataset}' has {dataset.num_classes}"
            )
        count = len(dataset) if cfg.eval.max_images is None else min(len(dataset), cfg.eval.max_images)
        if info.is_main:
            at = f"iteration {state['iter']}" if isinstance(state.get("iter"), int) else "iteration unknown"
            log(
                f"csfrn eval: {checkpoint} ({at}) on split '{split}' of {cfg.data.dataset}, {count} images, "
                f"{cfg.eval.mode} inference"
            )
        summary, cm = evaluate(
            model, dataset, cfg.model.num_classes, cfg.eval, info.device, cfg.data.base_size, progress=True
        )
        if info.is_main:
            if consistency:
                summary["consistency"] = dataset_feature_consistency(
                    model, dataset, info.device, cfg.eval.max_images, progress=True
                )
            log(write_report(summary, dataset.classes, out, name=f"eval_{split}"))
            write_confusion(cm, dataset.classes, out, f"{os.path.basename(checkpoint)} on {split}")
            if consistency:
                log(format_consistency(summary["consistency"]))
            log(f"csfrn eval: wrote {', '.join(reports + confusion)}")
        return summary
    finally:
        cleanup()
