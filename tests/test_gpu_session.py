"""The GPU session's plan (benchmarks/gpu_session.sh) proven on the CPU: its fast dry run goes through every stage
and leaves one tarball whose summary.json holds every figure the GPU check is stated in; a stage that does not
fit the time left is not started, one over its budget is cut, and the summary comes out either way; the pieces
(the summary's parsers, the determinism check) catch what they are for."""

import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_determinism  # noqa: E402
import gpu_summary  # noqa: E402

# The GPU issue's list, literally (gpu_summary.KEYS must hold all of them).
SUMMARY_KEYS = [
    "device",
    "torch",
    "date",
    "commit",
    "tests_passed",
    "tests_failed",
    "sanitizer_errors",
    "deform_vs_torchvision_fp32",
    "deform_vs_torchvision_bf16",
    "dual_vs_torchvision_bf16",
    "deform_deterministic",
    "step_ms_baseline",
    "step_ms_csfrn",
    "step_csfrn_over_baseline",
    "step_ms_torchvision_deeplabv3",
    "train_images_per_s_csfrn",
    "train_peak_gib_csfrn",
    "mfu_baseline",
]
STAGES = ["build", "info", "check", "deform", "step", "train", "profile", "compile", "summary"]


# Libraries of our extras that the GPU machine's image lacks (its python3 has torch, timm, transformers, onnx,
# onnxruntime, matplotlib, pytest): the dry plan runs as if they were absent, so a test module that needs one to
# be imported cannot stop the CUDA tests there.
GPU_IMAGE_LACKS = ("segmentation_models_pytorch",)
ABSENT = f"""
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {GPU_IMAGE_LACKS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent from the GPU image)", name=name)
sys.meta_path.insert(0, Absent())
"""


def run_session(tmp_path, timeout=1200, **env):  # the dry plan's own deadline bounds it
    out, res = tmp_path / "out", tmp_path / "res"
    absent = tmp_path / "absent"
    absent.mkdir()
    (absent / "sitecustomize.py").write_text(ABSENT)
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(absent), os.environ.get("PYTHONPATH")])),
        "CSFRN_GPU_DRY": "fast",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "RESULTS": str(res),
        "CSFRN_GPU_COMMIT": "",
        **env,
    }
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh")],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, out, res


def unpack(out, tmp_path):
    assert os.listdir(out) == ["gpu-session.tar.gz"], os.listdir(out)  # one file comes back
    dest = tmp_path / "unpacked"
    with tarfile.open(out / "gpu-session.tar.gz") as tar:
        names = {os.path.normpath(m.name) for m in tar.getmembers() if m.isfile()}
        tar.extractall(dest, filter="data")
    return names, dest


def stages(dest):
    with open(dest / "stages.jsonl") as f:
        return [json.loads(line) for line in f]


def test_dry_plan_runs_every_stage_into_one_tarball(tmp_path):
    proc, out, res = run_session(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names, dest = unpack(out, tmp_path)
    expected = {
        "session.json",
        "stages.jsonl",
        "info.json",
        "cuda-tests.xml",
        "sanitize-cpu.log",
        "sanitizer-skipped.txt",
        "deform_conv-fp32.json",
        "deform_conv-bf16.json",
        "deform_determinism.json",
        "train_step-core.json",
        "train-csfrn/metrics.jsonl",
        "profile.log",
        "summary.json",
        "summary.md",
        *(f"{s}.log" for s in STAGES),
    }
    assert expected <= names, expected - names
    assert not [n for n in names if n.endswith(".pth")], "checkpoints stay out of the tarball"
    assert [(r["stage"], r["status"]) for r in stages(dest)] == [(s, "ok") for s in STAGES]

    # The CUDA tests are selected by their marker: each skips here, none is the emulation's.
    cases = list(ET.parse(dest / "cuda-tests.xml").getroot().iter("testcase"))
    assert len(cases) > 20
    assert all(c.find("skipped") is not None for c in cases)
    assert not [c for c in cases if "cuda_emu" in c.get("classname") or "emu" in c.get("name")]
    assert any(c.get("classname").endswith("test_ops") and "[cuda-" in c.get("name") for c in cases)

    with open(dest / "summary.json") as f:
        summary = json.load(f)
    assert set(SUMMARY_KEYS) <= set(gpu_summary.KEYS)
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    assert not missing, missing
    assert summary["dry"] is True and summary["device"] and summary["torch"] == torch.__version__
    assert summary["tests_passed"] == 0 and summary["tests_failed"] == 0 and summary["tests_skipped"] == len(cases)
    assert summary["deform_deterministic"] is True
    for key in (
        "deform_vs_torchvision_fp32",
        "deform_vs_torchvision_bf16",
        "dual_vs_torchvision_bf16",
        "step_ms_baseline",
        "step_ms_csfrn",
        "step_csfrn_over_baseline",
        "step_ms_torchvision_deeplabv3",
        "train_images_per_s_csfrn",
        "mfu_baseline",
    ):
        assert isinstance(summary[key], float) and summary[key] > 0, (key, summary[key], summary["notes"].get(key))
    assert summary["step_csfrn_over_baseline"] == pytest.approx(summary["step_ms_csfrn"] / summary["step_ms_baseline"])
    assert 0 < summary["mfu_baseline"] < 1
    # What a CPU run cannot measure is null with a reason, never a number.
    assert summary["sanitizer_errors"] is None and "dry run" in summary["notes"]["sanitizer_errors"]
    assert summary["train_peak_gib_csfrn"] is None and "GPU memory" in summary["notes"]["train_peak_gib_csfrn"]
    assert summary["commit"] is not None or "commit" in summary["notes"]
    assert [k for k in SUMMARY_KEYS if summary[k] is None and k not in summary["notes"]] == []
    assert summary["train_iters_csfrn"] == 4
    # The targets' table is there, and a dry run meets or misses none of them.
    assert len([t for t in summary["targets"] if t["op"]]) == len(gpu_summary.TARGETS)
    assert all(t["met"] is None for t in summary["targets"])


def test_stages_that_do_not_fit_are_not_started_and_the_summary_still_comes(tmp_path):
    # 50 s before the deadline, less the summary's 30, covers no stage's budget (build's is 60): only the
    # summary runs, and says why each figure is missing.
    proc, out, _ = run_session(tmp_path, GPU_DEADLINE="50")
    assert proc.returncode == 1
    _, dest = unpack(out, tmp_path)
    assert [(r["stage"], r["status"]) for r in stages(dest)] == [(s, "not run") for s in STAGES[:-1]] + [
        ("summary", "ok")
    ]
    with open(dest / "summary.json") as f:
        summary = json.load(f)
    assert all(summary[k] is None for k in SUMMARY_KEYS if k != "commit")
    assert summary["notes"]["device"].startswith("stage info not run")
    assert summary["notes"]["train_images_per_s_csfrn"].startswith("stage train not run")


def test_a_stage_over_its_budget_is_cut_and_its_output_kept(tmp_path):
    proc, out, _ = run_session(tmp_path, GPU_DEADLINE="85", CSFRN_GPU_BUDGETS="build=1 info=1")
    assert proc.returncode == 1
    names, dest = unpack(out, tmp_path)
    records = {r["stage"]: r for r in stages(dest)}
    assert records["build"]["status"] == "cut" and records["build"]["rc"] == 124
    assert records["info"]["status"] == "cut" and "build.log" in names and "info.log" in names
    assert records["check"]["status"] == "not run" and records["summary"]["status"] == "ok"


def test_bad_budget_override_is_one_line(tmp_path):
    proc, _, _ = run_session(tmp_path, CSFRN_GPU_BUDGETS="bulid=10")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_session.sh: CSFRN_GPU_BUDGETS: 'bulid=10' is not STAGE=SECONDS with STAGE one of " + " ".join(STAGES)
    ]


def test_sanitizer_counts_every_tool(tmp_path):
    logs = {
        "memcheck": "========= ERROR SUMMARY: 2 errors\n",
        "racecheck": "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n",
        "initcheck": "========= ERROR SUMMARY: 0 errors\n",
    }
    finished = "sanitize_ops: all cases finite\n"
    for tool, text in logs.items():
        (tmp_path / f"sanitizer-{tool}.log").write_text("noise\n" + finished + text)
    (tmp_path / "session.json").write_text(json.dumps({"dry": "0", "commit": "abc"}))
    summary = gpu_summary.summarize(str(tmp_path))
    assert summary["sanitizer_errors"] == 3
    assert summary["sanitizer_errors_by_tool"] == {"memcheck": 2, "racecheck": 1, "initcheck": 0}
    # A tool cut before its summary makes the total unknown, not smaller.
    (tmp_path / "sanitizer-initcheck.log").write_text("========= Program hit ... (killed)\n")
    summary = gpu_summary.summarize(str(tmp_path))
    assert summary["sanitizer_errors"] is None and "initcheck" in summary["notes"]["sanitizer_errors"]
    # A tool that refused the device (the program died at its first allocation) checked nothing: its
    # "0 errors" is not a pass. Errors found before a crash still count.
    refused = "========= Error: Device not supported\nRuntimeError: CUDA error\n========= ERROR SUMMARY: 0 errors\n"
    (tmp_path / "sanitizer-initcheck.log").write_text(refused)
    summary = gpu_summary.summarize(str(tmp_path))
    assert summary["sanitizer_errors"] is None and "initcheck" in summary["notes"]["sanitizer_errors"]
    (tmp_path / "sanitizer-initcheck.log").write_text("RuntimeError: illegal memory access\n" + logs["memcheck"])
    assert gpu_summary.summarize(str(tmp_path))["sanitizer_errors"] == 5


def test_determinism_check_sees_a_call_that_differs(monkeypatch):
    assert all(r["deterministic"] for r in gpu_determinism.check("cpu", quick=True))
    real = gpu_determinism.ops.deform_conv2d
    calls = [0]

    def drifting(*args, **kwargs):  # what scattered atomics do: the last bits move from call to call
        calls[0] += 1
        out = real(*args, **kwargs)
        return out + calls[0] * 1e-6 * out.detach()

    monkeypatch.setattr(gpu_determinism.ops, "deform_conv2d", drifting)
    rows = {(r["op"], r["amp"]): r for r in gpu_determinism.check("cpu", quick=True)}
    assert not rows[("deform_conv2d", "none")]["deterministic"]
    assert "out" in rows[("deform_conv2d", "none")]["differs"]
    assert rows[("dual_deform_conv2d", "none")]["deterministic"]


def test_prebuilt_extension_is_used_only_when_its_stamp_matches(tmp_path, monkeypatch):
    """benchmarks/gpu_prebuilt.py check: an extension built ahead is accepted only with a stamp that matches the
    tree's sources, torch, Python and the architectures, and only when it loads with its CUDA kernels."""
    import gpu_prebuilt

    monkeypatch.setattr(gpu_prebuilt, "STAMP", str(tmp_path / "_C.build.json"))
    assert gpu_prebuilt.why_not("9.0").startswith("no stamp")
    good = {"sources": gpu_prebuilt.sources_hash(), **gpu_prebuilt.interpreter(), "arch": "9.0"}
    for key, wrong in (("sources", "0" * 64), ("torch", "2.0.0"), ("python", "3.8"), ("arch", "8.0")):
        (tmp_path / "_C.build.json").write_text(json.dumps({**good, key: wrong}))
        assert gpu_prebuilt.why_not("9.0").startswith(f"the stamp's {key} is"), key
    (tmp_path / "_C.build.json").write_text(json.dumps(good))
    reason = gpu_prebuilt.why_not("9.0")
    if torch.ops.csfrn.built_with_cuda():  # this machine's extension (make setup builds CUDA where nvcc is)
        assert reason is None
    else:
        assert reason == "it was built without CUDA"


def test_prebuilt_stamp_hash_follows_every_source(tmp_path, monkeypatch):
    import gpu_prebuilt

    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("setup()")
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() {}")
    monkeypatch.setattr(gpu_prebuilt, "ROOT", str(tmp_path))
    seen = {gpu_prebuilt.sources_hash()}
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() { }")  # an edit
    seen.add(gpu_prebuilt.sources_hash())
    (tmp_path / "csrc" / "new.h").write_text("")  # a new file
    seen.add(gpu_prebuilt.sources_hash())
    (tmp_path / "setup.py").write_text("setup(name='x')")
    seen.add(gpu_prebuilt.sources_hash())
    assert len(seen) == 4


def test_summary_holds_each_target_against_its_measurement(tmp_path):
    """summary.json's "targets" (and summary.md's table) from the 2026-11-26 H100 run's deform benchmark, the
    launch plan the benchmark adds now, and a step benchmark file: each target met, missed or not measured."""
    from csfrn.bench import deform_plan

    gpu = os.path.join(ROOT, "benchmarks", "results", "gpu")
    for dtype in ("fp32", "bf16"):
        with open(os.path.join(gpu, f"deform_conv_cuda-{dtype}.json")) as f:
            doc = json.load(f)
        doc["plan"] = deform_plan.gpu_plans()
        (tmp_path / f"deform_conv-{dtype}.json").write_text(json.dumps(doc))
    with open(os.path.join(gpu, "info.json")) as f:
        info = json.load(f)
    (tmp_path / "info.json").write_text(json.dumps(info))
    # On a GPU the step figures are the channels_last rows (csfrn train's default there), never the NCHW ones.
    rows = [
        {"mode": "train step", "variant": v, "median_ms": ms}
        for v, ms in (
            ("baseline", 400.0),
            ("csfrn", 400.0),
            ("tv-deeplabv3", 400.0),
            ("baseline-cl", 180.0),
            ("csfrn-cl", 210.0),
            ("tv-deeplabv3-cl", 190.0),
        )
    ]
    (tmp_path / "train_step-core.json").write_text(json.dumps({"rows": rows, "meta": {"batch": 8}}))
    compiled = [{"mode": "train step", "variant": "csfrn-cl-compiled", "median_ms": 150.0}]
    (tmp_path / "train_step-compiled-csfrn.json").write_text(json.dumps({"rows": compiled, "meta": {"batch": 8}}))
    (tmp_path / "session.json").write_text(json.dumps({"dry": "0", "commit": "abc"}))
    summary = gpu_summary.summarize(str(tmp_path))
    got = {t["target"]: (t["value"], t["met"]) for t in summary["targets"] if t["op"]}
    assert len(got) == len(gpu_summary.TARGETS)
    assert got["deform_conv2d fwd+bwd, float32: torchvision / ours"] == (pytest.approx(36.8 / 39.1, abs=0.01), False)
    assert got["AAM dual op fwd+bwd, bf16: ours / torchvision's two calls"] == (
        pytest.approx(37.99 / 48.31, 1e-3),
        False,
    )
    # 28.1 ms against the bf16 plan's floor at the measured ceilings, 2.27 ms
    value, met = got["deform_conv2d fwd+bwd, bf16: ours / the plan's floor at the measured ceilings"]
    assert value == pytest.approx(28.11 / 2.27, rel=0.02) and met is False
    assert got["baseline training step, ms"] == (180.0, True)
    assert got["CSFRN step / baseline step"] == (pytest.approx(210 / 180), False)
    assert got["baseline step / torchvision deeplabv3_resnet50 step"] == (pytest.approx(180 / 190), True)
    assert got["CSFRN through csfrn train, images/s"] == (None, None)
    assert summary["step_ms_csfrn_compiled"] == 150.0
    assert (
        summary["step_ms_baseline_compiled"] is None
        and "baseline-cl-compiled" in summary["notes"]["step_ms_baseline_compiled"]
    )
    plans = [t for t in summary["targets"] if t["op"] is None]
    assert [round(t["floor_ms"], 1) for t in plans] == [13.1, 2.3]
    md = gpu_summary.markdown(summary, str(tmp_path))
    assert "| baseline training step, ms | 180.000 | <= 200 | yes |" in md
    assert "| CSFRN step / baseline step | 1.167 | <= 1.12 | **no** |" in md


def test_summary_reads_variants_the_step_benchmark_makes():
    """Every step variant the summary looks for is one csfrn/bench/train_step.py runs, on a GPU and in the dry
    run (a name only the summary knew would leave its figure null on the card)."""
    from csfrn.bench import train_step

    wanted = {gpu_summary.step_variant(model, dry) for model in gpu_summary.STEP_VARIANTS for dry in (True, False)}
    wanted |= {gpu_summary.step_variant(model, dry, compiled=True) for model in ("baseline", "csfrn") for dry in (1, 0)}
    assert wanted <= set(train_step.VARIANTS), wanted - set(train_step.VARIANTS)
