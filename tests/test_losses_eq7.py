"""``csfrn.losses.Eq7Loss``, the one assembler of Eq. 7's losses: CSFRN and ``add_csflm`` give the same loss dict
for the same network, ``add_csflm(csflm_supervision="mask")``, and checkpoints from before it (the mask head's
weights under ``mask_head.``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csfrn.losses import DEFAULT_LOSS_WEIGHTS, Eq7Loss, lovasz_softmax
from csfrn.losses.cac import resize_labels
from csfrn.models import add_csflm, build_model

NC = 3
TINY = dict(width=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8, embed_dim=8)


def batch(n=2, size=32):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, NC, (n, size, size), generator=g)
    labels[:, :3] = 255
    return images, labels


def csfrn_and_plug(fusion, supervision, margins=True):
    """A CSFRN with CSFLM and the same network as its baseline with CSFLM plugged in by ``add_csflm`` (tapping the
    classifier's input, where CSFRN places CSFLM for the PSP head), with the same weights."""
    torch.manual_seed(0)
    full = build_model(
        "psp",
        NC,
        fusion=fusion,
        margins=margins,
        aux=False,
        csflm_supervision=supervision,
        loss_weights={"cac": 0.5},
        **TINY,
    )
    base = build_model("psp", NC, csflm=False, aux=False, **TINY)
    base.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("csflm.", "criterion."))})
    plug = add_csflm(
        base,
        NC,
        fusion=fusion,
        embed_dim=TINY["embed_dim"],
        tap="decode_head.dropout",
        channels=TINY["channels"],
        margins=margins,
        csflm_supervision=supervision,
        loss_weights={"cac": 0.5},
    )
    plug.csflm.load_state_dict(full.csflm.state_dict())
    plug.criterion.load_state_dict(full.criterion.state_dict())  # the mask head, with "mask"
    return full, plug


@pytest.mark.parametrize(
    "fusion, supervision, margins", [("aam", "cac", True), ("concat", "cac", False), ("concat", "mask", True)]
)
def test_csfrn_and_add_csflm_give_the_same_losses(fusion, supervision, margins):
    full, plug = csfrn_and_plug(fusion, supervision, margins)
    images, labels = batch()
    for train in (True, False):
        full.train(train), plug.train(train)
        torch.manual_seed(5)  # the same dropout draws
        logits, want = full(images, labels)
        torch.manual_seed(5)
        outputs, got = plug(images, labels)
        assert list(got) == list(want)
        expected = (
            ({"seg", "mask"} if train else {"seg"})
            if supervision == "mask"
            else {"seg", "cac"} | ({"smooth"} if margins else set())
        )
        assert set(want) == expected
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(outputs, logits)
        if train:  # and the same gradients for CSFLM (and the mask head)
            sum(want.values()).backward()
            sum(got.values()).backward()
            for (name, p), q in zip(full.csflm.named_parameters(), plug.csflm.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
            if supervision == "mask":
                torch.testing.assert_close(plug.criterion.mask_head.weight.grad, full.criterion.mask_head.weight.grad)


class TinySeg(nn.Module):
    """Logits at 1/4 of the input as a plain tensor; the classifier is a submodule."""

    def __init__(self, width=16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.cls = nn.Conv2d(width, NC, 1)

    def forward(self, x):
        return self.cls(self.body(x))


@pytest.mark.parametrize("fusion", ["aam", "loss_only"])
def test_add_csflm_mask_supervision(fusion):
    torch.manual_seed(0)
    plug = add_csflm(
        TinySeg(), NC, fusion=fusion, embed_dim=4, tap="cls", csflm_supervision="mask", loss_weights={"cac": 0.5}
    )
    assert {"criterion.mask_head.weight", "criterion.mask_head.bias"} <= set(plug.state_dict())
    images, labels = batch()
    _, losses = plug(images, labels)
    assert set(losses) == {"seg", "mask"}  # no CAC or smoothness loss
    # the mask loss: Lovasz-softmax of the mask head on B against the labels at B's size, weighted as the CAC loss
    embeddings = plug.predict_maps(images)["embeddings"]  # train mode: the same batch statistics
    with torch.no_grad():
        probs = F.softmax(plug.criterion.mask_head(embeddings), dim=1)
        want = 0.5 * lovasz_softmax(probs, resize_labels(labels, embeddings.shape[2:]), 255)
    torch.testing.assert_close(losses["mask"], want)
    sum(losses.values()).backward()
    assert plug.criterion.mask_head.weight.grad.abs().sum() > 0
    assert plug.csflm.embed.weight.grad.abs().sum() > 0  # B learns from the mask loss
    plug.eval()
    with torch.no_grad():
        assert set(plug(images, labels)[1]) == {"seg"}  # the mask loss is a training loss


def test_old_checkpoints_load_the_mask_head_and_keep_its_parameter_order():
    torch.manual_seed(0)
    model = build_model("fcn", NC, fusion="concat", csflm_supervision="mask", **TINY)
    # a CSFRN saved before Eq7Loss: the mask head's weights under "mask_head.", its parameters first
    old = {k.replace("criterion.mask_head.", "mask_head."): v for k, v in model.state_dict().items()}
    assert "mask_head.weight" in old and not any(k.startswith("criterion.") for k in old)
    twin = build_model("fcn", NC, fusion="concat", csflm_supervision="mask", **TINY)
    twin.load_state_dict(old)
    assert torch.equal(twin.criterion.mask_head.weight, model.criterion.mask_head.weight)
    # an optimizer's state is matched to the parameters by their order: the mask head's come first, as they did
    assert [n for n, _ in model.named_parameters()][:2] == ["criterion.mask_head.weight", "criterion.mask_head.bias"]


def test_errors_and_weights():
    with pytest.raises(ValueError, match="unknown csflm_supervision 'both'.*'cac', 'mask'"):
        Eq7Loss(NC, 8, "both")
    with pytest.raises(ValueError, match="unknown csflm_supervision"):
        add_csflm(TinySeg(), NC, tap="cls", csflm_supervision="both")
    with pytest.raises(ValueError, match="unknown loss_weights keys"):
        Eq7Loss(NC, loss_weights={"segg": 1.0})
    loss = Eq7Loss(NC, loss_weights={"aux": 1.0})
    assert loss.loss_weights == {**DEFAULT_LOSS_WEIGHTS, "aux": 1.0} and loss.mask_head is None
    images, labels = batch()
    with pytest.raises(ValueError, match=r"labels must have shape \[N, H, W\] = \[2, 32, 32\]"):
        loss.prepare_labels(images, labels[:, :16])
    with pytest.raises(ValueError, match="label value 7"):
        loss.prepare_labels(images, labels.masked_fill(labels == 1, 7))
    assert loss.prepare_labels(images, labels.int()).dtype == torch.int64
    # OHEM from the options, as build_model's; a loss module given takes their place
    assert type(Eq7Loss(NC, ohem=True, min_kept=10).seg_loss).__name__ == "OhemCrossEntropy"
    mine = nn.CrossEntropyLoss(ignore_index=255, label_smoothing=0.1)
    assert add_csflm(TinySeg(), NC, tap="cls", seg_loss=mine, ohem=True).criterion.seg_loss is mine
    plug = add_csflm(TinySeg(), NC, tap="cls", ohem=True, thresh=0.5, min_kept=7)
    assert (plug.criterion.seg_loss.thresh, plug.criterion.seg_loss.min_kept) == (0.5, 7)
    # fusion_init reaches add_csflm's CSFLM: "random" is not the identity start
    ident = add_csflm(TinySeg(), NC, tap="cls", fusion="concat").csflm.fuse[0].weight
    rand = add_csflm(TinySeg(), NC, tap="cls", fusion="concat", fusion_init="random").csflm.fuse[0].weight
    assert torch.equal(ident[:, :, 0, 0], torch.eye(16, 16 + 32)) and not torch.equal(ident, rand)
