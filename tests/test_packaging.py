"""The package as users get it: the sdist holds every source a build from a clean folder needs (every csrc/ file,
the .cu files included, the shipped configs, what setup.py reads), and the shipped configs are found by name from
any folder (``--config NAME``, ``csfrn config --list``). The wheel itself is built, installed into a fresh venv
and run from another folder by .ci/wheel-smoke (too slow for the test suite: it compiles the extension)."""

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT, SHIPPED, shipped_configs
from csfrn import configs
from csfrn.engine.config import load_config
from csfrn.errors import MissingPathError

# Besides csrc/ and the packages: what setup.py reads or the build backend needs.
ESSENTIALS = ["setup.py", "pyproject.toml", "requirements.txt", "README.md", "MANIFEST.in"]
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", "*.pyc", "runs", "demo_out", "results"
)


def _checkout_files():
    """The checkout's files as a fresh clone has them (git's tracked and untracked-but-not-ignored files), or, outside
    a git checkout, every file but build outputs."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        return sorted(f for f in out.splitlines() if os.path.isfile(os.path.join(ROOT, f)))
    except (OSError, subprocess.CalledProcessError):
        found = []
        for folder, subdirs, files in os.walk(ROOT):
            subdirs[:] = [d for d in subdirs if not IGNORED(folder, [d])]
            found += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if not IGNORED(folder, [f])]
        return sorted(found)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist built from a copy of the checkout (the build writes csfrn.egg-info next to setup.py) through the
    PEP 517 hook that `python -m build --sdist --no-isolation` and pip call. Returns (member names, checkout files)."""
    tmp = tmp_path_factory.mktemp("sdist")
    files = _checkout_files()
    src = tmp / "src"
    for name in files:
        if name.startswith(("benchmarks/results/", "docs/")):  # large, and never in the sdist
            continue
        os.makedirs(src / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), src / name)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp / "dist")], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    archive = tmp / "dist" / result.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
    top = {m.split("/")[0] for m in members}
    assert top == {"csfrn-0.1.0"}, top
    return {m.split("/", 1)[1] for m in members}, files


def test_sdist_holds_every_source_the_build_needs(sdist):
    members, files = sdist
    csrc = [f for f in files if f.startswith("csrc/")]
    assert (
        "csrc/op_schemas.h" in csrc
        and any(f.endswith(".cu") for f in csrc)
        and any(f.startswith("csrc/common/") for f in csrc)
    )
    missing = [f for f in csrc + ESSENTIALS if f not in members]
    assert not missing, f"not in the sdist: {missing}"
    package = [f for f in files if f.startswith("csfrn/") and f.endswith((".py", ".yaml"))]
    assert [f for f in package if f not in members] == []
    assert {f"csfrn/configs/{name}.yaml" for name in shipped_configs()} <= members
    assert any(m.startswith("csfrn/configs/_base_/") for m in members)  # the parts the configs include
    assert not [m for m in members if m.endswith((".so", ".pyc")) or m.startswith(("tests/", "build/"))]


def test_shipped_configs_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the names are the package's
    assert configs.names() == shipped_configs()
    assert "demo" in configs.names() and "cityscapes/psp_r50_769_40k" in configs.names()
    assert not [n for n in configs.names() if "_base_" in n]
    path = os.path.join(SHIPPED, "cityscapes", "psp_r50_769_40k.yaml")
    for given in (
        "cityscapes/psp_r50_769_40k",
        "cityscapes/psp_r50_769_40k.yaml",
        "configs/cityscapes/psp_r50_769_40k.yaml",
    ):
        assert os.path.samefile(configs.find_config(given), path), given
    cfg = load_config("cityscapes/psp_r50_769_40k")  # its _base_ parts resolve inside the package
    assert cfg.model.head == "psp" and cfg.data.dataset == "cityscapes" and cfg.train.iters == 40000
    # a file of one's own wins over the shipped config of the same name
    (tmp_path / "demo.yaml").write_text("train:\n  iters: 7\n")
    assert load_config("demo.yaml").train.iters == 7 and load_config("demo").train.iters != 7
    for bad in ("nope", "../csfrn/configs/demo", "cityscapes", str(tmp_path / "missing.yaml")):
        with pytest.raises(MissingPathError, match="csfrn config --list"):
            configs.find_config(bad, "--config")


def test_config_list_names_every_shipped_config(capsys):
    from csfrn.cli import main

    assert main(["config", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines[:-1]]
    assert listed == shipped_configs()
    assert all(len(line) <= 120 for line in lines[:-1])
    assert lines[[n for n in listed].index("demo")].split(None, 1)[1].startswith("csfrn demo:")
