"""The training-step benchmark and the report (benchmarks/report.py) run end to end in --quick mode and write what
they promise.
No timing assertions: timing is checked by the benchmarks themselves. Every run names --device cpu: on a GPU
machine the benchmarks default to CUDA (and bf16), which these CPU-sized expectations do not describe."""

import json
import os
import sys
import unittest.mock

import pytest
import torch
from PIL import Image

from conftest import ROOT
from csfrn.bench import train_step

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import report  # noqa: E402  (benchmarks/report.py: a tool of the repository, not of the package)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops on a shared, loaded CPU: a second OpenMP thread only waits for the busy core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_step_quick(tmp_path, capsys):
    path = tmp_path / "step.json"
    result = train_step.main(["--quick", "--device", "cpu", "--reps", "1", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert set(saved) == {"meta", "rows", "ratios", "gflops", "train", "ceiling"}
    variants = ["baseline", "csfrn", "reference"] + (["torchvision"] if train_step.have_torchvision() else [])
    assert [(r["mode"], r["variant"]) for r in saved["rows"]] == [
        (m, v) for m in ("train step", "inference") for v in variants
    ]
    for r in saved["rows"]:
        assert {"median_ms", "min_ms", "max_ms", "peak_mb", "vs_baseline"} <= set(r)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    assert {"csfrn_over_baseline", "extra_ms_csfrn", "extra_ms_reference", "extra_cut"} <= set(saved["ratios"])
    assert saved["gflops"]["csfrn"] > saved["gflops"]["baseline"] > 0
    assert saved["meta"]["size"] == [33, 33] and saved["meta"]["amp"] == "none"
    out = capsys.readouterr().out
    assert "(b)/(a) step time" in out and out.rstrip().splitlines()[-1].lstrip().startswith("inference")
    assert result["rows"] == saved["rows"]


def test_torchvision_variant_matches_ours():
    """(d) times the same computation as (b): torchvision's two deform convs give our dual op's result."""
    pytest.importorskip("torchvision")
    from csfrn import ops

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 3, 5, 6, generator=g), torch.randn(1, 4, 5, 6, generator=g)
    offset = torch.randn(1, 18, 5, 6, generator=g)
    wx, wy = torch.randn(3, 3, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    ours = ops.dual_deform_conv2d(x, y, offset, wx, wy, padding=1)
    with train_step.variant_context("torchvision"):
        theirs = ops.dual_deform_conv2d(x, y, offset, wx, wy, padding=1)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_breakdown_parts():
    images, labels = train_step.make_batch(2, (33, 33), "cpu")
    model = train_step.build(True, True, "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    parts = report.breakdown(model, optimizer, images, labels)
    assert list(parts) == [
        "backbone",
        "head",
        "aux head",
        "CSFLM",
        "AAM",
        "losses",
        "other forward",
        "backward",
        "optimizer",
    ]
    assert all(v >= 0 for k, v in parts.items() if k != "other forward")


def test_report_quick(tmp_path):
    paths = report.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert set(paths) == {"json", "md", "ops_png", "step_png"}
    for p in paths.values():
        assert os.path.dirname(p) == str(tmp_path) and os.path.getsize(p) > 0
    saved = json.loads(open(paths["json"]).read())
    assert set(saved) == {"meta", "ops", "train_step", "breakdown"}
    assert {r["op"] for r in saved["ops"]} >= {"class_avg_pool", "center_distance"}
    assert len({r["pixels"] for r in saved["ops"] if r["op"] == "class_avg_pool"}) >= 2
    assert set(saved["breakdown"]) == {"baseline", "csfrn"}
    assert "AAM" in saved["breakdown"]["csfrn"] and "AAM" not in saved["breakdown"]["baseline"]
    md = open(paths["md"]).read()
    assert "## Training step" in md and os.path.basename(paths["step_png"]) in md
    for key in ("ops_png", "step_png"):
        with Image.open(paths[key]) as img:
            assert img.format == "PNG" and img.width >= 800


def test_report_reuses_a_step_json(tmp_path):
    step = tmp_path / "step.json"
    train_step.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--reps",
            "1",
            "--variants",
            "baseline",
            "csfrn",
            "--no-inference",
            "--json",
            str(step),
        ]
    )
    paths = report.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "out"), "--step-json", str(step)])
    saved = json.loads(open(paths["json"]).read())
    assert saved["train_step"] == json.loads(step.read_text())


def test_deform_bench_quick_under_autocast(tmp_path, capsys):
    """The deform conv benchmark's mixed-precision run (what a GPU session measures in bf16), smoke-sized."""
    from csfrn.bench import deform

    path = tmp_path / "deform.json"
    rows = deform.main(["--quick", "--device", "cpu", "--no-twin", "--reps", "1", "--amp", "bf16", "--json", str(path)])
    assert {r["impl"] for r in rows} >= {"ours", "torchvision", "dense conv2d", "ours dual", "ours 2 calls"}
    assert all(r["median_ms"] > 0 and r["floor_ms"] is None for r in rows)  # no float32 floor under autocast
    saved = json.loads(path.read_text())
    assert saved["amp"] == "bf16"
    assert [(p["op"], p["dtype"]) for p in saved["plan"]] == [
        ("deform_conv2d", "float32"),
        ("dual_deform_conv2d", "float32"),
        ("deform_conv2d", "bfloat16"),
        ("dual_deform_conv2d", "bfloat16"),
    ]
    out = capsys.readouterr().out
    assert "autocast bf16" in out and "CUDA plan, deform_conv2d fwd+bwd" in out and "floor" in out


def test_deform_plan():
    """The CUDA launch plan at the GPU shape: three GEMMs of 2 N L C_out C_in 9 flops, the chunks deform_conv.cu's
    workspace cap gives (float32: 2 forward, 4 backward; bf16: 1 and 2), and a floor that adds up per kernel."""
    from csfrn.bench import deform_plan

    gemm = 2.0 * 8 * 97 * 97 * 256 * 512 * 9
    for dtype, chunks in (("float32", (2, 4)), ("bfloat16", (1, 2))):
        kernels = deform_plan.plan(dtype=dtype)
        assert sum(k.flops for k in kernels) == 3 * gemm
        assert tuple(k.launches for k in kernels if k.name.startswith("sample_kernel")) == chunks
        rows, total = deform_plan.summarise(kernels, "NVIDIA H100 80GB HBM3", dtype)
        assert total["floor_ms"] == sum(r["floor_ms"] for r in rows) > 3 * gemm / 778e12 * 1e3
    single, dual = (deform_plan.plan(dtype="bfloat16", dual=d) for d in (False, True))
    assert sum(k.flops for k in dual) == 2 * sum(k.flops for k in single)
    sort = [k for k in dual if k.name.startswith("at::sort")]  # the dual op sorts once for both convolutions
    assert sort[0].bytes == [k for k in single if k.name.startswith("at::sort")][0].bytes
    # vector loads: 16 bytes a lane at 512 channels; at 510 (255 per group: odd) one element, as many more accesses
    for dtype, v in (("float32", 4), ("bfloat16", 8)):
        wide = [k for k in deform_plan.plan(dtype=dtype, groups=2) if k.accesses]
        odd = [k for k in deform_plan.plan(dtype=dtype, groups=2, c_in=510) if k.accesses]
        assert [k.lane_bytes for k in wide] == [16] * 3 and [k.lane_bytes for k in odd] == [16 // v] * 3
        for a, b in zip(wide, odd):
            assert b.accesses / a.accesses == pytest.approx(v * 510 / 512)


def test_deform_plan_card_is_the_device_s_own(monkeypatch):
    """The plan is computed at the card the benchmark runs on when it knows that card, else at the H100's
    ceilings (a CPU run, an unknown GPU)."""
    from csfrn.bench import deform_plan

    assert deform_plan.card_of("cpu") == deform_plan.DEFAULT_CARD
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, want in (("NVIDIA H200", "NVIDIA H200"), ("NVIDIA A100-SXM4-80GB", deform_plan.DEFAULT_CARD)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert deform_plan.card_of("cuda") == want
    assert deform_plan.gpu_plans(deform_plan.card_of("cuda:0"))[0]["card"] == deform_plan.DEFAULT_CARD


def test_ops_bench_quick_has_the_kernels_alone(tmp_path, capsys):
    """bench-ops times the bare forward and backward ops beside the autograd path and the peers, in one run."""
    from csfrn.bench import ops as ops_bench

    path = tmp_path / "ops.json"
    rows = ops_bench.main(["--quick", "--device", "cpu", "--reps", "1", "--json", str(path)])
    for op in ("class_avg_pool", "center_distance"):
        for pass_ in ("fwd", "fwd+bwd"):
            impls = {r["impl"] for r in rows if r["op"] == op and r["pass"] == pass_}
            assert impls == {"csfrn", "reference", ops_bench.PEER[op], "kernels only"}
    assert all(r["median_ms"] > 0 for r in rows)
    assert json.loads(path.read_text())["rows"] == rows
    out = capsys.readouterr().out
    assert out.count("for our kernels alone, without autograd") == 2


def test_train_step_speed_variants_at_a_tiny_size(tmp_path, capsys):
    """The speed variants (channels_last, compiled, torchvision's deeplabv3_resnet50) and the run through
    csfrn train's loop, at a tiny size: every training row has its step ms, images/s, peak memory, TFLOP/s and
    share of the ceiling; the JSON has them by variant. (Compiled with the aot_eager backend here: inductor's
    code generation takes minutes on 2 cores; the benchmark itself uses inductor.)"""
    real_compile = torch.compile

    def compile_aot_eager(model, mode=None):
        return real_compile(model, backend="aot_eager")

    variants = ["baseline", "baseline-cl", "csfrn-compiled"]
    path = tmp_path / "step.json"
    with unittest.mock.patch.object(train_step.torch, "compile", compile_aot_eager):
        train_step.main(
            [
                "--quick",
                "--device",
                "cpu",
                "--size",
                "33",
                "--batch",
                "2",
                "--iters",
                "1",
                "--variants",
                *variants,
                "--no-inference",
                "--ceiling-tflops",
                "0.3",
                "--engine-iters",
                "2",
                "--engine-workers",
                "0",
                "--json",
                str(path),
            ]
        )
    saved = json.loads(path.read_text())
    want = ["baseline", "csfrn", "baseline-cl", "csfrn-compiled"]
    assert [r["variant"] for r in saved["rows"]] == want
    assert set(saved["train"]) == set(want)
    for _v, figures in saved["train"].items():
        assert set(figures) == {"step_ms", "images_s", "peak_mb", "tflops", "mfu", "step_tflop"}
        assert figures["images_s"] == pytest.approx(2e3 / figures["step_ms"])
        assert figures["mfu"] == pytest.approx(figures["tflops"] / 0.3) and figures["tflops"] > 0
    assert saved["train"]["csfrn"]["step_tflop"] > saved["train"]["baseline"]["step_tflop"]
    assert saved["ceiling"] == {"tflops": 0.3, "what": "given"}
    for name in ("baseline", "csfrn"):
        e = saved["engine"][name]
        assert 0 <= e["data_ms"] < e["step_ms"] and e["compute_ms"] == pytest.approx(e["step_ms"] - e["data_ms"])
    out = capsys.readouterr().out
    assert "through csfrn train (csfrn)" in out and "TFLOP/s" in out


def test_train_step_variant_names():
    assert train_step.parse_variant("csfrn-cl-compiled") == ("csfrn", True, True)
    assert train_step.parse_variant("tv-deeplabv3-cl") == ("tv-deeplabv3", True, False)
    assert train_step.parse_variant("baseline") == ("baseline", False, False)
    with pytest.raises(ValueError, match="unknown variants"):
        train_step.run("cpu", quick=True, variants=["csfrn-fast"])


def test_torchvision_peer_trains_like_our_models():
    """tv-deeplabv3: torchvision's deeplabv3_resnet50 with our training interface and loss (seg + 0.4 aux
    cross-entropy on float32 logits); its step FLOPs are counted on the meta device."""
    pytest.importorskip("torchvision")
    images, labels = train_step.make_batch(2, (33, 33), "cpu")
    peer = train_step.build_variant("tv-deeplabv3-cl", True, "cpu", {})
    assert peer.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    logits, losses = peer(images, labels)
    assert set(losses) == {"seg", "aux"} and logits.shape == (2, train_step.NUM_CLASSES, 33, 33)
    torch.testing.assert_close(losses["seg"], torch.nn.functional.cross_entropy(logits, labels, ignore_index=255))
    assert train_step.step_flops("tv-deeplabv3", True, (33, 33), 2) > train_step.step_flops(
        "baseline", True, (33, 33), 2
    )


def test_export_bench_writes_under_out(tmp_path, capsys):
    """csfrn bench --what export: onnxruntime and torch.export against eager on the demo's model, rows to --out."""
    pytest.importorskip("onnxruntime")
    from csfrn.bench import export

    rows = export.main(["--sizes", "32x32", "--reps", "1", "--threads", "1", "--out", str(tmp_path)])
    assert [r["size"] for r in rows] == [[32, 32]]
    assert all(rows[0][k] > 0 for k in ("eager", "onnxruntime", "torch.export")) and rows[0]["max_abs_diff"] < 1e-4
    assert json.loads((tmp_path / "export-cpu.json").read_text())["rows"] == rows
    assert "| 1x3x32x32 |" in capsys.readouterr().out
