"""Issue 29: distributed runs agree with themselves. Two gloo processes on the CPU through torchrun
(``python -m torch.distributed.run``, static rendezvous on a free port), the tiniest training of the suite
(4 iterations); one uninterrupted reference run is shared by the tests that compare against it. Each rank runs
``tests/dist_probe.py`` (``csfrn.cli`` that can also record each rank's losses, sleep after each step, or give
each rank its own work_dir). The pure parts (rank agreement, config comparison) are tested without processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from csfrn.engine.checkpoint import load_checkpoint
from csfrn.engine.resume import as_restart, check_agreement, meaning_changes, resume_problem
from csfrn.engine.config import load_config
from csfrn.errors import ResumeMismatchError

from conftest import TINY_CONFIG, finish, free_port, tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "dist_probe.py")
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
ITERS = 4
slow = pytest.mark.slow


def _train_args(work, *extra, iters=ITERS):
    overrides = tiny_overrides(work, iters=iters, extra=["train.checkpoint_interval=2", *extra])
    return ["train", "--config", TINY_CONFIG, *[a for o in overrides for a in ("--set", o)]]


def torchrun(work, *extra, flags=(), restarts=0, launcher="torch.distributed.run", env=(), agent=(), iters=ITERS):
    """Start 2 workers of tests/dist_probe.py train (stdout and stderr: text pipes)."""
    cmd = [
        sys.executable,
        "-m",
        launcher,
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "static",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "--node-rank",
        "0",
        "--max-restarts",
        str(restarts),
        *agent,
        PROBE,
        *_train_args(work, *extra, iters=iters),
        *flags,
    ]
    return subprocess.Popen(cmd, env={**ENV, **dict(env)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker(agent_pid, rank):
    """The pid of the agent's worker of ``rank`` (its environment says RANK)."""
    with open(f"/proc/{agent_pid}/task/{agent_pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if predicate():
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def records(work, kind="train"):
    path = work / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["kind"] == kind]


def at_iteration(path, iteration):
    def check():
        return path.is_file() and load_checkpoint(path)["iter"] >= iteration

    return check


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("csfrn train: ")]


def assert_same_run(a, b):
    """Two last.pth files of the same run: weights, optimizer, scheduler, every rank's RNG bitwise equal."""
    a, b = load_checkpoint(a), load_checkpoint(b)
    assert a["iter"] == b["iter"] == ITERS and a["world_size"] == b["world_size"] == 2
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["torch"], rb["torch"])
    assert a["best_mIoU"] == b["best_mIoU"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-process run (last.pth at 2 and 4, kept as iter_*.pth), each rank's losses recorded."""
    root = tmp_path_factory.mktemp("reference")
    work, probe = root / "run", root / "probe"
    probe.mkdir()
    started = time.time()
    code, out, err = finish(torchrun(work, "train.keep_checkpoints=true", env={"PROBE_OUT": str(probe)}))
    assert code == 0, err[-3000:]
    print(f"reference run: {time.time() - started:.1f} s")
    return {"work": work, "probe": probe, "out": out}


# ---------------------------------------------------------------- global logging
@slow
def test_logged_loss_is_the_mean_over_both_ranks(reference):
    logged = records(reference["work"])
    ranks = [
        [json.loads(line) for line in (reference["probe"] / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    assert [r["iter"] for r in logged] == list(range(1, ITERS + 1)) and all(len(r) == ITERS for r in ranks)
    for record, r0, r1 in zip(logged, *ranks):
        assert r0["loss"] != r1["loss"]  # the two shares differ: the mean is not rank 0's
        for term in r0:
            assert record[term] == pytest.approx((r0[term] + r1[term]) / 2, rel=1e-12, abs=1e-15), term
    assert "iter 1/4: seg " in reference["out"]  # printed by rank 0 only
    assert reference["out"].count("iter 1/4: ") == 1


# ---------------------------------------------------------------- a restart is a resume
@slow
def test_sigkilled_rank_is_restarted_and_resumes_bitwise(reference, tmp_path):
    work = tmp_path / "run"
    proc = torchrun(work, restarts=1, env={"PROBE_STEP_SLEEP": "0.3"}, flags=["--overwrite"])
    wait_for(at_iteration(work / "last.pth", 2), proc)
    os.kill(worker(proc.pid, 1), signal.SIGKILL)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    # --overwrite applied to the first start only: the restart resumed where the first start had got to
    assert f"torchelastic restart 1: resumed from {work / 'last.pth'} at iteration 2" in out, out[-3000:]
    assert_same_run(work / "last.pth", reference["work"] / "last.pth")
    assert [(r["iter"], r["loss"]) for r in records(work)] == [
        (r["iter"], r["loss"]) for r in records(reference["work"])
    ]


@slow
def test_best_pth_alone_resumes_from_iteration_0(reference, tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    shutil.copy(reference["work"] / "best.pth", work / "best.pth")  # evaluated, killed before its last.pth
    (work / "metrics.jsonl").write_text((reference["work"] / "metrics.jsonl").read_text())
    code, out, err = finish(torchrun(work, flags=["--resume", "auto"]))
    assert code == 0, err[-3000:]
    assert f"no last.pth in {work} (the run stopped before its first checkpoint): starting at iteration 0" in out
    assert_same_run(work / "last.pth", reference["work"] / "last.pth")
    assert [(r["iter"], r["loss"], r["lr"]) for r in records(work)] == [
        (r["iter"], r["loss"], r["lr"]) for r in records(reference["work"])
    ]  # the old records replaced
    assert (work / "best.pth").read_bytes() == (reference["work"] / "best.pth").read_bytes()  # not beaten


# ---------------------------------------------------------------- rank 0 decides, every rank checks
@slow
def test_separate_work_dirs_with_different_last_pth_are_refused_up_front(reference, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node, iteration in zip(nodes, (2, 4)):
        node.mkdir()
        shutil.copy(reference["work"] / f"iter_{iteration:06d}.pth", node / "last.pth")
    proc = torchrun(tmp_path / "unused", flags=["--resume", "auto"], env={"PROBE_WORK_DIRS": ",".join(map(str, nodes))})
    code, out, err = finish(proc)
    assert code != 0
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert (
        f"rank 1: its {nodes[1] / 'last.pth'} is at iteration 4, rank 0's {nodes[0] / 'last.pth'} at iteration 2"
    ) in lines[0]
    assert sorted(os.listdir(nodes[0])) == ["last.pth"] and sorted(os.listdir(nodes[1])) == ["last.pth"]
    assert "iter 3/4" not in out  # stopped before training


# ---------------------------------------------------------------- preemption: SIGTERM to the agent
@slow
def test_sigterm_to_the_agent_saves_the_iteration_reached_and_resumes_bitwise(reference, tmp_path):
    work = tmp_path / "run"
    proc = torchrun(work, "train.checkpoint_interval=100000", launcher="csfrn.launch", env={"PROBE_STEP_SLEEP": "0.3"})
    wait_for(lambda: len(records(work)) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 143, err[-3000:]
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith("csfrn train: interrupted by SIGTERM at iteration "), err[-3000:]
    reached = int(lines[0].split("at iteration ")[1].split()[0])
    assert 1 <= reached < ITERS and load_checkpoint(work / "last.pth")["iter"] == reached

    # a changed seed is refused (before anything is written), then the run continues bitwise
    before = (work / "last.pth").read_bytes()
    code, out, err = finish(torchrun(work, "train.seed=3", flags=["--resume", "auto"]))
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1, err[-3000:]
    assert "train.seed 0 -> 3" in lines[0] and "--resume-changed" in lines[0]
    assert (work / "last.pth").read_bytes() == before
    code, out, err = finish(torchrun(work, flags=["--resume", "auto"]))
    assert code == 0, err[-3000:]
    assert f"resumed from {work / 'last.pth'} at iteration {reached}" in out
    assert_same_run(work / "last.pth", reference["work"] / "last.pth")


# ---------------------------------------------------------------- a stalled rank: train.dist_timeout
@slow
def test_dist_timeout_ends_a_job_whose_rank_is_stopped(tmp_path):
    """SIGSTOP on rank 1: rank 0 gives up after train.dist_timeout and names it; csfrn.launch then SIGKILLs the
    stopped rank after --shutdown-timeout (torchrun's own agent waits its default 30 s there)."""
    work = tmp_path / "run"
    proc = torchrun(
        work,
        "train.dist_timeout=20",
        "train.checkpoint_interval=100000",
        iters=1000,
        launcher="csfrn.launch",
        agent=["--shutdown-timeout", "3"],
        env={"PROBE_STEP_SLEEP": "0.2"},
    )
    wait_for(lambda: len(records(work)) >= 1, proc)
    stopped = worker(proc.pid, 1)
    os.kill(stopped, signal.SIGSTOP)
    started = time.time()
    try:
        code, out, err = finish(proc, timeout=120)
        elapsed = time.time() - started
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(stopped, sig)
            except ProcessLookupError:
                pass
    print(f"job ended {elapsed:.1f} s after SIGSTOP")
    assert code != 0 and 20 <= elapsed <= 40, (elapsed, err[-3000:])
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("csfrn train: error: rank 0: rank 1 stopped answering for train.dist_timeout=20 s")


# ---------------------------------------------------------------- the pure parts, without processes
def test_every_rank_checks_its_copy_of_rank_0s_checkpoint():
    chosen = {"path": "/a/last.pth", "iter": 40, "checksum": "ab" * 32}
    same = {**chosen, "path": "/b/last.pth"}
    assert resume_problem(1, chosen, same) is None
    assert resume_problem(1, None, None) is None
    assert "rank 1: cannot read /a/last.pth, which rank 0 resumes from" in resume_problem(1, chosen, None)
    assert "rank 2: cannot read /b/last.pth: corrupt" in resume_problem(
        2, chosen, {"path": "/b/last.pth", "error": "corrupt"}
    )
    assert "is at iteration 20, rank 0's /a/last.pth at iteration 40" in resume_problem(1, chosen, {**same, "iter": 20})
    assert "differs from rank 0's /a/last.pth" in resume_problem(3, chosen, {**same, "checksum": "cd" * 32})
    assert "rank 1: its /b/last.pth exists (iteration 40) but rank 0 has no checkpoint" in resume_problem(1, None, same)
    check_agreement([None, None])
    with pytest.raises(ResumeMismatchError, match=r"rank 1: .*; rank 3: "):
        check_agreement([None, "rank 1: x", None, "rank 3: y"])


def test_resume_refuses_changes_of_meaning_only():
    saved = load_config(TINY_CONFIG, tiny_overrides("w", iters=8)).to_dict()
    same = load_config(
        TINY_CONFIG,
        tiny_overrides("w2", iters=16, extra=["train.lr=0.5", "model.pretrained=x.pth", "train.resume=auto"]),
    ).to_dict()
    assert meaning_changes(saved, same, 2, 2) == []  # lr / iters re-derive the schedule; paths are not meaning
    changed = load_config(
        TINY_CONFIG, tiny_overrides("w", iters=8, extra=["train.seed=3", "data.batch_size=8", "model.ohem=true"])
    ).to_dict()
    assert meaning_changes(saved, changed, 2, 1) == [
        "model.ohem False -> True",
        "data.batch_size 4 -> 8",
        "train.seed 0 -> 3",
        "world size 2 -> 1",
    ]


def test_a_torchelastic_restart_is_a_resume(monkeypatch):
    cfg = load_config(TINY_CONFIG, tiny_overrides("w"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert as_restart(cfg.train, True) == (cfg.train, True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    train_cfg, overwrite = as_restart(cfg.train, True)
    assert train_cfg.resume == "auto" and overwrite is False
    cfg.train.resume = "x.pth"
    assert as_restart(cfg.train, False)[0].resume == "x.pth"


def test_shutdown_timeout_on_a_torchrun_without_the_option(monkeypatch):
    """torch 2.11: torchrun has no --shutdown-timeout, so csfrn.launch takes it off torchrun's options
    (never off the training script's) and bounds the worker stops itself; with a torchrun that has it, the
    arguments go through unchanged."""
    import argparse

    import csfrn.launch as launch

    argv = ["--nproc-per-node", "2", "--shutdown-timeout", "3", "-m", "csfrn.cli", "train", "--shutdown-timeout", "9"]
    native = launch.get_args_parser()
    if any("--shutdown-timeout" in a.option_strings for a in native._actions):
        assert launch._shutdown_timeout(list(argv)) == (3, argv)

    def old_torchrun_parser():
        p = argparse.ArgumentParser()
        p.add_argument("--nproc-per-node")
        p.add_argument("-m", "--module", action="store_true")
        p.add_argument("training_script")
        p.add_argument("training_script_args", nargs=argparse.REMAINDER)
        return p

    monkeypatch.setattr(launch, "get_args_parser", old_torchrun_parser)
    rest = ["-m", "csfrn.cli", "train", "--shutdown-timeout", "9"]
    assert launch._shutdown_timeout(list(argv)) == (3, ["--nproc-per-node", "2", *rest])
    assert launch._shutdown_timeout(["--shutdown-timeout=5", *rest]) == (5, rest)
    assert launch._shutdown_timeout(["--nproc-per-node", "2", *rest]) == (None, ["--nproc-per-node", "2", *rest])
