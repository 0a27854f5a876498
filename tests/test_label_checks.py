"""Label values on the training path: checked once per batch on the CPU (csfrn.losses.check_labels) before the copy
to the device; the models check what a user hands them outside ``labels_checked()``; the class-wise losses call
class_avg_pool with validate=False (on CUDA that check would be a device-to-host sync every step)."""

import importlib

import pytest
import torch

import csfrn.losses.labels as labels_module
import csfrn.ops
from conftest import tiny_overrides
from csfrn.engine.config import load_config
from csfrn.losses import CACLoss, SmoothLoss, check_labels, labels_checked
from csfrn.models import add_csflm, build_model

train_module = importlib.import_module("csfrn.engine.train")  # csfrn.engine.train is also the function's name
NC = 3
TINY = dict(backbone="resnet50c", width=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8, embed_dim=8)


def good_labels(n=2, size=32):
    labels = torch.zeros(n, size, size, dtype=torch.long)
    labels[:, :, size // 2 :] = 1
    labels[:, : size // 4] = 2
    labels[:, :2] = 255
    return labels


@pytest.fixture
def pool_calls(monkeypatch):
    """The validate flag of every csfrn.ops.class_avg_pool call."""
    calls, real = [], csfrn.ops.class_avg_pool

    def recording(*args, **kwargs):
        calls.append(kwargs.get("validate", args[4] if len(args) > 4 else True))
        return real(*args, **kwargs)

    monkeypatch.setattr(csfrn.ops, "class_avg_pool", recording)
    return calls


@pytest.fixture
def model_checks(monkeypatch):
    """The label tensors the models' own check (check_model_labels) examined."""
    seen, real = [], labels_module.check_labels

    def recording(labels, *args):
        seen.append(labels)
        return real(labels, *args)

    monkeypatch.setattr(labels_module, "check_labels", recording)
    return seen


def test_check_labels_one_line_error():
    labels = good_labels()
    check_labels(labels, NC)
    for value in (3, -1, 1 << 40, -(2**63)):
        bad = labels.clone()
        bad[1, 5, 7] = value
        with pytest.raises(
            ValueError,
            match=rf"^labels must be in \[0, num_classes=3\) or equal ignore_index=255, "
            rf"got label value {value}$",
        ):
            check_labels(bad, NC)
    check_labels(labels.masked_fill(labels == 255, -1), NC, ignore_index=-1)


def test_losses_call_class_avg_pool_without_validation(pool_calls):
    torch.manual_seed(0)
    embeddings, margins = torch.randn(2, 4, 8, 8, requires_grad=True), torch.rand(2, 1, 8, 8, requires_grad=True)
    labels = good_labels(size=8)
    (CACLoss()(embeddings, margins, labels) + SmoothLoss()(margins, labels)).backward()
    assert pool_calls == [False, False, False]


@pytest.mark.parametrize("which", ["csfrn", "plug"])
def test_models_check_labels_unless_checked(which, model_checks, pool_calls):
    torch.manual_seed(0)
    if which == "csfrn":
        model = build_model("fcn", NC, fusion="concat", **TINY)
    else:
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        model = add_csflm(
            lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NC),
            NC,
            fusion="concat",
            embed_dim=4,
        )
    model.train()
    images, labels = torch.randn(2, 3, 32, 32), good_labels()
    model(images, labels)
    assert len(model_checks) == 1 and model_checks[0].shape == labels.shape
    assert pool_calls and not any(pool_calls)  # the losses never validate: the model did, once
    bad = labels.clone()
    bad[0, 20, 20] = 7
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=3\).*got label value 7$"):
        model(images, bad)
    with labels_checked():
        model(images, labels)
    assert len(model_checks) == 2  # the bad call's, not the one inside labels_checked()


def test_engine_checks_cpu_batches_and_the_step_does_not(tmp_path, monkeypatch, model_checks, pool_calls):
    engine_checks = []

    def recording(labels, num_classes, *args):
        engine_checks.append((labels.device.type, labels.dtype, num_classes, labels_module._checked_depth))
        return check_labels(labels, num_classes, *args)

    monkeypatch.setattr(train_module, "check_labels", recording)
    train_module.train(load_config(None, tiny_overrides(tmp_path, iters=2)))
    assert engine_checks == [("cpu", torch.int64, 4, 0)] * 2  # every batch, outside labels_checked()
    assert model_checks == []  # the step never checks again
    assert pool_calls and not any(pool_calls)


def test_engine_bad_batch_is_an_error(tmp_path, monkeypatch):
    class Bad(train_module.SeededTransforms):
        def __getitem__(self, item):
            image, label = super().__getitem__(item)
            label[0, 0] = 9
            return image, label

    monkeypatch.setattr(train_module, "SeededTransforms", Bad)
    with pytest.raises(ValueError, match=r"num_classes=4\) or equal ignore_index=255, got label value 9$"):
        train_module.train(load_config(None, tiny_overrides(tmp_path, iters=2)))
