"""The summary of a GPU session (``benchmarks/gpu_session.sh``): reads what its stages left in a results folder
and writes ``summary.json`` (every figure the GPU check is stated in, under the names of ``KEYS``) and
``summary.md`` (the tables for the README). Nothing here times anything: a figure the session did not measure
(its stage was cut or not run, the benchmark does not make it yet, the dry run cannot) is null, and
``notes[key]`` says why.

    python benchmarks/gpu_summary.py RESULTS_DIR
"""

import argparse
import json
import os
import re
import statistics
import xml.etree.ElementTree as ET

from csfrn.bench.deform_plan import floor_ms

# Every key summary.json must hold (the GPU issue's list), in its order.
KEYS = (
    "device",
    "torch",
    "date",
    "commit",
    "tests_passed",
    "tests_failed",
    "sanitizer_errors",
    "deform_vs_torchvision_fp32",
    "deform_vs_torchvision_bf16",
    "dual_vs_torchvision_bf16",
    "deform_deterministic",
    "step_ms_baseline",
    "step_ms_csfrn",
    "step_csfrn_over_baseline",
    "step_ms_torchvision_deeplabv3",
    "train_images_per_s_csfrn",
    "train_peak_gib_csfrn",
    "mfu_baseline",
)
# Which stage makes each key (for the note when it is null).
STAGE_OF = {
    "device": "info",
    "torch": "info",
    "date": "info",
    "tests_passed": "check",
    "tests_failed": "check",
    "sanitizer_errors": "check",
    "deform_vs_torchvision_fp32": "deform",
    "deform_vs_torchvision_bf16": "deform",
    "dual_vs_torchvision_bf16": "deform",
    "deform_deterministic": "deform",
    "step_ms_baseline": "step",
    "step_ms_csfrn": "step",
    "step_csfrn_over_baseline": "step",
    "step_ms_torchvision_deeplabv3": "step",
    "train_images_per_s_csfrn": "train",
    "train_peak_gib_csfrn": "train",
    "mfu_baseline": "step",
}
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck")


class Missing(Exception):
    """A figure that cannot be given; its message is the note."""


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _jsonl(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut off by a stage's kill
                    pass
    except OSError:
        pass
    return rows


def _need(doc, what):
    if doc is None:
        raise Missing(f"no {what}")
    return doc


# ---------------------------------------------------------------- interfaces
# The only readers of the JSON that csfrn/bench/deform.py (`csfrn bench --what deform --json`) and
# csfrn/bench/train_step.py (`csfrn bench --what train --json`) write; adapt them here when those change.
DEFORM_FILES = {"fp32": "deform_conv-fp32.json", "bf16": "deform_conv-bf16.json"}
DEFORM_CASES = {"single": "generic", "dual": "AAM"}  # the "case" names' prefixes in "ratios"
DEFORM_MODE, DEFORM_RATIO = "fwd+bwd", "torchvision_over_ours"
# The step benchmark's runs (gpu_session.sh): the eager core, the kernels' comparison, the compiled steps.
STEP_FILES = (
    "train_step-core.json",
    "train_step-kernels.json",
    "train_step-compiled-csfrn.json",
    "train_step-compiled-baseline.json",
)
STEP_MODE = "train step"
# A summary key's model -> the step benchmark's variant, in the layout csfrn train uses by default on the
# session's device (train.channels_last: true on CUDA, "-cl"; false on the CPU of a dry run).
STEP_VARIANTS = {"baseline": "baseline", "csfrn": "csfrn", "torchvision_deeplabv3": "tv-deeplabv3"}


def step_variant(model, dry, compiled=False):
    return STEP_VARIANTS[model] + ("" if dry else "-cl") + ("-compiled" if compiled else "")


def deform_ratio(res, dtype, case):
    """torchvision's time over ours, forward + backward, for the single or the dual op."""
    doc = _need(_load(os.path.join(res, DEFORM_FILES[dtype])), DEFORM_FILES[dtype])
    for r in doc.get("ratios", []):
        if r.get("case", "").startswith(DEFORM_CASES[case]) and r.get("mode") == DEFORM_MODE:
            if r.get(DEFORM_RATIO) is None:
                raise Missing(f"{DEFORM_FILES[dtype]}: the {case} case has no {DEFORM_RATIO}")
            return r[DEFORM_RATIO]
    raise Missing(f"{DEFORM_FILES[dtype]} has no {DEFORM_MODE} ratio for a case starting {DEFORM_CASES[case]!r}")


def step_docs(res):
    docs = [(name, _load(os.path.join(res, name))) for name in STEP_FILES]
    docs = [(name, d) for name, d in docs if d]
    if not docs:
        raise Missing(f"none of {', '.join(STEP_FILES)}")
    return docs


def step_row(res, variant):
    """The step benchmark's row for ``variant`` (its name there), from the first file that has it."""
    docs = step_docs(res)
    for _, doc in docs:
        for r in doc.get("rows", []):
            if r.get("mode") == STEP_MODE and r.get("variant") == variant:
                return r, doc
    raise Missing(f"the step benchmark ({', '.join(n for n, _ in docs)}) has no {STEP_MODE!r} row for {variant!r}")


def mfu_baseline(res, info, dry):
    """Model FLOPs utilisation of the baseline step (eager, the device's default layout): 3 (forward + backward)
    x 2 (FLOPs per multiply-add) x the paper's multiply-add count per image (the benchmark's "gflops": convs,
    ReLUs, pools; no aux head) x batch / the step time / the measured matrix-product peak in the step's precision
    (bf16 under bf16 autocast, else float32)."""
    row, doc = step_row(res, step_variant("baseline", dry))
    per_image = (doc.get("gflops") or {}).get("baseline")
    if per_image is None:
        raise Missing("the step benchmark gives no 'gflops' for the baseline")
    meta = doc.get("meta", {})
    amp = meta.get("amp")
    peak = info.get("matmul_tflops_bf16" if amp == "bf16" else "matmul_tflops_fp32")
    if peak is None:
        raise Missing(f"info.json has no matmul ceiling for amp {amp!r}")
    flops = 3 * 2 * per_image * 1e9 * meta["batch"]
    return flops / (row["median_ms"] * 1e-3) / (peak * 1e12)


def deform_ms(res, dtype, case, impl):
    """The median ms of ``impl``'s forward + backward in the deform benchmark's ``dtype`` file."""
    doc = _need(_load(os.path.join(res, DEFORM_FILES[dtype])), DEFORM_FILES[dtype])
    for r in doc.get("rows", []):
        if r.get("case", "").startswith(DEFORM_CASES[case]) and (r.get("mode"), r.get("impl")) == (DEFORM_MODE, impl):
            return r["median_ms"]
    raise Missing(f"{DEFORM_FILES[dtype]} has no {DEFORM_MODE} row of {impl!r} for the {case} case")


def deform_floor(res, info, dtype, op="deform_conv2d"):
    """(floor, expected) ms of the benchmark's CUDA launch plan for ``op`` in ``dtype``: the floor re-summed over
    its kernels at this card's measured ceilings (info.json), the expected time as the plan gives it at the card
    it was computed for."""
    doc = _need(_load(os.path.join(res, DEFORM_FILES[dtype])), DEFORM_FILES[dtype])
    want = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    for p in doc.get("plan", []):
        if p.get("op") == op and p.get("dtype") == want:
            if any(k not in info for k in ("copy_gb_s", "matmul_tflops_fp32", "matmul_tflops_bf16")):
                raise Missing("info.json has no measured GPU ceilings (copy, float32 and bf16 matmul)")
            floor = sum(floor_ms(k["mbytes"] * 1e6, k["gflop"] * 1e9, info, want) for k in p["kernels"])
            return floor, p["expected_ms"]
    raise Missing(f"{DEFORM_FILES[dtype]} has no launch plan of {op} in {want}")


def _got(summary, key):
    """summary[key], or Missing when it was not measured (its note says why)."""
    if summary.get(key) is None:
        raise Missing(f"{key} was not measured ({summary['notes'].get(key, 'no note')})")
    return summary[key]


# The targets the session is held against (the deformable convolution at the GPU shape, the training step at
# N=8, 769 x 769, bf16): (what, how the figure is made from the summary and the results, ">=" or "<=", limit).
TARGETS = (
    (
        "deform_conv2d fwd+bwd, float32: torchvision / ours",
        lambda s, res, info: _got(s, "deform_vs_torchvision_fp32"),
        ">=",
        2.0,
    ),
    (
        "deform_conv2d fwd+bwd, bf16 autocast: torchvision / ours",
        lambda s, res, info: _got(s, "deform_vs_torchvision_bf16"),
        ">=",
        6.0,
    ),
    (
        "AAM dual op fwd+bwd, bf16: ours / torchvision's two calls",
        lambda s, res, info: (
            deform_ms(res, "bf16", "dual", "ours dual") / deform_ms(res, "bf16", "dual", "torchvision 2 calls")
        ),
        "<=",
        0.75,
    ),
    (
        "AAM dual op fwd+bwd, float32: ours / torchvision's two calls",
        lambda s, res, info: (
            deform_ms(res, "fp32", "dual", "ours dual") / deform_ms(res, "fp32", "dual", "torchvision 2 calls")
        ),
        "<=",
        0.75,
    ),
    (
        "deform_conv2d fwd+bwd, bf16: ours / the plan's floor at the measured ceilings",
        lambda s, res, info: deform_ms(res, "bf16", "single", "ours") / deform_floor(res, info, "bf16")[0],
        "<=",
        3.0,
    ),
    ("baseline training step, ms", lambda s, res, info: _got(s, "step_ms_baseline"), "<=", 200.0),
    ("CSFRN step / baseline step", lambda s, res, info: _got(s, "step_csfrn_over_baseline"), "<=", 1.12),
    ("CSFRN through csfrn train, images/s", lambda s, res, info: _got(s, "train_images_per_s_csfrn"), ">=", 40.0),
    (
        "baseline step / torchvision deeplabv3_resnet50 step",
        lambda s, res, info: _got(s, "step_ms_baseline") / _got(s, "step_ms_torchvision_deeplabv3"),
        "<=",
        1.0,
    ),
)


def targets(summary, res, info):
    """Each target with its measured value and whether it is met (None: not measured, with the reason)."""
    rows = []
    for what, figure, op, limit in TARGETS:
        row = {"target": what, "op": op, "limit": limit, "value": None, "met": None}
        try:
            row["value"] = figure(summary, res, info)
        except Missing as why:
            row["why"] = str(why)
        if summary["dry"]:  # tiny shapes on the CPU: the plumbing, not the targets' shapes
            row["why"] = "dry run: tiny CPU shapes, not comparable with the target"
        elif row["value"] is not None:
            row["met"] = row["value"] >= limit if op == ">=" else row["value"] <= limit
        else:
            row.setdefault("why", "not measured (summary.json's notes say why)")
        rows.append(row)
    for dtype in ("fp32", "bf16"):  # the plan's figures beside the measurement
        try:
            floor, expected = deform_floor(res, info, dtype)
            ours = deform_ms(res, dtype, "single", "ours")
        except Missing:
            continue
        rows.append(
            {
                "target": f"deform_conv2d fwd+bwd, {dtype}: ms measured (the plan's floor here; its expected time)",
                "op": None,
                "limit": None,
                "value": ours,
                "met": None,
                "floor_ms": floor,
                "expected_ms": expected,
            }
        )
    return rows


# ---------------------------------------------------------------- the session's own files
def junit_counts(path):
    """(passed, failed, skipped) of a pytest --junitxml file; failed counts errors too; None when absent."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return total - failed - skipped, failed, skipped


def sanitizer_count(path):
    """Errors one compute-sanitizer tool reported ('ERROR SUMMARY: N errors', racecheck's 'RACECHECK SUMMARY:
    ... (N errors'); None when it did not get as far as a summary, or reported no error of a sanitize_ops.py
    that did not reach its last line (a tool that refuses the device, as on a gVisor machine, still prints a
    summary: 0 errors there means nothing was checked, while errors found before a crash are real)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    found = re.findall(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: .*?\((\d+) error", text)
    if not found:
        return None
    errors = sum(int(a or b) for a, b in found)
    finished = re.search(r"^sanitize_ops: (all|some) cases", text, re.MULTILINE)
    return errors if errors or finished else None


def train_figures(rows):
    """images/s (mean over the logged intervals after the first, which holds the warm-up), peak GiB (None when
    the log has no GPU memory), loss at the first and last log, iterations done, whether every loss was finite."""
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        return {}
    speeds = [r["images/s"] for r in (train[1:] or train)]
    mems = [r["max_mem_gib"] for r in train if "max_mem_gib" in r]
    return {
        "images_per_s": statistics.mean(speeds),
        "peak_gib": max(mems) if mems else None,
        "loss_first": train[0]["loss"],
        "loss_last": train[-1]["loss"],
        "iters": train[-1]["iter"],
        "finite": all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in train),
        "val_mIoU": next((r["mIoU"] for r in rows if r.get("kind") == "val"), None),
    }


def summarize(res):
    """summary.json's content: the KEYS first, then the details, ``notes`` (why each null is null) and the
    stages' records."""
    session = _load(os.path.join(res, "session.json")) or {}
    info = _load(os.path.join(res, "info.json")) or {}
    stages = {r["stage"]: r for r in _jsonl(os.path.join(res, "stages.jsonl"))}
    dry = session.get("dry", "0") != "0"
    tests = junit_counts(os.path.join(res, "cuda-tests.xml"))
    emu = junit_counts(os.path.join(res, "emu-tests.xml"))
    train = train_figures(_jsonl(os.path.join(res, "train-csfrn", "metrics.jsonl")))
    sanitizer = {tool: sanitizer_count(os.path.join(res, f"sanitizer-{tool}.log")) for tool in SANITIZER_TOOLS}
    determinism = _load(os.path.join(res, "deform_determinism.json"))

    def info_key(key):
        if key not in info:
            raise Missing("no info.json")
        return info[key]

    def tests_count(i):
        if tests is None:
            raise Missing("no cuda-tests.xml")
        return tests[i]

    def sanitizer_errors():
        if dry:
            raise Missing(
                "dry run: compute-sanitizer skipped (no GPU); sanitize_ops.py ran on the CPU kernels (sanitize-cpu.log)"
            )
        missing = [t for t, n in sanitizer.items() if n is None]
        if missing:
            raise Missing(
                f"no complete run under {', '.join(missing)}: no error summary, or none found in a run of "
                "sanitize_ops.py cut or failed before its end (sanitizer-TOOL.log)"
            )
        return sum(sanitizer.values())

    def deterministic():
        return _need(determinism, "deform_determinism.json")["deterministic"]

    def step_ms(model, compiled=False):
        return step_row(res, step_variant(model, dry, compiled))[0]["median_ms"]

    def train_key(key, why):
        if not train:
            raise Missing("no train-csfrn/metrics.jsonl with a train record")
        if train[key] is None:
            raise Missing(why)
        return train[key]

    def commit():
        if not session.get("commit"):
            raise Missing("no git checkout and no CSFRN_GPU_COMMIT given")
        return session["commit"]

    figures = {
        "device": lambda: info_key("device"),
        "torch": lambda: info_key("torch"),
        "date": lambda: info_key("date"),
        "commit": commit,
        "tests_passed": lambda: tests_count(0),
        "tests_failed": lambda: tests_count(1),
        "sanitizer_errors": sanitizer_errors,
        "deform_vs_torchvision_fp32": lambda: deform_ratio(res, "fp32", "single"),
        "deform_vs_torchvision_bf16": lambda: deform_ratio(res, "bf16", "single"),
        "dual_vs_torchvision_bf16": lambda: deform_ratio(res, "bf16", "dual"),
        "deform_deterministic": deterministic,
        "step_ms_baseline": lambda: step_ms("baseline"),
        "step_ms_csfrn": lambda: step_ms("csfrn"),
        "step_csfrn_over_baseline": lambda: step_ms("csfrn") / step_ms("baseline"),
        "step_ms_torchvision_deeplabv3": lambda: step_ms("torchvision_deeplabv3"),
        "train_images_per_s_csfrn": lambda: train_key("images_per_s", "no images/s logged"),
        "train_peak_gib_csfrn": lambda: train_key(
            "peak_gib", "the training log has no GPU memory (max_mem_gib): a CPU run"
        ),
        "mfu_baseline": lambda: mfu_baseline(res, info, dry),
    }
    # Beyond the keys: the compiled steps (the compile stage, on the time the others left).
    extras = {
        "step_ms_csfrn_compiled": lambda: step_ms("csfrn", compiled=True),
        "step_ms_baseline_compiled": lambda: step_ms("baseline", compiled=True),
    }
    out, notes = {}, {}
    figures.update(extras)
    for key in (*KEYS, *extras):
        try:
            out[key] = figures[key]()
        except Missing as why:
            out[key] = None
            stage = stages.get(STAGE_OF.get(key, "compile"))
            status = f"stage {stage['stage']} {stage['status']}; " if stage and stage["status"] != "ok" else ""
            notes[key] = status + str(why)
    out.update(
        {
            "dry": dry,
            "cuda": info.get("cuda"),
            "tests_skipped": tests[2] if tests else None,
            "emu_tests": dict(zip(("passed", "failed", "skipped"), emu)) if emu else None,
            "sanitizer_errors_by_tool": None if dry else sanitizer,
            "deform_determinism": determinism["rows"] if determinism else None,
            "train_iters_csfrn": train.get("iters"),
            "train_loss_first_csfrn": train.get("loss_first"),
            "train_loss_last_csfrn": train.get("loss_last"),
            "train_finite_csfrn": train.get("finite"),
            "train_val_mIoU_csfrn": train.get("val_mIoU"),
            "ceilings": {
                k: info[k]
                for k in ("copy_gb_s", "matmul_tflops_fp32", "matmul_tflops_tf32", "matmul_tflops_bf16")
                if k in info
            },
            "definitions": {
                "step_ms": "the step benchmark's median at the plan's shape (on a GPU: N=8, 769 x 769, bf16), eager, "
                "in the layout csfrn train uses by default on the device (channels_last on CUDA; variants "
                + ", ".join(step_variant(m, dry) for m in STEP_VARIANTS)
                + "); *_compiled: the same under torch.compile",
                "mfu_baseline": " ".join(mfu_baseline.__doc__.split()),
                "sanitizer_errors": "memcheck + racecheck + initcheck errors over benchmarks/sanitize_ops.py",
                "deform_deterministic": "outputs and every gradient bitwise equal on two calls "
                "(benchmarks/gpu_determinism.py)",
            },
            "notes": notes,
            "stages": list(stages.values()),
        }
    )
    out["targets"] = targets(out, res, info)
    return out


def _fmt(v, spec="{:.2f}"):
    return "n/a" if v is None else spec.format(v)


def markdown(summary, res):
    """The README's GPU tables from the results in ``res``."""
    s = summary
    lines = [
        f"GPU: {s['device']}, torch {s['torch']} (CUDA {s['cuda']}), {s['date']}, commit {s['commit']}.",
        "",
        f"CUDA tests: {s['tests_passed']} passed, {s['tests_failed']} failed, {s['tests_skipped']} skipped; "
        f"compute-sanitizer errors (memcheck + racecheck + initcheck): {s['sanitizer_errors']}; deform conv "
        f"deterministic (bitwise-equal gradients twice): {s['deform_deterministic']}.",
        "",
    ]
    # Every variant once, from the first run that has it; "x baseline" is against that run's own baseline
    # (interleaved in one process).
    seen, rows, meta = set(), [], None
    for name in STEP_FILES:
        doc = _load(os.path.join(res, name)) or {}
        for r in doc.get("rows", []):
            if (r.get("mode"), r.get("variant")) not in seen:
                seen.add((r.get("mode"), r.get("variant")))
                meta = meta if meta is not None else doc.get("meta", {})
                rows.append(
                    f"| {r.get('mode')} | {r.get('variant')} | {_fmt(r.get('median_ms'), '{:.1f}')} | "
                    f"{_fmt(r.get('vs_baseline'), '{:.3f}')} | {_fmt(r.get('images_s'), '{:.1f}')} | "
                    f"{_fmt((r.get('peak_mb') or 0) / 1024, '{:.1f}')} | {name} |"
                )
    if rows:
        lines += [
            f"**Training step**, N={meta.get('batch')} {meta.get('size')}, {meta.get('amp')} autocast, median of "
            f"{meta.get('reps')}:",
            "",
            "| pass | variant | ms | x baseline | images/s | peak GiB | run |",
            "|---|---|---:|---:|---:|---:|---|",
            *rows,
            "",
        ]
    for tag, name in DEFORM_FILES.items():
        doc = _load(os.path.join(res, name))
        if not doc:
            continue
        lines += [
            f"**Deformable convolution**, {tag}:",
            "",
            "| case | pass | implementation | ms | peak MiB |",
            "|---|---|---|---:|---:|",
        ]
        for r in doc.get("rows", []):
            lines.append(
                f"| {r.get('case')} | {r.get('mode')} | {r.get('impl')} | {_fmt(r.get('median_ms'))} | "
                f"{_fmt(r.get('peak_mb'), '{:.0f}')} |"
            )
        lines.append("")
    lines += [
        f"Training run (CLI, synthetic set): CSFRN {_fmt(s['train_images_per_s_csfrn'], '{:.1f}')} images/s, "
        f"peak {_fmt(s['train_peak_gib_csfrn'], '{:.1f}')} GiB, loss {_fmt(s['train_loss_first_csfrn'])} -> "
        f"{_fmt(s['train_loss_last_csfrn'])} in {s['train_iters_csfrn']} iterations; baseline MFU "
        f"{_fmt(s['mfu_baseline'], '{:.3f}')}.",
        "",
    ]
    lines += ["**Targets**:", "", "| target | measured | limit | met |", "|---|---:|---:|---|"]
    for t in s["targets"]:
        if t["op"] is None:
            lines.append(
                f"| {t['target']} | {_fmt(t['value'])} | floor {_fmt(t['floor_ms'])}, expected "
                f"{_fmt(t['expected_ms'])} | |"
            )
        else:
            met = {True: "yes", False: "**no**", None: "n/a: " + t.get("why", "")}[t["met"]]
            lines.append(f"| {t['target']} | {_fmt(t['value'], '{:.3f}')} | {t['op']} {t['limit']:g} | {met} |")
    lines.append("")
    if s["notes"]:
        lines += ["Not measured:", ""] + [f"- `{k}`: {v}" for k, v in s["notes"].items()] + [""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_summary.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the results folder of benchmarks/gpu_session.sh")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results):
        parser.error(f"results folder {args.results!r} does not exist")
    summary = summarize(args.results)
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write(markdown(summary, args.results))
    print(json.dumps({k: summary[k] for k in KEYS}, indent=2))
    if summary["notes"]:
        print("null:", "; ".join(f"{k}: {v}" for k, v in summary["notes"].items()))


if __name__ == "__main__":
    main()
