"""csfrn ablate: statistics on hand-made numbers, resume, unknown variants; feature consistency."""

import json
import math
import os

import pytest
import torch

from conftest import tiny_overrides
from csfrn import cli
from csfrn.engine import ablate as ab
from csfrn.engine.metrics import FeatureConsistency, feature_consistency
from csfrn.errors import ConfigError, TrainingDivergedError


def test_t_interval_on_hand_made_numbers():
    mean, lo, hi = ab.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975, 4} * sd / sqrt(n)
    assert mean == pytest.approx(3.0)
    assert (lo, hi) == (pytest.approx(3.0 - half, abs=1e-3), pytest.approx(3.0 + half, abs=1e-3))
    assert ab.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert ab.t_quantile(10) == pytest.approx(2.228, abs=1e-3)
    assert ab.t_quantile(60) == pytest.approx(2.000, abs=2e-3)
    assert math.isnan(ab.t_interval([1.0])[1])


def test_paired_difference_on_hand_made_runs():
    def rec(miou):
        return {"mIoU": miou / 100, "val_mIoU": None, "consistency": {"F": {"ratio": 1.0}}}

    base = [80.0, 82.0, 84.0]
    other = [81.0, 83.5, 84.5]  # differences 1.0, 1.5, 0.5: mean 1, sd 0.5
    records = {("baseline", s): rec(v) for s, v in enumerate(base)}
    records.update({("concat", s): rec(v) for s, v in enumerate(other)})
    summary = ab.summarize_runs(records, ["baseline", "concat"], [0, 1, 2])
    d = summary["variants"]["concat"]["diff"]
    half = 4.3027 * 0.5 / math.sqrt(3)
    assert d["mean"] == pytest.approx(1.0)
    assert d["low"] == pytest.approx(1.0 - half, abs=1e-3) and d["high"] == pytest.approx(1.0 + half, abs=1e-3)
    assert summary["variants"]["baseline"]["mean"] == pytest.approx(82.0)
    assert summary["variants"]["baseline"]["std"] == pytest.approx(2.0)
    table = ab.format_ablation(summary)
    assert "+1.00 [" in table and "82.00 ±  2.00" in table


def test_diverged_runs_are_named_and_left_out_of_the_statistics():
    def rec(miou):
        return {"mIoU": miou / 100, "val_mIoU": None, "consistency": {"F": {"ratio": 1.0}}}

    records = {("baseline", s): rec(v) for s, v in enumerate([80.0, 82.0, 84.0])}
    records.update(
        {
            ("bce", 0): rec(81.0),
            ("bce", 1): {"mIoU": None, "diverged": "loss is not finite at 7"},
            ("bce", 2): rec(84.0),
        }
    )
    summary = ab.summarize_runs(records, ["baseline", "bce"], [0, 1, 2])
    bce = summary["variants"]["bce"]
    assert bce["n"] == 2 and bce["mIoU"] == {0: 81.0, 2: 84.0} and bce["diverged"] == {1: "loss is not finite at 7"}
    assert bce["diff"]["n"] == 2 and bce["diff"]["mean"] == pytest.approx(0.5)  # paired over seeds 0 and 2
    assert "| 2 (seed 1 diverged) |" in ab.format_ablation(summary)


def test_a_run_whose_loss_diverges_is_recorded_not_fatal(tmp_path, monkeypatch):
    def diverge(cfg, split, keep=False, **kwargs):
        raise TrainingDivergedError("loss is not finite at iteration 3 (loss nan)")

    monkeypatch.setattr(ab, "train_and_evaluate", diverge)
    out = tmp_path / "study"
    summary = ab.ablate(
        None, "baseline", 1, str(out), tiny_overrides(tmp_path / "unused", iters=2), progress=False, log=lambda *a: None
    )
    record = json.loads((out / "runs" / "baseline_seed0.json").read_text())
    assert record["mIoU"] is None and "iteration 3" in record["diverged"] and record["config"]
    assert summary["variants"]["baseline"]["n"] == 0 and summary["variants"]["baseline"]["diverged"]


def test_unknown_variant_is_one_line_error(capsys, tmp_path):
    assert cli.main(["ablate", "--out", str(tmp_path), "--variants", "baseline,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown variant 'nope'" in err and all(v in err for v in ab.VARIANTS)
    with pytest.raises(ConfigError):
        ab.parse_variants("concat,foo")


def test_ablate_resumes_and_writes_outputs(tmp_path, monkeypatch):
    out = tmp_path / "study"
    overrides = tiny_overrides(tmp_path / "unused", iters=2)
    ab.ablate(None, "baseline,concat", 1, str(out), overrides, progress=False, log=lambda *a: None)
    runs = sorted(os.listdir(out / "runs"))
    assert runs == ["baseline_seed0.json", "concat_seed0.json"]
    for name in ("summary.json", "table.md", "ablation.png"):
        assert (out / name).is_file()
    record = json.loads((out / "runs" / "concat_seed0.json").read_text())
    assert record["split"] == "test" and set(record["consistency"]) == {"F", "B"}
    assert not (out / "work" / "concat_seed0" / "last.pth").exists()

    trained = []
    real = ab.train_and_evaluate

    def spy(cfg, split, keep=False, **kwargs):
        trained.append(cfg.train.seed)
        return real(cfg, split, keep, **kwargs)

    monkeypatch.setattr(ab, "train_and_evaluate", spy)
    summary = ab.ablate(None, "baseline,concat", 2, str(out), overrides, progress=False, log=lambda *a: None)
    assert trained == [1, 1]  # seed 0's runs were not trained again
    assert summary["variants"]["concat"]["diff"]["n"] == 2
    trained.clear()
    summary = ab.ablate(
        None, "baseline,concat", 3, str(out), overrides, progress=False, log=lambda *a: None, report_only=True
    )
    assert trained == [] and summary["variants"]["baseline"]["n"] == 2  # seed 2 is missing and not trained
    with pytest.raises(ConfigError, match="another config"):
        ab.ablate(None, "baseline", 1, str(out), overrides + ["train.lr=0.5"], progress=False, log=lambda *a: None)


def test_feature_consistency_known_answer():
    # class 0 at (0, 0) +- 1 along x, class 1 at (4, 0) +- 1: intra variance 1, centre distance 4.
    f = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [3.0, 0.0], [5.0, 0.0]]).t().reshape(1, 2, 2, 2)
    labels = torch.tensor([[[0, 0], [1, 1]]])
    r = feature_consistency(f, labels)
    assert r["intra"] == pytest.approx(1.0) and r["inter"] == pytest.approx(4.0)
    assert r["ratio"] == pytest.approx(16.0) and r["classes"] == 2
    # scaling the features leaves the ratio alone; ignored pixels count for nothing
    r2 = feature_consistency(3 * f, torch.tensor([[[0, 0], [1, 1]]]))
    assert r2["ratio"] == pytest.approx(16.0) and r2["intra"] == pytest.approx(9.0)
    f_ign = torch.cat([f, torch.full((1, 2, 2, 1), 100.0)], 3)
    lab_ign = torch.tensor([[[0, 0, 255], [1, 1, 255]]])
    assert feature_consistency(f_ign, lab_ign)["ratio"] == pytest.approx(16.0)
    # streaming over two batches = one batch; three classes: mean over the three pairs
    s = FeatureConsistency().update(f[..., :1], labels[..., :1]).update(f[..., 1:], labels[..., 1:])
    assert s.result()["ratio"] == pytest.approx(16.0)
    g = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]).t().reshape(1, 2, 1, 3)
    r3 = feature_consistency(g, torch.tensor([[[0, 1, 2]]]))
    assert r3["intra"] == 0 and r3["inter"] == pytest.approx((3 + 4 + 5) / 3) and math.isnan(r3["ratio"])
    # labels at a higher resolution are brought to the features' size by nearest neighbour
    big = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert feature_consistency(f, big)["ratio"] == pytest.approx(16.0)
    assert math.isnan(feature_consistency(f, torch.zeros(1, 2, 2, dtype=torch.long))["ratio"])


def test_mask_supervision_variant_trains_a_class_mask_on_b():
    from csfrn.losses import lovasz_softmax
    from csfrn.models import build_model

    torch.manual_seed(0)
    model = build_model(
        "fcn",
        4,
        width=8,
        blocks=(1, 1, 1, 1),
        channels=16,
        aux_channels=8,
        embed_dim=8,
        fusion="concat",
        margins=False,
        csflm_supervision="mask",
    ).train()
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    labels[0, :4] = 255
    _, losses = model(images, labels)
    assert set(losses) == {"seg", "aux", "mask"}
    sum(losses.values()).backward()
    assert model.criterion.mask_head.weight.grad.abs().sum() > 0
    target = torch.randint(0, 3, (1, 4, 4))
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert float(lovasz_softmax(perfect, target)) == 0.0
    assert float(lovasz_softmax(1 - perfect, target)) == pytest.approx(1.0)


@pytest.mark.parametrize("fusion", ["concat", "aam"])
def test_fusion_starts_as_the_identity_on_a(fusion, ops_path):
    from csfrn.nn import CSFLM

    torch.manual_seed(0)
    a = torch.relu(torch.randn(2, 16, 6, 6))
    module = CSFLM(16, 8, fusion).train()
    f = module(a).features
    mean = a.mean((0, 2, 3), keepdim=True)
    var = a.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = torch.relu((a - mean) / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(f, expected, atol=1e-4, rtol=1e-4)
    random = CSFLM(16, 8, fusion, fusion_init="random").train()
    assert not torch.allclose(random(a).features, expected, atol=1e-2)
    with pytest.raises(ValueError, match="fusion_init"):
        CSFLM(16, 8, fusion, fusion_init="zeros")
