"""``csfrn <verb>``: the argument parser, the dispatch to the verb's module and the one-line error handling.

Verbs: train, eval, predict, export, visualize, flops, bench, demo, ablate, config, plot, browse; each is a module
of :mod:`csfrn.commands` (its options, its ``--help`` examples and ``run(args)``). All but bench and plot take
``--config FILE.yaml`` and any number of ``--set section.key=value`` overrides (YAML values; unknown keys are
errors); ``csfrn bench --what X`` takes X's own options (``csfrn bench --help`` lists them).

A user's mistake (a :class:`csfrn.errors.UserError`: bad config value, missing file, broken dataset folder) ends
as one line on stderr, ``csfrn <verb>: error: <message>``, with exit status 2; ``--debug`` adds the traceback;
so does an OS error on a file (a full disk, a read-only folder). Ctrl-C / SIGTERM end as one line too, with exit
status 130 / 143 (a training first writes last.pth). Any other exception is a bug and shows its traceback.

Building the parser imports nothing heavy (``csfrn --help`` takes a fraction of a second): each verb's ``run``
imports the library it calls.
"""

import argparse
import importlib
import os
import platform
import signal
import sys
import traceback

from . import __version__
from .commands import VERBS
from .commands._common import check_paths
from .engine.interrupt import raise_interrupted, signal_name
from .errors import UserError


# What `csfrn --help` says, for users.
DESCRIPTION = (
    "csfrn: CSFRN semantic segmentation (AAAI 2021) with fused C++/CUDA kernels. Train, evaluate, "
    "predict, export and inspect models and datasets. Every verb but bench and plot reads a YAML "
    "config (--config) with --set section.key=value overrides."
)
EPILOG = """examples:
  csfrn demo                       # CSFRN vs its baseline on the built-in synthetic set
  csfrn train --config demo --work-dir runs/demo
  csfrn eval --checkpoint runs/demo/best.pth
  csfrn plot runs/demo runs/other --out curves.png
  csfrn config --config demo --set train.lr=0.02

`csfrn VERB --help` lists a verb's options, with an example."""


def version_text():
    """``csfrn --version``: csfrn, its kernels' build, torch and the CUDA it was built with, Python."""
    import torch  # here, not at the top: csfrn --help imports no torch

    from .ops import built_with_cuda

    cuda = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    kernels = "CPU + CUDA" if built_with_cuda() else "CPU only"
    return (
        f"csfrn {__version__} (kernels: {kernels}), torch {torch.__version__} ({cuda}), "
        f"Python {platform.python_version()}"
    )


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=kwargs.get("help"))

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs and keeps the lines of indented ones (examples) as written; lists the verbs one
    per line without a header line."""

    def _format_action(self, action):
        if isinstance(action, argparse._SubParsersAction):
            return "".join(self._format_action(a) for a in action._get_subactions())
        return super()._format_action(action)

    def _fill_text(self, text, width, indent):
        return "\n\n".join(
            "\n".join(indent + line for line in part.splitlines())
            if "\n  " in part or part.startswith("  ")
            else super(_HelpFormatter, self)._fill_text(part, width, indent)
            for part in text.split("\n\n")
        )


def _verb_module(name):
    return importlib.import_module(f"{__package__}.commands.{name}")


def _examples(lines):
    return "example" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join(f"  {x}" for x in lines)


def _parser():
    parser = argparse.ArgumentParser(
        prog="csfrn", description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action=_Version, help="csfrn, torch and CUDA build versions, then exit")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", title="verbs")
    for name in VERBS:
        module = _verb_module(name)
        options = {"formatter_class": _HelpFormatter, **module.PARSER}
        if module.EXAMPLES:
            options.setdefault("epilog", _examples(module.EXAMPLES))
        sub = verbs.add_parser(name, **options)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    return parser


def _one_line(err):
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(_verb_module(args.verb), "TAKES_EXTRA_ARGUMENTS", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    verb = args.verb
    previous = signal.signal(signal.SIGTERM, raise_interrupted)  # SIGTERM as Ctrl-C: one line, not a kill
    try:
        check_paths(args)
        return args.func(args)
    except UserError as err:
        if args.debug:
            traceback.print_exc()
            if err.worker_traceback:
                print(err.worker_traceback, file=sys.stderr)
        print(f"csfrn {verb}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None or isinstance(err, UserError):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"csfrn {verb}: error: {err.filename}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one line, from rank 0
            print(f"csfrn {verb}: {str(err) or 'interrupted by ' + signal_name(signum)}", file=sys.stderr, flush=True)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
