"""``csfrn ablate``: the paper's ablation variants, each trained with several seeds, with paired statistics
(:mod:`csfrn.engine.ablate`)."""

import argparse
import os

from ..engine.ablate import ABLATE_OUTPUTS, ablate, parse_variants, variants_help
from ..engine.outputs import refuse_or_remove, writable_dir
from ._common import add_config_options, add_overwrite, at_least_one, one_of

PARSER = {
    "help": "train the paper's ablation variants with several seeds",
    "formatter_class": argparse.RawDescriptionHelpFormatter,
    "description": "Train every variant with every seed (seed s: the same initial stream, data order and "
    "schedule for every variant, so the comparison with the baseline is paired), evaluate on --split, and "
    "write OUT/runs/<variant>_seed<s>.json, OUT/summary.json, OUT/table.md and OUT/ablation.png. Runs already "
    "in OUT are not trained again.\n\nVariants and the paper's rows they stand for:\n" + variants_help(),
}
EXAMPLES = ["csfrn ablate --config demo --out ablation --seeds 5"]


def add_arguments(parser):
    add_config_options(parser)
    parser.add_argument(
        "--variants",
        default="baseline,concat,aam,no-margins,bce",
        help="comma-separated variant names (default: %(default)s)",
    )
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder (runs in it are reused)")
    parser.add_argument(
        "--split",
        default="test",
        help="split the results are reported on; choices are made on "
        "data.val_split, so keep this another split (default: %(default)s)",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's last.pth")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: the table, summary and plot of the runs already in --out",
    )
    add_overwrite(parser, "start over: remove the runs, work folders, table, summary and plot in --out")
    parser.add_argument(
        "--resume",
        choices=["auto"],
        help="an interrupted run continues from its last.pth "
        "(without: it starts over; finished runs are always reused)",
    )


def run(args):
    variants = parse_variants(args.variants)
    at_least_one("--seeds", args.seeds)
    one_of(args)
    writable_dir(args.out, "--out")
    if args.overwrite:  # without it, finished runs in --out are reused and the report is made again from them
        refuse_or_remove([os.path.join(args.out, name) for name in ABLATE_OUTPUTS], True, f"--out {args.out}", "")
    ablate(
        args.config,
        variants,
        args.seeds,
        args.out,
        args.overrides,
        split=args.split,
        keep_checkpoints=args.keep_checkpoints,
        report_only=args.report_only,
        resume=bool(args.resume),
    )
    return 0
