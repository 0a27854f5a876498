"""train.optimizer (sgd | adamw), no weight decay on 1-D parameters with AdamW, train.layer_decay through timm's
param_groups_layer_decay (timm and csfrn backbones), head_lr_mult, and the poly schedule over every group."""

import pytest
import torch

from conftest import tiny_overrides
from csfrn.engine import checkpoint as ckpt
from csfrn.engine.config import load_config
from csfrn.engine.optim import build_optimizer, param_groups, poly_lambda
from csfrn.engine.train import train
from csfrn.errors import ConfigError, UserError
from csfrn.models import build_model


def cfg(*overrides):
    return load_config(None, ["train.lr=0.01", "train.weight_decay=0.05", "train.head_lr_mult=10", *overrides]).train


def tiny(backbone="resnet50c", **kw):
    torch.manual_seed(0)
    if not backbone.startswith("timm:"):
        kw = {"width": 8, "blocks": (1, 2, 1, 1), **kw}
    return build_model("fcn", 4, backbone=backbone, channels=16, aux_channels=8, embed_dim=8, **kw)


def settings(optimizer, model):
    """{parameter name: (lr, weight decay)} as the optimizer holds them."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_sgd_is_the_paper_recipe():
    model = tiny()
    opt = build_optimizer(model, cfg())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    got = settings(opt, model)
    assert got.keys() == {n for n, _ in model.named_parameters()}
    for name, (lr, wd) in got.items():  # weight decay everywhere; the head at 10x lr
        assert wd == 0.05 and lr == pytest.approx(0.01 if name.startswith("backbone.") else 0.1), name
    assert opt.param_groups[0]["lr"] == 0.01  # the logged lr is the base lr


def test_adamw_no_decay_on_norms_and_biases():
    model = tiny()
    opt = build_optimizer(model, cfg("train.optimizer=adamw"))
    assert isinstance(opt, torch.optim.AdamW)
    got = settings(opt, model)
    modules = dict(model.named_modules())
    for name, _p in model.named_parameters():
        owner = modules[name.rsplit(".", 1)[0]]
        norm_or_bias = name.endswith(".bias") or isinstance(owner, torch.nn.modules.batchnorm._BatchNorm)
        assert got[name][1] == (0.0 if norm_or_bias else 0.05), name
        assert got[name][0] == pytest.approx(0.01 if name.startswith("backbone.") else 0.1), name
    assert sum(norm_or_bias for norm_or_bias in (v[1] == 0 for v in got.values())) > 10


def test_adamw_layer_decay_on_a_timm_backbone():
    """ConvNeXt-atto: timm's layer groups (stem, then each downsample and block, 13 in all); layer i of the
    backbone at lr * 0.5 ** (13 - i), everything after the backbone at lr * head_lr_mult."""
    import timm

    model = tiny("timm:convnext_atto")
    opt = build_optimizer(model, cfg("train.optimizer=adamw", "train.layer_decay=0.5"))
    got = settings(opt, model)
    full = timm.create_model("convnext_atto")
    ids = timm.models.group_parameters(full, full.group_matcher(coarse=False), reverse=True)
    assert max(ids.values()) == 13  # stem 0, 12 downsample / block groups, then the (dropped) head
    # a few parameters named by hand: the features model's stem_0 is the full model's stem.0
    expected_layer = {
        "backbone.body.stem_0.weight": 0,
        "backbone.body.stages_0.blocks.0.conv_dw.weight": 1,
        "backbone.body.stages_3.blocks.1.mlp.fc2.weight": 12,
    }
    for name, layer in expected_layer.items():
        assert got[name] == (pytest.approx(0.01 * 0.5 ** (13 - layer)), 0.05), name
    scales = set()
    for name, (lr, wd) in got.items():
        p = dict(model.named_parameters())[name]
        assert wd == (0.0 if p.ndim <= 1 else 0.05), name
        if name.startswith("backbone."):
            scale = lr / 0.01
            assert 0.5**13 * 0.99 < scale < 0.51, name
            scales.add(round(scale, 12))
        else:
            assert lr == pytest.approx(0.1), name
    assert len(scales) == 13
    # the groups at the base lr lead (the one csfrn train logs), then lower and lower
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)

    # the poly schedule with warm-up scales every group alike
    tcfg = cfg(
        "train.optimizer=adamw",
        "train.layer_decay=0.5",
        "train.iters=10",
        "train.warmup_iters=2",
        "train.warmup_ratio=0.1",
        "train.min_lr=0",
    )
    opt = build_optimizer(model, tcfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(tcfg))
    initial = [g["initial_lr"] for g in opt.param_groups]
    for it in range(1, 6):
        opt.step()
        sched.step()
        factor = poly_lambda(tcfg)(it)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * factor for lr in initial])


def test_layer_decay_on_our_resnet_follows_its_blocks():
    model = tiny()  # blocks (1, 2, 1, 1): stem 0, blocks 1..5, head 6
    got = settings(build_optimizer(model, cfg("train.layer_decay=0.5")), model)
    assert got["backbone.conv1.0.weight"][0] == pytest.approx(0.01 * 0.5**6)
    assert got["backbone.layer2.1.conv1.weight"][0] == pytest.approx(0.01 * 0.5**3)
    assert got["backbone.layer4.0.conv3.weight"][0] == pytest.approx(0.01 * 0.5)
    assert got["decode_head.conv_seg.weight"][0] == pytest.approx(0.1)
    assert all(wd == 0.05 for _, wd in got.values())  # SGD: weight decay everywhere still


def test_config_checks():
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(None, ["train.optimizer=adam"])
    with pytest.raises(ConfigError, match="train.layer_decay"):
        load_config(None, ["train.layer_decay=1.5"])
    from csfrn.models import add_csflm
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    plug = add_csflm(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4), 4, embed_dim=4)
    with pytest.raises(UserError, match="train.layer_decay=0.5 needs a backbone with layers"):
        param_groups(plug, cfg("train.layer_decay=0.5"))
    # a plugged model's encoder is its backbone for head_lr_mult
    got = settings(build_optimizer(plug, cfg()), plug)
    assert got["model.backbone.0.0.weight"][0] == pytest.approx(0.01)
    assert got["csflm.embed.weight"][0] == got["model.classifier.cbr.0.weight"][0] == pytest.approx(0.1)


def test_train_with_adamw_and_layer_decay(tmp_path):
    c = load_config(
        None,
        tiny_overrides(tmp_path, iters=2, extra=["train.optimizer=adamw", "train.layer_decay=0.8", "train.lr=0.001"]),
    )
    result = train(c)
    assert result["iter"] == 2
    state = ckpt.load_checkpoint(tmp_path / "last.pth")
    groups = state["optimizer"]["param_groups"]
    assert len({round(g["lr_scale"], 9) for g in groups}) > 3 and any(g["weight_decay"] == 0 for g in groups)
    assert all("exp_avg" in s for s in state["optimizer"]["state"].values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_is_fused_on_a_gpu_only(name, device):
    """Fused on a GPU (one kernel a step, and the fp16 scaler's inf check without a host sync); torch's default
    implementation on the CPU."""
    model = tiny().to(device)
    opt = build_optimizer(model, cfg(f"train.optimizer={name}"))
    assert bool(opt.defaults["fused"]) == (device == "cuda")
    loss = sum(p.sum() for p in model.parameters())
    loss.backward()
    opt.step()


def test_resume_keeps_this_runs_optimizer_implementation():
    """A checkpoint's optimizer state written fused (a GPU run) loads into a CPU run unfused, with its momentum."""
    from csfrn.engine.optim import load_optimizer_state

    model = tiny()
    opt = build_optimizer(model, cfg())
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:
        group["fused"] = True
    other = build_optimizer(model, cfg())
    load_optimizer_state(other, state)
    assert all(not g["fused"] for g in other.param_groups)
    first = next(iter(other.state.values()))["momentum_buffer"]
    torch.testing.assert_close(first, next(iter(opt.state.values()))["momentum_buffer"])
    other.step()  # the CPU step runs (a fused group on CPU tensors is not what this run built)
