"""Issue 28: runs survive interruption and concurrency. Real signals are sent to real (tiny) trainings started
through the entry point (``python -m csfrn.cli``, torchrun with 2 gloo processes); waits poll files the run
writes and are bounded."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from csfrn.engine.checkpoint import load_checkpoint, save_checkpoint
from csfrn.engine.interrupt import stop_requests
from csfrn.engine.train import poly_lambda
from csfrn.engine.config import load_config
from csfrn.errors import Interrupted

from conftest import TINY_CONFIG, finish, tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def train_args(work, iters, *extra):
    return [
        "train",
        "--config",
        TINY_CONFIG,
        *_sets(tiny_overrides(work, iters=iters, extra=["train.checkpoint_interval=100000", *extra])),
    ]


def csfrn(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "csfrn.cli", *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def start(*args, launcher=("-m", "csfrn.cli")):
    return subprocess.Popen(
        [sys.executable, *launcher, *map(str, args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(predicate, proc, timeout=120):
    """Poll until ``predicate()`` holds; the process must still be running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if predicate():
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def train_records(work):
    path = work / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def only_line(err, start):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(start), err[-3000:]
    return lines[0]


# ---------------------------------------------------------------- SIGINT / SIGTERM, one run per work_dir
def test_signals_end_training_in_one_line_and_resume_continues(tmp_path):
    work = tmp_path / "run"
    proc = start(*train_args(work, 5000))
    wait_for(lambda: len(train_records(work)) >= 2, proc)
    # a second run into the same work_dir is refused, naming the first
    other = csfrn(*train_args(work, 5000))
    line = only_line(other.stderr, "csfrn train: error: ")
    assert other.returncode == 2 and f"in use by another run (pid {proc.pid} on " in line
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130
    line = only_line(err, "csfrn train: interrupted by SIGINT at iteration ")
    reached = int(line.split("at iteration ")[1].split()[0])
    assert f"last checkpoint {work / 'last.pth'} (iteration {reached}); continue with --resume auto" in line
    assert load_checkpoint(work / "last.pth")["iter"] == reached >= 2  # written at the iteration reached
    assert f"iter {reached}/5000: seg " in out  # loss lines without the progress bar
    assert not (work / "run.lock").exists()

    # SIGTERM to the resumed run: the same, 143; a lock left by a dead process is taken over
    (work / "run.lock").write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "started": "earlier"}))
    proc = start(*train_args(work, 5000), "--resume", "auto")
    wait_for(lambda: len(train_records(work)) >= reached + 2, proc)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 143 and "note: taking over the stale lock" in out
    line = only_line(err, "csfrn train: interrupted by SIGTERM at iteration ")
    again = load_checkpoint(work / "last.pth")["iter"]
    assert f"(iteration {again})" in line and again > reached
    assert [r["iter"] for r in train_records(work) if r["kind"] == "train"] == list(range(1, again + 1))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_signal_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint({"iter": 1, "w": torch.ones(3)}, path)

    class Signals:  # pickled in the middle of the write: sends SIGINT `count` times from inside torch.save
        def __init__(self, count):
            self.count = count

        def __reduce__(self):
            for _ in range(self.count):
                os.kill(os.getpid(), signal.SIGINT)
            return (collections.OrderedDict, ())  # loads under weights_only

    with stop_requests() as requests:
        with pytest.raises(Interrupted):  # the second signal stops the write at once
            save_checkpoint({"iter": 2, "w": torch.zeros(3), "x": Signals(2)}, path)
    assert requests.signum == signal.SIGINT
    assert load_checkpoint(path)["iter"] == 1 and os.listdir(tmp_path) == ["last.pth"]
    with stop_requests() as requests:  # one signal: the write completes, the request waits
        save_checkpoint({"iter": 3, "w": torch.zeros(3), "x": Signals(1)}, path)
    assert requests.signum == signal.SIGINT and load_checkpoint(path)["iter"] == 3


@pytest.mark.parametrize(
    "launcher, signum", [(("-m", "csfrn.launch"), signal.SIGTERM), (("-m", "torch.distributed.run"), signal.SIGINT)]
)
def test_torchrun_signal_stops_every_rank_at_one_step(tmp_path, launcher, signum):
    """The agent forwards the signal; the ranks agree on the step, rank 0 writes last.pth and prints one line.
    Plain torchrun's agent adds a SignalException traceback of its own; csfrn.launch exits 128 + signal."""
    work = tmp_path / "run"
    args = ["--standalone", "--nproc_per_node", "2", "-m", "csfrn.cli", *train_args(work, 5000)]
    proc = start(*args, launcher=launcher)
    wait_for(lambda: len(train_records(work)) >= 2, proc, timeout=180)
    proc.send_signal(signum)
    code, out, err = finish(proc)
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith(f"csfrn train: interrupted by {name} at iteration "), err[-3000:]
    reached = int(lines[0].split("at iteration ")[1].split()[0])
    state = load_checkpoint(work / "last.pth")
    assert state["iter"] == reached and state["world_size"] == 2 and len(state["rng"]) == 2
    worker_errors = [line for line in err.splitlines() if "KeyboardInterrupt" in line or "ChildFailedError" in line]
    assert not worker_errors, err[-3000:]
    if launcher[1] == "csfrn.launch":
        assert code == 128 + signum and "Traceback" not in err and "death signal" not in err, err[-3000:]
    else:  # the traceback is the agent's own, not a worker's
        assert err.count("Traceback") == 1 and "SignalException" in err


# ---------------------------------------------------------------- resume: nothing, finished, changed schedule
def test_resume_auto_refuses_a_started_work_dir_without_last_pth(tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    (work / "metrics.jsonl").write_text('{"kind": "train", "iter": 1}\n')
    r = csfrn(*train_args(work, 2), "--resume", "auto")
    line = only_line(r.stderr, "csfrn train: error: --resume auto: work_dir ")
    assert r.returncode == 2 and "no last.pth" in line and "metrics.jsonl" in line and "--overwrite" in line
    assert (work / "metrics.jsonl").read_text() == '{"kind": "train", "iter": 1}\n'  # not truncated
    empty = tmp_path / "empty"
    empty.mkdir()
    r = csfrn(*train_args(empty, 1), "--resume", "auto")  # an empty work_dir: a fresh start
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(empty / "last.pth")["iter"] == 1


def test_resume_finished_lowered_and_raised_schedule(tmp_path):
    fresh, work = tmp_path / "fresh", tmp_path / "run"
    r = csfrn(*train_args(fresh, 5, "train.lr=0.1"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = csfrn(*train_args(work, 2, "train.lr=0.01"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = csfrn(*train_args(work, 2, "train.lr=0.01"), "--resume", "auto")
    assert r.returncode == 0 and "the run is finished (iteration 2 of train.iters=2)" in r.stdout, r.stderr
    r = csfrn(*train_args(work, 1, "train.lr=0.01"), "--resume", "auto")
    line = only_line(r.stderr, "csfrn train: error: ")
    assert r.returncode == 2 and "at iteration 2, past train.iters=1" in line
    r = csfrn(*train_args(work, 5, "train.lr=0.1"), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "train.iters 2 -> 5; train.lr 0.01 -> 0.1" in r.stdout
        or "train.lr 0.01 -> 0.1; train.iters 2 -> 5" in r.stdout.replace("\n", " ")
    ), r.stdout
    assert load_checkpoint(work / "last.pth")["iter"] == 5
    lr = {rec["iter"]: rec["lr"] for rec in train_records(work) if rec["kind"] == "train"}
    ref = {rec["iter"]: rec["lr"] for rec in train_records(fresh) if rec["kind"] == "train"}
    assert [lr[i] for i in (3, 4, 5)] == pytest.approx([ref[i] for i in (3, 4, 5)], rel=1e-12)
    cfg = load_config(TINY_CONFIG, tiny_overrides(work, iters=5, extra=["train.lr=0.1"]))
    assert lr[5] == pytest.approx(0.1 * poly_lambda(cfg.train)(5)) and lr[5] >= cfg.train.min_lr


# ---------------------------------------------------------------- ablate and demo: one line, --resume auto
def test_ablate_interrupted_then_resumed(tmp_path):
    out = tmp_path / "study"
    args = [
        "ablate",
        "--config",
        TINY_CONFIG,
        *_sets(tiny_overrides(tmp_path / "unused", iters=40)),
        "--variants",
        "baseline",
        "--seeds",
        "1",
        "--out",
        out,
        "--split",
        "val",
    ]
    work = out / "work" / "baseline_seed0"
    proc = start(*args)
    wait_for(lambda: len(train_records(work)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    last = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert last.startswith("csfrn ablate: baseline seed 0: interrupted by SIGINT at iteration ") and last.endswith(
        "continue with --resume auto"
    ), last
    reached = load_checkpoint(work / "last.pth")["iter"]
    proc = start(*args, "--resume", "auto")
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    assert json.loads((out / "runs" / "baseline_seed0.json").read_text())["mIoU"] is not None
    iters = [r["iter"] for r in train_records(work) if r["kind"] == "train"]
    assert iters == list(range(1, 41)) and reached < 40  # continued, not started over


def test_demo_interrupted_refuses_a_rerun_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        out,
        "--iters",
        "40",
        "--seeds",
        "1",
        "--set",
        "data.size=32",
        "--set",
        "data.crop_size=[32,32]",
        "--set",
        "data.val_length=2",
        "--set",
        "data.batch_size=2",
        "--set",
        "train.log_interval=1",
    ]
    work = out / "csfrn" / "seed0"
    proc = start(*args)
    wait_for(lambda: len(train_records(work)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 143, err[-3000:]
    line = only_line(err, "csfrn demo: csfrn seed 0: interrupted by SIGTERM at iteration ")
    assert line.endswith("continue with --resume auto")
    again = csfrn(*args)
    assert again.returncode == 2
    only_line(again.stderr, "csfrn demo: error: --out ")
    assert "a previous demo" in again.stderr
    done = csfrn(*args, "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["seeds"] == [0]
    assert [r["iter"] for r in train_records(work) if r["kind"] == "train"] == list(range(1, 41))
