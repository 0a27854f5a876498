"""The csfrn CLI: every verb through main(), bad input, and a training run killed with SIGKILL that resumes."""

import json
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from csfrn import cli
from csfrn.engine.checkpoint import load_checkpoint

from conftest import ROOT, TINY_CONFIG, rgb, shipped_configs, sigkill_at_checkpoint, tiny_overrides, write_png


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CSFRN (concat fusion) trained for 3 iterations through `csfrn train`."""
    work = tmp_path_factory.mktemp("run")
    assert (
        cli.main(
            ["train", "--config", TINY_CONFIG, *_sets(tiny_overrides(work, iters=3, extra=["train.eval_interval=3"]))]
        )
        == 0
    )
    return work


def test_train_writes_checkpoints_metrics_and_report(trained):
    for name in ("last.pth", "best.pth", "metrics.jsonl", "val_last.json", "val_last.csv"):
        assert (trained / name).is_file(), name
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["kind"] == "train"]
    assert [r["iter"] for r in train_rows] == [1, 2, 3]
    assert {"seg", "aux", "cac", "smooth", "loss", "lr", "it/s", "images/s"} <= set(train_rows[0])
    assert train_rows[0]["loss"] == pytest.approx(
        sum(train_rows[0][k] for k in ("seg", "aux", "cac", "smooth")), rel=1e-5
    )
    assert [r["kind"] for r in records].count("val") == 1
    state = load_checkpoint(trained / "last.pth")
    assert state["iter"] == 3 and state["config"]["model"]["head"] == "fcn"
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "iter", "world_size"} <= set(state)
    assert "sampler" not in state  # never read: the sampler is a function of (seed, iteration)


def test_a_checkpoint_with_the_old_sampler_key_still_resumes(trained, tmp_path):
    state = load_checkpoint(trained / "last.pth")
    state["sampler"] = {"seed": 0, "iter": state["iter"], "batch_size": 2}  # what checkpoints used to hold
    old = tmp_path / "old.pth"
    torch.save(state, old)
    work = tmp_path / "resumed"
    overrides = tiny_overrides(work, iters=4, extra=[f"train.resume={old}", "train.eval_interval=0"])
    assert cli.main(["train", "--config", TINY_CONFIG, *_sets(overrides)]) == 0
    assert load_checkpoint(work / "last.pth")["iter"] == 4


def test_eval_predict_visualize(trained, tmp_path, capsys):
    ckpt = str(trained / "best.pth")
    assert cli.main(["eval", "--checkpoint", ckpt, "--out", str(tmp_path), "--set", "eval.flip=true"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "background" in out
    metrics = json.loads((tmp_path / "eval_val.json").read_text())
    assert 0 <= metrics["mIoU"] <= 1 and len(metrics["IoU"]) == 4
    assert "feature consistency, features F" in out and "feature consistency, embeddings B" in out
    assert set(metrics["consistency"]) == {"F", "B"} and metrics["consistency"]["F"]["intra"] >= 0

    write_png(str(tmp_path / "in" / "berlin_000000_000019_leftImg8bit.png"), rgb(30, 40))
    assert (
        cli.main(["predict", "--checkpoint", ckpt, "--input", str(tmp_path / "in"), "--out", str(tmp_path / "pred")])
        == 0
    )
    from PIL import Image

    names = sorted(os.listdir(tmp_path / "pred"))
    assert names == [
        "berlin_000000_000019_color.png",
        "berlin_000000_000019_overlay.png",
        "berlin_000000_000019_trainid.png",
    ]
    train_ids = np.asarray(Image.open(tmp_path / "pred" / "berlin_000000_000019_trainid.png"))
    assert train_ids.shape == (30, 40) and train_ids.max() < 4

    png = tmp_path / "fig3.png"
    assert (
        cli.main(
            [
                "visualize",
                "--checkpoint",
                ckpt,
                "--out",
                str(png),
                "--indices",
                "0",
                "1",
                "--points",
                "5,5",
                "20,10",
                "--scale",
                "4",
            ]
        )
        == 0
    )
    with Image.open(png) as img:
        # image, gt, pred + 2 maps per row, 2 rows of 4x upscaled 32 px tiles; titles above, colour bar and
        # legend below
        assert img.width == 4 + 5 * (4 * 32 + 4) and img.height > 20 + 4 + 2 * (4 * 32 + 4) + 46


def test_flops_uses_the_config(capsys):
    c = cli.main(["flops", "--config", "demo", "--size", "64"])
    assert c == 0
    out = capsys.readouterr().out
    assert (
        "deeplabv3plus resnet50c (num_classes 7, width 8, blocks [1, 1, 1, 1], channels 32, aux_channels 16) "
        "+CSFLM(aam, D=8) @ 64x64"
        in out
        and "GFLOPs" in out
    )


def test_bench_what_ops_takes_only_its_own_options(monkeypatch, capsys):
    calls = []

    def fake_main(argv, parser):
        calls.append(argv)
        parser.add_argument("--quick", action="store_true")
        return parser.parse_args(argv)

    monkeypatch.setitem(sys.modules, "csfrn.bench.ops", types.SimpleNamespace(main=fake_main, __doc__="ops"))
    assert cli.main(["bench", "--what", "ops", "--quick"]) == 0
    assert calls == [["--quick"]]
    assert cli.main(["bench", "--what", "ops", "--reps", "3"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "csfrn bench: error: unrecognized arguments: --reps 3 (see csfrn bench --what ops --help)"
    )
    with pytest.raises(SystemExit):  # the bench-ops alias is gone
        cli.main(["bench-ops", "--quick"])
    assert "invalid choice: 'bench-ops'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # other verbs take no extra options
        cli.main(["config", "--quick"])
    assert "unrecognized arguments: --quick" in capsys.readouterr().err


def test_every_verb_is_a_commands_module_with_the_same_shape():
    """csfrn.commands holds one module per verb (and _common); each gives its parser options, examples, its
    arguments and run(args), and cli.main dispatches to that run."""
    import importlib
    import pkgutil

    from csfrn import commands

    found = {m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")}
    assert found == set(commands.VERBS)
    for name in commands.VERBS:
        module = importlib.import_module(f"csfrn.commands.{name}")
        assert module.PARSER["help"] and module.EXAMPLES, name
        assert callable(module.add_arguments) and callable(module.run), name


def test_bench_dispatches_by_what(monkeypatch):
    calls = []
    monkeypatch.setitem(
        sys.modules,
        "csfrn.bench.train_step",
        types.SimpleNamespace(main=lambda argv, parser: calls.append(argv), __doc__="train"),
    )
    assert cli.main(["bench", "--what", "train", "--quick", "--reps", "1"]) == 0
    assert cli.main(["bench", "--quick"]) == 0  # train is the default
    assert calls == [["--quick", "--reps", "1"], ["--quick"]]
    with pytest.raises(SystemExit):
        cli.main(["bench", "--what", "nothing"])


def test_demo_writes_summary_and_pictures(tmp_path, ops_path, capsys):
    out = tmp_path / "demo"
    assert (
        cli.main(
            [
                "demo",
                "--out",
                str(out),
                "--iters",
                "2",
                "--set",
                "data.size=32",
                "--set",
                "data.crop_size=[32,32]",
                "--set",
                "data.val_length=2",
                "--set",
                "data.batch_size=2",
                "--set",
                "train.warmup_iters=0",
                "--seeds",
                "2",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    for name in ("csfrn", "baseline"):
        assert len(summary[name]["mIoU"]) == 2 and all(0 <= v <= 100 for v in summary[name]["mIoU"])
        assert "ratio" in summary[name]["consistency"][0]["F"]
    assert "B" in summary["csfrn"]["consistency"][0] and "B" not in summary["baseline"]["consistency"][0]
    assert summary["csfrn"]["params"] > summary["baseline"]["params"]
    d = summary["difference"]
    assert d["low"] <= d["mean"] <= d["high"] and summary["split"] == "test"
    assert summary["seconds"] > 0
    assert (out / "predictions.png").is_file() and (out / "figure3_distance_maps.png").is_file()
    printed = capsys.readouterr().out
    assert "paired by seed" in printed and "95% CI" in printed and "feature consistency" in printed


def test_sigkilled_training_resumes_from_an_intact_checkpoint(tmp_path):
    work = tmp_path / "run"
    overrides = tiny_overrides(work, iters=500, extra=["train.checkpoint_interval=2"])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "csfrn.cli", "train", "--config", TINY_CONFIG, *_sets(overrides)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last = work / "last.pth"
    sigkill_at_checkpoint(proc, last, 6)
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(last)  # never corrupt: the old file or the new one
    done = state["iter"]
    assert done >= 6 and done % 2 == 0
    final = done + 2
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "csfrn.cli",
            "train",
            "--config",
            TINY_CONFIG,
            *_sets(overrides),
            "--resume",
            "auto",
            "--set",
            f"train.iters={final}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {last} at iteration {done}" in resumed.stdout
    assert load_checkpoint(last)["iter"] == final
    assert not [n for n in os.listdir(work) if n.endswith(".tmp")]
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    iters = [r["iter"] for r in records if r["kind"] == "train"]
    assert iters == list(range(1, final + 1))  # records after the checkpoint are not duplicated


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_loads_and_builds(name):
    from csfrn.data import DATASETS
    from csfrn.engine.config import load_config
    from csfrn.engine.checkpoint import build_model_from_config

    cfg = load_config(name, ["model.pretrained=null"])  # by name: the shipped file, from any folder
    assert cfg.data.dataset in DATASETS
    assert cfg.data.batch_size >= 1 and cfg.train.iters >= 1
    with torch.device("meta"):
        model = build_model_from_config(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
