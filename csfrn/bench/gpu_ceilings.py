"""The two ceilings a GPU kernel is measured against, read off the card itself: device-memory bandwidth (a
large device-to-device copy, bytes read plus bytes written) and matrix-product throughput (8192^3 products in
float32 without TF32, in TF32 and in bfloat16, on random data). CUDA events, median of ``reps`` after a
warm-up."""
import statistics

import torch


def _median_ms(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ceilings(reps=10, copy_mib=1024, n=8192):
    """{"copy_gb_s", "matmul_tflops_fp32", "matmul_tflops_tf32", "matmul_tflops_bf16"} of the current GPU."""
    out = {}
    src = torch.randn(copy_mib * 2**18, device="cuda")      # copy_mib MiB of float32
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), reps)
    out["copy_gb_s"] = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, allow_tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                                        ("bf16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            b = torch.randn(n, n, device="cuda", dtype=dtype)
            ms = _median_ms(lambda: a @ b, reps)
            out[f"matmul_tflops_{name}"] = 2 * n ** 3 / (ms * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out
