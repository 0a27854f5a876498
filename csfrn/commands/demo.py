"""``csfrn demo``: CSFRN and its no-CSFLM baseline trained on the built-in synthetic set with several seeds, and
compared."""

import os

from ..engine.outputs import refuse_or_remove, writable_dir
from ._common import add_config_options, add_overwrite, at_least_one, config, one_of

PARSER = {
    "help": "train CSFRN and its baseline on synthetic data, compare",
    "description": "Train CSFRN and its no-CSFLM baseline on the synthetic set with several seeds and compare "
    "(mean ± std, paired difference with a 95%% interval, feature consistency).",
}
EXAMPLES = ["csfrn demo --out demo_out --seeds 3"]


def add_arguments(parser):
    add_config_options(parser)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per model, 0..N-1 (default: %(default)s)")
    parser.add_argument(
        "--iters",
        type=int,
        default=500,
        help="training iterations per run (default: %(default)s, "
        "so that 3 seeds x 2 models fit in about 5 minutes on a 2-core CPU; the demo config's 1000 "
        "is the scale of the README's study; same as --set train.iters=N)",
    )
    add_overwrite(
        parser, "start over in an --out that holds a previous demo (its runs, summary and pictures are removed)"
    )
    parser.add_argument(
        "--resume",
        choices=["auto"],
        help="continue the demo in --out: finished runs are loaded, an interrupted one continues from its last.pth",
    )


def run(args):
    from ..engine.demo import DEMO_CONFIG, DEMO_OUTPUTS, run_demo  # here, not at the top: --help imports no torch

    args.config = args.config or DEMO_CONFIG
    config(args)  # report bad keys before any work
    at_least_one("--seeds", args.seeds)
    at_least_one("--iters", args.iters)
    one_of(args)
    writable_dir(args.out, "--out")
    if not args.resume:
        refuse_or_remove(
            [os.path.join(args.out, name) for name in DEMO_OUTPUTS],
            args.overwrite,
            f"--out {args.out}",
            "a previous demo (continue it with --resume auto)",
        )
    args.overrides.insert(0, f"train.iters={args.iters}")  # a --set train.iters=N given too wins
    run_demo(args.out, args.config, args.overrides, seeds=args.seeds, resume=bool(args.resume))
    return 0
