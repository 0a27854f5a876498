"""Benchmark of the class-wise ops: our kernel vs its reference twin vs the pure-PyTorch formulation a user
would write (one-hot + bmm for the pooling, torch.cdist for the distance), forward and forward+backward,
time and peak memory, measured in one run. ``csfrn bench --what ops`` and ``benchmarks/bench_ops.py`` run it.

Each row's time is printed beside its floor (:func:`floor_ms`): the bytes the op must move over the copy
bandwidth, or its arithmetic over the float32 matmul rate, whichever is larger; P = N*H*W pixels.

  class_avg_pool  fwd reads the features and labels, P*(D*4 + 8) bytes; bwd writes the gradient and reads the
                  labels again
  center_distance fwd reads the embeddings, writes phi: (P*D + P*K)*4 bytes, 3*K*D*P flops; bwd about twice
                  the traffic and 3x the flops

On the CPU both ceilings are measured at the start of the run (:func:`csfrn.bench.timing.cpu_ceilings`) and
written with the rows; figures for the machines we ran on are in ``benchmarks/results/``.
"""

import argparse
import datetime
import os

import torch
import torch.nn.functional as F

from .. import ops
from .timing import cpu_ceilings, device_name, measure, table, write_json


# ---------------------------------------------------------------- the peers a user would write
def onehot_bmm_class_avg_pool(features, labels, num_classes, ignore_index=255):
    n, d = features.shape[:2]
    valid = (labels != ignore_index).reshape(n, -1, 1)
    onehot = F.one_hot(labels.reshape(n, -1).masked_fill(~valid[..., 0], 0), num_classes).to(features.dtype) * valid
    counts = onehot.sum(1)  # [N, K]
    sums = torch.bmm(onehot.transpose(1, 2), features.reshape(n, d, -1).transpose(1, 2))
    return sums / counts.clamp(min=1).unsqueeze(-1), counts


def cdist_center_distance(embeddings, centers, margins, delta=10.0):
    n, d, h, w = embeddings.shape
    dist = torch.cdist(embeddings.reshape(n, d, -1).transpose(1, 2), centers).square()  # [N, P, K]
    phi = 1 - torch.exp(-dist * torch.exp(delta * margins).unsqueeze(1))
    return phi.transpose(1, 2).reshape(n, -1, h, w)


# ---------------------------------------------------------------- the kernels alone
# The forward op, then (for fwd+bwd) the backward op, called directly: no autograd graph, and the gradient
# buffers are the only allocations. Beside the "csfrn" row (the public function under autograd) it shows how
# much of a call is our kernels and how much the engine, Python dispatch and fresh-memory page faults. The pooling
# runs as the losses call it, validate=False: no label check (on CUDA, no device-to-host sync).
def kernels_only_class_avg_pool(features, labels, num_classes, ignore_index=255, upstream=None):
    means, counts = torch.ops.csfrn.class_avg_pool.default(features.detach(), labels, num_classes, ignore_index, False)
    if upstream is not None:
        torch.ops.csfrn.class_avg_pool_backward.default(upstream, labels, counts, ignore_index)
    return means, counts


def kernels_only_center_distance(embeddings, centers, margins, delta=10.0, upstream=None):
    inputs = [t.detach() for t in (embeddings, centers, margins)]
    phi = torch.ops.csfrn.center_distance.default(*inputs, float(delta))
    if upstream is not None:
        torch.ops.csfrn.center_distance_backward.default(upstream, *inputs, float(delta), [True, True, True])
    return phi


KERNELS_ONLY = (kernels_only_class_avg_pool, kernels_only_center_distance)


# ---------------------------------------------------------------- cases
def _pool_case(impl, n, d, h, w, k, device, dtype, backward):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(n, d, h, w, generator=g, dtype=dtype).to(device).requires_grad_(backward)
    labels = torch.randint(0, k, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.1] = 255
    labels = labels.to(device)
    upstream = torch.randn(n, k, d, generator=g, dtype=dtype).to(device)

    def run():
        if impl in KERNELS_ONLY:
            impl(features, labels, k, upstream=upstream if backward else None)
            return
        means, _ = impl(features, labels, k)
        if backward:
            torch.autograd.grad(means, features, upstream)

    return run


def _dist_case(impl, n, d, h, w, k, device, dtype, backward):
    g = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(n, d, h, w, generator=g, dtype=dtype),
        torch.randn(n, k, d, generator=g, dtype=dtype) * 0.5,
        torch.randn(n, k, generator=g, dtype=dtype) * 0.1,
    ]
    inputs = [t.to(device).requires_grad_(backward) for t in inputs]
    upstream = torch.randn(n, k, h, w, generator=g, dtype=dtype).to(device)

    def run():
        if impl in KERNELS_ONLY:
            impl(*inputs, upstream=upstream if backward else None)
            return
        phi = impl(*inputs)
        if backward:
            torch.autograd.grad(phi, inputs, upstream)

    return run


def floor_ms(op, n, d, h, w, k, backward, bandwidth, flops_per_s, itemsize=4):
    """The least time an op can take: bytes it must move over ``bandwidth`` (B/s, read + write) or its
    arithmetic over ``flops_per_s``, whichever is larger."""
    p = n * h * w
    if op == "class_avg_pool":
        moved = p * (d * itemsize + 8) * (2 if backward else 1)
        return moved / bandwidth * 1e3
    moved = (p * d + p * k) * itemsize * (2 if backward else 1)
    flops = 3 * k * d * p * (3 if backward else 1)
    return max(moved / bandwidth, flops / flops_per_s) * 1e3


def _with_reference(fn):
    def run(*args, **kwargs):
        with ops.use_reference():
            return fn(*args, **kwargs)

    return run


IMPLS = {
    "class_avg_pool": {
        "csfrn": ops.class_avg_pool,
        "reference": _with_reference(ops.class_avg_pool),
        "onehot+bmm": onehot_bmm_class_avg_pool,
        "kernels only": kernels_only_class_avg_pool,
    },
    "center_distance": {
        "csfrn": ops.center_distance,
        "reference": _with_reference(ops.center_distance),
        "cdist": cdist_center_distance,
        "kernels only": kernels_only_center_distance,
    },
}
PEER = {"class_avg_pool": "onehot+bmm", "center_distance": "cdist"}


def run(device="cpu", reps=10, shapes=None, dtype=torch.float32, ceilings=None):
    """Returns one row per (op, shape, pass, implementation). ``ceilings`` (:func:`cpu_ceilings`'s keys) give
    the csfrn rows a floor; none without them."""
    shapes = shapes or [(2, 32, 97, 97, 19), (2, 32, 97, 97, 150)]
    rows = []
    for op, impls in IMPLS.items():
        make = _pool_case if op == "class_avg_pool" else _dist_case
        for shape in shapes:
            for backward in (False, True):
                fns = {name: make(impl, *shape, device, dtype, backward) for name, impl in impls.items()}
                result = measure(fns, device=device, reps=reps, warmup=2)
                ours = result["csfrn"]["median_ms"]
                floor = (
                    floor_ms(op, *shape, backward, ceilings["copy_gb_s"] * 1e9, ceilings["matmul_gflops_fp32"] * 1e9)
                    if ceilings
                    else None
                )
                for name, r in result.items():
                    rows.append(
                        {
                            "op": op,
                            "shape": "N=%d D=%d %dx%d K=%d" % shape,
                            "pass": "fwd+bwd" if backward else "fwd",
                            "impl": name,
                            **r,
                            "speedup": r["median_ms"] / ours,
                            "floor_ms": floor if name == "csfrn" else None,
                        }
                    )
    return rows


COLUMNS = [
    ("op", "op", "{}"),
    ("shape", "shape", "{}"),
    ("pass", "pass", "{}"),
    ("impl", "impl", "{}"),
    ("median_ms", "median ms", "{:.3f}"),
    ("min_ms", "min ms", "{:.3f}"),
    ("peak_mb", "peak MiB", "{:.2f}"),
    ("speedup", "x slower than csfrn", "{:.2f}"),
    ("floor_ms", "floor ms", "{:.3f}"),
]


def summary_lines(rows):
    """The targets of the issue as ratios: ours vs the peer formulation, fwd+bwd."""
    lines = []
    kernels = {
        (r["op"], r["shape"]): r["median_ms"] for r in rows if r["pass"] == "fwd+bwd" and r["impl"] == "kernels only"
    }
    for r in rows:
        if r["pass"] == "fwd+bwd" and r["impl"] == PEER[r["op"]]:
            alone = r["median_ms"] / kernels[r["op"], r["shape"]] if (r["op"], r["shape"]) in kernels else None
            lines.append(
                f"{r['op']:16s} {r['shape']}: csfrn is {r['speedup']:.1f}x faster than {r['impl']} fwd+bwd"
                + (f" ({alone:.1f}x for our kernels alone, without autograd)" if alone else "")
            )
    return lines


def parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be five positive integers N,D,H,W,K, got {text!r}")
    return shape


def add_arguments(parser):
    """The options of this benchmark (``csfrn bench --what ops`` and ``benchmarks/bench_ops.py``)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        default=None,
        metavar="N,D,H,W,K",
        help="a shape to time (repeatable; default N=2 D=32 97x97 with K=19 and K=150)",
    )
    parser.add_argument("--quick", action="store_true", help="one small shape, for a smoke test")
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="write the rows to DIR/class_ops-<device>.json (default: no file)"
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write the rows to FILE (instead of --out's)")
    return parser


def main(argv=None, parser=None):
    parser = add_arguments(
        parser or argparse.ArgumentParser(prog="benchmarks/bench_ops.py", description=__doc__.split("\n\n")[0])
    )
    args = parser.parse_args(argv)
    shapes = [(2, 8, 24, 24, 5)] if args.quick else args.shape
    ceilings = cpu_ceilings() if torch.device(args.device).type == "cpu" else None
    rows = run(args.device, args.reps, shapes=shapes, dtype=getattr(torch, args.dtype), ceilings=ceilings)
    meta = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "date": datetime.date.today().isoformat(),
        "threads": torch.get_num_threads(),
        "ceilings": ceilings,
    }
    path = args.json or (args.out and os.path.join(args.out, f"class_ops-{torch.device(args.device).type}.json"))
    if path:
        write_json(path, {"meta": meta, "rows": rows})
    print(f"class-wise ops on {meta['device']}, torch {meta['torch']}, {args.dtype}, median of {args.reps}")
    if ceilings:
        print(
            f"floors from this CPU's ceilings, measured now: {ceilings['copy_gb_s']:.1f} GB/s copy, "
            f"{ceilings['matmul_gflops_fp32']:.0f} GFLOP/s float32 matmul"
        )
    print(table(rows, COLUMNS))
    print("\n".join(summary_lines(rows)))
    print(f"wrote {path}" if path else "(no --out: nothing written)")
    return rows


if __name__ == "__main__":
    main()
