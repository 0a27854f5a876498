"""Issue 28: nothing silently wrong. Corrupt checkpoints, read-only or misnamed outputs, one overwrite policy,
inputs that used to be accepted and mis-read (split names, 1-bit and 0/255 masks, float images, eval strides,
binary configs, work dirs parsed as YAML), and the verbs' manners (eval's header, .pt2 prediction, fast
--help, README snippets). Everything runs the real entry point (``python -m csfrn.cli``) in a subprocess."""

import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from csfrn.data import FolderDataset
from csfrn.engine.checkpoint import load_checkpoint, save_checkpoint

from conftest import TINY_CONFIG, rgb, tiny_overrides, write_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def _unprivileged():
    """A command prefix under which root meets permissions like any user (root writes into read-only folders):
    a user namespace in which it is uid 65534 (files keep their owner, so the repository stays readable)."""
    if os.geteuid() != 0:
        return []
    prefix = ["unshare", "-U", "--map-user=65534", "--map-group=65534"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("running as root without user namespaces: a read-only folder cannot be made")
    return prefix


def csfrn(*args, cwd=None, timeout=300, unprivileged=False, python=()):
    prefix = _unprivileged() if unprivileged else []
    return subprocess.run(
        [*prefix, sys.executable, *python, "-m", "csfrn.cli", *map(str, args)],
        env=ENV,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(result, verb, *phrases):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"csfrn {verb}: error: "), result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained by `csfrn train --work-dir "exp #1"` (a path, not YAML: '#' would start a comment)."""
    root = tmp_path_factory.mktemp("run")
    overrides = [o for o in tiny_overrides("unused", iters=2) if not o.startswith("train.work_dir")]
    r = csfrn("train", "--config", TINY_CONFIG, *_sets(overrides), "--work-dir", "exp #1", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    work = root / "exp #1"
    assert not (root / "exp").exists() and (work / "best.pth").is_file()
    return {"root": root, "work": work, "best": work / "best.pth", "overrides": overrides}


# ---------------------------------------------------------------- checkpoints: checksum, mode
def _flip_tensor_bytes(src, dst, count=400):
    """Copy ``src`` with ``count`` bytes inverted in the middle of its largest tensor's data."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        payload = z.read(info)
    start = data.find(payload) + len(payload) // 2 - count // 2
    assert start > 0 and info.file_size > count
    for i in range(start, start + count):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))


def test_a_flipped_byte_is_a_one_line_error_and_files_are_0644(run, tmp_path):
    bad = tmp_path / "best.pth"
    _flip_tensor_bytes(run["best"], bad)
    torch.load(bad, weights_only=True)  # torch itself loads it: only the checksum notices
    one_line_error(
        csfrn("eval", "--checkpoint", bad, "--out", tmp_path), "eval", f"checkpoint {bad} is corrupt", "checksum"
    )
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("best.pth", "last.pth"):
        assert stat.S_IMODE(os.stat(run["work"] / name).st_mode) == 0o666 & ~umask
    os.umask(0o027)
    try:
        save_checkpoint({"w": torch.ones(2)}, tmp_path / "x.pth")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "x.pth").st_mode) == 0o640
    assert load_checkpoint(tmp_path / "x.pth")["checksum"]["algorithm"] == "sha256"


# ---------------------------------------------------------------- outputs: writable, folders, one overwrite policy
def _verb_args(verb, run, out, image):
    best = run["best"]
    return {
        "train": ["train", "--config", TINY_CONFIG, *_sets(run["overrides"]), "--work-dir", os.path.join(out, "w")],
        "eval": ["eval", "--checkpoint", best, "--out", out],
        "predict": ["predict", "--checkpoint", best, "--input", image, "--out", out],
        "export": ["export", "--checkpoint", best, "--out", os.path.join(out, "m.pt2"), "--size", "32", "32"],
        "visualize": ["visualize", "--checkpoint", best, "--out", os.path.join(out, "f.png")],
        "ablate": ["ablate", "--config", TINY_CONFIG, *_sets(run["overrides"]), "--out", out, "--seeds", "1"],
        "demo": ["demo", "--out", out, "--iters", "1", "--seeds", "1"],
    }[verb]


@pytest.mark.parametrize("verb", ["train", "eval", "predict", "export", "visualize", "ablate", "demo"])
def test_a_read_only_output_folder_is_refused_before_any_work(run, tmp_path, verb):
    image = str(tmp_path / "x.png")
    write_png(image, rgb(32, 32))
    readonly = str(tmp_path / "ro")
    os.mkdir(readonly)
    os.chmod(readonly, 0o555)
    try:
        r = csfrn(*_verb_args(verb, run, readonly, image), unprivileged=True, cwd=tmp_path)
        one_line_error(r, verb, readonly, "cannot write in", "Permission denied")
        assert os.listdir(readonly) == []
    finally:
        os.chmod(readonly, 0o755)


@pytest.mark.parametrize("verb", ["eval", "predict", "ablate", "demo"])
def test_out_naming_a_file_where_a_folder_is_meant(run, tmp_path, verb):
    out = tmp_path / "taken"
    out.write_text("mine")
    write_png(str(tmp_path / "x.png"), rgb(32, 32))
    r = csfrn(*_verb_args(verb, run, str(out), tmp_path / "x.png"))
    one_line_error(r, verb, f"{out} is a file; expected a folder")
    assert out.read_text() == "mine"


def test_every_verb_refuses_to_replace_outputs_without_overwrite(run, tmp_path):
    write_png(str(tmp_path / "in" / "x.png"), rgb(32, 32))
    best = run["best"]
    # predict: refused, then replaced
    assert csfrn("predict", "--checkpoint", best, "--input", tmp_path / "in", "--out", tmp_path / "p").returncode == 0
    one_line_error(
        csfrn("predict", "--checkpoint", best, "--input", tmp_path / "in", "--out", tmp_path / "p"),
        "predict",
        "already holds predictions",
        "x_trainid.png",
        "--overwrite",
    )
    assert (
        csfrn(
            "predict", "--checkpoint", best, "--input", tmp_path / "in", "--out", tmp_path / "p", "--overwrite"
        ).returncode
        == 0
    )
    # eval: a header, the paths written; refused the second time
    r = csfrn("eval", "--checkpoint", best, "--out", tmp_path / "e", "--no-consistency")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"csfrn eval: {best} (iteration 2) on split 'val' of synthetic, 4 images" in r.stdout
    assert f"wrote {tmp_path / 'e' / 'eval_val.json'}, {tmp_path / 'e' / 'eval_val.csv'}, " in r.stdout
    one_line_error(
        csfrn("eval", "--checkpoint", best, "--out", tmp_path / "e", "--no-consistency"),
        "eval",
        "eval_val.json",
        "--overwrite",
    )
    # visualize
    one_line_error(
        csfrn("visualize", "--checkpoint", best, "--out", tmp_path / "p" / "x_color.png"),
        "visualize",
        "already holds a picture",
        "--overwrite",
    )
    # demo: an --out holding a previous demo is refused (its seeds would mix with the new ones)
    (tmp_path / "d" / "csfrn" / "seed4").mkdir(parents=True)
    one_line_error(
        csfrn("demo", "--out", tmp_path / "d", "--iters", "1", "--seeds", "1"),
        "demo",
        "a previous demo",
        "--resume auto",
        "--overwrite",
    )


def test_train_overwrite_removes_stale_eval_reports(run, tmp_path):
    work = tmp_path / "2024"  # a path: not the YAML integer 2024
    shutil.copytree(run["work"], work)
    (work / "eval_test.json").write_text("{}")
    (work / "notes.txt").write_text("mine")
    r = csfrn(
        "train",
        "--config",
        TINY_CONFIG,
        *_sets(run["overrides"]),
        "--work-dir",
        "2024",
        "--overwrite",
        "--set",
        "train.iters=1",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (work / "eval_test.json").exists() and (work / "notes.txt").read_text() == "mine"
    assert load_checkpoint(work / "last.pth")["iter"] == 1


def test_make_bench_writes_under_build():
    dry = subprocess.run(["make", "-n", "bench", "VENV=/nonexistent"], cwd=ROOT, capture_output=True, text=True)
    line = [ln for ln in dry.stdout.splitlines() if "bench_ops.py" in ln]
    assert line and "--out build/bench" in line[0], dry.stdout
    dry = subprocess.run(
        ["make", "-n", "bench", "VENV=/nonexistent", "BENCH_OUT=benchmarks/results"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "--out benchmarks/results" in dry.stdout


# ---------------------------------------------------------------- inputs accepted and read as meant
def test_config_mistakes_are_one_line(run, tmp_path):
    one_line_error(csfrn("train", *_sets(run["overrides"])), "train", "--config is required", "csfrn config --list")
    one_line_error(csfrn("train", "--config", run["best"]), "train", str(run["best"]), "not a YAML text file")
    one_line_error(
        csfrn(
            "eval",
            "--checkpoint",
            run["best"],
            "--out",
            tmp_path,
            "--set",
            "eval.mode=slide",
            "--set",
            "eval.crop_size=[16,16]",
            "--set",
            "eval.stride=[24,8]",
        ),
        "eval",
        "'eval.stride'",
        "larger than eval.crop_size",
    )


def _folder(root, masks, split, image_mode="RGB"):
    for i, mask in enumerate(masks):
        if image_mode == "F":
            path = root / "images" / split / f"im{i}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb(*mask.shape, seed=i)[..., 0].astype(np.float32) / 255).save(path)
        else:
            write_png(str(root / "images" / split / f"im{i}.png"), rgb(*mask.shape, seed=i))
        path = root / "masks" / split / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(path)


def test_folder_splits_one_bit_and_binary_255_masks_and_float_images(tmp_path):
    bits = [np.arange(32 * 32).reshape(32, 32) % 3 == 0 for _ in range(4)]
    root = tmp_path / "data"
    (root).mkdir()
    (root / "classes.txt").write_text("background\nobject\n")
    _folder(root, bits, "fold1", image_mode="F")  # 1-bit masks, float TIFF images
    _folder(root, [(b * 255).astype(np.uint8) for b in bits], "held-out")
    assert Image.open(root / "masks" / "fold1" / "im0.png").mode == "1"
    sets = [o for o in tiny_overrides(tmp_path / "w", iters=1) if not o.startswith(("data.dataset", "model.num_"))]
    base = [
        "train",
        "--config",
        TINY_CONFIG,
        *_sets(sets),
        "--set",
        "data.dataset=folder",
        "--set",
        f"data.root={root}",
        "--set",
        "model.num_classes=2",
        "--set",
        "data.train_split=fold1",
    ]
    # 0 / 255 masks with two classes: refused, saying what to do
    one_line_error(
        csfrn(*base, "--set", "data.val_split=held-out"),
        "train",
        "only the values 0, 255",
        "data.binary_255: true",
        "relabel",
    )
    r = csfrn(*base, "--set", "data.val_split=held-out", "--set", "data.binary_255=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is a floating-point image: its values in [0, 1] are scaled to 0..255" in r.stderr
    one_line_error(
        csfrn(*base, "--set", "data.val_split=nope", "--overwrite"), "train", "split 'nope'", "fold1, held-out"
    )
    # what the dataset reads
    fold = FolderDataset(str(root), "fold1")
    image, label = fold.load(0)
    assert set(np.unique(label.numpy())) == {0, 1} and np.array_equal(label.numpy(), bits[0].astype(np.int64))
    assert image.float().std() > 10  # not all black
    held = FolderDataset(str(root), "held-out", binary_255=True)
    assert np.array_equal(held.load(0)[1].numpy(), bits[0].astype(np.int64))
    Image.fromarray(np.full((32, 32), 3.0, dtype=np.float32)).save(root / "images" / "fold1" / "im0.tif")
    with pytest.raises(OSError, match=r"floating-point image with values in \[3, 3\]; expected values in \[0, 1\]"):
        FolderDataset(str(root), "fold1").load(0)


# ---------------------------------------------------------------- manners
def test_predict_runs_a_pt2_and_names_the_supported_suffixes(run, tmp_path):
    model = tmp_path / "m.pt2"
    r = csfrn("export", "--checkpoint", run["best"], "--out", model, "--size", "32", "32", "--no-check")
    assert r.returncode == 0, r.stderr[-3000:]
    write_png(str(tmp_path / "in" / "x.png"), rgb(32, 32))
    r = csfrn("predict", "--model", model, "--input", tmp_path / "in", "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr[-3000:]
    via_pt2 = np.asarray(Image.open(tmp_path / "p" / "x_trainid.png"))
    r = csfrn("predict", "--checkpoint", run["best"], "--input", tmp_path / "in", "--out", tmp_path / "q")
    assert np.array_equal(via_pt2, np.asarray(Image.open(tmp_path / "q" / "x_trainid.png")))
    (tmp_path / "m.xyz").write_bytes(b"x")
    one_line_error(
        csfrn("predict", "--model", tmp_path / "m.xyz", "--input", tmp_path / "in", "--out", tmp_path / "r"),
        "predict",
        ".onnx or .pt2",
    )


VERBS = [
    "train",
    "eval",
    "predict",
    "export",
    "visualize",
    "flops",
    "demo",
    "ablate",
    "bench",
    "config",
    "plot",
    "browse",
]


def test_help_builds_without_importing_torch():
    for args in [["--help"], *([verb, "--help"] for verb in VERBS)]:
        r = csfrn(*args, python=("-X", "importtime"))
        assert r.returncode == 0 and "usage: csfrn" in r.stdout, r.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}
        assert "torch" not in imported and "csfrn.ops" not in imported, (args, sorted(imported)[-20:])


def test_ablation_plot_title_keeps_its_spaces(tmp_path, monkeypatch):
    # The Pillow chart this replaced lost its spaces at small font sizes ("dotsseeds"); matplotlib draws the text
    # it is given, so check the text the figure holds when it is saved, and that a PNG with ink comes out.
    from csfrn import plotting
    from csfrn.engine.ablate import plot_ablation

    titles, save = [], plotting.save_png

    def spy(fig, path):
        titles.extend(ax.get_title() for ax in fig.axes)
        return save(fig, path)

    monkeypatch.setattr(plotting, "save_png", spy)
    summary = {
        "split": "test",
        "variants": {"baseline": {"mIoU": {0: 50.0, 1: 52.0}}, "concat": {"mIoU": {0: 51.0, 1: 54.0}}},
    }
    plot_ablation(summary, tmp_path / "a.png")
    assert "mIoU % (test split): dots seeds, bar mean, line 95% CI" in titles
    assert (np.asarray(Image.open(tmp_path / "a.png").convert("L")) < 128).any()


def _readme_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_python_blocks_run_as_written(index, tmp_path):
    code = _readme_blocks()[index]
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README block {index}:\n{code}\n{r.stderr[-3000:]}"


def test_an_os_error_on_an_output_is_one_line(run, tmp_path):
    """Found only while writing: the folder of a nested output is taken by a file."""
    write_png(str(tmp_path / "in" / "a" / "x.png"), rgb(32, 32))
    write_png(str(tmp_path / "in" / "y.png"), rgb(32, 32))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a").write_text("mine")
    r = csfrn("predict", "--checkpoint", run["best"], "--input", tmp_path / "in", "--out", tmp_path / "p")
    last = r.stderr.strip().splitlines()[-1]  # after the progress bar
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last == f"csfrn predict: error: {tmp_path / 'p' / 'a'}: File exists", last


def test_slide_inference_refuses_strides_that_leave_pixels_uncovered():
    from csfrn.engine.inference import slide_inference

    model = lambda x: x[:, :2]  # noqa: E731  (logits: two "classes")
    with pytest.raises(ValueError, match=r"stride \(24, 8\) larger than crop_size \(16, 16\)"):
        slide_inference(model, torch.randn(1, 3, 40, 40), 2, crop_size=(16, 16), stride=(24, 8))
    out = slide_inference(model, torch.randn(1, 3, 16, 40), 2, crop_size=(32, 16), stride=(64, 8))  # one row
    assert torch.isfinite(out).all()
