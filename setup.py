"""Build csfrn and its extension csfrn._C from csrc/.

CUDAExtension (every .cpp and .cu) when torch has CUDA and a CUDA toolkit is found, else CppExtension
(.cpp only) with a printed line that says why. Environment switches:
  CSFRN_CPU_ONLY=1     never compile CUDA sources
  CSFRN_FORCE_CUDA=1   a missing toolkit (or a CPU-only torch) is an error, not a CPU-only build
  TORCH_CUDA_ARCH_LIST the GPU architectures to build for ("8.0;9.0" when unset and no GPU is visible)
"""

import glob
import os
import shutil
import sys

# torch computes CUDA_HOME when cpp_extension is imported, and guesses /usr/local when an nvcc wrapper sits
# in /usr/local/bin: point it at the real toolkit first.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    for _candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(_candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = _candidate
            break

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_decision():
    """Return (use_cuda, reason)."""
    if _flag("CSFRN_CPU_ONLY"):
        return False, "CSFRN_CPU_ONLY=1 was set"
    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) was built without CUDA"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "no CUDA toolkit (nvcc) was found; set CUDA_HOME to build the CUDA kernels"
    return True, f"CUDA {torch.version.cuda} toolkit at {CUDA_HOME}"


def _shared_cxx_runtime():
    """Linker arguments that make _C use the C++ runtime torch runs on, the shared libstdc++ this process has
    loaded. A toolchain whose own libstdc++ is static-only (seen: a GCC under /opt/gcc on a GPU machine) would
    otherwise copy libstdc++ into _C; two C++ runtimes in one process break iostreams, so the first error
    message built with one crashed the process (or came out truncated)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as f:
            loaded = sorted({line.split()[-1] for line in f if "/libstdc++.so" in line})
    except OSError:
        return []
    if not loaded:
        return []
    return [f"-L{os.path.dirname(loaded[0])}", f"-l:{os.path.basename(loaded[0])}"]


def _extension():
    use_cuda, reason = _cuda_decision()
    if not use_cuda and _flag("CSFRN_FORCE_CUDA"):
        sys.exit(f"csfrn: CSFRN_FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")

    sources = sorted(f for d in ("", "cpu", "autocast") for f in glob.glob(os.path.join("csrc", d, "*.cpp")))
    include_dirs = [os.path.join(HERE, "csrc")]
    # torch picks the C++ standard its headers need. -fno-trapping-math (we never unmask FP exceptions) lets
    # gcc turn the branches of the CPU kernels' exp into blends, so their loops vectorise.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    define_macros = []
    link_flags = ["-fopenmp"] + _shared_cxx_runtime()
    if not use_cuda:
        print(f"csfrn: building the CPU-only extension: {reason}", flush=True)
        return CppExtension(
            "csfrn._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )

    print(f"csfrn: building the CPU + CUDA extension ({reason})", flush=True)
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    define_macros.append(("WITH_CUDA", None))
    # With no GPU visible torch cannot detect an architecture (and crashes trying): pick Ampere + Hopper.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        print("csfrn: no GPU visible, TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0", flush=True)
    # ATen/cuda/CUDAContext.h includes cuBLAS/cuSPARSE headers that a bare toolkit may lack; torch's
    # CUDA wheels bring them under site-packages/nvidia/cu*/include.
    nvidia_dir = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    for inc in sorted(glob.glob(os.path.join(nvidia_dir, "cu*", "include"))):
        include_dirs.append(inc)
    # ccache turns a rebuild of unchanged CUDA sources into seconds.
    ccache = shutil.which("ccache")
    if ccache and "PYTORCH_NVCC" not in os.environ:
        os.environ["PYTORCH_NVCC"] = f"{ccache} {os.path.join(CUDA_HOME, 'bin', 'nvcc')}"
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(
        "csfrn._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


def _requirements():
    with open(os.path.join(HERE, "requirements.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [
        line
        for line in lines
        if line
        and line.split(">")[0].split("=")[0] not in ("pytest", "pytest-xdist", "ninja", "pybind11", "setuptools")
    ]


os.environ.setdefault("MAX_JOBS", "2")

# pip install -e .[deploy]: csfrn export (ONNX) and csfrn predict --model FILE.onnx. onnxruntime 1.25 is the
# first release whose CPU execution provider implements DeformConv.
DEPLOY_REQUIREMENTS = ["onnx>=1.16", "onnxruntime>=1.25", "onnxscript>=0.5"]
# pip install -e .[plot]: every chart (csfrn plot / browse, eval's confusion.png, ablate, the benchmark report).
PLOT_REQUIREMENTS = ["matplotlib>=3.8"]
# pip install -e .[timm]: timm backbones (model.backbone timm:<name>), timm's SyncBN converter, train.layer_decay.
# pip install -e .[plug]: other libraries' models with CSFLM plugged in (model.external: smp, transformers; smp
# builds its encoders with timm).
TIMM_REQUIREMENTS = ["timm>=1.0", "safetensors"]
PLUG_REQUIREMENTS = ["segmentation-models-pytorch>=0.4", "transformers>=4.40"] + TIMM_REQUIREMENTS
# pip install -e .[dev]: the checks of .ci/run beyond the tests (lint-imports: the floors contract in .importlinter;
# ruff: lint and format; clang-format: csrc/).
# Pinned: another ruff / clang-format release may format differently, and .ci/run checks the format.
DEV_REQUIREMENTS = ["import-linter>=2.1", "ruff==0.17.6", "clang-format==23.1.5"]

setup(
    name="csfrn",
    version="0.1.0",
    description="CSFRN: Consistent-Separable Feature Representation for Semantic Segmentation (AAAI 2021), "
    "with fused C++/CUDA kernels",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["csfrn", "csfrn.*"]),
    # The shipped configs (csfrn/configs/, read with importlib.resources): `csfrn demo`, `--config NAME`.
    package_data={"csfrn.configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    install_requires=_requirements(),
    extras_require={
        "deploy": DEPLOY_REQUIREMENTS,
        "plot": PLOT_REQUIREMENTS,
        "timm": TIMM_REQUIREMENTS,
        "plug": PLUG_REQUIREMENTS,
        "dev": DEV_REQUIREMENTS,
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["csfrn = csfrn.cli:main"]},
    zip_safe=False,
)
