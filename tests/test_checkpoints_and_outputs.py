"""Issue 14: checkpoints that work anywhere, and no output destroyed silently. CLI behaviour is checked through
the real entry point (``python -m csfrn.cli``) in a subprocess, on tiny models."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from csfrn import cli
from csfrn.engine import checkpoint as ckpt
from csfrn.engine.config import load_config
from csfrn.engine.checkpoint import build_model_from_config, checkpoint_config
from csfrn.engine.train import check_work_dir, train

from conftest import TINY_CONFIG, rgb, tiny_overrides, write_jpg, write_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def csfrn(*args, cwd=None):
    """``csfrn ARGS`` in a fresh process on this checkout's code."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "csfrn.cli", *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(result, verb, *phrases):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"csfrn {verb}: error: "), result.stderr[-2000:]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained from an "ImageNet" backbone file (model.pretrained) that is deleted afterwards."""
    root = tmp_path_factory.mktemp("pretrained_run")
    imagenet = root / "imagenet.pth"
    base = load_config(None, tiny_overrides(root / "unused"))
    torch.save(build_model_from_config(base.model).backbone.state_dict(), imagenet)
    overrides = tiny_overrides(root / "work", iters=2, extra=[f"model.pretrained={imagenet}", "train.eval_interval=2"])
    assert cli.main(["train", "--config", TINY_CONFIG, *_sets(overrides)]) == 0
    imagenet.unlink()
    return {"work": root / "work", "overrides": overrides, "imagenet": imagenet}


# ---------------------------------------------------------------- checkpoints that work anywhere
def test_checkpoint_needs_no_pretrained_file(run, tmp_path):
    """eval, predict, visualize and --resume all work once model.pretrained's file is gone."""
    best, work = run["work"] / "best.pth", run["work"]
    assert ckpt.load_checkpoint(best)["config"]["model"]["pretrained"] == str(run["imagenet"])
    with pytest.raises(FileNotFoundError):  # the file really is gone: building *with* it fails
        build_model_from_config(load_config(None, [*run["overrides"]]).model)

    r = csfrn("eval", "--checkpoint", best, "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads((tmp_path / "eval" / "eval_val.json").read_text())["IoU"]) == 4
    write_png(str(tmp_path / "in" / "x.png"), rgb(20, 28))
    r = csfrn("predict", "--checkpoint", best, "--input", tmp_path / "in", "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "pred" / "x_trainid.png").is_file()
    r = csfrn("visualize", "--checkpoint", best, "--out", tmp_path / "fig.png", "--points", "5,5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "fig.png").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(work, resumed)
    r = csfrn(
        "train",
        "--config",
        TINY_CONFIG,
        *_sets(run["overrides"]),
        "--set",
        f"train.work_dir={resumed}",
        "--set",
        "train.iters=3",
        "--resume",
        "auto",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {resumed / 'last.pth'} at iteration 2" in r.stdout
    assert ckpt.load_checkpoint(resumed / "last.pth")["iter"] == 3


def test_every_verb_builds_its_model_with_the_one_function(run, tmp_path, monkeypatch):
    calls = []
    real = ckpt.load_model_from_checkpoint
    monkeypatch.setattr(ckpt, "load_model_from_checkpoint", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    best = str(run["work"] / "best.pth")
    write_png(str(tmp_path / "in" / "x.png"), rgb(20, 28))
    assert cli.main(["eval", "--checkpoint", best, "--out", str(tmp_path)]) == 0
    assert (
        cli.main(["predict", "--checkpoint", best, "--input", str(tmp_path / "in"), "--out", str(tmp_path / "pred")])
        == 0
    )
    assert cli.main(["visualize", "--checkpoint", best, "--out", str(tmp_path / "f.png")]) == 0
    assert (
        cli.main(["export", "--checkpoint", best, "--out", str(tmp_path / "m.pt2"), "--size", "32", "32", "--no-check"])
        == 0
    )
    assert calls == [best] * 4
    assert not hasattr(cli, "_model_and_config")


def test_a_config_file_is_layered_on_the_checkpoint_config(run, tmp_path):
    best = run["work"] / "best.pth"
    (tmp_path / "eval.yaml").write_text("eval:\n  mode: whole\n  max_images: 2\n")
    # the training machine's device is not inherited: a checkpoint from train.device=cuda works on a CPU box
    state = ckpt.load_checkpoint(best)
    state["config"]["train"]["device"] = "cuda"
    cfg = checkpoint_config(state, str(tmp_path / "eval.yaml"), ["eval.flip=true"])
    assert (cfg.model.head, cfg.model.num_classes, cfg.model.width) == ("fcn", 4, 8)  # the checkpoint's
    assert cfg.data.dataset == "synthetic" and cfg.data.size == 32
    assert cfg.eval.max_images == 2 and cfg.eval.flip  # file, then --set
    assert cfg.train.device == "auto"

    r = csfrn("eval", "--checkpoint", best, "--config", tmp_path / "eval.yaml", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads((tmp_path / "o" / "eval_val.json").read_text())["IoU"]) == 4


def _bad_checkpoints(best, d):
    data = best.read_bytes()
    (d / "empty.pth").write_bytes(b"")
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    (d / "notes.pth").write_text("these are not weights\n")
    torch.save(ckpt.load_checkpoint(best)["model"], d / "bare.pth")
    torch.save({"state_dict": ckpt.load_checkpoint(best)["model"], "meta": {}}, d / "mmseg.pth")
    (d / "five.yaml").write_text("model:\n  num_classes: 5\n")


@pytest.mark.parametrize(
    "name, args, phrases",
    [
        ("missing.pth", [], ["no such file", "missing.pth"]),
        ("empty.pth", [], ["empty.pth is empty (0 bytes)"]),
        ("truncated.pth", [], ["truncated.pth is truncated or corrupt"]),
        ("notes.pth", [], ["notes.pth is not a PyTorch checkpoint file"]),
        ("bare.pth", [], ["bare.pth is a bare state_dict", "load_state_dict"]),
        ("mmseg.pth", [], ["mmseg.pth is an mmcv / mmsegmentation checkpoint"]),
        ("best.pth", ["--set", "model.num_classes=5"], ["best.pth has 4 classes, the config asks for 5"]),
        ("best.pth", ["--config", "five.yaml"], ["best.pth has 4 classes, the config asks for 5"]),
        (
            "best.pth",
            ["--set", "model.channels=32"],
            ["best.pth does not fit the configured model", "channels: checkpoint 16, config 32"],
        ),
    ],
)
def test_loading_errors_name_the_file_and_the_problem(run, tmp_path, name, args, phrases):
    _bad_checkpoints(run["work"] / "best.pth", tmp_path)
    path = run["work"] / "best.pth" if name == "best.pth" else tmp_path / name
    args = [str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    r = csfrn("eval", "--checkpoint", path, *args)
    assert_one_line_error(r, "eval", *phrases)


def test_resume_errors_name_the_file(run, tmp_path):
    work = tmp_path / "w"
    r = csfrn(
        "train",
        "--config",
        TINY_CONFIG,
        *_sets(run["overrides"]),
        "--set",
        f"train.work_dir={work}",
        "--resume",
        run["work"] / "best.pth",
    )
    assert_one_line_error(r, "train", "best.pth holds model weights only", "cannot be resumed from", "last.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="empty.pth is empty"):  # the library's error
        train(
            load_config(None, [*run["overrides"], f"train.work_dir={work}", f"train.resume={tmp_path / 'empty.pth'}"])
        )


def test_unsafe_checkpoint_is_refused_in_one_line(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Evil(), "config": {}}, f, protocol=2)
    r = csfrn(
        "predict", "--checkpoint", tmp_path / "evil.pth", "--input", tmp_path / "evil.pth", "--out", tmp_path / "o"
    )
    assert_one_line_error(r, "predict", "evil.pth is refused", "system")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- never destroy output silently
def test_train_refuses_a_work_dir_with_a_run_unless_resume_or_overwrite(tmp_path):
    work = tmp_path / "w"
    first = tiny_overrides(work, iters=1, extra=["train.keep_checkpoints=true"])
    assert cli.main(["train", "--config", TINY_CONFIG, *_sets(first)]) == 0
    before = {n: (work / n).read_bytes() for n in ("last.pth", "best.pth", "metrics.jsonl", "iter_000001.pth")}

    again = tiny_overrides(work, iters=2, extra=["train.keep_checkpoints=true"])
    r = csfrn("train", "--config", TINY_CONFIG, *_sets(again))
    assert_one_line_error(r, "train", str(work), "last.pth", "--resume auto", "--overwrite")
    assert {n: (work / n).read_bytes() for n in before} == before  # nothing touched
    r = csfrn("train", "--config", TINY_CONFIG, *_sets(again), "--overwrite", "--resume", "auto")
    assert_one_line_error(r, "train", "--overwrite", "--resume")

    r = csfrn("train", "--config", TINY_CONFIG, *_sets(again), "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed" not in r.stdout
    assert ckpt.load_checkpoint(work / "last.pth")["iter"] == 2
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2]  # the new run's records only
    assert not (work / "iter_000001.pth").exists() and (work / "iter_000002.pth").is_file()


def test_work_dir_check_covers_best_only_and_auto_without_last(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path))
    assert check_work_dir(cfg.train) == []  # empty work_dir: fine
    (tmp_path / "best.pth").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="best.pth.*--overwrite"):
        check_work_dir(cfg.train)
    cfg.train.resume = "auto"  # no last.pth: best.pth alone never blocks it (a start at iteration 0)
    assert check_work_dir(cfg.train) == []
    cfg.train.resume = None
    (tmp_path / "notes.txt").write_text("mine")
    assert check_work_dir(cfg.train, overwrite=True) == [str(tmp_path / "best.pth")]  # only the run's files


def _write_16bit_png(path, array16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array16, dtype=np.uint16)).save(path)


def test_predict_mirrors_the_tree_skips_bad_images_and_reports(run, tmp_path):
    src = tmp_path / "in"
    write_png(str(src / "a" / "x.png"), rgb(20, 28, seed=1))
    write_jpg(str(src / "x.jpg"), rgb(24, 20, seed=2))
    gradient = (np.arange(24)[:, None] * np.ones(32)[None] * 2800).astype(np.uint16)  # 0 .. 64400
    _write_16bit_png(str(src / "deep" / "b" / "g16.png"), gradient)
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = (src / "a" / "x.png").read_bytes()
    (src / "a" / "cut.png").write_bytes(good[: len(good) // 2])
    out = src / "pred"  # inside the input folder: a second run must not predict it
    r = csfrn("predict", "--checkpoint", run["work"] / "best.pth", "--input", src, "--out", out)
    assert r.returncode == 1, r.stderr[-2000:]
    skipped = [line for line in r.stderr.splitlines() if "skipped" in line]
    assert (
        len(skipped) == 2
        and any(str(src / "bad.png") in s for s in skipped)
        and any(str(src / "a" / "cut.png") in s for s in skipped)
    ), r.stderr
    assert "3 of 5 images predicted" in r.stderr and "2 failed" in r.stderr
    for stem in ("a/x", "x", "deep/b/g16"):
        for kind in ("trainid", "color", "overlay"):
            assert (out / f"{stem}_{kind}.png").is_file(), (stem, kind)
    assert np.asarray(Image.open(out / "a" / "x_trainid.png")).shape == (20, 28)
    assert np.asarray(Image.open(out / "x_trainid.png")).shape == (24, 20)
    # the 16-bit image was read as a gradient, not as white: the overlay (half image) has dark pixels
    assert np.asarray(Image.open(out / "deep" / "b" / "g16_overlay.png")).min() < 64

    from csfrn.engine.evaluate import find_images

    assert len(find_images([str(src)], exclude=str(out))) == 5


def test_read_image_scales_16_bit_files(tmp_path):
    from csfrn.data._base import read_image

    values = np.array([[0, 257, 1000], [32768, 65280, 65535]], dtype=np.uint16)
    _write_16bit_png(str(tmp_path / "g.png"), values)
    image = read_image(str(tmp_path / "g.png"))
    expected = np.round(values / 257.0).astype(np.uint8)
    assert image.dtype == torch.uint8 and image.shape == (3, 2, 3)
    assert (image.numpy() == expected[None]).all()


def test_find_images_keeps_same_stems_apart(tmp_path):
    from csfrn.engine.evaluate import find_images

    write_png(str(tmp_path / "d" / "x.png"), rgb(4, 4))
    write_jpg(str(tmp_path / "d" / "x.jpg"), rgb(4, 4))
    write_png(str(tmp_path / "d" / "a" / "x.png"), rgb(4, 4))
    write_png(str(tmp_path / "e" / "x.png"), rgb(4, 4))
    stems = sorted(s for _, s in find_images([str(tmp_path / "d")]))
    assert stems == ["a/x", "x_jpg", "x_png"]
    both = sorted(s for _, s in find_images([str(tmp_path / "d" / "x.png"), str(tmp_path / "e")]))
    assert both == ["d/x", "e/x"]


def test_predict_input_errors(run, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    r = csfrn(
        "predict", "--checkpoint", run["work"] / "best.pth", "--input", tmp_path / "empty", "--out", tmp_path / "o"
    )
    assert_one_line_error(r, "predict", f"no images in {tmp_path / 'empty'}")
    r = csfrn(
        "predict", "--checkpoint", run["work"] / "best.pth", "--input", tmp_path / "nope", "--out", tmp_path / "o"
    )
    assert_one_line_error(r, "predict", f"{tmp_path / 'nope'}: no such file or directory")
    assert not (tmp_path / "o").exists()


def test_cityscapes_ids_need_cityscapes_classes(run, tmp_path):
    write_png(str(tmp_path / "in" / "berlin_000000_000019_leftImg8bit.png"), rgb(30, 40))
    r = csfrn(
        "predict",
        "--checkpoint",
        run["work"] / "best.pth",
        "--input",
        tmp_path / "in",
        "--out",
        tmp_path / "o",
        "--cityscapes-ids",
    )
    assert_one_line_error(r, "predict", "--cityscapes-ids", "has 4 classes", "data.dataset 'synthetic'")
    assert not (tmp_path / "o").exists()

    # a 19-class Cityscapes model (its data root is not on this machine: predict needs none)
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "w", extra=["model.num_classes=19", "data.dataset=cityscapes", f"data.root={tmp_path / 'gone'}"]
        ),
    )
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model)
    ckpt.save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "city.pth")
    r = csfrn(
        "predict",
        "--checkpoint",
        tmp_path / "city.pth",
        "--input",
        tmp_path / "in",
        "--out",
        tmp_path / "o",
        "--cityscapes-ids",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    train_ids = np.asarray(Image.open(tmp_path / "o" / "berlin_000000_000019_trainid.png"))
    label_ids = np.asarray(Image.open(tmp_path / "o" / "labelIds" / "berlin_000000_000019.png"))
    from csfrn.data.cityscapes import train_ids_to_label_ids

    assert train_ids.shape == (30, 40) and (label_ids == train_ids_to_label_ids(train_ids)).all()
