"""``csfrn bench --what X [X's options]``: the benchmarks in :mod:`csfrn.bench`; X's own parser takes the rest
of the command line, so an option X does not take is an error, not dropped."""

import argparse
import importlib

from ..errors import UsageError

# csfrn bench --what NAME runs NAME's main(argv, parser); the module's add_arguments(parser) lists its options.
BENCHMARKS = {
    "ops": "csfrn.bench.ops",
    "deform": "csfrn.bench.deform",
    "train": "csfrn.bench.train_step",
    "export": "csfrn.bench.export",
}
BENCHMARK_SUMMARIES = {
    "ops": "every csfrn op against its twin (and the peer), forward and backward",
    "deform": "deform_conv2d / the AAM pair against torchvision, with the launch plan's floor",
    "train": "training steps: baseline, CSFRN, channels_last, compiled, torchvision's peer",
    "export": "an exported model: onnxruntime and torch.export against PyTorch eager",
}

PARSER = {
    "help": "benchmarks: --what ops | deform | train | export",
    "add_help": False,
    "description": "Benchmarks. Each --what takes its own options, listed below; results are written under "
    "--out DIR only, never to the current folder.",
}
EXAMPLES = ["csfrn bench --what ops --quick", "csfrn bench --what train --out results/"]
# The rest of the command line goes to the benchmark's own parser (csfrn.cli passes it as args.extra).
TAKES_EXTRA_ARGUMENTS = True


class _OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``csfrn bench: error: ...``), without the usage block."""

    def error(self, message):
        if message.startswith("unrecognized arguments") and getattr(self, "hint", None):
            message += f" ({self.hint})"
        raise UsageError(message)


def benchmark_parser(what):
    """The benchmark module of ``csfrn bench --what WHAT`` and an empty parser for it: the module's
    ``add_arguments`` (called by its ``main``) gives it the module's own options."""
    module = importlib.import_module(BENCHMARKS[what])
    parser = _OneLineParser(
        prog="csfrn bench",
        usage=f"csfrn bench --what {what} [options]",
        description=(module.__doc__ or "").split("\n\n")[0],
    )
    parser.hint = f"see csfrn bench --what {what} --help"
    return module, parser


class _BenchHelp(argparse.Action):
    """``csfrn bench --help``: the verb's usage, then every benchmark's options (``--what X --help``: X's only)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=kwargs.get("help"))

    def __call__(self, parser, namespace, values, option_string=None):
        chosen = getattr(namespace, "what", None)
        parser.print_help()
        if chosen is None:  # no import (torch) for the overview: each benchmark's options come with --what X
            print("\nbenchmarks (csfrn bench --what X --help: X's options):")
            for what in sorted(BENCHMARKS):
                print(f"  {what:<8} {BENCHMARK_SUMMARIES[what]}")
        else:
            print(f"\n==== --what {chosen} ({BENCHMARKS[chosen]})")
            module, sub = benchmark_parser(chosen)
            print(module.add_arguments(sub).format_help().rstrip())
        parser.exit()


def add_arguments(parser):
    parser.add_argument("-h", "--help", action=_BenchHelp, help="show this help (with --what X: X's options only)")
    # default None, not "train": --help tells an overview (no --what) from one benchmark's options
    parser.add_argument("--what", choices=sorted(BENCHMARKS), default=None, help="which benchmark (default: train)")
    # bench takes no config: the keys the code common to all verbs reads are there, empty
    parser.set_defaults(config=None, overrides=[], debug=False)


def run(args):
    module, parser = benchmark_parser(args.what or "train")
    module.main(args.extra, parser=parser)
    return 0
