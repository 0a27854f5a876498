"""``csfrn.models.add_csflm``: CSFLM plugged into torchvision's segmentation models and into a model through tap=.

Every torchvision model is built with weights=None, weights_backbone=None at 32x32 inputs. The ResNet-101
models share their heads (and so the tap, the hook and the losses) with the ResNet-50 ones and differ only in
backbone depth: they get the structural checks and a short training on one batch; the 50-iteration training on
the synthetic set runs on the other four. CPU time of the whole file: about a minute.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation

from csfrn.data import Synthetic
from csfrn.data.transforms import Normalize
from csfrn.models import CSFLMPlug, add_csflm, complexity
from csfrn.losses import DEFAULT_LOSS_WEIGHTS
from csfrn.nn import CSFLM

NC = 4  # classes
SIZE = 32  # input side
EMBED = 8
MODELS = {  # name -> (default tap, channels of the tapped features, has an aux head)
    "fcn_resnet50": ("classifier.3", 512, True),
    "fcn_resnet101": ("classifier.3", 512, True),
    "deeplabv3_resnet50": ("classifier.4", 256, True),
    "deeplabv3_resnet101": ("classifier.4", 256, True),
    "deeplabv3_mobilenet_v3_large": ("classifier.4", 256, True),
    "lraspp_mobilenet_v3_large": ("classifier.high_classifier", 128, False),
}
LIGHT = ("deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
R50 = ("fcn_resnet50", "deeplabv3_resnet50")
R101 = ("fcn_resnet101", "deeplabv3_resnet101")


def torchvision_model(name, seed=0):
    torch.manual_seed(seed)
    kw = {} if name.startswith("lraspp") else {"aux_loss": True}
    return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=NC, **kw)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def synthetic_batch(data, start, n):
    items = [data[start + j] for j in range(n)]
    return torch.stack([i for i, _ in items]), torch.stack([lab for _, lab in items])


def data(length, split="train"):
    return Synthetic(split, transforms=Normalize(), size=SIZE, length=length, num_classes=NC)


def count_calls(module):
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---------------------------------------------------------------- forward, losses, backward, eval, parameters
CASES = [(m, f) for m in LIGHT + R50 for f in ("concat", "aam", "loss_only")] + [(m, "aam") for m in R101]


@pytest.mark.parametrize("name, fusion", CASES)
def test_torchvision_forward_losses_backward_eval(name, fusion):
    tap, channels, has_aux = MODELS[name]
    model = torchvision_model(name)
    base_params = n_params(model)
    plug = add_csflm(model, NC, fusion=fusion, embed_dim=EMBED)
    assert isinstance(plug, CSFLMPlug) and plug.model is model and plug.tap == tap

    # parameters: the wrapped model's + CSFLM's (no fusion layers with "loss_only")
    alone = CSFLM(channels, EMBED, None if fusion == "loss_only" else fusion)
    assert n_params(plug.csflm) == n_params(alone)
    assert n_params(plug) == base_params + n_params(plug.csflm)
    assert (plug.csflm.fuse is None) == (fusion == "loss_only")

    images, labels = synthetic_batch(data(2), 0, 2)
    labels[:, :2] = 255
    calls = count_calls(plug.csflm)
    outputs, losses = plug(images, labels)
    assert calls[0] == 1
    assert set(outputs) == ({"out", "aux"} if has_aux else {"out"})
    assert outputs["out"].shape == (2, NC, SIZE, SIZE)
    assert set(losses) == {"seg", "cac", "smooth"} | ({"aux"} if has_aux else set())
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    # Eq. 7 weights, as csfrn's own models
    assert plug.criterion.loss_weights == DEFAULT_LOSS_WEIGHTS
    assert torch.allclose(losses["seg"], F.cross_entropy(outputs["out"], labels, ignore_index=255))
    if has_aux:
        assert torch.allclose(losses["aux"], 0.4 * F.cross_entropy(outputs["aux"], labels, ignore_index=255))

    sum(losses.values()).backward()
    for n, p in plug.csflm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    final = model.classifier.high_classifier if name.startswith("lraspp") else model.classifier[-1]
    assert final.weight.grad is not None and next(model.backbone.parameters()).grad is not None

    plug.eval()
    calls[0] = 0
    with torch.no_grad():
        out = plug(images)
        _, eval_losses = plug(images, labels)
    assert set(out) == set(outputs) and out["out"].shape == (2, NC, SIZE, SIZE)
    assert torch.isfinite(out["out"]).all()
    if fusion == "loss_only":  # not run at inference; no class losses in eval
        assert calls[0] == 0 and set(eval_losses) == {"seg"}
    else:  # the classifier sees CSFLM's features; eval losses as CSFRN's
        assert calls[0] == 2 and set(eval_losses) == {"seg", "cac", "smooth"}


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_only_leaves_inference_unchanged(name):
    model = torchvision_model(name)
    ref = copy.deepcopy(model).eval()
    plug = add_csflm(model, NC, fusion="loss_only", embed_dim=EMBED).eval()
    calls = count_calls(plug.csflm)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        got, want = plug(images), ref(images)
        plug.train()
        plug(images)  # train mode without labels: no losses, CSFLM not run either
        plug.eval()
    assert calls[0] == 0
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the inference cost is the wrapped model's: same FLOPs, the only extra parameters CSFLM's
    a, b = complexity(plug, SIZE), complexity(ref, SIZE)
    assert (a["gflops"], a["gflops_all"]) == (b["gflops"], b["gflops_all"])
    assert a["params"] == b["params"] + n_params(plug.csflm)


# ---------------------------------------------------------------- training through the Python API
def train(plug, iters, batches, lr=0.01):
    """SGD steps through the Python API; (total loss, CAC loss) per step."""
    opt = torch.optim.SGD([p for p in plug.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    plug.train()
    history = []
    for i in range(iters):
        images, labels = batches(i)
        _, losses = plug(images, labels)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), losses["cac"].item()))
    assert all(torch.isfinite(torch.tensor(history)).flatten())
    return history


def mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize(
    "name, fusion",
    [
        ("lraspp_mobilenet_v3_large", "aam"),
        ("deeplabv3_mobilenet_v3_large", "concat"),
        ("fcn_resnet50", "loss_only"),
        ("deeplabv3_resnet50", "aam"),
    ],
)
def test_training_50_iterations_on_synthetic_loss_falls(name, fusion):
    """50 SGD steps of batch 2 over a synthetic set of 8 images (4 batches in turn, so the first and the last 4
    steps see the same batches). The ResNet-50 models train their heads and CSFLM with the backbone frozen (its
    backward is most of the cost on a CPU); the MobileNet models train everything."""
    plug = add_csflm(torchvision_model(name), NC, fusion=fusion, embed_dim=EMBED)
    if name in R50:
        plug.model.backbone.requires_grad_(False)
    train_set = data(8)
    history = train(plug, 50, lambda i: synthetic_batch(train_set, 2 * (i % 4), 2))
    total = [t for t, _ in history]
    assert mean(total[-4:]) < 0.6 * mean(total[:4]), total


@pytest.mark.parametrize("name", R101)
def test_resnet101_trains_on_a_batch(name):
    """The ResNet-101 models: the least work that shows they train (their heads are the ResNet-50 ones'):
    5 steps on one synthetic batch, every parameter trained."""
    plug = add_csflm(torchvision_model(name), NC, fusion="concat", embed_dim=EMBED)
    batch = synthetic_batch(data(2), 0, 2)
    total, _ = zip(*train(plug, 5, lambda i: batch))
    assert total[-1] < 0.8 * total[0], total


# ---------------------------------------------------------------- any model through tap=
class TinySeg(nn.Module):
    """Logits at 1/4 of the input as a plain tensor; the classifier is a submodule."""

    def __init__(self, classes=NC, width=16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.head = nn.ModuleDict({"cls": nn.Conv2d(width, classes, 1)})

    def forward(self, x):
        return self.head["cls"](self.body(x))


@pytest.mark.parametrize("tap", ["head.cls", "module", "callable"])
@pytest.mark.parametrize("fusion", ["concat", "aam", "loss_only"])
def test_tap_any_model(tap, fusion):
    model = TinySeg()
    tap = {"module": model.head["cls"], "callable": lambda m: m.head["cls"]}.get(tap, tap)
    plug = add_csflm(model, NC, fusion=fusion, embed_dim=4, tap=tap)
    assert plug.tap == "head.cls"
    images, labels = synthetic_batch(data(2), 0, 2)
    logits, losses = plug(images, labels)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, NC, SIZE // 4, SIZE // 4)
    assert set(losses) == {"seg", "cac", "smooth"}
    up = F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert torch.allclose(losses["seg"], F.cross_entropy(up, labels))  # logits upsampled to the labels
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in plug.csflm.parameters())
    assert plug.eval()(images).shape == (2, NC, SIZE // 4, SIZE // 4)


def test_options_and_copies():
    images, labels = synthetic_batch(data(2), 0, 2)
    plug = add_csflm(
        TinySeg(), NC, fusion="concat", embed_dim=4, tap="head.cls", margins=False, loss_weights={"cac": 0.5}
    )
    _, losses = plug(images, labels)
    assert set(losses) == {"seg", "cac"} and plug.criterion.loss_weights["cac"] == 0.5
    # channels= for a tapped module without in_channels (the input of the whole head here)
    model = TinySeg()
    model.head["cls"] = nn.Sequential(nn.Identity(), nn.Conv2d(16, NC, 1))
    plug = add_csflm(model, NC, fusion="aam", embed_dim=4, tap="head.cls.0", channels=16)
    assert plug(images, labels)[0].shape == (2, NC, SIZE // 4, SIZE // 4)
    # a deep copy and a state_dict round trip carry the hook to the copy's own CSFLM
    plug.eval()
    twin = copy.deepcopy(plug)
    with torch.no_grad():
        assert torch.equal(twin(images), plug(images))
        twin.csflm.fuse.fuse[0].weight.add_(1.0)  # the fusion: F depends on it from step 0
        assert not torch.equal(twin(images), plug(images))
        plug.load_state_dict(twin.state_dict())
        assert torch.equal(twin(images), plug(images))
    assert set(plug.state_dict()) >= {"model.head.cls.1.weight", "csflm.embed.weight"}


def test_errors():
    with pytest.raises(ValueError, match="unknown fusion"):
        add_csflm(TinySeg(), NC, fusion="sum", tap="head.cls")
    with pytest.raises(ValueError, match="no default tap for TinySeg"):
        add_csflm(TinySeg(), NC)
    with pytest.raises(ValueError, match="names no submodule"):
        add_csflm(TinySeg(), NC, tap="head.nope")
    with pytest.raises(ValueError, match="not a submodule"):
        add_csflm(TinySeg(), NC, tap=nn.Conv2d(16, NC, 1))
    with pytest.raises(ValueError, match="pass channels="):
        add_csflm(TinySeg(), NC, tap="body")
    images, labels = synthetic_batch(data(2), 0, 2)
    with pytest.raises(ValueError, match="num_classes is 5"):
        add_csflm(TinySeg(), NC + 1, tap="head.cls")(images, labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        add_csflm(TinySeg(), NC, tap="head.cls")(images, labels[:, :8])
    model = TinySeg()
    model.body = nn.Sequential(model.body[0], nn.ReLU(), model.body[3], model.body[3])  # a module run twice
    with pytest.raises(RuntimeError, match="ran 2 times"):
        add_csflm(model, NC, fusion="loss_only", tap="body.2")(images, labels)
