"""``csfrn plot``: the training curves of runs (loss terms, learning rate, val mIoU) to one PNG."""

from ..engine.outputs import refuse_or_remove, writable_file
from ._common import add_debug, add_overwrite

PARSER = {
    "help": "training curves of runs (losses, lr, val mIoU) to a PNG",
    "description": "Plot the loss terms, the learning rate and val mIoU against iterations from the "
    "metrics.jsonl of each WORK_DIR, the runs overlaid with a legend.",
}
EXAMPLES = ["csfrn plot runs/a runs/b --out curves.png"]


def add_arguments(parser):
    parser.set_defaults(config=None, overrides=[])  # plot reads no config
    parser.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="the work_dir of a csfrn train run")
    parser.add_argument("--out", required=True, help="the PNG file to write")
    add_overwrite(parser, "replace an existing --out file")
    add_debug(parser)


def run(args):
    from ..engine.browse import plot_runs  # here, not at the top: --help imports no torch

    path = writable_file(args.out, "--out")
    if not args.overwrite:  # with it the picture is replaced once the new one is drawn
        refuse_or_remove([path], False, f"--out {path}", "a picture")
    print(f"wrote {plot_runs(args.work_dirs, path)}")
    return 0
