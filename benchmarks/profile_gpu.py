"""Where the GPU time goes: torch.profiler over (1) deform_conv2d forward + backward at the generic shape
(N=8, 512 -> 256, 97x97, 3x3) in float32 and under bf16 autocast, and (2) one CSFRN training step
(DeepLabv3+ R50, N=8, 3x769x769, bf16), each after a warm-up. Prints the kernels by total GPU time.

    python benchmarks/profile_gpu.py [--what deform step] [--rows 25]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from csfrn import ops
from csfrn.bench import train_step


def _profile(fn, rows, title, reps=3):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    print(f"\n=== {title} ({reps} calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def deform(rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 512, 97, 97, generator=g).cuda().requires_grad_()
    off = (torch.randn(8, 18, 97, 97, generator=g) * 2).cuda().requires_grad_()
    w = (torch.randn(256, 512, 3, 3, generator=g) / 68).cuda().requires_grad_()
    b = torch.zeros(256, device="cuda", requires_grad=True)
    for amp in (None, torch.bfloat16):
        def step():
            with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                out = ops.deform_conv2d(x, off, w, b, padding=1)
            out.backward(torch.ones_like(out))
        _profile(step, rows, f"deform_conv2d fwd+bwd, N=8 512->256 97x97, {amp or 'float32'}")


def step(rows):
    images, labels = train_step.make_batch(8, (769, 769), "cuda")
    model = train_step.build(True, False, "cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    _profile(train_step.train_step_fn(model, optimizer, images, labels, torch.bfloat16), rows,
             "CSFRN training step, N=8 769x769 bf16", reps=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", nargs="+", choices=["deform", "step"], default=["deform", "step"])
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    for what in args.what:
        {"deform": deform, "step": step}[what](args.rows)


if __name__ == "__main__":
    main()
