"""Inference time of an exported model: onnxruntime (CPU) vs PyTorch eager, and torch.export's program.

    csfrn bench --what export [--checkpoint best.pth] [--sizes 64x64 512x1024] [--threads 2] [--reps 5]

Without ``--checkpoint`` the model is the demo's (the shipped ``demo`` config, random init, AAM offsets perturbed
so that the deformable convs sample off the grid). Each size gets its own fixed-size ONNX export; the
implementations are timed interleaved (``csfrn.bench.timing.measure``, median), batch 1, float32, same thread
count. Writes a Markdown row per size to stdout (onnxruntime's pool threads do not spin between runs, as they would
take the cores from torch's) and, with ``--out DIR`` or ``--json FILE``, the numbers as JSON.
"""

import argparse
import os
import tempfile

import torch

from .. import deploy
from ..engine.checkpoint import build_model_from_config, load_model_from_checkpoint
from ..engine.config import load_config
from .timing import device_name, measure, write_json


def _model(checkpoint):
    if checkpoint:
        return load_model_from_checkpoint(checkpoint)[0], checkpoint
    cfg = load_config("demo")
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model, load_pretrained=False).eval()
    with torch.no_grad():
        model.csflm.fuse.offset.bias.normal_(0, 1.5)
    return model, "the demo config (random init)"


def add_arguments(parser):
    """The options of the export benchmark (``csfrn bench --what export``)."""
    parser.add_argument("--checkpoint", help="a csfrn checkpoint (default: the demo's model, random init)")
    parser.add_argument("--sizes", nargs="+", default=["64x64", "512x1024"], help="HxW input sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="write the rows to DIR/export-cpu.json (default: no file)"
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write the rows to FILE (instead of --out's)")
    return parser


def main(argv=None, parser=None):
    parser = add_arguments(
        parser or argparse.ArgumentParser(prog="python -m csfrn.bench.export", description=__doc__.split("\n")[0])
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, what = _model(args.checkpoint)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.sizes:
            h, w = (int(v) for v in text.lower().split("x"))
            onnx_path = deploy.export_onnx(model, os.path.join(tmp, f"m{h}x{w}.onnx"), (h, w))
            pt2_path = deploy.export_program(model, os.path.join(tmp, f"m{h}x{w}.pt2"), (h, w))
            # no spinning: onnxruntime's idle pool threads would otherwise take the cores from torch's threads
            runner = deploy.OnnxModel(onnx_path, threads=args.threads, spin=False)
            program = torch.export.load(pt2_path).module()
            x = torch.randn(1, 3, h, w)
            xn = x.numpy()
            with torch.no_grad():
                diff = (torch.from_numpy(runner.run(xn)) - model(x)).abs().max().item()
                fns = {
                    "eager": lambda: model(x),
                    "onnxruntime": lambda: runner.run(xn),
                    "torch.export": lambda: program(x),
                }
                res = measure(fns, "cpu", reps=args.reps, warmup=2)
            row = {"size": [h, w], "max_abs_diff": diff, **{k: round(v["median_ms"], 2) for k, v in res.items()}}
            row["eager_over_ort"] = round(row["eager"] / row["onnxruntime"], 2)
            rows.append(row)
    import onnxruntime  # optional (the deploy extra); the export above needed it already

    head = (
        f"model: {what}; {device_name('cpu')}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"batch 1, float32, median of {args.reps}"
    )
    print(head)
    print("| input | PyTorch eager ms | onnxruntime ms | torch.export ms | eager / onnxruntime | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| 1x3x{r['size'][0]}x{r['size'][1]} | {r['eager']:.1f} | {r['onnxruntime']:.1f} | "
            f"{r['torch.export']:.1f} | {r['eager_over_ort']:.2f}x | {r['max_abs_diff']:.1e} |"
        )
    path = args.json or (args.out and os.path.join(args.out, "export-cpu.json"))
    if path:
        write_json(path, {"setup": head, "rows": rows})
    print(f"wrote {path}" if path else "(no --out: nothing written)")
    return rows


if __name__ == "__main__":
    main()
