"""``csfrn <verb>``: parse the command line, then call the library.

Verbs: train, eval, predict, export, visualize, flops, bench (``bench-ops`` is ``bench --what ops``), demo, ablate,
config, plot, browse. Each verb's ``--help`` ends with examples (:data:`EXAMPLES`); building the parser imports no
torch: each verb's handler imports the library it calls.
All but bench take ``--config FILE.yaml`` and any number of ``--set section.key=value`` overrides (YAML values;
unknown keys are errors); ``csfrn bench --what X`` takes X's own options (``csfrn bench --help`` lists them).

A user's mistake (a :class:`csfrn.errors.UserError`: bad config value, missing file, broken dataset folder) ends
as one line on stderr, ``csfrn <verb>: error: <message>``, with exit status 2; ``--debug`` adds the traceback;
so does an OS error on a file (a full disk, a read-only folder). Ctrl-C / SIGTERM end as one line too, with exit
status 130 / 143 (a training first writes last.pth). Any other exception is a bug and shows its traceback.

Building the parser imports nothing heavy (``csfrn --help`` takes a fraction of a second): each verb's handler
imports the library it calls.
"""
import argparse
import os
import signal
import sys
import traceback

from .errors import ConfigError, Interrupted, MissingPathError, UsageError, UserError


# csfrn bench --what NAME runs NAME's main(argv, parser); the module's add_arguments(parser) lists its options.
BENCHMARKS = {"ops": "csfrn.bench.ops", "deform": "csfrn.bench.deform", "train": "csfrn.bench.train_step",
              "report": "csfrn.bench.report"}
BENCHMARK_SUMMARIES = {"ops": "every csfrn op against its twin (and the peer), forward and backward",
                       "deform": "deform_conv2d / the AAM pair against torchvision, with the launch plan's floor",
                       "train": "training steps: baseline, CSFRN, channels_last, compiled, torchvision's peer",
                       "report": "all of them into one JSON and charts (--out)"}


# What `csfrn --help` says, for users.
DESCRIPTION = ("csfrn: CSFRN semantic segmentation (AAAI 2021) with fused C++/CUDA kernels. Train, evaluate, "
               "predict, export and inspect models and datasets. Every verb but bench and plot reads a YAML "
               "config (--config) with --set section.key=value overrides.")
EPILOG = """examples:
  csfrn demo                       # CSFRN vs its baseline on the built-in synthetic set
  csfrn train --config configs/demo.yaml --work-dir runs/demo
  csfrn eval --checkpoint runs/demo/best.pth
  csfrn plot runs/demo runs/other --out curves.png
  csfrn config --config configs/demo.yaml --set train.lr=0.02

`csfrn VERB --help` lists a verb's options, with an example."""

# The examples at the end of each verb's --help.
EXAMPLES = {
    "train": ["csfrn train --config configs/demo.yaml --work-dir runs/demo",
              "csfrn train --config runs/demo/config.yaml --resume auto        # continue a stopped run",
              "torchrun --nproc-per-node 4 -m csfrn.cli train --config configs/cityscapes_deeplabv3plus_r101_769_40k.yaml"],
    "eval": ["csfrn eval --checkpoint runs/demo/best.pth --split test --out runs/demo/test"],
    "predict": ["csfrn predict --checkpoint runs/demo/best.pth --input photos/ --out predictions/"],
    "export": ["csfrn export --checkpoint runs/demo/best.pth --out model.onnx --size 512 512"],
    "visualize": ["csfrn visualize --checkpoint runs/demo/best.pth --out fig3.png --indices 0 1 2"],
    "flops": ["csfrn flops --config configs/demo.yaml --size 512 1024"],
    "bench": ["csfrn bench --what ops --quick", "csfrn bench --what report --out benchmarks/results"],
    "demo": ["csfrn demo --out demo_out --seeds 3"],
    "ablate": ["csfrn ablate --config configs/demo.yaml --out ablation --seeds 5"],
    "config": ["csfrn config --config configs/demo.yaml --set train.lr=0.02 > my.yaml",
               "csfrn train --config my.yaml"],
    "plot": ["csfrn plot runs/a runs/b --out curves.png"],
    "browse": ["csfrn browse --config configs/demo.yaml --split val --out browse/ --n 8",
               "csfrn browse --config configs/demo.yaml --split train --out browse_aug/ --augmented"],
}


def version_text():
    """``csfrn --version``: csfrn, its kernels' build, torch and the CUDA it was built with, Python."""
    import platform

    import torch

    import csfrn
    from .ops import built_with_cuda
    cuda = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    kernels = "CPU + CUDA" if built_with_cuda() else "CPU only"
    return (f"csfrn {csfrn.__version__} (kernels: {kernels}), torch {torch.__version__} ({cuda}), "
            f"Python {platform.python_version()}")


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
            "\n".join(indent + line for line in part.splitlines()) if "\n  " in part or part.startswith("  ")
            else super(_HelpFormatter, self)._fill_text(part, width, indent) for part in text.split("\n\n"))


def _add_examples(verbs):
    for name, sub in verbs.choices.items():
        lines = EXAMPLES.get(name)
        if lines and sub.epilog is None:
            sub.epilog = "example" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join(f"  {x}" for x in lines)
            if sub.formatter_class is argparse.HelpFormatter:
                sub.formatter_class = _HelpFormatter


class _OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``csfrn bench: error: ...``), without the usage block."""

    def error(self, message):
        if message.startswith("unrecognized arguments") and getattr(self, "hint", None):
            message += f" ({self.hint})"
        raise UsageError(message)


def _bench_parser(what):
    """The benchmark module of ``csfrn bench --what WHAT`` and an empty parser for it: the module's
    ``add_arguments`` (called by its ``main``) gives it the module's own options."""
    import importlib
    module = importlib.import_module(BENCHMARKS[what])
    parser = _OneLineParser(prog="csfrn bench", usage=f"csfrn bench --what {what} [options]",
                            description=(module.__doc__ or "").split("\n\n")[0])
    parser.hint = f"see csfrn bench --what {what} --help"
    return module, parser


class _BenchHelp(argparse.Action):
    """``csfrn bench --help``: the verb's usage, then every benchmark's options (``--what X --help``: X's only)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=kwargs.get("help"))

    def __call__(self, parser, namespace, values, option_string=None):
        chosen = getattr(namespace, "what", None)
        parser.print_help()
        if chosen is None:   # no import (torch) for the overview: each benchmark's options come with --what X
            print("\nbenchmarks (csfrn bench --what X --help: X's options):")
            for what in sorted(BENCHMARKS):
                print(f"  {what:<8} {BENCHMARK_SUMMARIES[what]}")
        else:
            print(f"\n==== --what {chosen} ({BENCHMARKS[chosen]})")
            module, sub = _bench_parser(chosen)
            print(module.add_arguments(sub).format_help().rstrip())
        parser.exit()


def _common(parser, handler):
    """The options every verb but bench takes, and the function that runs the verb."""
    parser.set_defaults(func=handler)
    parser.add_argument("--config", help="YAML config (sections model / data / train / eval)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.02 (repeatable)")
    parser.add_argument("--debug", action="store_true", help="on a user error, show the traceback too")


def _parser():
    parser = argparse.ArgumentParser(prog="csfrn", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action=_Version, help="csfrn, torch and CUDA build versions, then exit")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", title="verbs")

    p = verbs.add_parser("train", help="train a model (run under torchrun for several processes)")
    _common(p, _train)
    p.add_argument("--resume", help="checkpoint to resume from ('auto': work_dir/last.pth when it exists)")
    p.add_argument("--work-dir", help="output directory (same as --set train.work_dir=...)")
    p.add_argument("--overwrite", action="store_true", help="start over in a work_dir that holds a previous run "
                   "(its checkpoints, metrics and reports are removed); without it such a work_dir is refused")
    p.add_argument("--resume-changed", action="store_true", help="resume although the seed, global batch, world "
                   "size or model differ from the checkpoint's (refused without it)")

    p = verbs.add_parser("eval", help="evaluate a checkpoint on a dataset split")
    _common(p, _eval)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", help="dataset split (default: data.val_split)")
    p.add_argument("--out", help="folder for eval_<split>.json / .csv (default: the checkpoint's folder)")
    _overwrite(p, "replace eval_<split>.json / .csv in --out")
    p.add_argument("--no-consistency", action="store_true", help="skip the feature-consistency scores (intra-class "
                   "variance, centre distance and their ratio of the features F and embeddings B; one more pass)")

    p = verbs.add_parser("predict", help="predict images: train-id, colour and overlay PNGs",
                         description="Write prediction PNGs (train ids, colour, overlay) for images.")
    _common(p, _predict)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint")
    source.add_argument("--model", help="an exported .onnx (run by onnxruntime) or .pt2 (torch.export) file from "
                        "csfrn export instead of a checkpoint; its config comes from the file, --config / --set on top")
    p.add_argument("--input", nargs="+", required=True, help="image files or directories")
    p.add_argument("--out", required=True, help="output folder")
    _overwrite(p, "replace prediction pictures already in --out")
    p.add_argument("--cityscapes-ids", action="store_true", help="also write Cityscapes label-id PNGs "
                   "(trainId -> id) for the official test server")

    p = verbs.add_parser("export", help="export a checkpoint to ONNX or torch.export (.pt2)",
                         description="Export a checkpoint's inference graph to ONNX (.onnx, deformable convs as "
                         "DeformConv) or torch.export (.pt2), checked against PyTorch.")
    _common(p, _export)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="FILE.onnx or FILE.pt2")
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="input size of the export")
    p.add_argument("--opset", type=int, default=19, help="ONNX opset (at least 19, the first with DeformConv)")
    p.add_argument("--dynamic", action="store_true", help="batch, height and width dynamic")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch on random images")
    _overwrite(p, "replace an existing --out file")

    p = verbs.add_parser("visualize", help="the paper's Figure 3: phi-distance maps of query pixels")
    _common(p, _visualize)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="PNG file to write (its folders are created); a folder (existing, "
                   "ending in / or without an extension) gets figure3.png")
    p.add_argument("--split", help="dataset split (default: data.val_split)")
    p.add_argument("--indices", type=int, nargs="+", default=[0], help="dataset items to draw")
    p.add_argument("--points", nargs="+", metavar="Y,X", help="query pixels, numbered rings in red, green, blue "
                   "(default: one per large class)")
    p.add_argument("--scale", type=int, default=None, help="integer upscaling of the tiles (default: tiles at "
                   "least 128 px wide)")
    _overwrite(p, "replace an existing picture")

    p = verbs.add_parser("flops", help="parameters and GFLOPs of the model a config describes",
                         description="Parameters and GFLOPs (paper counting, csfrn.models.complexity) of the model "
                         "that --config / --set describe: every model key counts (width, blocks, channels, "
                         "aux_channels, aux, ...); model.pretrained is never read. The flags below override the "
                         "config's model keys.")
    _common(p, _flops)
    p.add_argument("--size", type=int, nargs="+", metavar="PIXELS",
                   help="input size, H or H W (default: data.crop_size of --config; 512 without --config)")
    for flag, key, kind in _FLOPS_FLAGS:
        if kind is bool:
            p.add_argument(flag, action="store_true", help=f"same as --set model.{key}")
        else:
            p.add_argument(flag, type=kind, help=f"same as --set model.{key}=...")

    p = verbs.add_parser("bench", aliases=["bench-ops"], add_help=False,
                         help="benchmarks: --what ops | deform | train | report",
                         description="Benchmarks. Each --what takes its own options, listed below; results "
                         "are written under --out DIR only (the report needs it), never to the current folder.")
    p.add_argument("-h", "--help", action=_BenchHelp, help="show this help (with --what X: X's options only)")
    p.add_argument("--what", choices=sorted(BENCHMARKS), default=None,
                   help="which benchmark (default: train; ops for the bench-ops alias)")
    # bench takes no config: the keys code common to all verbs reads are there, empty
    p.set_defaults(func=_bench, config=None, overrides=[], debug=False)

    p = verbs.add_parser("demo", help="train CSFRN and its baseline on synthetic data, compare",
                         description="Train CSFRN and its no-CSFLM baseline on the synthetic set with several "
                         "seeds and compare (mean ± std, paired difference with a 95%% interval, feature "
                         "consistency).")
    _common(p, _demo)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seeds", type=int, default=3, help="seeds per model, 0..N-1 (default: %(default)s)")
    p.add_argument("--iters", type=int, default=500, help="training iterations per run (default: %(default)s, so that "
                   "3 seeds x 2 models fit in about 5 minutes on a 2-core CPU; configs/demo.yaml's 1000 is the "
                   "scale of the README's study; same as --set train.iters=N)")
    _overwrite(p, "start over in an --out that holds a previous demo (its runs, summary and pictures are removed)")
    p.add_argument("--resume", choices=["auto"], help="continue the demo in --out: finished runs are loaded, an "
                   "interrupted one continues from its last.pth")

    from .engine.ablate import variants_help
    p = verbs.add_parser(
        "ablate", help="train the paper's ablation variants with several seeds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every variant with every seed (seed s: the same initial stream, data order and schedule "
        "for every variant, so the comparison with the baseline is paired), evaluate on --split, and write "
        "OUT/runs/<variant>_seed<s>.json, OUT/summary.json, OUT/table.md and OUT/ablation.png. Runs already in "
        "OUT are not trained again.\n\nVariants and the paper's rows they stand for:\n" + variants_help())
    _common(p, _ablate)
    p.add_argument("--variants", default="baseline,concat,aam,no-margins,bce",
                   help="comma-separated variant names (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder (runs in it are reused)")
    p.add_argument("--split", default="test", help="split the results are reported on; choices are made on "
                   "data.val_split, so keep this another split (default: %(default)s)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's last.pth")
    p.add_argument("--report-only", action="store_true", help="train nothing: the table, summary and plot of the runs "
                   "already in --out")
    _overwrite(p, "start over: remove the runs, work folders, table, summary and plot in --out")
    p.add_argument("--resume", choices=["auto"], help="an interrupted run continues from its last.pth (without: it "
                   "starts over; finished runs are always reused)")

    p = verbs.add_parser("config", help="print the resolved config (every key) as YAML",
                         description="Print the config that --config and --set resolve to, every key, as YAML: "
                         "what a training run writes to work_dir/config.yaml, loadable with --config.")
    _common(p, _print_config)

    p = verbs.add_parser("plot", help="training curves of runs (losses, lr, val mIoU) to a PNG",
                         description="Plot the loss terms, the learning rate and val mIoU against iterations "
                         "from the metrics.jsonl of each WORK_DIR, the runs overlaid with a legend.")
    p.set_defaults(func=_plot, config=None, overrides=[])
    p.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="the work_dir of a csfrn train run")
    p.add_argument("--out", required=True, help="the PNG file to write")
    _overwrite(p, "replace an existing --out file")
    p.add_argument("--debug", action="store_true", help="on a user error, show the traceback too")

    p = verbs.add_parser("browse", help="a dataset's images with their masks blended in, to PNGs",
                         description="Write OUT/<split>_<index>.png for the first --n items of --split: the "
                         "image beside the image with its mask blended in the dataset's palette, and a legend of "
                         "the classes present; with --augmented after the training transforms.")
    _common(p, _browse)
    p.add_argument("--split", help="dataset split (default: data.val_split)")
    p.add_argument("--out", required=True, help="folder for the PNGs (created)")
    p.add_argument("--n", type=int, default=16, help="number of items (default: %(default)s)")
    p.add_argument("--augmented", action="store_true", help="after the training transforms (data.crop_size, "
                   "scale_range, flip, photometric)")
    _overwrite(p, "remove the split's earlier pictures in --out first")
    _add_examples(verbs)
    return parser


def _overwrite(parser, what):
    parser.add_argument("--overwrite", action="store_true", help=f"{what}; without it existing outputs are refused")


def _config(args, base=None):
    from .engine.config import load_config
    return load_config(args.config, args.overrides, base)


def _check_paths(args):
    """The files and folders named on the command line exist, before any work starts."""
    files = [("--config", args.config, "a YAML config file"),
             ("--checkpoint", getattr(args, "checkpoint", None), "a checkpoint file (best.pth / last.pth)"),
             ("--model", getattr(args, "model", None), "an exported .onnx or .pt2 file (csfrn export)")]
    if getattr(args, "resume", None) != "auto":
        files.append(("--resume", getattr(args, "resume", None), "a checkpoint file, or 'auto'"))
    for flag, path, expected in files:
        if path is not None and not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "no such file"
            raise MissingPathError(f"{flag} {path}: {what} (expected {expected})")
    model = getattr(args, "model", None)
    if model is not None and os.path.splitext(model)[1].lower() not in (".onnx", ".pt2"):
        raise UsageError(f"--model {model}: unsupported file type {os.path.splitext(model)[1] or '(no suffix)'}; "
                         f"expected an exported model ending in .onnx or .pt2 (csfrn export)")
    for path in getattr(args, "input", None) or []:
        if not os.path.exists(path):
            raise MissingPathError(f"--input {path}: no such file or directory (expected image files or folders "
                                   f"of images)")


def _one_line(err):
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


# csfrn flops flags: (flag, model key, type); bool flags set the key to the flag's meaning.
_FLOPS_FLAGS = [("--head", "head", str), ("--backbone", "backbone", str), ("--num-classes", "num_classes", int),
                ("--fusion", "fusion", str), ("--embed-dim", "embed_dim", int),
                ("--output-stride", "output_stride", int), ("--no-csflm", "csflm=false", bool),
                ("--no-margins", "margins=false", bool), ("--multi-grid", "multi_grid=true", bool)]


def _flops(args):
    """Count the model of --config / --set / the flags (every model key, ``pretrained`` never read)."""
    import dataclasses
    from .models.complexity import count_model
    for flag, key, kind in _FLOPS_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if kind is bool and value:
            args.overrides.append(f"model.{key}")
        elif kind is not bool and value is not None:
            args.overrides.append(f"model.{key}={value}")
    cfg = _config(args)
    size = args.size or (cfg.data.crop_size if args.config else [512])
    if not 1 <= len(size) <= 2 or min(size) < 1:
        raise UsageError(f"--size takes H or H W (positive), got {' '.join(str(v) for v in size)}")
    size = (size[0], size[-1])
    try:
        count_model(dataclasses.asdict(cfg.model), size)
    except ValueError as err:          # an unknown head / output stride that the config let through
        raise UsageError(str(err))
    return 0


def _bench(args):
    """``csfrn bench --what X [X's options]`` (``bench-ops`` is ``bench --what ops``): X's own parser takes the
    rest of the command line, so an option X does not take is an error, not dropped."""
    what = args.what or ("ops" if args.verb == "bench-ops" else "train")
    module, parser = _bench_parser(what)
    module.main(args.extra, parser=parser)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb not in ("bench-ops", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    verb = "bench" if args.verb == "bench-ops" else args.verb   # the alias is bench --what ops
    from .engine.interrupt import raise_interrupted, signal_name
    previous = signal.signal(signal.SIGTERM, raise_interrupted)   # SIGTERM as Ctrl-C: one line, not a kill
    try:
        _check_paths(args)
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
        if int(os.environ.get("RANK", "0")) == 0:   # under torchrun: one line, from rank 0
            print(f"csfrn {verb}: {str(err) or 'interrupted by ' + signal_name(signum)}", file=sys.stderr,
                  flush=True)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)


def _shipped_configs():
    """The configs in the checkout's configs/ folder (not the _base_ parts), relative to the current folder."""
    import glob
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    found = sorted((p for p in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)
                    if "_base_" not in p.split(os.sep)), key=lambda p: (not p.endswith("demo.yaml"), p))
    return [os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p for p in found]


def _paths(args, cfg, **keys):
    """Config keys set from flags that are paths (never YAML: "exp #1", 2024 and on stay file names)."""
    from .engine.config import validate
    for key, value in keys.items():
        if value is not None:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    return validate(cfg)


def _train(args):
    if args.config is None:
        shipped = _shipped_configs()
        more = f" ({len(shipped) - 6} more in configs/)" if len(shipped) > 6 else ""
        raise UsageError(f"--config is required (a YAML recipe; the built-in defaults are only a base), e.g. one of "
                         f"{', '.join(shipped[:6])}{more}")
    from .engine.outputs import writable_dir
    from .engine.train import check_work_dir, train
    cfg = _paths(args, _config(args), **{"train.work_dir": args.work_dir, "train.resume": args.resume})
    writable_dir(cfg.train.work_dir, "--work-dir" if args.work_dir else "train.work_dir")
    check_work_dir(cfg.train, args.overwrite)   # never replace a previous run's outputs silently
    train(cfg, overwrite=args.overwrite, resume_changed=args.resume_changed)
    return 0


def _eval(args):
    from .engine.evaluate import evaluate_checkpoint
    from .engine.outputs import writable_dir
    writable_dir(args.out or os.path.dirname(os.path.abspath(args.checkpoint)), "--out")
    evaluate_checkpoint(args.checkpoint, args.split, args.out, not args.no_consistency, args.config, args.overrides,
                        overwrite=args.overwrite)
    return 0


def _predict(args):
    from tqdm import tqdm
    from .engine.evaluate import predict_files
    from .engine.outputs import writable_dir
    writable_dir(args.out, "--out")
    written, failed, total = predict_files(
        args.input, args.out, args.checkpoint, args.model, args.config, args.overrides, args.cityscapes_ids,
        on_error=lambda path, why: tqdm.write(f"csfrn predict: skipped {path}: {why}", file=sys.stderr),
        overwrite=args.overwrite)
    print(f"csfrn predict: {len(written)} of {total} images predicted into {args.out}, {len(failed)} failed",
          file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _export(args):
    from .deploy import export_from_checkpoint
    from .engine.outputs import writable_file
    writable_file(args.out, "--out")
    return export_from_checkpoint(args.checkpoint, args.out, args.size, opset=args.opset, dynamic=args.dynamic,
                                  check=not args.no_check, overwrite=args.overwrite, config=args.config,
                                  overrides=args.overrides)


def _points(values):
    """--points Y,X ... -> [(y, x), ...]."""
    try:
        points = [tuple(int(v) for v in p.split(",")) for p in values]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 for p in points):
        raise UsageError(f"--points takes Y,X pairs of integers, got {' '.join(values)}")
    return points


def _picture_path(out):
    """--out of visualize: a PNG file, or a folder (existing, ending in /, or without an extension) that gets
    figure3.png."""
    from PIL import Image
    if out.endswith(("/", os.sep)) or os.path.isdir(out) or not os.path.splitext(out)[1]:
        out = os.path.join(out, "figure3.png")
    if os.path.splitext(out)[1].lower() not in Image.registered_extensions():
        raise UsageError(f"--out {out}: unknown picture extension {os.path.splitext(out)[1]} (use .png)")
    return out


def _visualize(args):
    from .engine.visualize import visualize_checkpoint
    points = _points(args.points) if args.points else None
    if args.scale is not None and args.scale < 1:
        raise UsageError(f"--scale must be a positive integer, got {args.scale}")
    from .engine.outputs import refuse_or_remove, writable_file
    path = writable_file(_picture_path(args.out), "--out")
    if not args.overwrite:   # with it the picture is replaced once the new one is drawn
        refuse_or_remove([path], False, f"--out {path}", "a picture")
    try:
        path = visualize_checkpoint(args.checkpoint, path, args.split, args.indices, points,
                                    args.scale, args.config, args.overrides)
    except ValueError as err:      # indices / points out of range, a model without CSFLM, a bad extension
        raise UsageError(str(err))
    print(f"wrote {path}")
    return 0


def _demo(args):
    from .engine.demo import DEMO_CONFIG, DEMO_OUTPUTS, run_demo
    from .engine.outputs import refuse_or_remove, writable_dir
    if args.config is None and os.path.isfile(DEMO_CONFIG):
        args.config = DEMO_CONFIG
    _config(args)  # report bad keys before any work
    _at_least_one("--seeds", args.seeds)
    _at_least_one("--iters", args.iters)
    _one_of(args)
    writable_dir(args.out, "--out")
    if not args.resume:
        refuse_or_remove([os.path.join(args.out, name) for name in DEMO_OUTPUTS], args.overwrite, f"--out {args.out}",
                         "a previous demo (continue it with --resume auto)")
    args.overrides.insert(0, f"train.iters={args.iters}")   # a --set train.iters=N given too wins
    run_demo(args.out, args.config, args.overrides, seeds=args.seeds, resume=bool(args.resume))
    return 0


def _ablate(args):
    from .engine.ablate import ABLATE_OUTPUTS, ablate, parse_variants
    from .engine.outputs import refuse_or_remove, writable_dir
    variants = parse_variants(args.variants)
    _at_least_one("--seeds", args.seeds)
    _one_of(args)
    writable_dir(args.out, "--out")
    if args.overwrite:   # without it, finished runs in --out are reused and the report is made again from them
        refuse_or_remove([os.path.join(args.out, name) for name in ABLATE_OUTPUTS], True, f"--out {args.out}", "")
    ablate(args.config, variants, args.seeds, args.out, args.overrides, split=args.split,
           keep_checkpoints=args.keep_checkpoints, report_only=args.report_only, resume=bool(args.resume))
    return 0


def _print_config(args):
    from .engine.run_files import config_yaml
    sys.stdout.write(config_yaml(_config(args)))
    return 0


def _plot(args):
    from .engine.browse import plot_runs
    from .engine.outputs import refuse_or_remove, writable_file
    path = writable_file(args.out, "--out")
    if not args.overwrite:   # with it the picture is replaced once the new one is drawn
        refuse_or_remove([path], False, f"--out {path}", "a picture")
    print(f"wrote {plot_runs(args.work_dirs, path)}")
    return 0


def _browse(args):
    import glob
    from .engine.browse import browse_dataset
    from .engine.outputs import refuse_or_remove, writable_dir
    cfg = _config(args)
    split = args.split or cfg.data.val_split
    writable_dir(args.out, "--out")
    old = sorted(glob.glob(os.path.join(glob.escape(args.out), f"{glob.escape(split)}_*.png")))
    refuse_or_remove(old, args.overwrite, f"--out {args.out}", f"pictures of split '{split}'")
    paths = browse_dataset(cfg, split, args.out, args.n, args.augmented)
    print(f"wrote {len(paths)} pictures to {args.out}")
    return 0


def _one_of(args):
    if args.overwrite and args.resume:
        raise UsageError("--overwrite starts over and --resume continues: give one of them")


def _at_least_one(flag, value):
    if value < 1:
        raise ConfigError(f"{flag} must be at least 1, got {value}")


if __name__ == "__main__":
    sys.exit(main())
