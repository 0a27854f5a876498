"""``csfrn train``: train a model from a YAML recipe (under torchrun: one process per GPU)."""

from ..engine.outputs import writable_dir
from ..errors import UsageError
from ._common import add_config_options, config, set_paths

PARSER = {"help": "train a model (run under torchrun for several processes)"}
EXAMPLES = [
    "csfrn train --config demo --work-dir runs/demo",
    "csfrn train --config runs/demo/config.yaml --resume auto        # continue a stopped run",
    "torchrun --nproc-per-node 4 -m csfrn.cli train --config cityscapes/deeplabv3plus_r101_769_40k",
]


def add_arguments(parser):
    add_config_options(parser)
    parser.add_argument("--resume", help="checkpoint to resume from ('auto': work_dir/last.pth when it exists)")
    parser.add_argument("--work-dir", help="output directory (same as --set train.work_dir=...)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a work_dir that holds a previous "
        "run (its checkpoints, metrics and reports are removed); without it such a work_dir is "
        "refused",
    )
    parser.add_argument(
        "--resume-changed",
        action="store_true",
        help="resume although the seed, global batch, "
        "world size or model differ from the checkpoint's (refused without it)",
    )


def run(args):
    if args.config is None:
        raise UsageError(
            "--config is required (a YAML file, or a shipped config's name such as demo or "
            "cityscapes/psp_r50_769_40k: csfrn config --list names them)"
        )
    from ..engine.train import check_work_dir, train  # here, not at the top: csfrn train --help imports no torch

    cfg = set_paths(config(args), {"train.work_dir": args.work_dir, "train.resume": args.resume})
    writable_dir(cfg.train.work_dir, "--work-dir" if args.work_dir else "train.work_dir")
    check_work_dir(cfg.train, args.overwrite)  # never replace a previous run's outputs silently
    train(cfg, overwrite=args.overwrite, resume_changed=args.resume_changed)
    return 0
