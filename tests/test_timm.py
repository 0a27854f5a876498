"""timm backbones (``backbone="timm:<name>"``), timm's SyncBN converter under a 2-process gloo run, and the
one-line errors of both. Random init throughout (nothing is downloaded); tiny heads at 32-64 px on the CPU."""

import os
import sys

import pytest
import timm
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port
from csfrn.engine.distributed import CPUSyncBatchNorm, CPUSyncBatchNormAct, convert_sync_batchnorm
from csfrn.errors import UserError
from csfrn.extras import MissingExtraError
from csfrn.models import build_model, complexity


NC = 4


def tiny(backbone, **kw):
    torch.manual_seed(0)
    return build_model("fcn", NC, backbone=backbone, channels=16, aux_channels=8, embed_dim=8, **kw)


def one_line(err):
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ---------------------------------------------------------------- CSFRN on timm families
@pytest.mark.parametrize(
    "name, channels",
    [
        ("convnext_atto", (40, 80, 160, 320)),
        ("efficientnet_b0", (24, 40, 112, 320)),
        ("regnetx_002", (24, 56, 152, 368)),
    ],
)
def test_csfrn_on_timm_families_trains_and_counts(name, channels):
    model = tiny(f"timm:{name}")
    assert model.backbone.out_channels == channels and model.backbone.output_stride == 8
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, NC, (2, 64, 64))
    # the four deepest maps in the places of the ResNet stages: strides 4, 8, 8, 8
    assert [tuple(f.shape[1:]) for f in model.backbone(x)] == [(c, s, s) for c, s in zip(channels, (16, 8, 8, 8))]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    history = []
    for _ in range(4):
        _, losses = model(x, labels)
        assert set(losses) == {"seg", "aux", "cac", "smooth"}
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.backbone.parameters())
        opt.step()
        history.append(loss.item())
    assert all(torch.isfinite(torch.tensor(history))) and history[-1] < history[0], history
    c = complexity(model, 64)
    assert c["params"] == sum(p.numel() for p in model.parameters()) and c["gflops"] > 0 and c["gflops_all"] > 0


def test_timm_resnet50c_is_our_resnet50c():
    with torch.device("meta"):
        ours = build_model("deeplabv3plus", 19, backbone="resnet50c")
        theirs = build_model("deeplabv3plus", 19, backbone="timm:resnet50c")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs) > 40e6
    a = {k[len("backbone.") :]: v.shape for k, v in ours.state_dict().items() if k.startswith("backbone.")}
    b = {k[len("backbone.body.") :]: v.shape for k, v in theirs.state_dict().items() if k.startswith("backbone.")}
    assert a == b  # key for key, shape for shape


def test_output_stride_16():
    net = tiny("timm:resnet18d", output_stride=16).backbone
    assert [f.shape[-1] for f in net(torch.randn(1, 3, 64, 64))] == [16, 8, 4, 4]


def test_pretrained_local_files_load_exactly(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    torch.manual_seed(1)
    full = timm.create_model("resnet18d", pretrained=False)
    save_file(full.state_dict(), tmp_path / "r18d.safetensors")
    torch.save({"state_dict": full.state_dict()}, tmp_path / "r18d.pth")
    for path in ("r18d.safetensors", "r18d.pth"):
        model = tiny("timm:resnet18d", pretrained=str(tmp_path / path))
        got = model.backbone.body.state_dict()
        assert got.keys() <= full.state_dict().keys()
        assert all(torch.equal(v, full.state_dict()[k]) for k, v in got.items())
        assert model.pretrained_report is not None and not model.pretrained_report.missing
    # a torchvision ResNet-18 file into timm's resnet18 (the same key names)
    tv = resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "tv_r18.pth")
    model = tiny("timm:resnet18", pretrained=str(tmp_path / "tv_r18.pth"))
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    # a file of another model: one line naming the file
    with pytest.raises(UserError) as err:
        tiny("timm:convnext_atto", pretrained=str(tmp_path / "tv_r18.pth"))
    assert "tv_r18.pth does not fit timm's convnext_atto" in one_line(err)


def test_errors_are_one_line():
    with pytest.raises(UserError) as err:
        tiny("timm:no_such_net")
    assert "unknown timm model 'no_such_net'" in one_line(err)
    with pytest.raises(UserError) as err:
        tiny("timm:convnext_atom")
    assert "convnext_atto" in one_line(err)  # similar names
    for name in ("vit_tiny_patch16_224", "hrnet_w18_small"):  # no output_stride / an assertion in timm
        with pytest.raises(UserError) as err:
            tiny(f"timm:{name}")
        assert "cannot dilate" in one_line(err) and name in one_line(err)
    for kw, key in (
        ({"width": 32}, "model.width"),
        ({"blocks": (1, 1, 1, 1)}, "model.blocks"),
        ({"multi_grid": True}, "model.multi_grid"),
    ):
        with pytest.raises(UserError) as err:
            tiny("timm:resnet18d", **kw)
        assert key in one_line(err) and "csfrn's ResNets only" in one_line(err)


def test_config_takes_timm_names_and_names_the_extra(monkeypatch):
    from csfrn.engine.config import load_config

    assert load_config(None, ["model.backbone=timm:convnext_atto"]).model.backbone == "timm:convnext_atto"
    with pytest.raises(UserError, match="model.backbone"):
        load_config(None, ["model.backbone=timm:"])
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    with pytest.raises(MissingExtraError) as err:
        tiny("timm:resnet18d")
    assert "pip install -e .[timm]" in one_line(err)


# ---------------------------------------------------------------- SyncBN keeps timm's norm + act layers
def _sync_model():
    torch.manual_seed(0)
    return timm.create_model("mobilenetv3_small_050", pretrained=False, features_only=True, out_indices=2)


def _torch_converted(model):
    """What train.sync_bn did before timm's converter: torch's, which turns BatchNormAct2d into a plain
    SyncBatchNorm (its activation lost)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = CPUSyncBatchNorm
    return model


def _sync_worker(rank, world, port, x, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        half = x.shape[0] // world
        result = {}
        for converter in ("timm", "torch"):
            model = _sync_model()
            model = (
                convert_sync_batchnorm(model, torch.device("cpu")) if converter == "timm" else _torch_converted(model)
            )
            kinds = sorted(
                {type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
            )
            out = model.train()(x[rank * half : (rank + 1) * half])
            # numpy arrays travel by value (a tensor would be shared memory of a process that is about to exit)
            stats = {k: v.numpy() for k, v in model.state_dict().items() if "running" in k}
            result[converter] = ([o.detach().numpy() for o in out], stats, kinds)
        queue.put((rank, result, None))
    except Exception as err:  # report to the parent instead of hanging it
        queue.put((rank, None, repr(err)))
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_sync_bn_keeps_timm_batchnorm_act_two_processes():
    """Two gloo processes, each with half the batch, after timm's conversion: the same features and running
    statistics as one process on the whole batch (BatchNormAct2d's activation kept); torch's converter drops
    the activations and the features differ."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    ref_model = _sync_model().train()
    assert any(type(m).__name__ == "BatchNormAct2d" for m in ref_model.modules())
    with torch.no_grad():
        ref = ref_model(x)
    ref_stats = {k: v for k, v in ref_model.state_dict().items() if "running" in k}

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_sync_worker, args=(r, 2, port, x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted([queue.get(timeout=240) for _ in procs], key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    assert all(err is None for _, _, err in results), results

    def features(converter, level):
        return torch.cat([torch.from_numpy(r[1][converter][0][level]) for r in results])

    assert results[0][1]["timm"][2] == sorted({CPUSyncBatchNorm.__name__, CPUSyncBatchNormAct.__name__})
    for level, want in enumerate(ref):
        got = features("timm", level)
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), (level, (got - want).abs().max())
    for k, v in ref_stats.items():
        mine, theirs = (torch.from_numpy(r[1]["timm"][1][k]) for r in results)
        assert torch.allclose(mine, v, rtol=1e-3, atol=1e-5) and torch.equal(mine, theirs), k
    dropped = max((features("torch", level) - want).abs().max().item() for level, want in enumerate(ref))
    assert dropped > 0.1, dropped


def test_sync_bn_conversion_keeps_eval_outputs_exactly():
    model = _sync_model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        got = convert_sync_batchnorm(_sync_model(), torch.device("cpu")).eval()(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
