"""An extension built ahead of a GPU session, so that the session's build stage takes seconds instead of minutes.

    python benchmarks/gpu_prebuilt.py build    # here, with a Python and torch like the GPU machine's:
                                               # builds csfrn/_C (CPU + CUDA, TORCH_CUDA_ARCH_LIST, sm_90 by
                                               # default) and writes its stamp, csfrn/_C.build.json
    python benchmarks/gpu_prebuilt.py check    # there (gpu_session.sh's build stage): exit 0 when the built
                                               # extension can be used as it is, else 1 with the reason

The stamp holds the hash of the extension's inputs (csrc/ and setup.py), the torch and Python versions and the
architectures it was built for. ``check`` accepts the extension only when all of them match the tree and the
interpreter it runs in, the extension loads and has its CUDA kernels: a stale or foreign .so is rebuilt, never
used. Both files are build outputs (ignored by git); the device call carries them (``carry``).
"""

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join(ROOT, "csfrn", "_C.build.json")


def sources_hash():
    """sha256 over the extension's inputs (the Makefile's SOURCES: every file under csrc/, and setup.py)."""
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True))
    files = [f for f in files if os.path.isfile(f)] + [os.path.join(ROOT, "setup.py")]
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, ROOT).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read() + b"\0")
    return h.hexdigest()


def interpreter():
    import torch

    return {"torch": torch.__version__, "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}


def build(args):
    env = dict(os.environ, CSFRN_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=args.arch)
    if os.path.exists(STAMP):
        os.remove(STAMP)  # no stamp beside a half-built extension
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env, check=True)
    stamp = {"sources": sources_hash(), **interpreter(), "arch": args.arch}
    with open(STAMP, "w") as f:
        json.dump(stamp, f, indent=1)
    print(f"built; stamp {os.path.relpath(STAMP, ROOT)}: {stamp}")
    print("carry: " + " ".join(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csfrn", "_C*"))))


def why_not(arch):
    """None when the built extension can be used as it is, else the reason it cannot."""
    if not os.path.exists(STAMP):
        return "no stamp (csfrn/_C.build.json): not prebuilt"
    with open(STAMP) as f:
        stamp = json.load(f)
    want = {"sources": sources_hash(), **interpreter(), "arch": arch}
    for key, value in want.items():
        if stamp.get(key) != value:
            return f"the stamp's {key} is {stamp.get(key)!r}, this tree / interpreter has {value!r}"
    probe = "import csfrn.ops as ops, sys; sys.exit(0 if ops.built_with_cuda() else 3)"
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return "it was built without CUDA" if r.returncode == 3 else f"it does not load: {tail}"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["build", "check"])
    parser.add_argument("--arch", default=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    args = parser.parse_args(argv)
    if args.what == "build":
        return build(args)
    reason = why_not(args.arch)
    print(f"prebuilt extension: {'usable' if reason is None else 'not used: ' + reason}")
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
