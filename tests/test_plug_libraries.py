"""``add_csflm`` on the models people use besides torchvision's: segmentation_models_pytorch (Unet, DeepLabV3Plus,
FPN with its in-place dropout at the tap, Unet with aux_params) and Hugging Face transformers (Segformer, UperNet),
tiny configurations, random init; the tap's one-line errors; ``build_external`` (``model.external``); and
``csfrn.engine.train(cfg, model=plug)`` through its evaluations."""

import pytest
import torch
from torch import nn
from transformers import (
    ConvNextConfig,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from conftest import tiny_overrides
from csfrn.engine.checkpoint import CheckpointError, load_model_from_checkpoint
from csfrn.engine.config import load_config
from csfrn.engine.train import train
from csfrn.errors import UserError
from csfrn.models import add_csflm, build_external


def smp():
    """segmentation_models_pytorch, imported where a test builds one of its models, so that this module still
    collects where the library is absent (as on a GPU image where benchmarks/gpu_session.sh runs only the CUDA
    tests)."""
    import segmentation_models_pytorch

    return segmentation_models_pytorch


NC = 4
SIZE = 32
ENC = {"encoder_name": "resnet18", "encoder_weights": None, "encoder_depth": 3, "decoder_channels": (32, 16, 16)}


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, SIZE, SIZE, generator=g), torch.randint(0, NC, (2, SIZE, SIZE), generator=g)


def segformer():
    torch.manual_seed(0)
    return SegformerForSemanticSegmentation(
        SegformerConfig(
            depths=[1, 1, 1, 1],
            hidden_sizes=[8, 16, 24, 32],
            num_attention_heads=[1, 1, 1, 1],
            decoder_hidden_size=32,
            num_labels=NC,
        )
    )


def upernet():
    torch.manual_seed(0)
    backbone = ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    return UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_channels=8, num_labels=NC)
    )


def smp_model(arch, **kw):
    torch.manual_seed(0)
    if arch == "FPN":
        return smp().FPN(
            classes=NC,
            encoder_name="resnet18",
            encoder_weights=None,
            decoder_pyramid_channels=32,
            decoder_segmentation_channels=32,
            **kw,
        )
    if arch == "DeepLabV3Plus":
        return smp().DeepLabV3Plus(classes=NC, encoder_name="resnet18", encoder_weights=None, decoder_channels=32, **kw)
    return smp().Unet(classes=NC, **ENC, **kw)


# name -> (model factory, add_csflm keywords, type of the eval output, the tap add_csflm takes)
CASES = {
    "smp_unet": (lambda: smp_model("Unet"), {}, torch.Tensor, "segmentation_head.0"),
    "smp_deeplabv3plus": (lambda: smp_model("DeepLabV3Plus"), {}, torch.Tensor, "segmentation_head.0"),
    # the case: Dropout2d(inplace=True) at the tap overwrote CSFLM's features (an autograd error)
    "smp_fpn_inplace_tap": (
        lambda: smp_model("FPN"),
        {"tap": "decoder.dropout", "channels": 32},
        torch.Tensor,
        "decoder.dropout",
    ),
    "smp_unet_aux": (lambda: smp_model("Unet", aux_params={"classes": 3}), {}, tuple, "segmentation_head.0"),
    "hf_segformer": (segformer, {"tap": "decode_head.classifier"}, "ModelOutput", "decode_head.classifier"),
    "hf_upernet": (upernet, {}, "ModelOutput", "decode_head.classifier"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_and_eval(case):
    make, kw, kind, tap = CASES[case]
    model = make()
    plug = add_csflm(model, NC, fusion="aam", embed_dim=8, **kw)
    assert plug.tap == tap
    images, labels = batch()
    outputs, losses = plug.train()(images, labels)
    assert set(losses) == {"seg", "cac", "smooth"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in plug.csflm.parameters())
    assert next(model.parameters()).grad is not None  # the gradient reached the encoder's stem
    assert all(p.grad is not None for p in model.get_submodule(tap).parameters())
    if case == "smp_fpn_inplace_tap":
        assert plug.out_of_place == ["decoder.dropout"] and not model.decoder.dropout.inplace
    plug.eval()
    with torch.no_grad():
        out = plug(images)  # the wrapped model's own convention
        logits = plug.segment(images)
    if kind == "ModelOutput":
        assert type(out).__name__ == "SemanticSegmenterOutput" and out.loss is None
        side = SIZE // 4 if case == "hf_segformer" else SIZE  # Segformer's logits are at stride 4
        assert out.logits.shape == (2, NC, side, side)
    else:
        assert isinstance(out, kind)
    if kind is tuple:
        assert out[0].shape == (2, NC, SIZE, SIZE) and out[1].shape == (2, 3)  # smp: (mask, label)
    assert logits.shape == (2, NC, SIZE, SIZE) and torch.isfinite(logits).all()
    maps = plug.predict_maps(images)
    assert maps["embeddings"].shape[1] == 8 and torch.equal(maps["logits"], logits)


def test_inplace_tap_would_break_backward():
    """What the out-of-place switch guards against: with the dropout back in place, backward fails."""
    model = smp_model("FPN")
    plug = add_csflm(model, NC, embed_dim=8, tap="decoder.dropout", channels=32)
    model.decoder.dropout.inplace = True
    _, losses = plug.train()(*batch())
    with pytest.raises(RuntimeError, match="inplace operation"):
        sum(losses.values()).backward()


def test_outputs_callable_and_unknown_outputs():
    class DictSeg(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3, padding=1)
            self.cls = nn.Conv2d(8, NC, 1)

        def forward(self, x):
            return {"seg": self.cls(self.body(x)), "extra": 1}

    images, labels = batch()
    plug = add_csflm(DictSeg(), NC, embed_dim=4, tap="cls", outputs=lambda out: out["seg"])
    out, losses = plug(images, labels)
    assert set(out) == {"seg", "extra"} and set(losses) == {"seg", "cac", "smooth"}
    with pytest.raises(UserError) as err:
        add_csflm(DictSeg(), NC, embed_dim=4, tap="cls")(images, labels)
    assert "cannot find the logits" in str(err.value) and "outputs=" in str(err.value)


def one_line(err):
    text = str(err.value)
    assert "\n" not in text and text.startswith("add_csflm: "), text
    return text


def test_tap_errors_are_one_line():
    images, labels = batch()
    with pytest.raises(UserError) as err:
        add_csflm(smp_model("Unet"), NC, tap=123)
    assert "tap=123 is a int" in one_line(err)
    with pytest.raises(UserError) as err:  # wrong channels=: named before any conv runs
        add_csflm(smp_model("Unet"), NC, tap="segmentation_head.0", channels=32)(images, labels)
    assert "input of tap 'segmentation_head.0' is a 4-D tensor [2, 16, 32, 32]" in one_line(err)
    assert "[N, 32, h, w]" in one_line(err)
    # a 3-D token tensor at the tap (Segformer's MLP decoder takes [N, h*w, C] tokens)
    with pytest.raises(UserError) as err:
        add_csflm(segformer(), NC, tap="decode_head.linear_projections.0.proj", channels=8)(images, labels)
    assert "is a 3-D tensor [2, 64, 8]" in one_line(err) and "token tensor" in one_line(err)
    with pytest.raises(UserError) as err:
        add_csflm(smp_model("Unet"), NC, tap="segmentation_head.9")
    assert "names no submodule" in one_line(err)


def test_build_external_and_local_weights(tmp_path):
    external = {"library": "smp", "name": "Unet", "kwargs": dict(ENC), "fusion": "concat"}
    plug = build_external(external, NC, embed_dim=8)
    assert plug.tap == "segmentation_head.0" and plug.fusion == "concat" and plug.backbone_prefix == "model.encoder."
    # model.pretrained: a local state_dict of the wrapped model; a classifier of another class count is skipped
    torch.manual_seed(3)
    other = smp().Unet(classes=NC + 1, **ENC)
    torch.save(other.state_dict(), tmp_path / "unet.pth")
    with pytest.warns(UserWarning, match="skipped for their shape"):
        loaded = build_external(external, NC, embed_dim=8, pretrained=str(tmp_path / "unet.pth"))
    assert torch.equal(loaded.model.encoder.conv1.weight, other.encoder.conv1.weight)
    assert loaded.pretrained_report.ignored == ["segmentation_head.0.bias", "segmentation_head.0.weight"]
    # Hugging Face: a save_pretrained folder, through from_pretrained (whose key renaming a plain load would miss)
    hf = segformer()
    hf.save_pretrained(tmp_path / "hf")
    loaded = build_external(
        {
            "library": "transformers",
            "name": "SegformerForSemanticSegmentation",
            "kwargs": {
                "depths": [1, 1, 1, 1],
                "hidden_sizes": [8, 16, 24, 32],
                "num_attention_heads": [1, 1, 1, 1],
                "decoder_hidden_size": 32,
            },
        },
        NC,
        embed_dim=8,
        pretrained=str(tmp_path / "hf"),
    )
    want = hf.state_dict()
    assert loaded.model.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())


@pytest.mark.parametrize(
    "external, fragment",
    [
        ({"library": "keras", "name": "x"}, "'model.external.library' is 'keras'"),
        ({"name": "Unet"}, "'model.external.library' is missing"),
        ({"library": "smp", "name": "Unett"}, "not an smp architecture"),
        ({"library": "torchvision", "name": "resnet50"}, "not one of torchvision's segmentation models"),
        ({"library": "transformers", "name": "SegformerConfig"}, "not a transformers model class"),
        ({"library": "smp", "name": "Unet", "kwargs": {"encoder_name": "no_such_encoder"}}, "could not be built"),
        ({"library": "smp", "name": "Unet", "tap": 3}, "'model.external.tap' expects str"),
        ({"library": "smp", "name": "Unet", "fusion": "sum"}, "'model.external.fusion' is 'sum'"),
        ({"library": "smp", "name": "Unet", "taps": "x"}, "unknown keys ['taps']"),
    ],
)
def test_external_config_errors_are_one_line(external, fragment):
    with pytest.raises(UserError) as err:
        load_config(None, [f"model.external={external}", "model.num_classes=4"])
        build_external(external, NC)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_engine_trains_and_evaluates_a_plugged_torchvision_model(tmp_path):
    """train(cfg, model=plug): the evaluations run on the plug's logits (torchvision's dict output); the checkpoint
    of a model the config does not describe says how to load it, in one line."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    cfg = load_config(None, tiny_overrides(tmp_path, iters=2, extra=["train.eval_interval=1"]))
    torch.manual_seed(0)
    plug = add_csflm(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4), 4, embed_dim=4)
    result = train(cfg, model=plug)
    assert result["last"] is not None and 0 <= result["last"]["mIoU"] <= 1
    with pytest.raises(CheckpointError) as err:
        load_model_from_checkpoint(tmp_path / "best.pth")
    assert "plugged with add_csflm" in str(err.value) and "model.external" in str(err.value)
    assert "\n" not in str(err.value)


def test_flops_counts_an_external_model(capsys):
    import dataclasses
    from csfrn.commands.flops import count_model

    cfg = load_config(
        None,
        [
            "model.num_classes=4",
            "model.embed_dim=8",
            "model.external={library: smp, name: Unet, kwargs: {encoder_name: resnet18}}",
        ],
    )
    c = count_model(dataclasses.asdict(cfg.model), (32, 32))
    assert capsys.readouterr().out.startswith("smp:Unet +CSFLM(aam, D=8) @ 32x32: params ")
    assert c["params"] == sum(p.numel() for p in build_external(cfg.model.external, 4, embed_dim=8).parameters())
