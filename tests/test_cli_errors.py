"""User mistakes end as one line, ``csfrn <verb>: error: ...`` on stderr with exit status 2 (issue 14, "One-line
errors"). Each case runs the real entry point (``python -m csfrn.cli``) in a subprocess on a tiny config."""

import os
import subprocess
import sys

import numpy as np
import pytest

from csfrn import cli
from csfrn.commands import eval as eval_verb, train as train_verb
from csfrn.data import FolderDataset
from csfrn.engine.config import Config, check_training, load_config
from csfrn.errors import ConfigError, DataError, UserError

from conftest import TINY_CONFIG, rgb, tiny_overrides, write_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def csfrn(*args, env=None):
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "csfrn.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


def assert_user_error(result, verb, *needles):
    """Exit status 2, stderr exactly one line ``csfrn <verb>: error: ...`` holding every needle, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"csfrn {verb}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tiny_train(work, *extra, iters=1):
    return ["train", "--config", TINY_CONFIG, *_sets(tiny_overrides(work, iters=iters)), *_sets(extra)]


# ---------------------------------------------------------------- config: --set and YAML files
@pytest.mark.parametrize(
    "override, needles",
    [
        ("data.crop_size=[64,64", ["--set data.crop_size=[64,64", "malformed value for 'data.crop_size'", "expected"]),
        ("data.crop_size", ["--set data.crop_size", "key=value"]),
        ("train.lrr=0.1", ["unknown config key 'train.lrr'", "known in 'train'", "lr"]),
        ("data.batch_size=big", ["'data.batch_size'", "expects an integer", "'big'"]),
        ("data.crop_size=[64,x]", ["'data.crop_size[1]'", "expects an integer"]),
    ],
)
def test_malformed_set(tmp_path, override, needles):
    assert_user_error(csfrn(*tiny_train(tmp_path), "--set", override), "train", *needles)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  head: fcn\ntrain:\n  lr: [0.01\n  iters: 10\n")
    line = assert_user_error(
        csfrn(*tiny_train(tmp_path), "--config", path), "train", str(path), "YAML syntax", "line 5"
    )
    assert "expected ',' or ']'" in line
    path.write_text("modle:\n  head: fcn\n")
    assert_user_error(csfrn("train", "--config", path), "train", str(path), "unknown config key 'modle'")
    path.write_text("- a list\n")
    assert_user_error(csfrn("train", "--config", path), "train", str(path), "expected a mapping")


def test_yaml_numbers_written_with_an_exponent_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "train:\n  lr: 1e-3\n  min_lr: 1E-5\n  iters: 4e4\n  warmup_ratio: .5e-2\n"
        "model:\n  loss_weights: {cac: 2e-1}\neval:\n  scales: [5e-1, 1]\n"
    )
    cfg = load_config(str(path))
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == 1e-5 and cfg.train.warmup_ratio == 0.005
    assert cfg.train.iters == 40000 and isinstance(cfg.train.iters, int)
    assert cfg.model.loss_weights == {"cac": 0.2} and cfg.eval.scales == [0.5, 1.0]
    assert load_config(None, ["train.lr=2e-2"]).train.lr == 0.02
    with pytest.raises(ConfigError, match="'train.iters' expects an integer, got '1.5e0'"):
        load_config(None, ["train.iters=1.5e0"])
    with pytest.raises(ConfigError, match="'train.lr' expects a number"):
        load_config(None, ["train.lr=fast"])


# ---------------------------------------------------------------- names with a fixed set of choices
@pytest.mark.parametrize(
    "override, needles",
    [
        ("model.head=upernet", ["'model.head' is 'upernet'", "expected one of deeplabv3plus, fcn, nonlocal, psp"]),
        ("train.device=gpu", ["'train.device' is 'gpu'", "expected one of auto, cpu, cuda"]),
        (
            "data.dataset=voc",
            [
                "'data.dataset' is 'voc'",
                "expected one of cityscapes, ade20k, coco_stuff, pascal_context, folder, synthetic",
            ],
        ),
    ],
)
def test_unknown_names_list_the_choices(tmp_path, override, needles):
    assert_user_error(csfrn(*tiny_train(tmp_path), "--set", override), "train", *needles)


# ---------------------------------------------------------------- ranges, checked when the config is read
@pytest.mark.parametrize(
    "override, needles",
    [
        ("train.iters=0", ["'train.iters' must be an integer >= 1, got 0"]),
        ("train.iters=-3", ["'train.iters' must be an integer >= 1, got -3"]),
        ("data.batch_size=0", ["'data.batch_size' must be an integer >= 1, got 0"]),
    ],
)
def test_out_of_range_values(tmp_path, override, needles):
    # The dataset root does not exist either: the config is checked first, before any dataset or model.
    result = csfrn(
        *tiny_train(tmp_path),
        "--set",
        "data.dataset=cityscapes",
        "--set",
        f"data.root={tmp_path / 'nowhere'}",
        "--set",
        override,
    )
    assert_user_error(result, "train", *needles)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_validation_covers_the_whole_tree():
    for override, key in [
        ("eval.mode=sliding", "eval.mode"),
        ("train.amp=fp8", "train.amp"),
        ("model.fusion=sum", "model.fusion"),
        ("data.scale_range=[2.0,1.0]", "data.scale_range"),
        ("eval.crop_size=[0,512]", "eval.crop_size"),
        ("model.blocks=[1,1]", "model.blocks"),
        ("model.loss_weights={segg: 1}", "model.loss_weights"),
        ("train.lr=0", "train.lr"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])


def test_batch_of_one_per_process_with_batchnorm(tmp_path):
    line = assert_user_error(
        csfrn(*tiny_train(tmp_path), "--set", "data.batch_size=1"),
        "train",
        "'data.batch_size' is 1",
        "BatchNorm",
        "expected data.batch_size >= 2",
    )
    assert "1 sample per process (1 process)" in line
    # Under torchrun (WORLD_SIZE is read before any process group is joined).
    assert_user_error(
        csfrn(*tiny_train(tmp_path), "--set", "data.batch_size=3", env={"WORLD_SIZE": "2"}),
        "train",
        "'data.batch_size' is 3",
        "expected a multiple of 2",
    )
    assert_user_error(
        csfrn(
            *tiny_train(tmp_path), "--set", "data.batch_size=2", "--set", "train.sync_bn=false", env={"WORLD_SIZE": "2"}
        ),
        "train",
        "1 sample per process (2 processes)",
        "train.sync_bn=true or data.batch_size >= 4",
    )
    cfg = Config()
    cfg.data.batch_size = 2
    check_training(cfg, 1)
    check_training(cfg, 2)  # SyncBN pools the two processes' samples
    cfg.train.sync_bn = False
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_training(cfg, 2)


# ---------------------------------------------------------------- dataset folders
def test_missing_dataset_root_or_split_folder(tmp_path):
    root = tmp_path / "cityscapes"
    args = [
        *tiny_train(tmp_path / "run"),
        "--set",
        "data.dataset=cityscapes",
        "--set",
        f"data.root={root}",
        "--set",
        "model.num_classes=19",
    ]
    assert_user_error(csfrn(*args), "train", f"dataset root {root} does not exist", "data.root")
    (root / "gtFine" / "train").mkdir(parents=True)
    assert_user_error(csfrn(*args), "train", "Cityscapes images", f"expected a directory at {root}/leftImg8bit/train")
    assert_user_error(
        csfrn(*args, "--set", "data.train_split=training"),
        "train",
        "split 'training'",
        "expected one of train, val, test",
    )


def _folder(root, num_classes=4, size=(24, 32), n=3):
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"c{k}\n" for k in range(num_classes)))
    for split in ("train", "val"):
        for i in range(n):
            write_png(str(root / "images" / split / f"im{i}.png"), rgb(*size, seed=i))
            write_png(
                str(root / "masks" / split / f"im{i}.png"), np.random.default_rng(i).integers(0, num_classes, size)
            )
    return root


def _folder_train(tmp_path, root, workers=2):
    return [
        *tiny_train(tmp_path / "run"),
        "--set",
        "data.dataset=folder",
        "--set",
        f"data.root={root}",
        "--set",
        f"data.num_workers={workers}",
    ]


@pytest.mark.parametrize("mistake", ["value", "size", "rgb", "classes", "mask", "empty"])
def test_folder_dataset_mistakes_are_one_line_from_the_main_process(tmp_path, mistake):
    root = _folder(tmp_path / "data")
    mask = root / "masks" / "train" / "im1.png"
    if mistake == "value":
        write_png(str(mask), np.full((24, 32), 7))
        needles = [str(mask), "value 7 is not a valid class id", "expected 0..3 or 255"]
    elif mistake == "size":
        write_png(str(mask), np.zeros((20, 32)))
        needles = [str(mask), "has size (20, 32)", "(24, 32)", "expected the same height and width"]
    elif mistake == "rgb":
        write_png(str(mask), rgb(24, 32))
        needles = [str(mask), "expected a single-channel label image, got mode RGB"]
    elif mistake == "classes":
        (root / "classes.txt").unlink()
        needles = ["class list not found", f"expected {root / 'classes.txt'}"]
    elif mistake == "mask":
        mask.unlink()
        needles = ["no mask for", f"expected {mask}"]
    else:
        for name in os.listdir(root / "images" / "train"):
            os.unlink(root / "images" / "train" / name)
        needles = ["no images found for split 'train'", str(root / "images" / "train")]
    with pytest.raises(UserError) as err:  # found by the constructor, in the main process
        FolderDataset(str(root), "train")
    assert all(needle in str(err.value) for needle in needles)
    line = assert_user_error(csfrn(*_folder_train(tmp_path, root)), "train", *needles)
    assert "DataLoader worker" not in line


def test_an_error_inside_a_dataloader_worker_is_one_line(tmp_path):
    """A truncated image passes the header check in the main process and fails in a worker while decoding."""
    root = _folder(tmp_path / "data", size=(64, 64))
    image = root / "images" / "train" / "im2.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    result = csfrn(
        *_folder_train(tmp_path, root, workers=1), "--set", "train.iters=3", "--set", "data.crop_size=[32,32]"
    )
    line = assert_user_error(result, "train", f"cannot read image {image}")
    assert "Traceback" not in line and "worker" not in line
    debug = csfrn(
        *_folder_train(tmp_path, root, workers=1),
        "--set",
        "train.iters=3",
        "--set",
        "data.crop_size=[32,32]",
        "--debug",
    )
    assert debug.returncode == 2
    assert "in DataLoader worker process" in debug.stderr  # --debug keeps the worker's traceback
    assert debug.stderr.splitlines()[-1] == line


# ---------------------------------------------------------------- paths named on the command line
def test_missing_input_paths(tmp_path):
    ckpt = tmp_path / "exists.pth"
    ckpt.write_bytes(b"")  # never opened: the paths are checked before any work
    missing = tmp_path / "missing"
    assert_user_error(
        csfrn("predict", "--checkpoint", ckpt, "--input", tmp_path, missing, "--out", tmp_path / "o"),
        "predict",
        f"--input {missing}: no such file or directory",
        "expected image files",
    )
    assert not (tmp_path / "o").exists()
    assert_user_error(
        csfrn("eval", "--checkpoint", missing),
        "eval",
        f"--checkpoint {missing}: no such file",
        "expected a checkpoint file",
    )
    assert_user_error(
        csfrn("visualize", "--checkpoint", tmp_path, "--out", tmp_path / "v.png"),
        "visualize",
        f"--checkpoint {tmp_path}: is a directory",
    )
    assert_user_error(
        csfrn("train", "--config", missing), "train", f"--config {missing}: no such file", "expected a YAML config file"
    )
    assert_user_error(
        csfrn(*tiny_train(tmp_path), "--resume", missing),
        "train",
        f"--resume {missing}",
        "expected a checkpoint file, or 'auto'",
    )
    assert_user_error(
        csfrn(*tiny_train(tmp_path), "--set", f"train.resume={missing}"), "train", "'train.resume'", str(missing)
    )
    assert_user_error(
        csfrn(*tiny_train(tmp_path), "--set", f"model.pretrained={missing}"),
        "train",
        "'model.pretrained'",
        str(missing),
        "expected an ImageNet checkpoint file",
    )


# ---------------------------------------------------------------- the mechanism itself
def test_debug_shows_the_traceback(tmp_path):
    result = csfrn(*tiny_train(tmp_path), "--set", "train.iters=0", "--debug")
    assert result.returncode == 2
    assert result.stderr.startswith("Traceback") and "ConfigError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("csfrn train: error: config key 'train.iters'")


def test_bugs_keep_their_traceback(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_verb, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train"])
    monkeypatch.setattr(eval_verb, "run", lambda *args: (_ for _ in ()).throw(ConfigError("config key 'x' is bad")))
    assert cli.main(["eval", "--checkpoint", __file__]) == 2
    assert capsys.readouterr().err == "csfrn eval: error: config key 'x' is bad\n"


def test_user_errors_are_still_the_builtin_types():
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    with pytest.raises(KeyError, match="train.lrr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")
    err = DataError(
        "Caught DataError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
        "  File \"x.py\", line 1, in f\ncsfrn.errors.DataError: label a.png: value 7\n"
    )
    assert str(err) == "label a.png: value 7" and "worker process 3" in err.worker_traceback
    assert isinstance(err, UserError)


def test_a_missing_extension_says_how_to_build_it():
    """Without the compiled csfrn._C (not built, or built for another torch), importing the ops says what to run."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'csfrn._C':\n"
        "            raise ImportError('undefined symbol: _ZN3c10 (simulated)')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import csfrn.ops\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: csfrn's compiled extension csfrn._C could not be loaded (undefined symbol")
    assert "make setup" in last and "pip install --no-build-isolation -e ." in last


def test_a_diverging_training_is_one_line_naming_the_iteration(tmp_path):
    r = csfrn(*tiny_train(tmp_path / "w", "train.lr=1e30", iters=3))
    assert_user_error(r, "train", "loss is not finite at iteration", "train.lr")
