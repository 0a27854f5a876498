"""Each shipped plug/ config (another library's model with CSFLM, ``model.external``) through the real entry
point, ``python -m csfrn.cli``: train 2 iterations at 64 px on the synthetic set, then eval, predict and export
--out x.onnx of its checkpoint (and visualize, for one), which build the model from the checkpoint's config.
One test per config chains the verbs: the cost is mostly the start of each process."""

import os

import pytest

from conftest import rgb, write_png
from test_cli_verbs import _sets, csfrn

TINY = [
    "model.num_classes=4",
    "data.dataset=synthetic",
    "data.root=null",
    "data.size=64",
    "data.length=4",
    "data.val_length=2",
    "data.crop_size=[64,64]",
    "data.batch_size=2",
    "data.num_workers=0",
    "train.device=cpu",
    "train.iters=2",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.checkpoint_interval=2",
    "train.tensorboard=false",
    "train.progress=false",
    "eval.mode=whole",
]


@pytest.mark.parametrize("name", ["torchvision_deeplabv3_r50", "smp_unet_r34", "hf_segformer_b0"])
def test_plug_config_train_eval_predict_export(tmp_path, name):
    config = f"plug/{name}"  # a shipped config, by name
    work = tmp_path / "run"
    result = csfrn("train", "--config", config, *_sets(TINY + [f"train.work_dir={work}"]))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = work / "last.pth"
    assert checkpoint.is_file() and "iter 2: mIoU" in result.stdout

    result = csfrn("eval", "--checkpoint", checkpoint, "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "eval" / "eval_val.json").is_file() and "embeddings B" in result.stdout

    write_png(str(tmp_path / "images" / "a.png"), rgb(64, 48))
    result = csfrn("predict", "--checkpoint", checkpoint, "--input", tmp_path / "images", "--out", tmp_path / "pred")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"a_trainid.png", "a_color.png", "a_overlay.png"} <= set(os.listdir(tmp_path / "pred"))

    onnx = tmp_path / "x.onnx"
    result = csfrn("export", "--checkpoint", checkpoint, "--out", onnx, "--size", "64", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert onnx.is_file() and "within 0.0001" in result.stdout

    if name == "hf_segformer_b0":  # Figure 3 needs only predict_maps, which every plug has: one is enough
        result = csfrn("visualize", "--checkpoint", checkpoint, "--out", tmp_path / "fig.png")
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / "fig.png").is_file()


def test_plug_config_errors_are_one_line(tmp_path, capsys):
    """In this process (csfrn.cli.main, the console script's function): the errors come before any training."""
    from csfrn.cli import main

    config = "plug/smp_unet_r34"
    for override, fragment in (
        ("model.external.tap=segmentation_head.7", "'model.external.library' is missing"),
        (
            "model.external={library: smp, name: Unet, kwargs: {encoder_name: resnet18}, tap: nope}",
            "tap='nope' names no submodule",
        ),
    ):
        assert main(["train", "--config", config, *_sets(TINY + [f"train.work_dir={tmp_path}", override])]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("csfrn train: error: ") and fragment in lines[0], lines
