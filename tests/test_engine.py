"""Metrics, checkpoints, config, inference (slide / multi-scale / flip), the schedule, exact resume and DDP."""

import csv
import json
import math
import os
import pickle

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from csfrn.engine import checkpoint as ckpt
from csfrn.engine.config import Config, load_config, parse_overrides
from csfrn.engine.inference import inference, slide_inference
from csfrn.engine.metrics import confusion_matrix, format_table, save_summary, summarize
from csfrn.engine.checkpoint import build_model_from_config
from csfrn.engine.train import poly_lambda, train

from conftest import free_port, tiny_overrides


# ---------------------------------------------------------------- metrics
def test_confusion_matrix_by_hand():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 3, 0]])
    cm = confusion_matrix(pred, label, num_classes=4)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]


def test_summarize_by_hand_with_absent_classes():
    cm = torch.tensor(
        [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    )  # class 3: in neither ground truth nor prediction
    s = summarize(cm)
    assert s["aAcc"] == pytest.approx(4 / 6)
    assert s["IoU"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2]) and math.isnan(s["IoU"][3])
    assert s["Acc"][:3] == pytest.approx([1 / 2, 1, 1 / 2]) and math.isnan(s["Acc"][3])
    assert s["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["mAcc"] == pytest.approx(2 / 3)
    # predicted but never in the ground truth: IoU 0 (counts in the mean), Acc NaN
    s2 = summarize(torch.tensor([[1, 1], [0, 0]]))
    assert s2["IoU"] == pytest.approx([0.5, 0.0]) and math.isnan(s2["Acc"][1])
    assert s2["mIoU"] == pytest.approx(0.25) and s2["mAcc"] == pytest.approx(0.5)


def test_confusion_matrix_rejects_bad_values():
    with pytest.raises(ValueError, match="label value 7"):
        confusion_matrix(torch.zeros(3), torch.tensor([0, 7, 255]), 4)
    with pytest.raises(ValueError, match="predicted value 4"):
        confusion_matrix(torch.tensor([4]), torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2), torch.zeros(3), 4)
    assert confusion_matrix(torch.zeros(2), torch.full((2,), 255), 2).sum() == 0


def test_report_table_json_csv(tmp_path):
    s = summarize(torch.tensor([[3, 1, 0], [0, 0, 0], [0, 0, 0]]))
    table = format_table(s, ["a", "b", "c"])
    assert "mIoU" in table and "75.00" in table and "nan" in table
    save_summary(s, ["a", "b", "c"], tmp_path / "m.json", tmp_path / "m.csv")
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["IoU"][2] is None and data["classes"] == ["a", "b", "c"]
    rows = list(csv.reader(open(tmp_path / "m.csv")))
    assert rows[0] == ["class", "IoU", "Acc"] and rows[1][0] == "a" and rows[-1][0] == "mean"


# ---------------------------------------------------------------- checkpoints
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_roundtrip_and_atomic_replace(tmp_path):
    path = tmp_path / "sub" / "last.pth"
    torch.manual_seed(0)
    state = {
        "model": nn.Linear(3, 2).state_dict(),
        "iter": 5,
        "config": {"a": [1, 2.5, "x", None]},
        "rng": ckpt.rng_state(),
    }
    ckpt.save_checkpoint(state, path)
    loaded = ckpt.load_checkpoint(path)
    assert loaded["iter"] == 5 and loaded["config"] == state["config"]
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    # a failing save leaves the previous file intact and no temp file behind
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda cannot be pickled
        ckpt.save_checkpoint({"bad": lambda: 0}, path)
    assert ckpt.load_checkpoint(path)["iter"] == 5
    assert sorted(os.listdir(path.parent)) == ["last.pth"]
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ckpt.load_checkpoint(tmp_path / "missing.pth")


def test_checkpoint_never_runs_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_checkpoint(path)


def test_rng_state_roundtrip():
    import random
    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


# ---------------------------------------------------------------- config
def test_config_files_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  head: psp\ntrain:\n  lr: 0.02\n")
    cfg = load_config(str(path), ["train.iters=7", "data.crop_size=[33, 44]", "eval.flip=true"])
    assert cfg.model.head == "psp" and cfg.train.lr == 0.02 and cfg.train.iters == 7
    assert cfg.data.crop_size == [33, 44] and cfg.eval.flip is True
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    with pytest.raises(KeyError, match="train.lrr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(KeyError, match="'optim'"):
        load_config(None, ["optim.lr=1"])
    with pytest.raises(ValueError, match="train.iters.*integer"):
        load_config(None, ["train.iters=abc"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["train.iters"])
    path.write_text("train:\n  momentum_typo: 0.9\n")
    with pytest.raises(KeyError, match="train.momentum_typo"):
        load_config(str(path))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_config_bases_apply_in_order_then_the_file_then_set(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "data.yaml").write_text(
        "data:\n  crop_size: [32, 32]\n  batch_size: 4\nmodel:\n  num_classes: 5\n"
    )
    (tmp_path / "b" / "sched.yaml").write_text(
        "_base_: data.yaml\ntrain:\n  iters: 100\n  lr: 0.5\n"
        "data:\n  batch_size: 6\nmodel:\n  loss_weights: {cac: 2.0}\n"
    )
    (tmp_path / "b" / "model.yaml").write_text("model:\n  head: psp\n  loss_weights: {smooth: 3.0}\n")
    path = tmp_path / "c.yaml"
    path.write_text("_base_: [b/sched.yaml, b/model.yaml]\ntrain:\n  lr: 0.02\n")
    cfg = load_config(str(path), ["train.iters=7"])
    assert cfg.data.crop_size == [32, 32] and cfg.model.num_classes == 5  # from the base of a base
    assert cfg.data.batch_size == 6  # a later base replaces an earlier one, key by key
    assert cfg.model.head == "psp" and cfg.model.loss_weights == {"smooth": 3.0}  # a mapping value is replaced
    assert cfg.train.lr == 0.02 and cfg.train.iters == 7  # the file, then --set
    # Mistakes name the file they are in.
    (tmp_path / "b" / "model.yaml").write_text("model:\n  haed: psp\n")
    with pytest.raises(KeyError, match=r"model\.yaml.*model\.haed"):
        load_config(str(path))
    path.write_text("_base_: [b/missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml \(a _base_ of .*c\.yaml\)"):
        load_config(str(path))
    path.write_text("_base_: {a: 1}\n")
    with pytest.raises(ValueError, match="'_base_' expects a file path or a list"):
        load_config(str(path))
    (tmp_path / "b" / "data.yaml").write_text("_base_: ../c.yaml\n")
    path.write_text("_base_: b/sched.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(str(path))


def test_shipped_configs_resolve_as_before_they_inherited():
    """Every shipped config yields the config it did before the shared parts moved to configs/_base_ (the
    fixture was written from the configs as they were)."""
    from conftest import ROOT, shipped_configs

    with open(os.path.join(ROOT, "tests", "fixtures", "resolved_configs.json")) as f:
        expected = json.load(f)
    assert set(expected) <= set(shipped_configs())  # configs added since (plug/...) are not in it
    defaults = Config().to_dict()
    for name, resolved in expected.items():
        got = load_config(name).to_dict()
        # keys added to the config since the fixture was written keep their defaults in these configs
        known = {
            section: {k: v for k, v in values.items() if k in resolved[section]} for section, values in got.items()
        }
        added = {
            section: {k: v for k, v in values.items() if k not in resolved[section]} for section, values in got.items()
        }
        assert known == resolved, name
        assert all(v == defaults[section][k] for section, values in added.items() for k, v in values.items()), name


def test_amp_needs_cuda(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, iters=1, extra=["train.amp=bf16"]))
    with pytest.raises(ValueError, match="train.amp=bf16 needs a CUDA device"):
        train(cfg)


@pytest.mark.cuda  # needs a CUDA GPU (tests/conftest.py skips it without one): AMP runs on CUDA
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_on_cuda(tmp_path, amp):
    cfg = load_config(None, tiny_overrides(tmp_path, iters=3, extra=[f"train.amp={amp}", "train.device=cuda"]))
    result = train(cfg)
    state = ckpt.load_checkpoint(tmp_path / "last.pth")
    assert result["iter"] == 3 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0


def test_poly_schedule_with_warmup():
    cfg = load_config(
        None,
        ["train.iters=100", "train.lr=0.01", "train.min_lr=0.0", "train.warmup_iters=10", "train.warmup_ratio=0.1"],
    )
    f = poly_lambda(cfg.train)
    assert f(0) == pytest.approx(0.1)
    assert f(10) == pytest.approx(0.9**0.9)
    assert f(50) == pytest.approx(0.5**0.9)
    assert f(100) == 0.0


# ---------------------------------------------------------------- inference
class _Pointwise(nn.Module):
    """A 1x1 conv: translation-equivariant with no border effects, so any tiling gives the same logits."""

    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return self.conv(x)


def _tiny_model(**kw):
    cfg = load_config(None, tiny_overrides("unused"))
    for k, v in kw.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    return build_model_from_config(cfg.model).eval()


def test_slide_equals_whole_when_the_crop_covers_the_image():
    model = _tiny_model()
    x = torch.randn(2, 3, 24, 32)
    whole = model(x)
    slide = slide_inference(model, x, 4, crop_size=(24, 32), stride=(16, 16))
    assert torch.allclose(slide, whole, atol=1e-6)
    # a crop larger than the image (the 769 default on a small image) is cut to the image, not zero-padded
    for crop in [(769, 769), (24, 769), (769, 32), (100, 40)]:
        slide = slide_inference(model, x, 4, crop_size=crop, stride=(513, 513))
        assert torch.allclose(slide, whole, atol=1e-6), crop


def test_slide_crop_larger_in_one_dimension_is_cut_to_the_image():
    """mmsegmentation's windows: the crop spans the whole height, and slides over the width."""
    model = _tiny_model()
    x = torch.randn(1, 3, 24, 40)
    calls = []

    def record(crops):
        calls.append(tuple(crops.shape[-2:]))
        return model(crops)

    slide = slide_inference(record, x, 4, crop_size=(64, 24), stride=(8, 16), crop_batch=1)
    assert calls == [(24, 24), (24, 24)]  # windows x = 0 and 16; never padded to 64 rows
    expected = torch.zeros(1, 4, 24, 40)
    count = torch.zeros(1, 1, 24, 40)
    for x0 in (0, 16):
        expected[..., x0 : x0 + 24] += model(x[..., x0 : x0 + 24])
        count[..., x0 : x0 + 24] += 1
    assert torch.allclose(slide, expected / count, atol=1e-6)


@pytest.mark.parametrize("size", [(37, 50), (10, 12)])
def test_slide_overlap_averaging_and_small_images(size):
    model = _Pointwise().eval()
    x = torch.randn(1, 3, *size)
    a = slide_inference(model, x, 3, crop_size=(16, 20), stride=(7, 9), crop_batch=3)
    b = slide_inference(model, x, 3, crop_size=(16, 20), stride=(7, 9), crop_batch=100)
    assert a.shape == (1, 3, *size)
    assert torch.allclose(a, model(x), atol=1e-5) and torch.allclose(a, b, atol=1e-6)


def test_multiscale_flip_is_flip_consistent():
    model = _tiny_model(head="deeplabv3plus")
    x = torch.randn(1, 3, 40, 48)
    kw = dict(num_classes=4, scales=(0.5, 1.0, 1.5), flip=True)
    p = inference(model, x, mode="whole", **kw)
    q = inference(model, x.flip(-1), mode="whole", **kw)
    assert p.shape == (1, 4, 40, 48)
    assert torch.allclose(p.sum(1), torch.ones(1, 40, 48), atol=1e-5)
    assert torch.allclose(q, p.flip(-1), atol=1e-5)
    # without flip averaging the model itself is not flip-equivariant: the property is the averaging's
    p1 = inference(model, x, mode="whole", num_classes=4)
    q1 = inference(model, x.flip(-1), mode="whole", num_classes=4)
    assert not torch.allclose(q1, p1.flip(-1), atol=1e-5)
    slide = inference(model, x, mode="slide", crop_size=(32, 32), stride=(16, 16), out_size=(20, 24), **kw)
    assert slide.shape == (1, 4, 20, 24)


# ---------------------------------------------------------------- training: exact resume
def _states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bitwise_exact(tmp_path):
    full = load_config(
        None,
        tiny_overrides(
            tmp_path / "full",
            iters=6,
            extra=[
                "train.checkpoint_interval=3",
                "train.keep_checkpoints=true",
                "model.head=deeplabv3plus",
                "data.flip=true",
            ],
        ),
    )
    train(full)
    resumed = load_config(
        None,
        tiny_overrides(
            tmp_path / "resumed",
            iters=6,
            extra=[
                "train.checkpoint_interval=3",
                "model.head=deeplabv3plus",
                f"train.resume={tmp_path / 'full' / 'iter_000003.pth'}",
            ],
        ),
    )
    train(resumed)
    a = ckpt.load_checkpoint(tmp_path / "full" / "last.pth")
    b = ckpt.load_checkpoint(tmp_path / "resumed" / "last.pth")
    mid = ckpt.load_checkpoint(tmp_path / "full" / "iter_000003.pth")
    assert a["iter"] == b["iter"] == 6 and mid["iter"] == 3
    _states_equal(a["model"], b["model"])
    changed = [
        k for k in a["model"] if a["model"][k].is_floating_point() and not torch.equal(a["model"][k], mid["model"][k])
    ]
    assert changed, "iterations 4..6 changed no parameter: the test would prove nothing"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


# ---------------------------------------------------------------- DDP (gloo, CPU) == one process, combined batch
def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d)):
            m.p = 0.0
    return model


def _ddp_worker(rank, world, port, overrides, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, overrides)
        torch.manual_seed(0)
        result = train(cfg, model=_no_dropout(build_model_from_config(cfg.model)))
        queue.put((rank, result["last"]["mIoU"], None))
    except Exception as err:  # report to the parent instead of hanging it
        queue.put((rank, None, repr(err)))
        raise


def test_ddp_two_processes_match_one_process_with_the_combined_batch(tmp_path):
    extra = [
        "train.iters=3",
        "train.checkpoint_interval=3",
        "model.head=psp",
        "data.batch_size=4",
        "train.eval_interval=3",
    ]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ddp_overrides = tiny_overrides(tmp_path / "ddp", iters=3, extra=extra)
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, ddp_overrides, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(err is None for _, _, err in results), results
    assert all(p.exitcode == 0 for p in procs)

    single = load_config(None, tiny_overrides(tmp_path / "single", iters=3, extra=extra))
    torch.manual_seed(0)
    ref = train(single, model=_no_dropout(build_model_from_config(single.model)))
    a = ckpt.load_checkpoint(tmp_path / "ddp" / "last.pth")["model"]
    b = ckpt.load_checkpoint(tmp_path / "single" / "last.pth")["model"]
    assert a.keys() == b.keys()
    torch.manual_seed(0)
    init = build_model_from_config(single.model).state_dict()
    moved = 0
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
            moved += not torch.allclose(b[k], init[k])
        else:
            assert torch.equal(a[k], b[k]), k
    assert moved > 0
    # the evaluation (sharded over the two processes, confusion matrices summed) agrees too
    assert {r: m for r, m, _ in results}[0] == pytest.approx(ref["last"]["mIoU"], abs=1e-6)
