"""Timing and peak-memory helpers shared by every benchmark: one process, interleaved repetitions, medians."""

import contextlib
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def cpu_ceilings(copy_mib=64, n=1536, reps=5):
    """The two ceilings a CPU kernel's floor is computed from, measured now at torch's current thread count
    (median of ``reps``): {"copy_gb_s": a large tensor copy, bytes read plus bytes written,
    "matmul_gflops_fp32": an n x n x n float32 matrix product}."""
    src = torch.randn(copy_mib * 2**18)
    dst = torch.empty_like(src)
    a, b = torch.randn(n, n), torch.randn(n, n)
    result = {}
    for key, fn, work in (
        ("copy_gb_s", lambda: dst.copy_(src), 2 * src.numel() * 4),
        ("matmul_gflops_fp32", lambda: a @ b, 2 * n**3),
    ):
        fn()
        seconds = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t0)
        result[key] = work / statistics.median(seconds) / 1e9
    return result


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


def _copy_gb_s(copy_mib, reps):
    """Device copy bandwidth (read + write) of a copy_mib MiB float32 buffer; the buffers are freed on return."""
    src = torch.randn(copy_mib * 2**18, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def gpu_ceilings(reps=10, copy_mib=1024, n=8192):
    """{"copy_gb_s", "matmul_tflops_fp32", "matmul_tflops_tf32", "matmul_tflops_bf16"} of the current GPU."""
    out = {"copy_gb_s": _copy_gb_s(copy_mib, reps)}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, allow_tf32 in (
            ("fp32", torch.float32, False),
            ("tf32", torch.float32, True),
            ("bf16", torch.bfloat16, False),
        ):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            b = torch.randn(n, n, device="cuda", dtype=dtype)
            ms = _median_ms(lambda: a @ b, reps)
            out[f"matmul_tflops_{name}"] = 2 * n**3 / (ms * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns, device="cpu", reps=5, warmup=1, min_time=0.0):
    """Time each callable of ``fns`` (name -> fn), interleaving the repetitions so machine noise hits all
    alike, in a new order each repetition: a call runs in the state its predecessor left (caches, the malloc
    heap, sleeping threads), so no implementation may always follow the same one. CUDA events time GPU calls.
    Returns name ->
    {"median_ms", "min_ms", "max_ms", "peak_mb"}. Peak memory: CUDA's allocator peak on GPUs; on the CPU, the
    peak of bytes held by tensors allocated during one call (torch profiler)."""
    times = {name: [] for name in fns}
    peaks = {name: peak_memory_mb(fn, device) for name, fn in fns.items()}  # also serves as a warm-up
    for _ in range(max(warmup - 1, 0)):
        for fn in fns.values():
            fn()
    _sync(device)
    start = time.perf_counter()
    order, shuffle = list(fns), random.Random(0).shuffle
    rep = 0
    while rep < reps or time.perf_counter() - start < min_time:
        shuffle(order)
        for name in order:
            times[name].append(_time_once(fns[name], device))
        rep += 1
    return {
        name: {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "peak_mb": peaks[name]}
        for name, ts in times.items()
    }


def _time_once(fn, device):
    """Milliseconds of one call: CUDA events around it on a GPU (device time of everything it queued, the
    device idle before), the host clock on the CPU."""
    _sync(device)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# What kineto (the torch profiler's backend) writes to the C-level stderr at every profile: "USDT: ...
# profiler_start / profiler_stop", "STAGE: ... Completed Stage" and, on a machine without a GPU,
# "ERROR: ... gpuGetDeviceCount failed with code 35"; and c10's "Memory block of unknown size was allocated
# before the profiling started" when the call frees a tensor made before it (the peak counts the call's own
# allocations by design). None of it is ours or actionable.
_PROFILER_NOISE = re.compile(
    r"^(USDT|STAGE):.*\]|gpuGetDeviceCount failed|"
    r"allocated before the profiling started"
)


@contextlib.contextmanager
def profiler_quiet():
    """Run a torch profiler without its log lines: file descriptor 2 goes to a temporary file for the block,
    and afterwards every line of it that is not profiler noise (a warning of the profiled code, say) is written
    to stderr as it would have been. torch 2.11's profiler also warns at its first start that it "clears events
    at the end of each cycle" (about schedules with several cycles, which nothing here uses): dropped too."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events", category=UserWarning)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                if not _PROFILER_NOISE.search(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def peak_memory_mb(fn, device="cpu"):
    """Peak extra memory of one call of ``fn`` in MiB."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with profiler_quiet():  # kineto logs at start, stop and when its events are read
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        recorded = prof.events()

    # Walk allocation events in time order; the running sum of bytes is what the call holds.
    # Self memory counts each allocation once (an operator's total would count its children's again);
    # frees appear as "[memory]" events with negative sizes. An operator that frees its children's
    # buffers before returning (workspaces of a fused kernel) has negative self memory: count those frees
    # at its end, not its start, or the workspaces it held would vanish from the peak.
    def when(e):
        own_frees = e.self_cpu_memory_usage < 0 and e.name != "[memory]"
        return e.time_range.end if own_frees else e.time_range.start

    events = sorted((when(e), e.self_cpu_memory_usage) for e in recorded if e.self_cpu_memory_usage)
    held = peak = 0
    for _, size in events:
        held += size
        peak = max(peak, held)
    return peak / 2**20


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def table(rows, columns):
    """Plain-text table: rows are dicts, columns (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
