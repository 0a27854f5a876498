"""What a run leaves behind and the training knobs (issue 27): config.yaml / train.log / env.json in the work_dir,
eval's confusion matrix, csfrn plot / browse / config / --version / --help, train.ema (on / off, exact across a
SIGKILL and --resume auto), train.accumulate (= one big batch), train.clip_grad, and the one-line errors for a
missing tensorboard or matplotlib. The CLI runs through its real entry point (``python -m csfrn.cli``) on tiny
models; one trained work_dir is shared by the tests that only read it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from csfrn.engine import checkpoint as ckpt
from csfrn.engine.config import load_config

from conftest import ROOT, TINY_CONFIG, sigkill_at_checkpoint, tiny_overrides

KNOBS = ["train.ema=0.9", "train.clip_grad=0.5", "train.eval_interval=2"]


def csfrn(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "csfrn.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )


def _sets(overrides):
    """--config (the tests' defaults: `csfrn train` needs one) and the overrides as --set options."""
    return ["--config", TINY_CONFIG] + [arg for o in overrides for arg in ("--set", o)]


def assert_picture(path, min_size=(300, 200)):
    """A PNG of at least ``min_size`` that is not blank: many colours, dark and light pixels."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= min_size[0] and img.height >= min_size[1], img.size
        pixels = np.asarray(img.convert("RGB"))
    grey = pixels.mean(-1)
    assert grey.min() < 100 and grey.max() > 200, "blank picture"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8, "hardly any colours"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`csfrn train`, 4 iterations, with EMA, gradient clipping and an evaluation every 2 iterations."""
    work = tmp_path_factory.mktemp("run") / "ema_clip"
    overrides = tiny_overrides(work, iters=4, extra=KNOBS)
    result = csfrn("train", *_sets(overrides))
    assert result.returncode == 0, result.stderr[-2000:]
    return {"work": work, "overrides": overrides}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The same run without EMA."""
    work = tmp_path_factory.mktemp("run") / "no_ema"
    result = csfrn("train", *_sets(tiny_overrides(work, iters=4, extra=[k for k in KNOBS if "ema" not in k])))
    assert result.returncode == 0, result.stderr[-2000:]
    return work


# ---------------------------------------------------------------- the work_dir tells the story
def test_train_writes_config_log_and_env(run):
    work = run["work"]
    # config.yaml: every key, and loading it gives the same config
    assert load_config(str(work / "config.yaml")) == load_config(None, run["overrides"])
    text = (work / "config.yaml").read_text()
    assert "ema: 0.9" in text and "accumulate: 1" in text and "clip_grad: 0.5" in text
    # train.log: one line per iteration (log_interval 1) with lr, each loss, data / step time, ETA, memory
    lines = (work / "train.log").read_text().splitlines()
    iteration = [line for line in lines if " iter " in line and "/4 " in line]
    assert len(iteration) == 4, lines
    for i, line in enumerate(iteration, 1):
        assert f"iter {i}/4  lr " in line
        for part in ("seg ", "aux ", "cac ", "smooth ", "loss ", "data ", "step ", "eta ", "mem ", "GiB", "grad_norm "):
            assert part in line, (part, line)
    assert "clipped to 0.5 in 1 of 1 steps" in iteration[0]  # the norm of a fresh model is > 0.5
    for event in (
        "iter 2: val mIoU",
        "iter 2: EMA val mIoU",
        "iter 2: saved best.pth",
        "saved best_ema.pth",
        "iter 4: saved last.pth",
        "finished at iteration 4",
    ):
        assert any(event in line for line in lines), event
    # env.json: versions, devices, the command line
    env = json.loads((work / "env.json").read_text())
    assert (
        env["torch"] == torch.__version__ and env["csfrn"] == "0.1.0" and env["kernels"] in ("CPU + CUDA", "CPU only")
    )
    assert env["python"] == sys.version.split()[0] and env["device"] == "cpu" and env["world_size"] == 1
    assert "train" in env["command"] and "git_commit" in env and env["cpu"]


def test_metrics_record_clipping_and_ema(run):
    records = [json.loads(line) for line in (run["work"] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["grad_norm"] > 0.5 and r["clipped"] == 1 and 0 <= r["data_ms"] < r["step_ms"] for r in train)
    val = [r for r in records if r["kind"] == "val"]
    assert [r["iter"] for r in val] == [2, 4] and all(0 <= r["ema_mIoU"] <= 1 for r in val)


def test_config_verb_prints_a_config_that_loads_back(tmp_path, capsys):
    demo = "demo"  # the shipped config, by name
    result = csfrn("config", "--config", demo, "--set", "train.lr=0.02", "--set", "train.ema=0.99")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "printed.yaml"
    path.write_text(result.stdout)
    assert load_config(str(path)) == load_config(demo, ["train.lr=0.02", "train.ema=0.99"])
    from csfrn import cli

    assert cli.main(["config", "--config", demo, "--set", "train.ema=1.5"]) == 2
    assert "csfrn config: error: config key 'train.ema'" in capsys.readouterr().err


# ---------------------------------------------------------------- EMA
def test_ema_on_and_off(run, plain):
    """With EMA: best_ema.pth (loadable by eval) and the EMA in last.pth, following the weights; without: none
    of these, and the same raw weights (the EMA never touches training)."""
    on = ckpt.load_checkpoint(run["work"] / "last.pth")
    off_work = plain
    off = ckpt.load_checkpoint(off_work / "last.pth")
    assert "ema" not in off and not (off_work / "best_ema.pth").exists()
    assert "ema_mIoU" not in (off_work / "metrics.jsonl").read_text()
    assert on["model"].keys() == off["model"].keys() == on["ema"].keys()
    for k in on["model"]:
        assert torch.equal(on["model"][k], off["model"][k]), k
    moved = [k for k, v in on["ema"].items() if v.is_floating_point() and not torch.equal(v, on["model"][k])]
    assert moved, "the EMA equals the raw weights: it would prove nothing"
    best_ema = ckpt.load_checkpoint(run["work"] / "best_ema.pth")
    assert best_ema["iter"] in (2, 4) and best_ema["model"].keys() == on["model"].keys()
    assert (run["work"] / "val_last_ema.json").is_file()


def test_model_ema_is_the_exponential_average():
    from csfrn.engine.ema import ModelEma

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEma(model, 0.75)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 3))  # BatchNorm's running statistics and counter move too
        ema.update()
        for k, v in model.state_dict().items():
            expected[k] = 0.75 * expected[k] + 0.25 * v if v.is_floating_point() else v.clone()
    for k, v in ema.state_dict().items():
        assert (
            torch.allclose(v, expected[k], rtol=1e-6, atol=1e-7)
            if v.is_floating_point()
            else torch.equal(v, expected[k])
        ), k
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_survives_sigkill_and_resume_auto_bitwise(tmp_path):
    """A run killed with SIGKILL and resumed with --resume auto ends with the same EMA (and weights), bit for
    bit, as a run that was never interrupted. train.power=0 keeps the lr constant, so the killed run (500
    iterations planned) and the others (fewer) follow the same schedule."""
    extra = ["train.ema=0.8", "train.power=0", "train.checkpoint_interval=2"]
    killed_work = tmp_path / "killed"
    overrides = tiny_overrides(killed_work, iters=500, extra=extra)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "csfrn.cli", "train", *_sets(overrides)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last = killed_work / "last.pth"
    sigkill_at_checkpoint(proc, last, 4)
    done = ckpt.load_checkpoint(last)["iter"]
    final = done + 2
    resumed = csfrn("train", *_sets(overrides), "--resume", "auto", "--set", f"train.iters={final}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = csfrn("train", *_sets(tiny_overrides(tmp_path / "reference", iters=final, extra=extra)))
    assert reference.returncode == 0, reference.stderr[-2000:]
    a, b = ckpt.load_checkpoint(last), ckpt.load_checkpoint(tmp_path / "reference" / "last.pth")
    assert a["iter"] == b["iter"] == final
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert f"resumed from {last} at iteration {done}" in (killed_work / "train.log").read_text()


# ---------------------------------------------------------------- accumulation and clipping
def _norm_free(model):
    """The model without BatchNorm (Identity in its place) or dropout: what is left is the same for one batch
    of 4 and two micro-batches of 2."""
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, nn.Identity())
            elif isinstance(child, (nn.Dropout, nn.Dropout2d)):
                child.p = 0.0
    return model


def test_accumulate_two_micro_batches_equals_one_batch(tmp_path):
    """train.accumulate=2 with data.batch_size=4 (the global batch) takes the same steps as batch 4 at once, up
    to float rounding. BatchNorm would see batches of 2 instead of 4 (different statistics, by design), so the
    model here has none; without CSFLM its losses (cross-entropy, seg + aux) are means over equally many pixels
    (no ignored pixels in these crops), which micro-batches of equal size average exactly."""
    from csfrn.engine.checkpoint import build_model_from_config
    from csfrn.engine.train import train

    weights = {}
    for accumulate in (1, 2):
        cfg = load_config(
            None,
            tiny_overrides(
                tmp_path / f"acc{accumulate}",
                iters=3,
                extra=["model.csflm=false", "data.batch_size=4", f"train.accumulate={accumulate}", "train.lr=0.05"],
            ),
        )
        torch.manual_seed(0)
        model = _norm_free(build_model_from_config(cfg.model))
        train(cfg, model=model)
        weights[accumulate] = ckpt.load_checkpoint(tmp_path / f"acc{accumulate}" / "last.pth")["model"]
    torch.manual_seed(0)
    init = _norm_free(build_model_from_config(cfg.model)).state_dict()
    moved = 0
    for k, v in weights[1].items():
        assert torch.allclose(weights[2][k], v, rtol=1e-4, atol=1e-6), k
        moved += not torch.allclose(v, init[k], rtol=1e-4, atol=1e-6)
    assert moved, "no weight moved: the comparison would prove nothing"


def test_accumulate_must_split_the_batch():
    from csfrn.engine.config import check_training
    from csfrn.errors import ConfigError

    with pytest.raises(ConfigError, match="'train.accumulate' is 3.*expected a divisor of 4"):
        check_training(load_config(None, ["data.batch_size=4", "train.accumulate=3"]))
    with pytest.raises(ConfigError, match="micro-batches of 1 sample"):
        check_training(load_config(None, ["data.batch_size=4", "train.accumulate=4"]))
    with pytest.raises(ConfigError, match="train.clip_grad"):
        load_config(None, ["train.clip_grad=0"])


def test_clip_grad_clips_before_the_step():
    """The step uses the clipped gradient (norm = max norm) and reports the norm before clipping."""
    from csfrn.engine.step import train_step

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x, y):
            logits = self.conv(x)
            return logits, {"seg": nn.functional.cross_entropy(logits, y)}

    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 4, 4) * 10, torch.randint(0, 2, (2, 4, 4))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    results = {}
    for clip in (None, 1e-3):
        torch.manual_seed(1)
        model = Tiny()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        losses, norm = train_step(model, x, y, optimizer, scaler, clip_grad=clip)
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
        assert torch.allclose(step, grads, atol=1e-6)  # SGD at lr 1 stepped by these gradients
        results[clip] = (grads, norm)
    raw, none = results[None]
    clipped, norm = results[1e-3]
    assert none is None and float(norm) == pytest.approx(float(raw.norm()), rel=1e-5) and float(norm) > 1e-3
    assert float(clipped.norm()) == pytest.approx(1e-3, rel=1e-4)
    assert torch.allclose(clipped, raw * (1e-3 / raw.norm()), rtol=1e-4, atol=1e-12)


# ---------------------------------------------------------------- eval, plot, browse
def test_eval_writes_the_confusion_matrix(run, tmp_path):
    out = tmp_path / "eval"
    result = csfrn("eval", "--checkpoint", run["work"] / "best.pth", "--out", out, "--no-consistency")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split(",") for line in (out / "confusion.csv").read_text().splitlines()]
    classes = json.loads((out / "eval_val.json").read_text())["classes"]
    assert rows[0][1:] == classes and [r[0] for r in rows[1:]] == classes
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert counts.sum() == 4 * 32 * 32  # every pixel of the 4 val images (none ignored)
    summary = json.loads((out / "eval_val.json").read_text())
    assert summary["aAcc"] == pytest.approx(np.trace(counts) / counts.sum())
    assert_picture(out / "confusion.png")


def test_plot_overlays_runs(run, plain, tmp_path, capsys):
    out = tmp_path / "curves.png"
    result = csfrn("plot", run["work"], plain, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_picture(out, (800, 600))
    from csfrn import cli

    assert cli.main(["plot", str(run["work"]), "--out", str(out)]) == 2  # never replaced without --overwrite
    assert f"csfrn plot: error: --out {out} already holds a picture" in capsys.readouterr().err
    assert cli.main(["plot", str(run["work"]), "--out", str(out), "--overwrite"]) == 0
    assert cli.main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "other.png")]) == 2
    assert f"csfrn plot: error: {tmp_path / 'nothing'}: no metrics.jsonl" in capsys.readouterr().err


def test_browse_writes_masks_blended(tmp_path):
    sets = _sets(tiny_overrides(tmp_path / "unused"))
    result = csfrn("browse", *sets, "--split", "val", "--out", tmp_path / "plain", "--n", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "plain")) == ["val_0000.png", "val_0001.png"]
    for name in os.listdir(tmp_path / "plain"):
        assert_picture(tmp_path / "plain" / name)
    from csfrn import cli

    assert (
        cli.main(["browse", *sets, "--split", "train", "--out", str(tmp_path / "aug"), "--n", "1", "--augmented"]) == 0
    )
    assert_picture(tmp_path / "aug" / "train_0000.png")


# ---------------------------------------------------------------- missing optional packages
def test_tensorboard_requested_but_missing_is_one_line(tmp_path, monkeypatch, capsys):
    from csfrn import cli

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    work = tmp_path / "tb"
    assert cli.main(["train", *_sets(tiny_overrides(work, iters=1, extra=["train.tensorboard=true"]))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "csfrn train: error: train.tensorboard=true but the tensorboard package is not installed"
    ), err
    assert not (work / "last.pth").exists()


def test_matplotlib_missing_is_one_line_naming_the_extra(run, tmp_path, monkeypatch, capsys):
    from csfrn import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    checks = [
        ["plot", str(run["work"]), "--out", str(tmp_path / "x.png")],
        ["eval", "--checkpoint", str(run["work"] / "best.pth"), "--out", str(tmp_path / "eval")],
        ["browse", *_sets(tiny_overrides(tmp_path / "unused")), "--out", str(tmp_path / "browse")],
    ]
    for argv in checks:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"csfrn {argv[0]}: error: ") and "csfrn[plot]" in err[0], err
    assert not any((tmp_path / n).exists() for n in ("x.png", "eval", "browse"))  # checked before any work


# ---------------------------------------------------------------- CLI manners
def test_version_and_help():
    result = csfrn("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("csfrn 0.1.0 (kernels: ") and f"torch {torch.__version__} (" in result.stdout
    from csfrn import cli

    parser = cli._parser()
    text = parser.format_help()
    assert "parse the command line" not in text and "examples:" in text
    verbs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    listed = text.splitlines()
    for name, sub in verbs.choices.items():
        line = next(i for i, line in enumerate(listed) if line.startswith(f"  {name} "))
        assert not listed[line + 1].startswith("        "), f"{name}'s help takes more than one line"
        assert "example" in sub.format_help() and f"csfrn {name}" in sub.format_help(), name
