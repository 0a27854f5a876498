"""The CUDA deformable convolution's launch plan on paper: for one call (forward + backward of ``deform_conv2d`` or
``dual_deform_conv2d``), every kernel and GEMM csrc/cuda/deform_conv.cu launches, the bytes it moves through device
memory and the flops it computes, and from them the floor of the call at a card's ceilings and the time we expect.
A pure function of the shape: it runs on the CPU, so a GPU run can hold its measurement against it
(``csfrn bench --what deform`` prints it and writes it into the benchmark's JSON).

The byte model (DRAM traffic): each tensor a kernel reads or writes counts once. The sampling kernels and the
input-gradient gather read the four bilinear corners of every sample, but neighbouring samples share corners, and
an image's input (19 MB at 512 channels, 97 x 97, float32) and the window of column gradients a run of destination
pixels reads stay in L2 (50 MB), so the input and the columns count once, not four times. The stable sort (CUB
radix, int64 keys and int64 values) counts 8 passes of 8 bits, each reading and writing keys and values.

Vector loads: the sampling kernels and the gather move 16 bytes of channels a lane (8 bfloat16 / float16, 4 float32,
2 float64) where C / groups and C / offset_groups are multiples of that (the launcher's vector_width(); else one
element a lane). That changes no byte above, but the memory accesses the lanes issue (``accesses``: per-lane loads
and stores of the corner values, columns and their gradients, counting every corner) by that factor: at the GPU
shape 4x fewer in float32 and 8x in bfloat16 than one element a lane, which keeps these kernels off the
load/store-issue limit (2-byte scalar accesses move 64 bytes per warp instruction, a 16-byte vector 512).

Offsets and masks: the kernels read them where they lie, NCHW or channels_last, and the backward writes their
gradients in their memory format (csrc/cuda/deform_conv.cu), so no copy of them is counted because none runs: they
count once, in sample_kernel (read) and in the backward's sampling_kernel (gradients written). A channels_last
offset field is read coalesced, an NCHW one is not; the byte model counts each byte once either way.

Expected time of a kernel: its floor (the larger of bytes / copy bandwidth and flops / matmul peak) over the
fraction of the ceiling such a kernel reaches: GEMMs 0.8, streaming kernels (layout copies, keys) 0.8, the
sampling kernels and the gather 0.5 (gathers through L2), the sort 0.5.
"""

import dataclasses
from typing import List, Optional

import torch

# Mirrors of csrc/cuda/deform_conv.cu: the workspace cap, the GEMM alignment, sizeof(DeformSample<acc_t>).
WORKSPACE_BYTES = 1 << 30
ALIGN = 8
SAMPLE_BYTES = {"float32": 64, "bfloat16": 64, "float16": 64, "float64": 88}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
SORT_PASSES = 8

# Cards the plan is evaluated at: measured ceilings (benchmarks/results/gpu/info.json: a 1 GiB device copy,
# read + write; 8192^3 matmuls), or the figures quoted for the card where it has not been measured yet.
CARDS = {
    "NVIDIA H100 80GB HBM3": dict(
        copy_gb_s=2984.0,
        matmul_tflops_fp32=51.5,
        matmul_tflops_bf16=778.0,
        source="measured 2026-11-26, benchmarks/results/gpu/info.json",
    ),
    "NVIDIA H200": dict(
        copy_gb_s=4300.0,
        matmul_tflops_fp32=51.5,
        matmul_tflops_bf16=788.0,
        source="4.3 TB/s copy, 788 TFLOP/s bf16 (8192^3, random data) as measured on one such card, 2026-10-28; "
        "fp32 as the H100 (same chip)",
    ),
}
DEFAULT_CARD = "NVIDIA H100 80GB HBM3"


def card_of(device):
    """The CARDS entry of ``device`` when it is a CUDA device the plan knows, else DEFAULT_CARD."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
        if name in CARDS:
            return name
    return DEFAULT_CARD


EFFICIENCY = {"gemm": 0.8, "stream": 0.8, "sampling": 0.5, "sort": 0.5}


def floor_ms(nbytes, flops, card, dtype):
    """A kernel's floor at ``card``'s ceilings (a CARDS entry, or measured ones under the same keys): the larger
    of its bytes over the copy bandwidth and its flops over the matrix-product peak of ``dtype``."""
    peak = card["matmul_tflops_bf16"] if dtype in ("bfloat16", "float16") else card["matmul_tflops_fp32"]
    return max(nbytes / (card["copy_gb_s"] * 1e9), flops / (peak * 1e12)) * 1e3


@dataclasses.dataclass
class Kernel:
    name: str
    phase: str  # "forward" or "backward"
    kind: str  # a key of EFFICIENCY
    launches: int
    bytes: float
    flops: float = 0.0
    accesses: float = 0.0  # per-lane memory accesses of the sampling kernels and the gather (0: not modelled)
    lane_bytes: int = 0  # bytes a lane moves per access there (16: vector loads)

    def floor_ms(self, card, dtype):
        return floor_ms(self.bytes, self.flops, card, dtype)

    def expected_ms(self, card, dtype):
        return self.floor_ms(card, dtype) / EFFICIENCY[self.kind]


def _round_up(v, m):
    return (v + m - 1) // m * m


def _chunk(n, per_image, workspace=WORKSPACE_BYTES):
    """Images per chunk as chunk_images() in deform_conv.cu: the most that fit (at least one), evened out."""
    most = max(1, min(n, workspace // max(1, per_image)))
    chunks = -(-n // most)
    return -(-n // chunks), chunks


def vector_elements(c_in, groups, offset_groups, dtype):
    """Channels a lane moves at once, as vector_width() in deform_conv.cu (an aligned input assumed)."""
    v = 16 // ELEMENT_BYTES[dtype]
    return v if (c_in // groups) % v == 0 and (c_in // offset_groups) % v == 0 else 1


def plan(
    n=8,
    c_in=512,
    c_out=256,
    size=97,
    k=3,
    padding=1,
    stride=1,
    dilation=1,
    groups=1,
    offset_groups=1,
    dtype="float32",
    dual=False,
    mask=False,
    channels_last=False,
    coords_float32: Optional[bool] = None,
    workspace=WORKSPACE_BYTES,
) -> List[Kernel]:
    """The kernels of one forward + backward (every gradient asked for) of deform_conv2d, or of
    dual_deform_conv2d with two such convolutions on one offset field (``dual``), on N images of C_in x size x size
    laid out NCHW (or ``channels_last``). ``dtype``: the input's; ``coords_float32``: the offset's and mask's
    dtype is float32 (default: under autocast, i.e. for float16 / bfloat16)."""
    e = ELEMENT_BYTES[dtype]
    ce = 4 if (coords_float32 if coords_float32 is not None else dtype in ("bfloat16", "float16")) else e
    s_bytes = SAMPLE_BYTES[dtype]
    taps = k * k
    out = (size + 2 * padding - (dilation * (k - 1) + 1)) // stride + 1
    L, hw = out * out, size * size
    branches = 2 if dual else 1
    rg = taps * c_in // groups
    row = groups * _round_up(rg, ALIGN)
    items = n * offset_groups * taps * L
    M = n * L
    input_b, cols_b, out_b = n * c_in * hw * e, M * row * e, M * c_out * e
    weight_b = c_out * rg * e
    coords_b = items * (2 + (1 if mask else 0)) * ce
    gemm_flops = 2.0 * M * c_out * rg
    per_image_items = offset_groups * taps * L
    fwd_chunk, fwd_chunks = _chunk(n, branches * L * row * e + per_image_items * s_bytes, workspace)
    bwd_chunk, bwd_chunks = _chunk(
        n, branches * 2 * L * row * e + 4 * per_image_items * 8 * 4 + per_image_items * s_bytes, workspace
    )
    contributions = 4 * items
    dests = n * hw * offset_groups
    copies_out = not (channels_last and c_out % ALIGN == 0)
    vec = vector_elements(c_in, groups, offset_groups, dtype)
    runs = c_in // offset_groups // vec  # accesses of one lane group per corner, column or contributor
    ks = []

    def add(name, phase, kind, launches, nbytes, flops=0.0, per_branch=True, accesses=0.0):
        """per_branch: bytes, flops and accesses for each convolution; one launch serves both in the sampling
        kernels and the gather (their names say so)."""
        mult = branches if per_branch else 1
        shared = name.startswith(("sampling_kernel", "grad_input_kernel"))
        ks.append(
            Kernel(
                name,
                phase,
                kind,
                launches * (1 if shared else mult),
                nbytes * mult,
                flops * mult,
                accesses * mult,
                vec * e if shared else 0,
            )
        )

    for phase, _, chunks in (("forward", fwd_chunk, fwd_chunks), ("backward", bwd_chunk, bwd_chunks)):
        if not channels_last:
            add("input to channels-last (copy)", phase, "stream", 1, 2 * input_b)
        if phase == "backward" and copies_out:
            add("grad_out to [pixels, C_out] rows (copy)", phase, "stream", 1, 2 * out_b)
        add("sample_kernel (positions, weights)", phase, "stream", chunks, coords_b + items * s_bytes, per_branch=False)
        if phase == "forward":
            add(
                "sampling_kernel (columns)",
                phase,
                "sampling",
                chunks,
                items * s_bytes / branches + input_b + cols_b,
                accesses=items * runs * (4 + 1),
            )
            add(
                "GEMM out = cols @ W^T (+ bias)",
                phase,
                "gemm",
                chunks * groups,
                cols_b + weight_b * chunks + out_b,
                gemm_flops,
            )
            if copies_out:
                add("output to its layout (copy)", phase, "stream", 1, 2 * out_b)
            continue
        add(
            "GEMM grad_cols = grad_out @ W",
            phase,
            "gemm",
            chunks * groups,
            out_b + weight_b * chunks + cols_b,
            gemm_flops,
        )
        add(
            "sampling_kernel (columns + offset/mask grads)",
            phase,
            "sampling",
            chunks,
            items * s_bytes / branches + input_b + 2 * cols_b + coords_b / branches,
            accesses=items * runs * (4 + 2),
        )
        add(
            "GEMM grad_W = grad_out^T @ cols (K = images * pixels)",
            phase,
            "gemm",
            chunks * groups,
            out_b + cols_b + weight_b * chunks,
            gemm_flops,
        )
        add(
            "keys_kernel (destination of each contribution)",
            phase,
            "stream",
            chunks,
            items * s_bytes + contributions * 8,
            per_branch=False,
        )
        add(
            "at::sort stable (radix, int64 pairs)",
            phase,
            "sort",
            chunks,
            SORT_PASSES * 2 * contributions * 16 + contributions * 8,
            per_branch=False,
        )
        add(
            "at::searchsorted (destination runs)",
            phase,
            "stream",
            chunks,
            contributions * 8 + (dests + 1) * 16,
            per_branch=False,
        )
        add(
            "grad_input_kernel (fixed-order gather)",
            phase,
            "sampling",
            chunks,
            ((dests + 1) * 8 + contributions * 8 + items * s_bytes) / branches + cols_b + input_b,
            accesses=(contributions + dests) * runs,
        )
        add("grad of bias (sum)", phase, "stream", 1, out_b)
    return ks


def summarise(kernels, card_name, dtype):
    """Rows per kernel (bytes, flops, floor and expected ms at the card) and the totals."""
    card = CARDS[card_name]
    rows = [
        dict(
            kernel=k.name,
            phase=k.phase,
            launches=k.launches,
            mbytes=k.bytes / 1e6,
            gflop=k.flops / 1e9,
            maccesses=k.accesses / 1e6 if k.accesses else None,
            lane_bytes=k.lane_bytes or None,
            floor_ms=k.floor_ms(card, dtype),
            expected_ms=k.expected_ms(card, dtype),
        )
        for k in kernels
    ]
    total = dict(
        mbytes=sum(r["mbytes"] for r in rows),
        gflop=sum(r["gflop"] for r in rows),
        floor_ms=sum(r["floor_ms"] for r in rows),
        expected_ms=sum(r["expected_ms"] for r in rows),
    )
    return rows, total


def gpu_plans(card_name=DEFAULT_CARD):
    """The plans the benchmark prints: the GPU shape (N=8, 512 -> 256, 97 x 97, 3 x 3, NCHW input as the benchmark
    makes it) in float32 and bfloat16 (autocast: float32 offsets), single and dual, at ``card_name``."""
    out = []
    for dtype in ("float32", "bfloat16"):
        for dual in (False, True):
            rows, total = summarise(plan(dtype=dtype, dual=dual), card_name, dtype)
            out.append(
                dict(
                    card=card_name,
                    card_source=CARDS[card_name]["source"],
                    dtype=dtype,
                    op="dual_deform_conv2d" if dual else "deform_conv2d",
                    shape="N=8 512->256 97x97 3x3" + (" (x and y)" if dual else ""),
                    kernels=rows,
                    **total,
                )
            )
    return out
