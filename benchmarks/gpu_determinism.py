"""Is deformable convolution deterministic? ``deform_conv2d`` and ``dual_deform_conv2d``, forward and backward,
twice on the same inputs (float32 and under bf16 autocast): the outputs and every gradient must be bitwise equal
(scattered float atomics make them differ from call to call). The GPU session's deform stage runs it.

    python benchmarks/gpu_determinism.py --json RESULTS/deform_determinism.json [--device cpu] [--quick]

Exit code 0 whether or not they are equal (the JSON says); 2 for bad arguments.
"""

import argparse
import json
import sys

import torch

from csfrn import ops


def _inputs(n, c_in, c_out, size, device, gen, dual):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    tensors = {
        "x": t(n, c_in, size, size),
        "offset": t(n, 18, size, size, scale=2.0),
        "weight_x": t(c_out, c_in, 3, 3, scale=1 / (3 * c_in**0.5)),
        "bias_x": t(c_out),
    }
    if dual:
        tensors.update(
            y=t(n, c_in, size, size), weight_y=t(c_out, c_in, 3, 3, scale=1 / (3 * c_in**0.5)), bias_y=t(c_out)
        )
    return tensors


def _run(op, tensors, grads, device, amp):
    with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
        if op == "dual_deform_conv2d":
            outs = ops.dual_deform_conv2d(
                tensors["x"],
                tensors["y"],
                tensors["offset"],
                tensors["weight_x"],
                tensors["weight_y"],
                tensors["bias_x"],
                tensors["bias_y"],
                padding=1,
            )
        else:
            outs = (
                ops.deform_conv2d(tensors["x"], tensors["offset"], tensors["weight_x"], tensors["bias_x"], padding=1),
            )
    names = list(tensors)
    got = torch.autograd.grad(outs, [tensors[k] for k in names], [g.to(o.dtype) for g, o in zip(grads, outs)])
    return {"out": [o.detach() for o in outs], **{f"grad_{k}": [g] for k, g in zip(names, got)}}


def check(device, quick):
    """One row per (op, autocast): whether two calls gave bitwise-equal outputs and gradients."""
    n, c_in, c_out, size = (1, 8, 8, 9) if quick else (8, 512, 256, 97)
    rows = []
    for op in ("deform_conv2d", "dual_deform_conv2d"):
        for amp in (None, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            tensors = _inputs(n, c_in, c_out, size, device, gen, op == "dual_deform_conv2d")
            grads = [
                torch.randn(n, c_out, size, size, generator=gen).to(device)
                for _ in range(2 if op == "dual_deform_conv2d" else 1)
            ]
            first, second = _run(op, tensors, grads, device, amp), _run(op, tensors, grads, device, amp)
            differs = [k for k in first if not all(map(torch.equal, first[k], second[k]))]
            rows.append(
                {
                    "op": op,
                    "amp": "bf16" if amp else "none",
                    "shape": [n, c_in, c_out, size],
                    "deterministic": not differs,
                    "differs": differs,
                }
            )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_determinism.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny shape (the dry run)")
    parser.add_argument("--json", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    rows = check(args.device, args.quick)
    result = {"device": args.device, "rows": rows, "deterministic": all(r["deterministic"] for r in rows)}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        verdict = "bitwise equal" if r["deterministic"] else "DIFFERS: " + ", ".join(r["differs"])
        print(f"{r['op']:20s} autocast {r['amp']:4s}: {verdict}")
    sys.exit(0)


if __name__ == "__main__":
    main()
