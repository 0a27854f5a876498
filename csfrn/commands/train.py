"""``csfrn train``: train a model from a YAML recipe (under torchrun: one process per GPU)."""
import glob
import os

from ..engine.outputs import writable_dir
from ..errors import UsageError
from ._common import add_config_options, config, set_paths

PARSER = {"help": "train a model (run under torchrun for several processes)"}
EXAMPLES = ["csfrn train --config configs/demo.yaml --work-dir runs/demo",
            "csfrn train --config runs/demo/config.yaml --resume auto        # continue a stopped run",
            "torchrun --nproc-per-node 4 -m csfrn.cli train --config configs/cityscapes_deeplabv3plus_r101_769_40k.yaml"]


def add_arguments(parser):
    add_config_options(parser)
    parser.add_argument("--resume", help="checkpoint to resume from ('auto': work_dir/last.pth when it exists)")
    parser.add_argument("--work-dir", help="output directory (same as --set train.work_dir=...)")
    parser.add_argument("--overwrite", action="store_true", help="start over in a work_dir that holds a previous "
                        "run (its checkpoints, metrics and reports are removed); without it such a work_dir is "
                        "refused")


def shipped_configs():
    """The configs in the checkout's configs/ folder (not the _base_ parts), relative to the current folder."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    found = sorted((p for p in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)
                    if "_base_" not in p.split(os.sep)), key=lambda p: (not p.endswith("demo.yaml"), p))
    return [os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p for p in found]


def run(args):
    if args.config is None:
        shipped = shipped_configs()
        more = f" ({len(shipped) - 6} more in configs/)" if len(shipped) > 6 else ""
        raise UsageError(f"--config is required (a YAML recipe; the built-in defaults are only a base), e.g. one of "
                         f"{', '.join(shipped[:6])}{more}")
    from ..engine.train import check_work_dir, train   # here, not at the top: csfrn train --help imports no torch
    cfg = set_paths(config(args), {"train.work_dir": args.work_dir, "train.resume": args.resume})
    writable_dir(cfg.train.work_dir, "--work-dir" if args.work_dir else "train.work_dir")
    check_work_dir(cfg.train, args.overwrite)   # never replace a previous run's outputs silently
    train(cfg, overwrite=args.overwrite)
    return 0
