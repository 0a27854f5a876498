"""``csfrn ablate``: the paper's ablation rows, each trained with several seeds, with statistics that mean
something.

Every variant is trained with every seed; seed s gives every variant the same initial random stream, the same
training images in the same order and the same schedule, so the comparison with the baseline is paired. Runs
are evaluated on a split that no choice was tuned on (``test`` by default: the training's own evaluation at the
end uses ``data.val_split``, which is where choices are made). Per run: ``runs/<variant>_seed<s>.json``; for the
whole study: ``summary.json``, ``table.md`` (mean +- std per variant, the paired difference to the baseline
with a 95% t-interval over seeds, the feature-consistency scores) and ``ablation.png`` (one dot per seed, the
mean and the interval per variant). A run whose JSON is already in the output folder is not trained again.
"""

import contextlib
import copy
import json
import math
import os
import time

from ..errors import ConfigError, TrainingDivergedError, TrainingInterrupted
from .config import load_config

# What a study writes into its folder (``--overwrite`` removes them all).
ABLATE_OUTPUTS = ("runs", "work", "summary.json", "table.md", "ablation.png")

# name -> (config overrides, the paper's row it stands for)
VARIANTS = {
    "baseline": (
        ["model.csflm=false"],
        "the head alone, no CSFLM / AAM (first row of Tables 2, 4, 5, 6: 'Deeplabv3+')",
    ),
    "concat": (
        ["model.csflm=true", "model.fusion=concat"],
        "'+CSFLM': concat fusion, CAC(Lovasz) with margins (Table 2; Table 4 'CAC(LS)'; Table 5 'w/ margins'; "
        "Table 6 '+CSFLM')",
    ),
    "aam": (["model.csflm=true", "model.fusion=aam"], "'+CSFLM&AAM', the full CSFRN (Table 6)"),
    "no-margins": (
        ["model.csflm=true", "model.fusion=concat", "model.margins=false"],
        "'+CSFLM w/o margins' (Table 5): concat fusion, every margin fixed at 0",
    ),
    "bce": (
        ["model.csflm=true", "model.fusion=concat", "model.binary=bce"],
        "'+CSFLM Distance CAC(BCE)' (Table 4): concat fusion, BCE in place of the Lovasz hinge",
    ),
    "aux-mask": (
        ["model.csflm=true", "model.fusion=concat", "model.csflm_supervision=mask", "model.margins=false"],
        "'+Aux Loss, Mask, L-Softmax' (Table 4): the embeddings B classified by a 1x1 conv and supervised "
        "by Lovasz-softmax on the class mask instead of the CAC loss",
    ),
    "no-cac": (
        ["model.csflm=true", "model.fusion=concat", "model.loss_weights={cac: 0.0, smooth: 0.0}"],
        "not a paper row: the '+CSFLM' modules without their losses (what the extra layers alone do)",
    ),
}

# Two-sided 95% quantiles t_{0.975, df} of Student's t, df = 1..30 (used when scipy is not installed).
T975 = [
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
]


def variants_help():
    return "\n".join(f"  {name:<11} {row}" for name, (_, row) in VARIANTS.items())


def parse_variants(names):
    """'a,b' or ['a', 'b'] -> a list of known variant names; an unknown name is a ConfigError listing them."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant {', '.join(map(repr, unknown))}; choose from {', '.join(VARIANTS)}")
    if not names:
        raise ConfigError(f"no variant given; choose from {', '.join(VARIANTS)}")
    return names


def t_quantile(df, q=0.975):
    """Student's t quantile (scipy.stats.t.ppf when scipy is installed; else the table above for q = 0.975,
    and the normal quantile 1.95996 plus its first two Cornish-Fisher terms beyond df 30)."""
    if df < 1:
        return float("nan")
    try:
        from scipy import stats  # optional: without scipy, the table below

        return float(stats.t.ppf(q, df))
    except ImportError:
        pass
    if q != 0.975:
        raise ValueError("without scipy only the 95% two-sided quantile (q=0.975) is available")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values):
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def t_interval(values, confidence=0.95):
    """(mean, low, high): the t-interval mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n) of ``values`` (for
    paired differences, the differences per seed). NaN bounds with fewer than two values."""
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(n - 1, 1 - (1 - confidence) / 2) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def _run_config(config, overrides, variant, seed, work_dir):
    cfg = load_config(
        config,
        list(overrides) + VARIANTS[variant][0] + [f"train.seed={seed}", "train.resume=null", "train.progress=false"],
    )
    cfg.train.work_dir = work_dir  # a path, not a YAML value ("exp #1" stays whole)
    return cfg


# Model keys that change nothing in a network without CSFLM.
_CSFLM_ONLY = ("fusion", "embed_dim", "margins", "binary", "delta", "fusion_init", "csflm_supervision")


def _comparable(cfg_dict):
    """The parts of a run's config that decide its result (not where it was written; not CSFLM's settings for
    a run without CSFLM, so baseline runs are shared by studies that differ only in them)."""
    d = copy.deepcopy(cfg_dict)
    if not d["model"].get("csflm", True):
        for key in _CSFLM_ONLY:
            d["model"].pop(key, None)
    for key in (
        "work_dir",
        "resume",
        "progress",
        "log_interval",
        "tensorboard",
        "checkpoint_interval",
        "keep_checkpoints",
        "threads",
        "device",
    ):
        d["train"].pop(key, None)
    # keys added after runs were recorded: at their defaults they are what those runs did
    for key, default in (("ema", None), ("accumulate", 1), ("clip_grad", None)):
        if d["train"].get(key, default) == default:
            d["train"].pop(key, None)
    return d


def train_and_evaluate(cfg, split, keep_checkpoint=False, return_model=False, resume=False):
    """Train one run, evaluate it on ``split`` (mIoU & co. and feature consistency). Returns the run's record
    (and the trained model with ``return_model``). With ``resume``, a run whose work_dir holds a last.pth
    continues from it (a finished one is only loaded); otherwise the run starts over."""
    # here, not at the top: csfrn ablate --help reads this module's VARIANTS, and must not import torch
    from ..data import build_dataset
    from ..data.transforms import eval_transforms
    from .evaluate import dataset_feature_consistency, evaluate
    from .train import train

    t0 = time.perf_counter()
    resume = resume and os.path.isfile(os.path.join(cfg.train.work_dir, "last.pth"))
    if resume:
        cfg = copy.deepcopy(cfg)
        cfg.train.resume = "auto"
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # one line per run, from ablate
        result = train(cfg, overwrite=not resume)  # without resume, a run that was cut off part way starts over
    model = result["model"].eval()
    device = next(model.parameters()).device
    dataset = build_dataset(cfg.data, split, eval_transforms(), num_classes=cfg.model.num_classes, seed=cfg.train.seed)
    summary, _ = evaluate(model, dataset, cfg.model.num_classes, cfg.eval, device, cfg.data.base_size)
    consistency = dataset_feature_consistency(model, dataset, device, cfg.eval.max_images)
    if not keep_checkpoint:
        for name in ("last.pth", "best.pth"):
            path = os.path.join(cfg.train.work_dir, name)
            if os.path.isfile(path):
                os.unlink(path)
    val = result["last"]
    if val is None:  # a finished run that was only loaded: its final validation again (the same numbers)
        val_set = build_dataset(
            cfg.data, cfg.data.val_split, eval_transforms(), num_classes=cfg.model.num_classes, seed=cfg.train.seed
        )
        val, _ = evaluate(model, val_set, cfg.model.num_classes, cfg.eval, device, cfg.data.base_size)
    record = {
        "split": split,
        "mIoU": summary["mIoU"],
        "mAcc": summary["mAcc"],
        "aAcc": summary["aAcc"],
        "IoU": summary["IoU"],
        "val_mIoU": val.get("mIoU"),
        "consistency": consistency,
        "train_seconds": time.perf_counter() - t0,
    }
    return (record, model) if return_model else record


def ablate(
    config=None,
    variants=("baseline", "concat", "aam", "no-margins", "bce"),
    seeds=5,
    out_dir="ablation",
    overrides=(),
    split="test",
    keep_checkpoints=False,
    progress=True,
    log=print,
    report_only=False,
    resume=False,
):
    """Train every variant with every seed and compare them; see the module doc.

    Args:
        config: YAML config file (or None: the defaults); ``overrides``: ``key=value`` for every run.
        variants: names from :data:`VARIANTS` (a list or "a,b,c"); the first comparison is against
            "baseline" when it is among them.
        seeds: a number n (seeds 0..n-1) or a list of seeds.
        out_dir: where runs/, summary.json, table.md and ablation.png go. Runs found there are not retrained;
            a run there made with another config is an error (use another folder).
        split: the split the results are reported on (not the one choices were tuned on: data.val_split).
        report_only: train nothing; write the table, summary and plot from the runs already in ``out_dir``.
        resume: a run that was interrupted continues from its work folder's last.pth (else it starts over).

    Returns:
        the summary dict (also written to summary.json).
    """
    names = parse_variants(variants)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError("--seeds must be at least 1")
    base = load_config(config, overrides)  # bad keys are reported before any work
    # here, not at the top: csfrn ablate --help reads this module, and stays quick
    from tqdm import tqdm

    from ..plotting import pyplot

    pyplot()  # and a missing matplotlib (ablation.png) too
    if split == base.data.val_split:
        log(
            f"note: reporting on {split}, the split that training evaluates on (data.val_split): it is not "
            f"held out from choices made on it"
        )
    run_dir = os.path.join(out_dir, "runs")
    os.makedirs(run_dir, exist_ok=True)
    jobs = [(v, s) for s in seed_list for v in names]
    records = {}
    bar = tqdm(total=len(jobs), desc="ablate", disable=not progress, dynamic_ncols=True)
    for variant, seed in jobs:
        path = os.path.join(run_dir, f"{variant}_seed{seed}.json")
        cfg = _run_config(config, overrides, variant, seed, os.path.join(out_dir, "work", f"{variant}_seed{seed}"))
        if os.path.isfile(path):
            with open(path) as f:
                record = json.load(f)
            if _comparable(record["config"]) != _comparable(cfg.to_dict()) or record["split"] != split:
                raise ConfigError(
                    f"{path} was made with another config or split than this study's; give another "
                    f"--out, or remove it to run it again"
                )
            bar.update(1)
            records[(variant, seed)] = record
            result = "diverged" if record.get("diverged") else f"{split} mIoU {100 * record['mIoU']:.2f}"
            bar.write(f"{variant} seed {seed}: done before, {result}")
            continue
        if report_only:
            bar.update(1)
            continue
        t0 = time.perf_counter()
        try:
            record = train_and_evaluate(cfg, split, keep_checkpoints, resume=resume)
        except TrainingInterrupted as err:  # Ctrl-C / SIGTERM: say which run, and leave
            bar.close()
            raise TrainingInterrupted(
                err.signum, f"{variant} seed {seed}: {err}", err.iteration, err.checkpoint
            ) from None
        except TrainingDivergedError as err:  # the loss went NaN / inf: a result of the variant, kept as such
            record = {"split": split, "mIoU": None, "diverged": str(err), "train_seconds": time.perf_counter() - t0}
        record.update(variant=variant, seed=seed, config=cfg.to_dict())
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, allow_nan=True)
        os.replace(tmp, path)
        records[(variant, seed)] = record
        bar.update(1)
        if record.get("diverged"):
            bar.write(f"{variant} seed {seed}: diverged ({record['diverged'][:80]}), {record['train_seconds']:.0f} s")
            continue
        fc = record["consistency"]["F"]["ratio"]
        bar.write(
            f"{variant} seed {seed}: {split} mIoU {100 * record['mIoU']:.2f} (val {100 * record['val_mIoU']:.2f})"
            f", separability of F {fc:.3g}, {record['train_seconds']:.0f} s"
        )
    bar.close()
    if not records:
        raise ConfigError(f"no finished run in {run_dir} to report")
    summary = summarize_runs(records, names, seed_list, split)
    summary["config"] = base.to_dict()
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, allow_nan=True)
    table = format_ablation(summary)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    plot_ablation(summary, os.path.join(out_dir, "ablation.png"))
    log(table)
    log(f"wrote {os.path.join(out_dir, 'summary.json')}, table.md and ablation.png")
    return summary


def summarize_runs(records, names, seeds, split="test"):
    """Per variant: the runs' mIoU (percent) by seed, mean, std, and the paired difference to the baseline
    with its 95% t-interval (over the seeds both finished), and the mean feature-consistency scores. Runs whose
    loss diverged are listed under "diverged" (seed -> message) and left out of the statistics."""
    out = {"split": split, "seeds": list(seeds), "variants": {}}
    finished = {key: r for key, r in records.items() if not r.get("diverged")}
    base = {s: 100 * finished[("baseline", s)]["mIoU"] for s in seeds if ("baseline", s) in finished}
    for v in names:
        miou = {s: 100 * finished[(v, s)]["mIoU"] for s in seeds if (v, s) in finished}
        val = [
            100 * finished[(v, s)]["val_mIoU"]
            for s in seeds
            if (v, s) in finished and finished[(v, s)].get("val_mIoU") is not None
        ]
        mean, std = mean_std(list(miou.values()))
        entry = {
            "row": VARIANTS[v][1],
            "mIoU": miou,
            "mean": mean,
            "std": std,
            "n": len(miou),
            "val_mean": mean_std(val)[0],
            "diverged": {
                s: records[(v, s)]["diverged"] for s in seeds if (v, s) in records and records[(v, s)].get("diverged")
            },
        }
        if v != "baseline" and base:
            diffs = [miou[s] - base[s] for s in miou if s in base]
            d, lo, hi = t_interval(diffs)
            entry["diff"] = {"mean": d, "low": lo, "high": hi, "n": len(diffs)}
        for kind in ("F", "B"):
            ratios = [
                finished[(v, s)]["consistency"][kind]["ratio"]
                for s in seeds
                if (v, s) in finished and kind in finished[(v, s)]["consistency"]
            ]
            if ratios:
                entry[f"separability_{kind}"] = mean_std(ratios)
        out["variants"][v] = entry
    return out


def _fmt(x, spec="5.2f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_ablation(summary):
    """A Markdown table of the summary."""
    lines = [
        f"mIoU (%) on the synthetic {summary['split']} split, seeds {summary['seeds']}; difference to the "
        "baseline paired by seed, 95% t-interval over seeds; separability = mean squared distance between "
        "class centres / mean intra-class variance (higher: more compact and separable); n counts the "
        "finished runs, and runs whose loss diverged are named beside it and left out of the statistics",
        "",
        "| variant | paper row | n | mIoU mean ± std | Δ vs baseline [95% CI] | separability F | separability B |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, e in summary["variants"].items():
        d = e.get("diff")
        diff = f"{_fmt(d['mean'], '+.2f')} [{_fmt(d['low'], '+.2f')}, {_fmt(d['high'], '+.2f')}]" if d else "–"
        sep = {
            k: (
                f"{_fmt(e[f'separability_{k}'][0], '.3g')} ± {_fmt(e[f'separability_{k}'][1], '.2g')}"
                if f"separability_{k}" in e
                else "–"
            )
            for k in ("F", "B")
        }
        diverged = e.get("diverged") or {}
        n = f"{e['n']} (seed {', '.join(map(str, diverged))} diverged)" if diverged else f"{e['n']}"
        lines.append(
            f"| {v} | {e['row']} | {n} | {_fmt(e['mean'])} ± {_fmt(e['std'])} | {diff} | {sep['F']} | {sep['B']} |"
        )
    return "\n".join(lines)


def plot_ablation(summary, path):
    """PNG (matplotlib): per variant one dot per seed (mIoU), a bar at the mean and a vertical line for the 95%
    t-interval of the mean; under each name the paired difference to the baseline and its interval."""
    from ..plotting import ablation_chart  # here, not at the top: as in ablate()

    intervals = {name: t_interval(list(e["mIoU"].values())) for name, e in summary["variants"].items()}
    return ablation_chart(summary, intervals, path)
