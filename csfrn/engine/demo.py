"""``csfrn demo``: a small CSFRN and the same network without CSFLM / AAM, trained on the synthetic set with the
same seed, data, iterations and schedule, then evaluated the same way. Whatever comes out is reported."""
import copy
import json
import os
import time

from ..data import build_dataset
from ..data.transforms import eval_transforms
from .config import load_config
from .evaluate import predict_dataset_grid, write_report
from .train import train
from .visualize import visualize_dataset

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "configs", "demo.yaml")


def run_demo(out_dir, config_path=None, overrides=None):
    """Train and evaluate both models; write summary.json, per-class tables and pictures to ``out_dir``."""
    start = time.perf_counter()
    if config_path is None and os.path.isfile(DEMO_CONFIG):
        config_path = DEMO_CONFIG
    cfg = load_config(config_path, overrides)
    os.makedirs(out_dir, exist_ok=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, eval_transforms(), num_classes=cfg.model.num_classes,
                            seed=cfg.train.seed)
    summary, models = {}, {}
    for name, csflm in (("csfrn", True), ("baseline", False)):
        run = copy.deepcopy(cfg)
        run.model.csflm = csflm
        run.train.work_dir = os.path.join(out_dir, name)
        run.train.resume = None
        print(f"== training {name} (csflm={csflm}) for {run.train.iters} iterations", flush=True)
        t0 = time.perf_counter()
        result = train(run, overwrite=True)   # the demo's own folders: a rerun starts over
        models[name] = result["model"].eval()
        table = write_report(result["last"], val_set.classes, out_dir, name=f"{name}_metrics")
        print(f"-- {name} on the synthetic val set ({len(val_set)} images):\n{table}", flush=True)
        summary[name] = {"mIoU": result["last"]["mIoU"], "mAcc": result["last"]["mAcc"],
                         "aAcc": result["last"]["aAcc"], "IoU": result["last"]["IoU"],
                         "train_seconds": time.perf_counter() - t0,
                         "params": sum(p.numel() for p in result["model"].parameters())}
    device = next(models["csfrn"].parameters()).device
    shown = list(range(min(4, len(val_set))))
    predict_dataset_grid(models, val_set, shown, os.path.join(out_dir, "predictions.png"), cfg.eval, device,
                         scale=4)
    visualize_dataset(models["csfrn"], val_set, shown, os.path.join(out_dir, "figure3_distance_maps.png"),
                      val_set.palette, device, delta=cfg.model.delta, scale=4)
    summary["seconds"] = time.perf_counter() - start
    summary["classes"] = list(val_set.classes)
    summary["config"] = cfg.to_dict()
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{result_line(summary)}  ({summary['seconds']:.0f} s; pictures in {out_dir})", flush=True)
    return summary


def result_line(summary):
    """The demo's verdict as it prints it (the README quotes it)."""
    return (f"CSFRN mIoU {100 * summary['csfrn']['mIoU']:.2f}  vs  baseline (no CSFLM/AAM) mIoU "
            f"{100 * summary['baseline']['mIoU']:.2f}")
