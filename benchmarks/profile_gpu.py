"""Where the GPU time goes: torch.profiler over (1) deform_conv2d forward + backward at the generic shape
(N=8, 512 -> 256, 97x97, 3x3) in float32 and under bf16 autocast, (2) the losses' upsampling of the logits,
forward + backward (N=8, 19 classes, 97 -> 769, float32, channels_last), by F.interpolate and by "gemm" (the CUDA
default of csfrn.losses.upsample_logits), beside the plan's estimate for "gemm", and (3) one CSFRN training step
(DeepLabv3+ R50, N=8, 3x769x769, bf16, in the memory format csfrn train uses by default there: channels_last on
CUDA), each after a warm-up. Prints the ops and kernels by total device time.

    python benchmarks/profile_gpu.py [--what deform step] [--rows 25] [--device cpu --quick]

``--device cpu --quick`` (the GPU session's dry run) profiles tiny shapes on the CPU, sorted by CPU time.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from csfrn import ops
from csfrn.bench import deform_plan, train_step
from csfrn.bench.timing import profiler_quiet
from csfrn.engine.speed import memory_format, use_channels_last
from csfrn.losses import upsample_logits


def _profile(fn, rows, title, device, reps=3):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profiler_quiet(), profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    print(f"\n=== {title} ({reps} calls)")
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70), flush=True)


def deform(rows, device, quick):
    n, c_in, c_out, size = (1, 16, 8, 17) if quick else (8, 512, 256, 97)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, size, size, generator=g).to(device).requires_grad_()
    off = (torch.randn(n, 18, size, size, generator=g) * 2).to(device).requires_grad_()
    w = (torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)).to(device).requires_grad_()
    b = torch.zeros(c_out, device=device, requires_grad=True)
    for amp in (None, torch.bfloat16):

        def step():
            with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
                out = ops.deform_conv2d(x, off, w, b, padding=1)
            out.backward(torch.ones_like(out))

        _profile(step, rows, f"deform_conv2d fwd+bwd, N={n} {c_in}->{c_out} {size}x{size}, {amp or 'float32'}", device)


def gemm_upsample_plan(n, c, h, w, height, width, element=4):
    """(flops, bytes) of upsample_logits' "gemm" forward + backward, NCHW view: X @ Aw^T, Ah @ T, then
    Ah^T @ G and grad_T @ Aw (grad of the input only), B = N C products each; bytes of the large operands
    (the output, its gradient, the intermediate T [B, h, W] and its gradient, each read and written once)."""
    b = n * c
    flops = 2 * b * (h * w * width + height * h * width + h * height * width + h * width * w)
    nbytes = element * b * (2 * height * width + 4 * h * width + 2 * h * w)
    return flops, nbytes


def upsample(rows, device, quick):
    n, c, h, size = (2, 19, 9, 65) if quick else (8, 19, 97, 769)
    flops, nbytes = gemm_upsample_plan(n, c, h, h, size, size)
    card = deform_plan.CARDS[deform_plan.card_of(device)]
    floor = deform_plan.floor_ms(nbytes, flops, card, "float32")
    print(
        f"\n=== upsample plan, gemm, fwd+bwd, N={n} C={c} {h} -> {size}: {flops / 1e9:.1f} GFLOP, "
        f"{nbytes / 1e6:.0f} MB; floor {floor:.2f} ms, expected {floor / deform_plan.EFFICIENCY['gemm']:.2f} ms at "
        f"{deform_plan.card_of(device)} (F.interpolate's backward: N C H W x 4 scattered float atomics, not modelled)"
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, h, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    for method in ("interpolate", "gemm"):

        def step(method=method):
            out = upsample_logits(x, (size, size), method=method)
            out.backward(torch.ones_like(out))

        _profile(step, rows, f"upsample_logits fwd+bwd by {method}, N={n} C={c} {h} -> {size} float32", device)


def csfrn_step(device, quick):
    """One CSFRN training step as the step benchmark builds it (csfrn/bench/train_step.py's make_batch, build
    and train_step_fn: the only calls into that module), and its title."""
    batch, size, amp = (2, (65, 65), None) if quick else (8, (769, 769), torch.bfloat16)
    channels_last = use_channels_last(None, device)  # train.channels_last's default on this device
    images, labels = train_step.make_batch(batch, size, device)
    images = images.contiguous(memory_format=memory_format(channels_last))
    model = train_step.build(True, quick, device).to(memory_format=memory_format(channels_last))
    optimizer = train_step.sgd(model)
    model.train()
    layout = "channels_last" if channels_last else "NCHW"
    title = f"CSFRN training step, N={batch} {size[0]}x{size[1]} {'bf16' if amp else 'float32'}, {layout}"
    return train_step.train_step_fn(model, optimizer, images, labels, amp), title


def step(rows, device, quick):
    fn, title = csfrn_step(device, quick)
    _profile(fn, rows, title, device, reps=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--what", nargs="+", choices=["deform", "upsample", "step"], default=["deform", "upsample", "step"]
    )
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the dry run)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    for what in args.what:
        {"deform": deform, "upsample": upsample, "step": step}[what](args.rows, args.device, args.quick)


if __name__ == "__main__":
    main()
