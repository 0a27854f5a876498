"""Every csfrn op, forward and backward, in every CUDA dtype, on awkward shapes that reach every launch plan:
the program that ``compute-sanitizer`` runs in ``benchmarks/gpu_session.sh`` (memcheck for out-of-bounds and
misaligned accesses, racecheck for shared-memory hazards, initcheck for reads of memory nothing wrote).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 benchmarks/sanitize_ops.py

Without the caching allocator every tensor is its own allocation, so a read past a tensor's end is outside
any allocation and memcheck sees it. The shapes are small (the sanitizer slows kernels 10-100x) and odd
(partial blocks, a size of one, channels_last and sliced inputs, an empty batch), plus the shapes that take
class_avg_pool's other launch plans (many pixel chunks, channel tiles, the global-memory path for a large K) and
deform conv with weight groups, offset groups and a mask. Prints a line for each case whose result is not
finite and then exits 1, so silent garbage is caught too. ``--device cpu`` runs the same cases on the CPU
kernels (float32 / float64), the GPU session's dry run.
"""

import argparse
import sys

import torch

from csfrn import ops

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DEVICE = "cuda"
LAYOUTS = ("nchw", "channels_last", "sliced")


def _finite(name, *tensors):
    bad = [i for i, t in enumerate(tensors) if t is not None and t.numel() and not torch.isfinite(t).all()]
    if bad:
        print(f"FAIL {name}: non-finite output(s) {bad}", flush=True)
        return False
    return True


def _backward(outputs, inputs, retain_graph=False):
    outputs = [o for o in (outputs if isinstance(outputs, (tuple, list)) else (outputs,)) if o.requires_grad]
    grads = [torch.randn_like(o) for o in outputs]
    return torch.autograd.grad(outputs, inputs, grads, allow_unused=True, retain_graph=retain_graph)


def class_ops(dtype, g):
    ok = True
    # (N, D, H, W, K): a partial block, a tiny image, K=1 and a large K, an empty batch; then class_avg_pool's
    # launch plans: many pixel chunks (D=300), channel tiles (D=33 over 600 pixels), the global-memory path
    # (K=7000 partial sums do not fit in shared memory).
    for n, d, h, w, k in (
        (2, 5, 7, 9, 3),
        (1, 33, 13, 11, 19),
        (3, 1, 1, 1, 1),
        (1, 8, 5, 6, 150),
        (0, 4, 3, 3, 2),
        (2, 300, 40, 40, 19),
        (2, 33, 20, 30, 19),
        (1, 2, 5, 10, 7000),
    ):
        for layout in LAYOUTS:
            x = torch.randn(n, d + (1 if layout == "sliced" else 0), h, w, generator=g).to(DEVICE, dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            elif layout == "sliced":
                x = x[:, 1:]
            x.requires_grad_()
            labels = torch.randint(0, k, (n, h, w), generator=g)
            labels[torch.rand(n, h, w, generator=g) < 0.2] = 255
            labels = labels.to(DEVICE)
            means, counts = ops.class_avg_pool(x, labels, k)
            grads = _backward(means, [x])
            ok &= _finite(f"class_avg_pool {dtype} {(n, d, h, w, k)} {layout}", means, counts, *grads)

            centers = torch.randn(n, k, d, generator=g).to(DEVICE, dtype).requires_grad_()
            margins = (torch.randn(n, k, generator=g) * 0.1).to(DEVICE, dtype).requires_grad_()
            phi = ops.center_distance(x, centers, margins)
            for mask in ((True, True, True), (True, False, False), (False, True, True)):
                leaves = [t for t, m in zip((x, centers, margins), mask) if m]
                grads = _backward(phi, leaves, retain_graph=True)
                ok &= _finite(f"center_distance {dtype} {(n, d, h, w, k)} {layout} grads {mask}", phi, *grads)
    return ok


def deform_ops(dtype, g):
    ok = True
    # (N, C_in, C_out, H, W, kernel, stride, padding, dilation, offset groups, mask, weight groups); y (the dual
    # op's second input) has C_in + 2 * og * groups channels and C_out + groups outputs.
    cases = (
        (2, 4, 3, 7, 9, 3, 1, 1, 1, 1, False, 1),
        (1, 6, 4, 5, 5, 3, 2, 1, 2, 2, True, 1),
        (1, 3, 2, 1, 1, 1, 1, 0, 1, 1, False, 1),
        (0, 4, 4, 5, 5, 3, 1, 1, 1, 1, True, 1),
        (2, 8, 8, 6, 7, 3, 1, 2, 2, 4, True, 1),
        (2, 8, 6, 6, 7, 3, 1, 1, 1, 2, True, 2),
        (0, 8, 4, 5, 5, 3, 1, 1, 1, 2, True, 4),
    )
    for n, cin, cout, h, w, kk, s, p, dil, og, use_mask, groups in cases:
        ho = (h + 2 * p - dil * (kk - 1) - 1) // s + 1
        wo = (w + 2 * p - dil * (kk - 1) - 1) // s + 1

        def t(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_()

        cy, cout_y = cin + 2 * og * groups, cout + groups
        x, y = t(n, cin, h, w), t(n, cy, h, w)
        offset = t(n, 2 * og * kk * kk, ho, wo, scale=2.0)
        mask = t(n, og * kk * kk, ho, wo) if use_mask else None
        wx, wy = t(cout, cin // groups, kk, kk), t(cout_y, cy // groups, kk, kk)
        bx, by = t(cout), t(cout_y)
        kw = dict(stride=s, padding=p, dilation=dil, mask=mask)
        name = f"{dtype} {(n, cin, cout, h, w, kk, s, p, dil, og, use_mask, groups)}"
        out = ops.deform_conv2d(x, offset, wx, bx, **kw)
        leaves = [x, offset, wx, bx] + ([mask] if use_mask else [])
        ok &= _finite(f"deform_conv2d {name}", out, *_backward(out, leaves))
        ok &= _finite(
            f"deform_conv2d {name} offset only", *_backward(ops.deform_conv2d(x, offset, wx, bx, **kw), [offset])
        )
        outs = ops.dual_deform_conv2d(x, y, offset, wx, wy, bx, by, **kw)
        leaves = [x, y, offset, wx, wy, bx, by] + ([mask] if use_mask else [])
        ok &= _finite(f"dual_deform_conv2d {name}", *outs, *_backward(outs, leaves))
        x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        out = ops.deform_conv2d(x_cl, offset, wx, bx, **kw)
        ok &= _finite(f"deform_conv2d {name} channels_last", out, *_backward(out, [x_cl, offset]))
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", choices=["all", "class", "deform"], default="all")
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: float32 / float64 only, to check this script without a GPU",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="float32 and contiguous inputs only, no autocast pass (the GPU session's fast dry run)",
    )
    args = parser.parse_args(argv)
    global DEVICE, LAYOUTS
    DEVICE = args.device
    if args.quick:
        LAYOUTS = LAYOUTS[:1]
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("sanitize_ops.py: no CUDA device visible")
    g = torch.Generator().manual_seed(0)
    ok = True
    for dtype in DTYPES[:1] if args.quick else DTYPES if DEVICE == "cuda" else DTYPES[:2]:
        if args.ops in ("all", "class"):
            ok &= class_ops(dtype, g)
        if args.ops in ("all", "deform"):
            ok &= deform_ops(dtype, g)
    # Under autocast as well, as a mixed-precision training step calls the ops.
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=not args.quick):
        if args.ops in ("all", "deform"):
            ok &= deform_ops(torch.float32, g)
        if args.ops in ("all", "class"):
            ok &= class_ops(torch.float32, g)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print("sanitize_ops: all cases finite" if ok else "sanitize_ops: some cases were not finite", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
