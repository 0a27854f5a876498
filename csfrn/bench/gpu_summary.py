"""The summary of a GPU session (``benchmarks/gpu_session.sh``): reads what its stages left in a results folder
and writes ``summary.json`` (the figures the targets are stated in) and ``summary.md`` (the tables for the
README). A stage that did not run leaves its keys null; nothing here times anything.

    python benchmarks/gpu_summary.py RESULTS_DIR
"""
import argparse
import glob
import json
import os
import re
import statistics
import xml.etree.ElementTree as ET

from .ops import floor_ms


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


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


def sanitizer_errors(path):
    """Errors compute-sanitizer reported (the sum of memcheck's 'ERROR SUMMARY: N errors' and racecheck's
    'RACECHECK SUMMARY: ... (N errors' lines); None when it did not get as far as a summary."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    matches = re.findall(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: .*?\((\d+) error", text)
    found = [int(memcheck or racecheck) for memcheck, racecheck in matches]
    return sum(found) if found else None


def _deform_ratio(doc, case_prefix, key):
    for r in (doc or {}).get("ratios", []):
        if r["case"].startswith(case_prefix) and r["mode"] == "fwd+bwd":
            return r[key]
    return None


def train_figures(rows):
    """images/s (mean over the logged intervals after the first, which holds the warm-up), peak GiB, the loss
    at the first and last log, iterations done and whether every logged loss was finite."""
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        return {}
    speeds = [r["images/s"] for r in (train[1:] or train)]
    return {"images_per_s": statistics.mean(speeds), "peak_gib": max(r.get("max_mem_gib", 0.0) for r in train),
            "loss_first": train[0]["loss"], "loss_last": train[-1]["loss"], "iters": train[-1]["iter"],
            "finite": all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in train),
            "val_mIoU": next((r["mIoU"] for r in rows if r.get("kind") == "val"), None)}


def summarize(res):
    info = _load(os.path.join(res, "info.json")) or {}
    tests = junit_counts(os.path.join(res, "tests.xml")) or junit_counts(os.path.join(res, "cuda-tests.xml"))
    fp32 = _load(os.path.join(res, "deform_conv_cuda-fp32.json"))
    bf16 = _load(os.path.join(res, "deform_conv_cuda-bf16.json"))
    step = _load(os.path.join(res, "train_step-cuda.json"))
    csfrn = train_figures(_jsonl(os.path.join(res, "train-csfrn.jsonl")))
    base = train_figures(_jsonl(os.path.join(res, "train-baseline.jsonl")))
    ratios = (step or {}).get("ratios", {})
    stages = {os.path.basename(p)[:-3]: int(open(p).read().strip() or 1) for p in glob.glob(os.path.join(res, "*.rc"))}
    return {
        "device": info.get("device"), "torch": info.get("torch"), "cuda": info.get("cuda"), "date": info.get("date"),
        "tests_passed": tests[0] if tests else None, "tests_failed": tests[1] if tests else None,
        "tests_skipped": tests[2] if tests else None,
        "sanitizer_errors": sanitizer_errors(os.path.join(res, "sanitizer.log")),
        "deform_vs_torchvision_fp32": _deform_ratio(fp32, "generic", "torchvision_over_ours"),
        "deform_vs_torchvision_bf16": _deform_ratio(bf16, "generic", "torchvision_over_ours"),
        "deform_vs_dense_fp32": _deform_ratio(fp32, "generic", "ours_over_dense"),
        "dual_vs_torchvision_fp32": _deform_ratio(fp32, "AAM", "torchvision_over_ours"),
        "dual_vs_torchvision_bf16": _deform_ratio(bf16, "AAM", "torchvision_over_ours"),
        "step_csfrn_over_baseline": ratios.get("csfrn_over_baseline"),
        "step_extra_cut": ratios.get("extra_cut"),
        "step_torchvision_over_csfrn": ratios.get("torchvision_over_csfrn"),
        "train_images_per_s_csfrn": csfrn.get("images_per_s"),
        "train_images_per_s_baseline": base.get("images_per_s"),
        "train_peak_gib_csfrn": csfrn.get("peak_gib"), "train_peak_gib_baseline": base.get("peak_gib"),
        "train_iters_csfrn": csfrn.get("iters"), "train_loss_first_csfrn": csfrn.get("loss_first"),
        "train_loss_last_csfrn": csfrn.get("loss_last"), "train_finite_csfrn": csfrn.get("finite"),
        "ceilings": {k: info[k] for k in ("copy_gb_s", "matmul_tflops_fp32", "matmul_tflops_tf32",
                                          "matmul_tflops_bf16") if k in info},
        "stage_exit_codes": stages,
    }


def _fmt(v, spec="{:.2f}"):
    return "n/a" if v is None else spec.format(v)


def markdown(summary, res):
    """The README's GPU tables from the results in ``res``."""
    lines = [f"GPU: {summary['device']}, torch {summary['torch']} (CUDA {summary['cuda']}), {summary['date']}.", ""]
    step = _load(os.path.join(res, "train_step-cuda.json"))
    if step:
        m = step["meta"]
        rows = {(r["mode"], r["variant"]): r for r in step["rows"]}
        lines += [f"**Training step**, DeepLabv3+ R50 (deep stem), 19 classes, N={m['batch']} "
                  f"3x{m['size'][0]}x{m['size'][1]}, {m['amp']} autocast, median of {m['reps']}; inference: "
                  f"{m.get('infer_batch', m['batch'])} image(s) of {'x'.join(map(str, m.get('infer_size', m['size'])))}, "
                  "whole image:", "",
                  "| variant | step ms | x baseline | step peak GiB | inference ms |", "|---|---:|---:|---:|---:|"]
        names = {"baseline": "(a) baseline (no CSFLM / AAM)", "csfrn": "(b) CSFRN, our kernels",
                 "reference": "(c) CSFRN, reference twins (`use_reference()`)",
                 "torchvision": "(d) CSFRN, torchvision's deform_conv2d in AAM"}
        for v, label in names.items():
            r = rows.get(("train step", v))
            if r:
                inf = rows.get(("inference", v))
                lines.append(f"| {label} | {r['median_ms']:.1f} | {r['vs_baseline']:.3f} | {r['peak_mb'] / 1024:.1f} | "
                             f"{_fmt(inf and inf['median_ms'], '{:.1f}')} |")
        lines += ["", f"(b)/(a) = {_fmt(summary['step_csfrn_over_baseline'], '{:.3f}')}; our kernels cut CSFRN's extra "
                  f"time {_fmt(summary['step_extra_cut'])}x against the twins ((c)-(a))/((b)-(a)).", ""]
    ceil = summary["ceilings"]
    ops_doc = _load(os.path.join(res, "class_ops-cuda.json"))
    if ops_doc:
        lines += ["**Class-wise ops**, forward + backward, float32 (floor: bytes moved at the measured copy rate "
                  f"{_fmt(ceil.get('copy_gb_s'), '{:.0f}')} GB/s, or flops at {_fmt(ceil.get('matmul_tflops_fp32'), '{:.0f}')}"
                  " TFLOP/s):", "",
                  "| op, shape | ours | kernels only | reference twin | peer | peer / ours | floor |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        by = {}
        for r in ops_doc["rows"]:
            if r["pass"] == "fwd+bwd":
                by.setdefault((r["op"], r["shape"]), {})[r["impl"]] = r["median_ms"]
        peer = {"class_avg_pool": "onehot+bmm", "center_distance": "cdist"}
        for (op, shape), t in by.items():
            n, d, h, w, k = (int(v) for v in re.findall(r"\d+", shape))
            floor = None
            if ceil.get("copy_gb_s"):
                floor = floor_ms(op, n, d, h, w, k, True, bandwidth=ceil["copy_gb_s"] * 1e9,
                                 flops_per_s=ceil.get("matmul_tflops_fp32", 50) * 1e12)
            lines.append(f"| {op}, {shape} | {t['csfrn']:.3f} ms | {_fmt(t.get('kernels only'), '{:.3f}')} ms | "
                         f"{_fmt(t.get('reference'), '{:.3f}')} ms | {t[peer[op]]:.3f} ms ({peer[op]}) | "
                         f"{t[peer[op]] / t['csfrn']:.1f}x | {_fmt(floor, '{:.3f}')} ms |")
        lines.append("")
    for tag, doc in (("float32", _load(os.path.join(res, "deform_conv_cuda-fp32.json"))),
                     ("bf16 autocast", _load(os.path.join(res, "deform_conv_cuda-bf16.json")))):
        if not doc:
            continue
        lines += [f"**Deformable convolution**, forward + backward, {tag}:", "",
                  "| case | implementation | ms | peak MiB | output dtype |", "|---|---|---:|---:|---|"]
        for r in doc["rows"]:
            if r["mode"] == "fwd+bwd":
                lines.append(f"| {r['case']} | {r['impl']} | {r['median_ms']:.2f} | {r['peak_mb']:.0f} | "
                             f"{r.get('out_dtype', '')} |")
        lines.append("")
    lines += [f"Training run (CLI, synthetic set, 769 crops, batch 8, bf16): CSFRN "
              f"{_fmt(summary['train_images_per_s_csfrn'], '{:.1f}')} images/s, peak "
              f"{_fmt(summary['train_peak_gib_csfrn'], '{:.1f}')} GiB, loss {_fmt(summary['train_loss_first_csfrn'])} -> "
              f"{_fmt(summary['train_loss_last_csfrn'])} in {summary['train_iters_csfrn']} iterations; baseline "
              f"{_fmt(summary['train_images_per_s_baseline'], '{:.1f}')} images/s, peak "
              f"{_fmt(summary['train_peak_gib_baseline'], '{:.1f}')} GiB.", ""]
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
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
