"""Backbones, heads, CSFLM / AAM, the segmentor, checkpoint loading and the paper's complexity numbers."""

import pytest
import torch
import torchvision

import csfrn.ops
from csfrn.models import build_model, complexity
from csfrn.models.backbones import build_backbone, load_pretrained

HEADS = ("fcn", "psp", "nonlocal", "deeplabv3plus")
FUSIONS = (None, "concat", "aam")  # None: the plain baseline
TINY = dict(width=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8, embed_dim=8)


def tiny(head, fusion, **kw):
    torch.manual_seed(0)
    return build_model(
        head, 3, backbone="resnet50c", csflm=fusion is not None, fusion=fusion or "aam", **{**TINY, **kw}
    )


def batch(n=2, size=32, ignore=True):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    labels[:, :, size // 2 :] = 1
    labels[:, size // 4 : size // 2, size // 4 : size // 2] = 2
    if ignore:
        labels[:, :2] = 255
    return images, labels


# ---------------------------------------------------------------- backbone
@pytest.mark.parametrize("os_, size", [(8, 4), (16, 2)])
def test_backbone_strides_and_widths(os_, size):
    net, _ = build_backbone("resnet50c", output_stride=os_, width=8, blocks=(1, 1, 2, 2))
    c1, c2, c3, c4 = net(torch.randn(1, 3, 32, 32))
    assert net.out_channels == (32, 64, 128, 256)
    assert c1.shape[1:] == (32, 8, 8) and c2.shape[1:] == (64, 4, 4)
    assert c3.shape[1:] == (128, size, size) and c4.shape[1:] == (256, size, size)


def test_dilations_and_multi_grid():
    net, _ = build_backbone("resnet50", width=8)
    assert [b.conv2.dilation[0] for b in net.layer3] == [1] + [2] * 5
    assert [b.conv2.dilation[0] for b in net.layer4] == [2, 4, 4]
    assert [b.conv2.stride[0] for b in (net.layer2[0], net.layer3[0], net.layer4[0])] == [2, 1, 1]
    mg, _ = build_backbone("resnet50", width=8, multi_grid=True)
    assert [b.conv2.dilation[0] for b in mg.layer4] == [4, 8, 16]
    mg16, _ = build_backbone("resnet50", width=8, multi_grid=True, output_stride=16)
    assert [b.conv2.dilation[0] for b in mg16.layer4] == [2, 4, 8]


def test_torchvision_checkpoint_loads(tmp_path):
    ref = torchvision.models.resnet50(weights=None)
    for p in ref.parameters():
        p.data.normal_()
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    net, report = build_backbone("resnet50", pretrained=str(path))
    assert report.missing == [] and report.unexpected == []
    assert report.ignored == ["fc.bias", "fc.weight"]
    ours = net.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(ours[k], v), k


def _mmseg_name(key):
    for ours, theirs in (
        ("conv1.0.", "stem.0."),
        ("conv1.1.", "stem.1."),
        ("conv1.3.", "stem.3."),
        ("conv1.4.", "stem.4."),
        ("conv1.6.", "stem.6."),
        ("bn1.", "stem.7."),
    ):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def test_mmseg_v1c_checkpoint_loads(tmp_path):
    src, _ = build_backbone("resnet50c")
    for p in src.parameters():
        p.data.normal_()
    mmseg = {"backbone." + _mmseg_name(k): v for k, v in src.state_dict().items()}
    assert "backbone.stem.7.running_var" in mmseg and "backbone.layer1.0.downsample.1.weight" in mmseg
    path = tmp_path / "v1c.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": mmseg}, path)
    net, report = build_backbone("resnet50c", pretrained=str(path))
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    for k, v in src.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k


def test_stem_mismatch_is_reported_and_shape_mismatch_refused(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    net, _ = build_backbone("resnet50c", width=64, blocks=(1, 1, 1, 1))
    with pytest.warns(UserWarning, match="missing keys"):
        report = load_pretrained(net, str(path))
    assert "conv1.0.weight" in report.missing and "conv1.weight" in report.unexpected
    assert "layer1.1.conv1.weight" in report.unexpected
    narrow, _ = build_backbone("resnet50", width=32)
    with pytest.raises(
        ValueError,
        match=r"shape mismatch.*\n.*conv1.weight: checkpoint \[64, 3, 7, 7\] vs model "
        r"\[32, 3, 7, 7\]",
    ):
        load_pretrained(narrow, str(path))


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown head 'upernet'.*deeplabv3plus"):
        build_model("upernet", 19)
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'.*resnet101c"):
        build_model("fcn", 19, backbone="resnet18")
    with pytest.raises(ValueError, match="unknown fusion 'sum'"):
        build_model("fcn", 19, fusion="sum", **TINY)


# ---------------------------------------------------------------- segmentor
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_shapes_train_and_eval(head, fusion, ops_path):
    model = tiny(head, fusion)
    images, labels = batch()
    model.train()
    logits, losses = model(images, labels)
    assert logits.shape == (2, 3, 32, 32)
    expected = {"seg", "aux"} | ({"cac", "smooth"} if fusion else set())
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 3, 32, 32)
    feats = model.predict_maps(images)
    assert feats["logits"].shape == (2, 3, 32, 32)
    if fusion:
        assert feats["embeddings"].shape == (2, 8, 4, 4) and feats["margins"].shape == (2, 1, 4, 4)
    else:
        assert feats["embeddings"] is None and feats["margins"] is None


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("fusion", ("concat", "aam"))
def test_backward_reaches_every_parameter(head, fusion, ops_path):
    model = tiny(head, fusion).train()
    images, labels = batch()
    _, losses = model(images, labels)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # CSFLM's embedding and margin convs learn from the CAC / smooth losses, AAM's offsets from the seg loss
    assert model.csflm.embed.weight.grad.abs().sum() > 0
    assert model.csflm.margin.weight.grad.abs().sum() > 0
    if fusion == "aam":
        assert model.csflm.fuse.offset.weight.grad.abs().sum() > 0


def test_losses_are_weighted_terms_of_eq7(ops_path):
    model = tiny("fcn", "concat", loss_weights={"cac": 0.5}).train()
    images, labels = batch()
    torch.manual_seed(3)
    _, weighted = model(images, labels)
    unit = tiny("fcn", "concat", loss_weights={"seg": 1.0, "aux": 1.0, "cac": 1.0, "smooth": 1.0}).train()
    torch.manual_seed(3)
    _, plain = unit(images, labels)
    for name, w in {"seg": 1.0, "aux": 0.4, "cac": 0.5, "smooth": 0.2}.items():
        torch.testing.assert_close(weighted[name], w * plain[name])


def test_no_margins_and_no_aux(ops_path):
    model = tiny("psp", "aam", margins=False, aux=False).train()
    assert model.csflm.margin is None and model.aux_head is None
    _, losses = model(*batch())
    assert set(losses) == {"seg", "cac"}


def test_ohem_option(ops_path):
    model = tiny("fcn", None, ohem=True, min_kept=10).train()
    assert type(model.criterion.seg_loss).__name__ == "OhemCrossEntropy" and model.criterion.seg_loss.min_kept == 10
    _, losses = model(*batch())
    assert torch.isfinite(losses["seg"])


def test_eval_needs_no_labels_and_computes_no_centres(monkeypatch, ops_path):
    model = tiny("deeplabv3plus", "aam").eval()

    def forbidden(*args, **kwargs):
        raise AssertionError("inference must not compute class centres or distances")

    monkeypatch.setattr(csfrn.ops, "class_avg_pool", forbidden)
    monkeypatch.setattr(csfrn.ops, "center_distance", forbidden)
    with torch.no_grad():
        assert model(batch()[0]).shape == (2, 3, 32, 32)
        model.predict_maps(batch()[0])


def test_input_checks():
    model = tiny("fcn", None)
    for bad in (torch.randn(3, 32, 32), torch.randn(1, 1, 32, 32), torch.zeros(1, 3, 32, 32, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"4-D float tensor \[N, 3, H, W\]"):
            model(bad)
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.randn(2, 3, 32, 32), torch.zeros(2, 16, 16, dtype=torch.long))


def test_tiny_model_overfits_one_batch(ops_path):
    model = tiny("deeplabv3plus", "aam").train()
    images, labels = batch(ignore=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(40):
        _, losses = model(images, labels)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert totals[-1] < 0.25 * totals[0], totals
    model.eval()
    with torch.no_grad():
        acc = (model(images).argmax(1) == labels).float().mean()
    assert acc > 0.9


# ---------------------------------------------------------------- complexity (paper Tables 2 and 3)
def test_counting_convention_on_a_known_module():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 2, 1, bias=False),
        torch.nn.BatchNorm2d(2),
    )
    c = complexity(net, size=(8, 8))
    # conv: 64 px * 4 out * (27 MACs + 1 bias); ReLU: 256 outputs; pool: 256 inputs; 1x1 conv: 16 * 2 * 4
    assert c["gflops"] * 1e9 == pytest.approx(64 * 4 * 28 + 256 + 256 + 16 * 2 * 4)
    assert c["params"] == 3 * 4 * 9 + 4 + 4 * 2 + 2 * 2
    assert c["gflops_all"] * 1e9 == pytest.approx(64 * 4 * 27 + 16 * 2 * 4)


# head: (params M, GFLOPs) of the baseline, Table 2. The paper prints 239.88 GFLOPs for Non-local, which no
# counting of the standard block reproduces (its +CSFLM row, 250.75, is 239.88 + 10.87): 199.88 is asserted.
PAPER = {"fcn": (37.70, 149.40), "psp": (48.98, 178.48), "nonlocal": (50.02, 199.88), "deeplabv3plus": (43.59, 176.36)}


def _count(**kw):
    with torch.device("meta"):  # counting needs shapes only
        model = build_model(num_classes=19, backbone="resnet50c", **kw)
    return complexity(model, (512, 512))


@pytest.mark.parametrize("head", HEADS)
def test_table2_params_and_gflops(head):
    params, gflops = PAPER[head]
    base = _count(head=head, csflm=False)
    assert base["params"] / 1e6 == pytest.approx(params, rel=0.01)
    assert base["gflops"] == pytest.approx(gflops, rel=0.01)
    concat = _count(head=head, fusion="concat")
    assert (concat["params"] - base["params"]) / 1e6 == pytest.approx(2.66, abs=0.01)
    assert concat["gflops"] - base["gflops"] == pytest.approx(10.88, abs=0.01)
    full = _count(head=head, fusion="aam")
    # AAM adds (over concat) the offset conv and the two 3x3 deformable convs: 3x3 (512+32)->18 (+bias),
    # 3x3 32->32 and 3x3 512->512, at 64x64
    aam_extra = 544 * 9 * 18 + 18 + 32 * 32 * 9 + 512 * 512 * 9
    assert full["params"] - concat["params"] == aam_extra
    assert (full["gflops"] - concat["gflops"]) * 1e9 == pytest.approx(64 * 64 * aam_extra)
    assert full["gflops_all"] == pytest.approx(full["gflops"], rel=0.1)


@pytest.mark.parametrize("embed_dim, gflops", [(8, 187.14), (16, 187.17), (32, 187.24), (64, 187.37)])
def test_table3_embedding_widths(embed_dim, gflops):
    c = _count(head="deeplabv3plus", fusion="concat", embed_dim=embed_dim)
    assert c["gflops"] == pytest.approx(gflops, abs=0.01)


def test_flops_cli(capsys):
    from csfrn import cli

    assert cli.main(["flops", "--head", "psp", "--backbone", "resnet50c", "--size", "512", "--no-csflm"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("psp resnet50c @ 512x512: ") and "params 48.98 M" in out and "GFLOPs 178.48" in out
    assert f"params {_count(head='psp', csflm=False)['params'] / 1e6:.2f} M" in out
    assert cli.main(["flops", "--head", "fcn", "--fusion", "concat"]) == 0
    assert "params 40.36 M, GFLOPs 160.28" in capsys.readouterr().out
