"""The shipped configs: YAML recipes installed with the package (the paper's settings per dataset / head /
backbone, ``plug/`` for other libraries' models with CSFLM, ``demo``), and how ``--config`` finds one.

A shipped config is named by its path in this folder without ``.yaml``: ``demo``, ``cityscapes/psp_r50_769_40k``,
``plug/smp_unet_r34`` (``csfrn config --list`` prints every name). ``--config X`` reads the file X when there is
one; otherwise X must name a shipped config, given as the name, with ``.yaml``, or with a leading ``configs/``
(``configs/demo.yaml``, the form a checkout's commands used before the configs moved into the package). So a
file of your own always wins over a shipped config of the same name. The ``_base_/`` files are the parts the
others include (``_base_`` paths are relative to the file naming them); they are not listed.
"""

import importlib.resources
import os
import textwrap

from ..errors import MissingPathError

BASES = "_base_"
SUFFIX = ".yaml"


def root():
    """The folder that holds the shipped configs. The package is installed as files (``zip_safe=False``), so
    importlib.resources gives a real folder, which the ``_base_`` includes (paths relative to a file) need."""
    return os.fspath(importlib.resources.files(__name__))


def names():
    """Every shipped config's name (not the ``_base_`` parts), sorted."""
    top = root()
    found = []
    for folder, subdirs, files in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if d != BASES)
        found += [
            os.path.relpath(os.path.join(folder, f), top)[: -len(SUFFIX)].replace(os.sep, "/")
            for f in files
            if f.endswith(SUFFIX)
        ]
    return sorted(found)


def shipped_path(name):
    """The file of the shipped config ``name`` (``demo``, ``demo.yaml``, ``configs/demo.yaml``), or None."""
    name = name.replace(os.sep, "/")
    for prefix in ("configs/", "./configs/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if not name.endswith(SUFFIX):
        name += SUFFIX
    if os.path.isabs(name) or ".." in name.split("/"):
        return None
    path = os.path.join(root(), *name.split("/"))
    return path if os.path.isfile(path) else None


def find_config(path, what="config file"):
    """``path`` when it is a file, else the shipped config it names; else a one-line error that names ``what``
    (e.g. ``--config``) and says how to see the shipped names."""
    if os.path.isfile(path):
        return path
    shipped = shipped_path(path)
    if shipped is not None:
        return shipped
    problem = "is a directory" if os.path.isdir(path) else "no such file"
    raise MissingPathError(
        f"{what} {path}: {problem}, and no shipped config has that name (expected a YAML config "
        f"file, or a name that `csfrn config --list` prints, e.g. demo)"
    )


def describe(name):
    """The first sentence of a shipped config's header comment ('' without one)."""
    lines = []
    with open(shipped_path(name), encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = text.find(". ")
    return text[: end + 1] if end >= 0 else text


def listing(columns=120):
    """What ``csfrn config --list`` prints: one line per shipped config, its name and what it is (shortened to
    ``columns`` characters)."""
    all_names = names()
    width = max(map(len, all_names), default=0)
    lines = [
        f"{name:<{width}}  {textwrap.shorten(describe(name), columns - width - 2, placeholder=' ...')}".rstrip()
        for name in all_names
    ]
    return (
        "\n".join(
            lines
            + [f"(--config NAME reads one; `csfrn config --config NAME` prints it resolved; the files are in {root()})"]
        )
        + "\n"
    )
