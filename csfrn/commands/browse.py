"""``csfrn browse``: a dataset's images beside their masks, blended in the dataset's palette, to PNGs."""

import glob
import os

from ..engine.outputs import refuse_or_remove, writable_dir
from ._common import add_config_options, add_overwrite, config

PARSER = {
    "help": "a dataset's images with their masks blended in, to PNGs",
    "description": "Write OUT/<split>_<index>.png for the first --n items of --split: the image beside the "
    "image with its mask blended in the dataset's palette, and a legend of the classes present; with "
    "--augmented after the training transforms.",
}
EXAMPLES = [
    "csfrn browse --config demo --split val --out browse/ --n 8",
    "csfrn browse --config demo --split train --out browse_aug/ --augmented",
]


def add_arguments(parser):
    add_config_options(parser)
    parser.add_argument("--split", help="dataset split (default: data.val_split)")
    parser.add_argument("--out", required=True, help="folder for the PNGs (created)")
    parser.add_argument("--n", type=int, default=16, help="number of items (default: %(default)s)")
    parser.add_argument(
        "--augmented",
        action="store_true",
        help="after the training transforms (data.crop_size, scale_range, flip, photometric)",
    )
    add_overwrite(parser, "remove the split's earlier pictures in --out first")


def run(args):
    from ..engine.browse import browse_dataset  # here, not at the top: --help imports no torch

    cfg = config(args)
    split = args.split or cfg.data.val_split
    writable_dir(args.out, "--out")
    old = sorted(glob.glob(os.path.join(glob.escape(args.out), f"{glob.escape(split)}_*.png")))
    refuse_or_remove(old, args.overwrite, f"--out {args.out}", f"pictures of split '{split}'")
    paths = browse_dataset(cfg, split, args.out, args.n, args.augmented)
    print(f"wrote {len(paths)} pictures to {args.out}")
    return 0
