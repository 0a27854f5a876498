"""``csfrn demo``: a small CSFRN and the same network without CSFLM / AAM, each trained with several seeds on the
synthetic set (seed s: the same initial stream, data and schedule for both, so the comparison is paired), then
evaluated on the held-out test split. It prints mean +- std of each, the paired difference with its 95%
t-interval and the feature-consistency scores, and draws seed 0's predictions and distance maps. Whatever comes
out is reported."""

import copy
import json
import os
import time

from ..data import build_dataset
from ..errors import TrainingInterrupted
from ..data.transforms import eval_transforms
from .ablate import mean_std, t_interval, train_and_evaluate
from .config import load_config
from .evaluate import format_consistency, predict_dataset_grid
from .visualize import visualize_dataset

DEMO_CONFIG = "demo"  # the shipped config (csfrn/configs/demo.yaml), found by name wherever csfrn is installed
MODELS = (("csfrn", True), ("baseline", False))
# What a demo writes into its folder (a new demo refuses them, --overwrite removes them).
DEMO_OUTPUTS = ("csfrn", "baseline", "summary.json", "predictions.png", "figure3_distance_maps.png")


def run_demo(out_dir, config_path=None, overrides=None, seeds=3, split="test", resume=False):
    """Train and evaluate both models with seeds 0..seeds-1; write summary.json and pictures to ``out_dir``.
    With ``resume``, runs already in ``out_dir`` continue from their last.pth (finished ones are only loaded)."""
    start = time.perf_counter()
    cfg = load_config(config_path or DEMO_CONFIG, overrides)
    os.makedirs(out_dir, exist_ok=True)
    test_set = build_dataset(cfg.data, split, eval_transforms(), num_classes=cfg.model.num_classes, seed=cfg.train.seed)
    runs, models = {name: [] for name, _ in MODELS}, {}
    for seed in range(seeds):
        for name, csflm in MODELS:
            run = copy.deepcopy(cfg)
            run.model.csflm = csflm
            run.train.seed = seed
            run.train.work_dir = os.path.join(out_dir, name, f"seed{seed}")
            run.train.resume = None
            run.train.progress = False
            try:
                record, model = train_and_evaluate(run, split, keep_checkpoint=True, return_model=True, resume=resume)
            except TrainingInterrupted as err:  # Ctrl-C / SIGTERM: say which run, and leave
                raise TrainingInterrupted(
                    err.signum, f"{name} seed {seed}: {err}", err.iteration, err.checkpoint
                ) from None
            if seed == 0:
                models[name] = model
            runs[name].append(record)
            print(
                f"{name} seed {seed}: {split} mIoU {100 * record['mIoU']:.2f}  (val {100 * record['val_mIoU']:.2f}, "
                f"{record['train_seconds']:.0f} s)",
                flush=True,
            )
    summary = {"split": split, "seeds": list(range(seeds))}
    for name, _ in MODELS:
        values = [100 * r["mIoU"] for r in runs[name]]
        mean, std = mean_std(values)
        summary[name] = {
            "mIoU": values,
            "mean": mean,
            "std": std,
            "consistency": [r["consistency"] for r in runs[name]],
            "params": sum(p.numel() for p in models[name].parameters()),
        }
    diffs = [a - b for a, b in zip(summary["csfrn"]["mIoU"], summary["baseline"]["mIoU"])]
    d, lo, hi = t_interval(diffs)
    summary["difference"] = {"per_seed": diffs, "mean": d, "low": lo, "high": hi}

    device = next(models["csfrn"].parameters()).device
    shown = list(range(min(4, len(test_set))))
    predict_dataset_grid(models, test_set, shown, os.path.join(out_dir, "predictions.png"), cfg.eval, device, scale=4)
    visualize_dataset(
        models["csfrn"],
        test_set,
        shown,
        os.path.join(out_dir, "figure3_distance_maps.png"),
        test_set.palette,
        device,
        delta=cfg.model.delta,
        scale=4,
    )
    summary["seconds"] = time.perf_counter() - start
    summary["classes"] = list(test_set.classes)
    summary["config"] = cfg.to_dict()
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print(f"\nmIoU on the synthetic {split} split ({len(test_set)} images), seeds 0..{seeds - 1}:")
    for name, _ in MODELS:
        s = summary[name]
        print(f"  {name:<8} {s['mean']:6.2f} ± {s['std']:.2f}   per seed: {', '.join(f'{v:.2f}' for v in s['mIoU'])}")
    interval = f"95% CI [{lo:+.2f}, {hi:+.2f}]" if seeds > 1 else "no interval with one seed"
    print(f"  CSFRN - baseline, paired by seed: {d:+.2f} points ({interval})")
    if seeds > 1 and lo > 0:
        verdict = "CSFRN ahead: the interval excludes 0"
    elif seeds > 1 and hi < 0:
        verdict = "the baseline ahead: the interval excludes 0"
    else:
        verdict = "no difference shown at this number of seeds: the interval contains 0"
    print(f"  {verdict}")
    for name, _ in MODELS:
        print(
            f"{name}, seed 0 — "
            + format_consistency(summary[name]["consistency"][0]).replace("\n", f"\n{name}, seed 0 — ")
        )
    print(f"({summary['seconds']:.0f} s; pictures of seed 0 in {out_dir})", flush=True)
    return summary
