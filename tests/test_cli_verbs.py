"""Verbs that do what they say (issue 14): flops counts the configured model, bench and flops list and check
their options, bench writes only under --out and logs no profiler noise, slide inference equals whole when
the crop covers the image, visualize draws the legend / colour bar / numbered rings and rejects what it cannot
draw. CLI tests run the real entry point (``python -m csfrn.cli``) in a subprocess on tiny models."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIG, tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "demo"  # the shipped config, by name
NOISE = ("USDT", "gpuGetDeviceCount", "STAGE:", "profiling started", "Traceback")


def csfrn(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "csfrn.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def assert_one_line_error(result, verb, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"csfrn {verb}: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny CSFRN (concat fusion, 4 classes, 32 px synthetic images) trained 2 iterations by `csfrn train`."""
    work = tmp_path_factory.mktemp("run")
    result = csfrn("train", "--config", TINY_CONFIG, *_sets(tiny_overrides(work, iters=2)))
    assert result.returncode == 0, result.stderr[-2000:]
    return work / "last.pth"


# ---------------------------------------------------------------- flops
def _params(*overrides):
    from csfrn.engine.config import load_config
    from csfrn.engine.checkpoint import build_model_from_config

    cfg = load_config(DEMO, list(overrides))
    with torch.device("meta"):
        return sum(p.numel() for p in build_model_from_config(cfg.model).parameters())


def test_flops_counts_the_model_the_config_describes():
    result = csfrn("flops", "--config", DEMO, "--size", "64")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    # the demo's narrow model (0.28 M parameters), not a full ResNet-50 DeepLabv3+
    assert line.startswith(
        "deeplabv3plus resnet50c (num_classes 7, width 8, blocks [1, 1, 1, 1], channels 32, "
        "aux_channels 16) +CSFLM(aam, D=8) @ 64x64: params "
    )
    assert f"params {_params() / 1e6:.2f} M" in line and _params() < 0.3e6
    # every model key counts, the flags override the config, and model.pretrained is never read
    result = csfrn(
        "flops",
        "--config",
        DEMO,
        "--set",
        "model.aux_channels=64",
        "--set",
        "model.aux=true",
        "--set",
        "model.pretrained=/no/such/imagenet.pth",
        "--no-csflm",
    )
    assert result.returncode == 0, result.stderr
    expected = _params("model.aux_channels=64", "model.csflm=false")
    assert f"params {expected / 1e6:.2f} M" in result.stdout and "@ 64x64" in result.stdout  # data.crop_size
    assert "+CSFLM" not in result.stdout and "aux_channels 64" in result.stdout


def test_flops_user_errors_are_one_line():
    assert_one_line_error(csfrn("flops", "--size", "1", "2", "3"), "flops", "--size")
    result = csfrn("flops", "--config", DEMO, "--no-such-option", "3")
    assert result.returncode == 2 and "--no-such-option" in result.stderr


# ---------------------------------------------------------------- help lists every option
def _options(add_arguments):
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {s for a in parser._actions for s in a.option_strings}


def test_flops_and_bench_help_list_every_option():
    from csfrn.bench import deform, export, ops, train_step

    result = csfrn("flops", "--help")
    assert result.returncode == 0
    for option in (
        "--config",
        "--set",
        "--size",
        "--head",
        "--backbone",
        "--num-classes",
        "--fusion",
        "--embed-dim",
        "--output-stride",
        "--no-csflm",
        "--no-margins",
        "--multi-grid",
    ):
        assert option in result.stdout, option
    result = csfrn("bench", "--help")  # an overview naming every benchmark (fast: it imports none of them)
    assert result.returncode == 0
    for what, module in (("ops", ops), ("deform", deform), ("train", train_step), ("export", export)):
        assert f"\n  {what} " in result.stdout, what
        section = csfrn("bench", "--what", what, "--help").stdout.split(f"==== --what {what} ")[1]
        for option in _options(module.add_arguments):
            assert option in section, (what, option)
    # --what X --help: X's options only
    only = csfrn("bench", "--what", "train", "--help").stdout
    assert "--infer-size" in only and "--twin-reps" not in only


# ---------------------------------------------------------------- bench: strict options, --out, no noise
def test_bench_rejects_options_its_benchmark_does_not_take():
    assert_one_line_error(
        csfrn("bench", "--what", "ops", "--twin-reps", "3"),
        "bench",
        "unrecognized arguments: --twin-reps 3",
        "--what ops --help",
    )
    assert_one_line_error(csfrn("bench", "--what", "train", "--config", DEMO), "bench", "--config")
    assert_one_line_error(csfrn("bench", "--what", "ops", "--shape", "1,2"), "bench", "--shape")
    # the report is a tool of the repository (benchmarks/report.py), not a benchmark of the package
    result = csfrn("bench", "--what", "report", "--quick")
    assert result.returncode == 2 and "invalid choice: 'report'" in result.stderr, result.stderr


def test_bench_ops_writes_only_under_out(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = csfrn(
        "bench", "--what", "ops", "--quick", "--reps", "1", "--device", "cpu", "--out", tmp_path / "res", cwd=cwd
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "res" / "class_ops-cpu.json").read_text())
    assert {r["op"] for r in saved["rows"]} == {"class_avg_pool", "center_distance"}
    assert not any(n in result.stdout + result.stderr for n in NOISE), result.stderr
    result = csfrn("bench", "--what", "ops", "--quick", "--reps", "1", "--device", "cpu", cwd=cwd)
    assert result.returncode == 0 and "nothing written" in result.stdout
    assert os.listdir(cwd) == []  # nothing relative to the current folder


def test_bench_report_log_has_no_profiler_noise(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "report.py"),
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "res"),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert not [line for line in log.splitlines() if any(n in line for n in NOISE)], log
    assert result.stderr == ""
    assert sorted(os.path.splitext(n)[1] for n in os.listdir(tmp_path / "res")) == [".json", ".md", ".png", ".png"]
    assert os.listdir(cwd) == []


def test_profiler_quiet_drops_only_the_profilers_lines(capfd):
    from csfrn.bench.timing import peak_memory_mb, profiler_quiet

    with profiler_quiet():
        os.write(2, b"USDT:2026-11-26 16:21:32 1:1 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"ERROR:2026-11-26 16:21:32 1:1 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n")
        os.write(2, b"a warning of the profiled code\n")
    peak_memory_mb(lambda: torch.ones(1000).sum())
    err = capfd.readouterr().err
    assert err == "a warning of the profiled code\n"


def _overlap(a, b):
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def test_ops_chart_end_labels_do_not_overlap(tmp_path):
    """Lines ending at (nearly) the same value get labels spread apart, inside the picture."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import report  # benchmarks/report.py

    rows = []
    for op, impls in (
        ("center_distance", ["csfrn", "reference", "cdist", "kernels only"]),
        ("deform AAM", ["ours dual", "ours 2 calls", "torchvision 2 calls", "dense conv2d 2 calls", "twin dual"]),
    ):
        for i, impl in enumerate(impls):
            for pixels in (100, 1000, 10000):
                rows.append(
                    {
                        "op": op,
                        "pass": "fwd",
                        "impl": impl,
                        "pixels": pixels,
                        "median_ms": pixels / 100 * (1 + 0.001 * i),
                    }
                )
    path = tmp_path / "ops.png"
    labels = report.ops_chart(rows, path, "test")
    with Image.open(path) as img:
        width, height = img.size
    assert len(labels) == 2 and all(len(b) in (4, 5) for b in labels.values())
    for boxes in labels.values():
        for i, a in enumerate(boxes):
            assert 0 <= a[0] and a[2] <= width and 0 <= a[1] and a[3] <= height
            for b in boxes[i + 1 :]:
                assert not _overlap(a, b), (a, b)


# ---------------------------------------------------------------- eval: slide = whole when the crop covers
def test_eval_slide_with_a_crop_larger_than_the_image_equals_whole(checkpoint, tmp_path):
    miou = {}
    for mode in ("whole", "slide"):  # slide with the default 769 crop on 32 px images
        result = csfrn(
            "eval",
            "--checkpoint",
            checkpoint,
            "--out",
            tmp_path / mode,
            "--set",
            f"eval.mode={mode}",
            "--set",
            "eval.crop_size=[769,769]",
            "--set",
            "eval.stride=[513,513]",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        miou[mode] = json.loads((tmp_path / mode / "eval_val.json").read_text())
    assert miou["slide"]["IoU"] == miou["whole"]["IoU"] and miou["slide"]["aAcc"] == miou["whole"]["aAcc"]


# ---------------------------------------------------------------- visualize
def test_visualize_creates_out_folders_and_rejects_what_it_cannot_draw(checkpoint, tmp_path):
    out = tmp_path / "new" / "sub" / "fig3.png"
    result = csfrn(
        "visualize",
        "--checkpoint",
        checkpoint,
        "--out",
        out,
        "--indices",
        "0",
        "3",
        "--points",
        "5,5",
        "20,10",
        "31,31",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(out) as img:
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in np.unique(pixels, axis=0)}
    from csfrn.engine.visualize import QUERY_COLOURS, colormap

    assert set(QUERY_COLOURS) <= colours  # numbered rings: red, green, blue
    assert {tuple(colormap(v)) for v in (0.0, 0.5, 1.0)} <= colours  # the colour bar spans phi 0..1
    result = csfrn("visualize", "--checkpoint", checkpoint, "--out", tmp_path / "figures")  # a folder
    assert result.returncode == 0 and (tmp_path / "figures" / "figure3.png").is_file()

    # 4 validation images of 32 x 32 (into another file: `out` exists now, and would be refused)
    assert_one_line_error(
        csfrn("visualize", "--checkpoint", checkpoint, "--out", tmp_path / "other.png", "--indices", "0", "4"),
        "visualize",
        "--indices 4 out of range",
        "4 items",
    )
    assert_one_line_error(
        csfrn("visualize", "--checkpoint", checkpoint, "--out", tmp_path / "other.png", "--indices", "-1"),
        "visualize",
        "--indices -1 out of range",
    )
    assert_one_line_error(
        csfrn("visualize", "--checkpoint", checkpoint, "--out", tmp_path / "other.png", "--points", "5,32"),
        "visualize",
        "--points 5,32 outside item 0",
        "32x32",
    )
    assert_one_line_error(
        csfrn("visualize", "--checkpoint", checkpoint, "--out", tmp_path / "other.png", "--points", "5"),
        "visualize",
        "Y,X",
    )
    assert_one_line_error(
        csfrn("visualize", "--checkpoint", checkpoint, "--out", tmp_path / "f.xyz"),
        "visualize",
        "unknown picture extension .xyz",
    )


def test_figure3_has_a_colour_bar_a_class_legend_and_numbered_rings(tmp_path):
    from csfrn.engine import visualize

    palette = [(10, 200, 30), (200, 10, 130), (1, 2, 3), (90, 90, 250)]
    label = np.zeros((16, 16), dtype=np.uint8)
    label[8:] = 1
    label[0, 0] = 255
    pred = np.full((16, 16), 3, dtype=np.uint8)
    rows = [
        {
            "image": np.full((16, 16, 3), 128, dtype=np.uint8),
            "label": label,
            "pred": pred,
            "points": [(2, 2), (12, 12), (8, 3)],
            "maps": np.random.default_rng(0).random((3, 16, 16)),
        }
    ]
    path = visualize.figure3(
        rows, str(tmp_path / "a" / "f.png"), palette, scale=4, classes=["road", "car", "sky", "tree"]
    )
    with Image.open(path) as img:
        picture = np.asarray(img.convert("RGB"))
    grid_bottom = visualize.HEADER + visualize.GAP + 16 * 4 + visualize.GAP
    footer = {tuple(p) for p in np.unique(picture[grid_bottom:].reshape(-1, 3), axis=0)}
    grid = {tuple(p) for p in np.unique(picture[:grid_bottom].reshape(-1, 3), axis=0)}
    ramp = {tuple(c) for c in visualize.colormap(np.linspace(0, 1, 300))}
    assert len(ramp & footer) > 0.9 * len(ramp)  # the colour bar
    assert {palette[0], palette[1], palette[3]} <= footer  # legend: the classes shown (0, 1 in gt, 3 in pred)
    assert palette[2] not in footer  # not one that is not shown
    assert set(visualize.QUERY_COLOURS) <= grid  # the rings
    assert visualize.QUERY_COLOURS[:3] == [(255, 0, 0), (0, 255, 0), (0, 64, 255)]


# ---------------------------------------------------------------- README: what the demo gives
def test_readme_demo_paragraph_says_what_the_demo_prints():
    """The README's demo paragraph reports the multi-seed comparison the demo prints (means, the paired
    difference's interval and whether it contains 0), not a prose claim such as "within about a point"."""
    import re
    from csfrn.engine import demo

    text = open(os.path.join(ROOT, "README.md")).read()
    paragraph = text[text.index("`csfrn demo` trains") :].split("\n\n")[0]
    assert "within about a point" not in paragraph
    found = re.search(
        r"\(([\d.]+) ± [\d.]+ vs ([\d.]+) ± [\d.]+, interval \[([-+][\d.]+), ([-+][\d.]+)\], which "
        r"(contains|excludes) 0\)",
        paragraph,
    )
    assert found, paragraph
    ours, base, lo, hi = (float(v) for v in found.groups()[:4])
    assert lo <= ours - base <= hi
    assert (found.group(5) == "contains") == (lo <= 0 <= hi)
    assert ("behind" in paragraph) == (ours < base)
    assert "paired difference" in paragraph and "seeds" in paragraph
    assert "the interval contains 0" in open(demo.__file__).read()  # the demo prints the same verdict
