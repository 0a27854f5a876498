"""What several verbs share: the ``--config`` / ``--set`` / ``--debug`` options, ``--overwrite``, the config they
resolve to, and the checks of the paths named on the command line."""

import os

from ..configs import find_config
from ..engine.config import load_config, validate
from ..errors import ConfigError, MissingPathError, UsageError


def add_config_options(parser):
    """The options every verb but bench and plot takes."""
    parser.add_argument("--config", help="YAML config (sections model / data / train / eval)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.02 (repeatable)",
    )
    add_debug(parser)


def add_debug(parser):
    parser.add_argument("--debug", action="store_true", help="on a user error, show the traceback too")


def add_overwrite(parser, what):
    parser.add_argument("--overwrite", action="store_true", help=f"{what}; without it existing outputs are refused")


def config(args, base=None):
    """The config of ``--config`` with the ``--set`` overrides (on ``base``)."""
    return load_config(args.config, args.overrides, base)


def set_paths(cfg, keys):
    """``cfg`` with the config keys ``{"section.name": value}`` set from flags that are paths (never read as YAML:
    "exp #1", 2024 and on stay file names; None leaves a key as it is), validated again."""
    for key, value in keys.items():
        if value is not None:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    return validate(cfg)


def check_paths(args):
    """The files and folders named on the command line exist, before any work starts."""
    if args.config is not None:  # a YAML file, or a shipped config's name (csfrn.configs)
        args.config = find_config(args.config, "--config")
    files = [
        ("--checkpoint", getattr(args, "checkpoint", None), "a checkpoint file (best.pth / last.pth)"),
        ("--model", getattr(args, "model", None), "an exported .onnx or .pt2 file (csfrn export)"),
    ]
    if getattr(args, "resume", None) != "auto":
        files.append(("--resume", getattr(args, "resume", None), "a checkpoint file, or 'auto'"))
    for flag, path, expected in files:
        if path is not None and not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "no such file"
            raise MissingPathError(f"{flag} {path}: {what} (expected {expected})")
    model = getattr(args, "model", None)
    if model is not None and os.path.splitext(model)[1].lower() not in (".onnx", ".pt2"):
        raise UsageError(
            f"--model {model}: unsupported file type {os.path.splitext(model)[1] or '(no suffix)'}; "
            f"expected an exported model ending in .onnx or .pt2 (csfrn export)"
        )
    for path in getattr(args, "input", None) or []:
        if not os.path.exists(path):
            raise MissingPathError(
                f"--input {path}: no such file or directory (expected image files or folders of images)"
            )


def one_of(args):
    if args.overwrite and args.resume:
        raise UsageError("--overwrite starts over and --resume continues: give one of them")


def at_least_one(flag, value):
    if value < 1:
        raise ConfigError(f"{flag} must be at least 1, got {value}")
