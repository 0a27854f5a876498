"""The GPU session's versions and ceilings (``benchmarks/gpu_session.sh``, stage info): the machine, the
toolchain, and the two ceilings a GPU kernel is measured against, read off the card itself: device-memory
bandwidth (a large device-to-device copy, bytes read plus bytes written) and matrix-product throughput (8192^3
products in float32 without TF32, in TF32 and in bfloat16, on random data; CUDA events, median of ``reps``
after a warm-up). Writes them to a JSON file.

    python benchmarks/gpu_info.py --json RESULTS/info.json [--device cpu]

``--device cpu`` (the session's dry run) measures the CPU's ceilings instead (``csfrn.bench.timing``), in the
same keys where they mean the same thing.
"""

import argparse
import datetime
import json
import platform
import shutil
import subprocess

import torch

from csfrn.bench.timing import cpu_ceilings, device_name, gpu_ceilings as ceilings


def tool_version(*cmd):
    """The last line of a tool's version output, or None when the tool is not there."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[-1] if out else None


def info(device):
    now = datetime.datetime.now(datetime.timezone.utc)
    out = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": now.date().isoformat(),
        "time": now.strftime("%H:%M:%S UTC"),
        "nvcc": tool_version("nvcc", "--version"),
        "compute_sanitizer": tool_version("compute-sanitizer", "--version"),
        "driver": tool_version("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1), **ceilings())
    else:
        c = cpu_ceilings()
        out.update(
            threads=torch.get_num_threads(), copy_gb_s=c["copy_gb_s"], matmul_tflops_fp32=c["matmul_gflops_fp32"] / 1e3
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_info.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--json", required=True, metavar="FILE", help="where to write the versions and ceilings")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    result = info(args.device)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
