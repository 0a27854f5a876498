"""Where the GPU time goes: torch.profiler over (1) deform_conv2d forward + backward at the generic shape
(N=8, 512 -> 256, 97x97, 3x3) in float32 and under bf16 autocast, and (2) one CSFRN training step
(DeepLabv3+ R50, N=8, 3x769x769, bf16, in the memory format csfrn train uses by default there: channels_last on
CUDA), each after a warm-up. Prints the ops and kernels by total device time.

    python benchmarks/profile_gpu.py [--what deform step] [--rows 25] [--device cpu --quick]

``--device cpu --quick`` (the GPU session's dry run) profiles tiny shapes on the CPU, sorted by CPU time.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from csfrn import ops
from csfrn.bench import train_step
from csfrn.bench.timing import profiler_quiet
from csfrn.engine.speed import memory_format, use_channels_last


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
    parser.add_argument("--what", nargs="+", choices=["deform", "step"], default=["deform", "step"])
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the dry run)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    for what in args.what:
        {"deform": deform, "step": step}[what](args.rows, args.device, args.quick)


if __name__ == "__main__":
    main()
