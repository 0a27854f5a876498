// Deformable convolution on CUDA, channels-last inside, deterministic, no atomics.
//
// Layout. The input is read channels-last ([N, H, W, C]; a channels_last input as it is, any other one copied
// once). The columns of a chunk of images are pixel-major, [B * H_out * W_out, row] with row = groups * rg_pad and,
// per group, [kh * kw][C / groups] padded to rg_pad, a multiple of 8 elements: the GEMMs read them with unit stride
// and every operand's leading dimension (columns, weights [C_out, rg_pad], outputs and output gradients
// [pixels, C_out padded to 8]) is a multiple of 8, which the sm90 tensor-core GEMMs need. Padding is never read.
//
// Kernels of one chunk (whole images, as many as keep the workspace under kWorkspaceBytes, at least one):
//   sample_kernel    one thread per item (image, offset group, tap, output pixel): the four corners' pixels and
//                    bilinear weights (times the mask), once, into a DeformSample table shared by everything below
//                    and by both convolutions of the dual op.
//   sampling_kernel  one group of lanes per item (a power of two up to a warp, enough for the offset group's
//                    channels), its lanes over the offset group's contiguous run of channels (coalesced loads of
//                    the four corner vectors, 16 bytes a lane where aligned: see "Vector loads" below): writes the
//                    columns (forward; backward: the weight gradient's columns) and, in the backward, reduces
//                    grad_columns * corner derivatives across the lanes (warp shuffles, a fixed butterfly) into
//                    the offset and mask gradients, in the same pass: the backward never runs a second im2col.
//   GEMMs (cuBLAS)   forward: out[pixels, C_out] = cols @ W^T (+ bias), every image of the chunk in one GEMM per
//                    group; backward: grad_cols = grad_out @ W, and grad_W = grad_out^T @ cols with K = images *
//                    pixels: one GEMM for the whole batch when it fits one chunk; across chunks the GEMMs
//                    accumulate into one buffer (addmm, beta = 1; float32 for half precision): no sum pass.
//   input gradient   keys_kernel gives every contribution (item, corner) the input pixel and offset group it lands
//                    on; at::sort(stable) groups them by destination, keeping the item order among equals;
//                    at::searchsorted finds each destination's run; grad_input_kernel, one lane group per destination,
//                    sums its contributors in that fixed order in float32 (float64) and writes the final value in
//                    the final dtype and layout: no atomics, no zero-fill, no cast pass, bitwise reproducible, so
//                    torch.use_deterministic_algorithms(True) has nothing to alert about.
// Vector loads. Where every run of channels a lane moves starts 16-byte aligned (checked once per call, at launch:
// C / groups and C / offset_groups multiples of 16 bytes' worth of elements in every branch, the channels-last input
// aligned; the column buffers and the input gradient come from at::empty, their rows padded to 8 elements), each
// lane of the sampling kernel and the gather moves 8 float16 / bfloat16, 4 float32 or 2 float64 channels at once
// (one LDG.128 per corner, one STG.128 per column, one LDG.128 per contributor in the gather, and an STG.128 of the
// input gradient when it is channels-last); otherwise (odd channel counts, a misaligned view) one channel (V = 1,
// the same code). Each channel's column and input-gradient value is the same arithmetic in the same order either
// way, so both paths give the same bits there; the offset and mask gradients add a lane's channels in another
// order, so they differ between the paths in the last bits, each deterministic.
// Offsets and mask may be float32 beside a float16 / bfloat16 input (CUDA autocast keeps them so); positions and
// weights are computed in the accumulation type (float32, float64 for float64). The output and the input's gradient
// keep the input's memory format (channels_last in, channels_last out).
// Offsets and mask. They are read in place through their strides (common/deform_conv.h: CoordStrides), NCHW or
// channels_last (any layout whose pixels are not one run is copied contiguous once), and the backward writes their
// gradients directly in the offset's and the mask's memory formats: no copy on the way in or out. The items of
// sample_kernel and sampling_kernel are ordered tap-fastest (item = ((b * pixels + pix) * offset_groups + og) *
// taps + k), so neighbouring threads (lane groups) take neighbouring channels of one pixel: channels_last offsets
// and masks are read, and their gradients written, coalesced; NCHW ones are not (neighbouring threads 2 * H_out *
// W_out elements apart, one 32-byte sector each per access).
// What each kernel moves and computes at a given shape, and the floor at a card's ceilings:
// csfrn/bench/deform_plan.py (`csfrn bench --what deform`).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/launch.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cuda_helpers.cuh"
#include "common/deform_conv.h"
#include "common/deform_conv_checks.h"
#include "common/deform_conv_launch.h"
#include "common/kernel_scope.h"

namespace csfrn {
namespace {

// Column buffers, samples and sort of one chunk stay under this (a chunk holds at least one image).
constexpr int64_t kWorkspaceBytes = int64_t(1) << 30;
// GEMM leading dimensions are multiples of this many elements.
constexpr int64_t kAlign = 8;
// The lanes of an item (sampling) or destination (gather): a power of two <= 32 that covers the offset group's
// channels, kThreads / lanes of them per block.
constexpr int kMaxLanes = 32;

int lanes_for(int64_t channels_per_offset_group) {
  int lanes = 1;
  while (lanes < kMaxLanes && lanes < channels_per_offset_group) lanes *= 2;
  return lanes;
}

#ifdef CSFRN_CUDA_EMU
// Test hook of the emulation (csfrn_emu::set_deform_workspace_cap): a small cap drives the chunk loops.
int64_t& workspace_cap() {
  static int64_t cap = 0;  // 0: kWorkspaceBytes
  return cap;
}
int64_t workspace_bytes() { return workspace_cap() > 0 ? workspace_cap() : kWorkspaceBytes; }
int64_t set_deform_workspace_cap(int64_t cap) {
  const int64_t old = workspace_cap();
  workspace_cap() = cap;
  return old;
}
// Test hooks of the emulation: vector loads off (every call takes the scalar path), and the channels per lane
// (V) of the last call's sampling and gather kernels.
bool& vector_loads() {
  static bool on = true;
  return on;
}
bool set_deform_vector_loads(bool on) {
  const bool old = vector_loads();
  vector_loads() = on;
  return old;
}
int64_t& last_vector_width() {
  static int64_t v = 0;
  return v;
}
int64_t deform_vector_width() { return last_vector_width(); }
#else
int64_t workspace_bytes() { return kWorkspaceBytes; }
#endif

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

KernelGeom kernel_geom(const DeformGeom& g) {
  return {g.h,     g.w,     g.h_out, g.w_out,         g.kh,     g.kw,      g.stride_h, g.stride_w, g.pad_h,
          g.pad_w, g.dil_h, g.dil_w, g.offset_groups, g.taps(), g.pixels()};
}

// for (w over [0, n)) by every lane group (threadIdx.y) of the grid, blockDim = (lanes, kThreads / lanes).
#define CSFRN_GROUP_LOOP(w, n) \
  for (int64_t w = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; w < (n); w += int64_t(blockDim.y) * gridDim.x)

// One convolution's buffers for the kernels. Column (channel cg, tap k) of a row: (cg / per_group) * rg_pad +
// k * per_group + cg % per_group.
template <typename scalar_t>
struct ColBranch {
  const scalar_t* input;                     // channels-last [N, H, W, C] of the whole batch
  scalar_t* cols;                            // [B * pixels, row] columns of the chunk, or null
  const scalar_t* gcols;                     // [B * pixels, row] their gradient, or null
  int64_t channels, per_group, rg_pad, row;  // channels 0: absent (the single op's second branch)
};

template <typename scalar_t>
__device__ __forceinline__ int64_t column_of(const ColBranch<scalar_t>& br, int64_t cg, int64_t k) {
  return (cg / br.per_group) * br.rg_pad + k * br.per_group + cg % br.per_group;
}

// The offset and mask are read in place through their strides (os, ms): NCHW or channels_last.
template <typename coord_t, typename acc_t>
__global__ void sample_kernel(int64_t items, int64_t n0, KernelGeom g, const coord_t* __restrict__ offset,
                              CoordStrides os, const coord_t* __restrict__ mask, CoordStrides ms,
                              DeformSample<acc_t>* __restrict__ samples) {
  CSFRN_KERNEL_LOOP(it, items) samples[it] = deform_sample<acc_t>(g, it, n0, offset, os, mask, ms);
}

// Columns (where cols is given) and, where grad_offset / grad_mask are, the offset and mask gradients from the
// columns' gradient, of both branches, one lane group per item. Each lane takes V consecutive channels at a time
// (V > 1: one 16-byte load per corner, one 16-byte column store; the launcher checks the alignment), lane l the
// channels [l * V, l * V + V), then [(l + lanes) * V, ...), and adds its offset / mask terms in that order. The
// offset and mask gradients are written through their strides (gos, gms), in the offset's and mask's layouts.
template <int V, typename scalar_t, typename coord_t, typename acc_t>
__global__ void sampling_kernel(int64_t items, int64_t n0, KernelGeom g, const DeformSample<acc_t>* __restrict__ smp,
                                ColBranch<scalar_t> b0, ColBranch<scalar_t> b1, coord_t* __restrict__ grad_offset,
                                CoordStrides gos, coord_t* __restrict__ grad_mask, CoordStrides gms) {
  const int lane = threadIdx.x, lanes = blockDim.x, per_warp = kMaxLanes / lanes;
  const int64_t hw = g.h * g.w;
  const bool coords = grad_offset != nullptr || grad_mask != nullptr;
  // The loop is uniform across each warp (its lane groups start at `first`), so every lane reaches the shuffles;
  // a group past the last item takes part with zeros.
  const int64_t first = int64_t(blockIdx.x) * blockDim.y + threadIdx.y - threadIdx.y % per_warp;
  for (int64_t base = first; base < items; base += int64_t(blockDim.y) * gridDim.x) {
    const int64_t it = base + threadIdx.y % per_warp;
    const bool active = it < items;
    const DeformSample<acc_t> s = smp[active ? it : base];
    const int64_t k = it % g.taps, og = (it / g.taps) % g.offset_groups, r = it / (g.taps * g.offset_groups);
    acc_t sum_y = acc_t(0), sum_x = acc_t(0), sum_m = acc_t(0);
    for (int bi = 0; bi < 2 && active; ++bi) {
      const ColBranch<scalar_t>& br = bi == 0 ? b0 : b1;
      if (br.channels == 0) continue;
      const int64_t per_og = br.channels / g.offset_groups;
      // Corners outside are never read: a zero weight times an inf or NaN there would give NaN, and with
      // H * W = 0 there is nothing to read.
      const scalar_t* q[4];
      for (int j = 0; j < 4; ++j) q[j] = s.pixel[j] >= 0 ? br.input + (n0 * hw + s.pixel[j]) * br.channels : nullptr;
      for (int64_t c = int64_t(lane) * V; c < per_og; c += int64_t(lanes) * V) {
        const int64_t cg = og * per_og + c, col = r * br.row + column_of(br, cg, k);
        acc_t v[V][4];  // v[e][j]: channel cg + e at corner j
        for (int j = 0; j < 4; ++j) {
          if (q[j]) {
            const Vec<scalar_t, V> x = load_vec<V>(q[j] + cg);
            for (int e = 0; e < V; ++e) v[e][j] = static_cast<acc_t>(x.v[e]);
          } else {
            for (int e = 0; e < V; ++e) v[e][j] = acc_t(0);
          }
        }
        if (br.cols) {
          Vec<scalar_t, V> out;
          for (int e = 0; e < V; ++e) {
            out.v[e] = static_cast<scalar_t>(s.w[0] * v[e][0] + s.w[1] * v[e][1] + s.w[2] * v[e][2] + s.w[3] * v[e][3]);
          }
          store_vec<V>(br.cols + col, out);
        }
        if (coords) {
          const Vec<scalar_t, V> gcol = load_vec<V>(br.gcols + col);
          for (int e = 0; e < V; ++e) {
            const acc_t gv = static_cast<acc_t>(gcol.v[e]);
            acc_t value, d_y, d_x;
            bilinear_value_grad(s.ly, s.lx, v[e], value, d_y, d_x);
            sum_y += gv * d_y;
            sum_x += gv * d_x;
            sum_m += gv * value;
          }
        }
      }
    }
    if (coords) {
      for (int d = lanes / 2; d > 0; d /= 2) {  // a fixed butterfly within the lane group: the same order every run
        sum_y += __shfl_xor_sync(0xffffffffu, sum_y, d, lanes);
        sum_x += __shfl_xor_sync(0xffffffffu, sum_x, d, lanes);
        sum_m += __shfl_xor_sync(0xffffffffu, sum_m, d, lanes);
      }
      if (lane == 0 && active) {
        const int64_t n = n0 + r / g.pixels, pix = r % g.pixels;
        if (grad_offset) {
          const int64_t o = n * gos.n + (og * 2 * g.taps + 2 * k) * gos.c + pix * gos.p;
          grad_offset[o] = static_cast<coord_t>(sum_y * s.m);
          grad_offset[o + gos.c] = static_cast<coord_t>(sum_x * s.m);
        }
        if (grad_mask) {
          grad_mask[n * gms.n + (og * g.taps + k) * gms.c + pix * gms.p] = static_cast<coord_t>(sum_m);
        }
      }
    }
  }
}

// Contribution i = 4 * item + corner lands on destination (pixel of the chunk) * offset_groups + og; `none` (past
// every destination, sorted last, never read) for a corner outside.
template <typename acc_t>
__global__ void keys_kernel(int64_t contributions, KernelGeom g, const DeformSample<acc_t>* __restrict__ smp,
                            int64_t none, int64_t* __restrict__ keys) {
  CSFRN_KERNEL_LOOP(i, contributions) {
    const int64_t it = i / 4, pos = smp[it].pixel[i % 4];
    keys[i] = pos >= 0 ? pos * g.offset_groups + (it / g.taps) % g.offset_groups : none;
  }
}

// One convolution's input gradient: the columns' gradient and where to write (strides of [N, C, H, W]).
// vector_store: the gradient is channels-last with 16-byte aligned runs of V channels (V > 1): vector stores.
template <typename scalar_t>
struct GradBranch {
  const scalar_t* gcols;
  scalar_t* grad;
  int64_t channels, per_group, rg_pad, row;
  int64_t stride_n, stride_c, stride_h, stride_w;
  bool vector_store;
};

// One lane group per destination (input pixel of the chunk, offset group), lanes over its channels, V consecutive
// ones a lane (V > 1: a 16-byte load of the column gradients per contributor): the sum of its contributors
// order[bounds[d]], ..., order[bounds[d + 1] - 1], in that order, in acc_t, for each channel on its own (so every
// V gives the same bits).
template <int V, typename scalar_t, typename acc_t>
__global__ void grad_input_kernel(int64_t dests, int64_t n0, KernelGeom g, const int64_t* __restrict__ bounds,
                                  const int64_t* __restrict__ order, const DeformSample<acc_t>* __restrict__ smp,
                                  GradBranch<scalar_t> b0, GradBranch<scalar_t> b1) {
  const int lane = threadIdx.x, lanes = blockDim.x;
  const int64_t hw = g.h * g.w;
  CSFRN_GROUP_LOOP(d, dests) {
    const int64_t og = d % g.offset_groups, pix = d / g.offset_groups, b = pix / hw, y = (pix % hw) / g.w,
                  x = pix % g.w;
    const int64_t begin = bounds[d], end = bounds[d + 1];
    for (int bi = 0; bi < 2; ++bi) {
      const GradBranch<scalar_t>& br = bi == 0 ? b0 : b1;
      if (br.grad == nullptr) continue;
      const int64_t per_og = br.channels / g.offset_groups;
      scalar_t* dst = br.grad + (n0 + b) * br.stride_n + y * br.stride_h + x * br.stride_w;
      for (int64_t c = int64_t(lane) * V; c < per_og; c += int64_t(lanes) * V) {
        const int64_t cg = og * per_og + c, base = (cg / br.per_group) * br.rg_pad + cg % br.per_group;
        acc_t sum[V];
        for (int e = 0; e < V; ++e) sum[e] = acc_t(0);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t contrib = order[i], it = contrib / 4;
          const int64_t r = it / (g.taps * g.offset_groups), k = it % g.taps;
          const acc_t w = smp[it].w[contrib % 4];
          const Vec<scalar_t, V> gcol = load_vec<V>(br.gcols + r * br.row + base + k * br.per_group);
          for (int e = 0; e < V; ++e) sum[e] += w * static_cast<acc_t>(gcol.v[e]);
        }
        if (V > 1 && br.vector_store) {
          Vec<scalar_t, V> out;
          for (int e = 0; e < V; ++e) out.v[e] = static_cast<scalar_t>(sum[e]);
          store_vec<V>(dst + cg, out);
        } else {
          for (int e = 0; e < V; ++e) dst[(cg + e) * br.stride_c] = static_cast<scalar_t>(sum[e]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- host side
// One convolution of a (dual) call.
struct Branch {
  at::Tensor input;   // [N, C, H, W], channels_last-contiguous (its data is [N, H, W, C])
  at::Tensor weight;  // [C_out, rg_pad]: per output channel [kh][kw][C / groups], padded
  int64_t channels, groups, per_group, out_channels, rg, rg_pad, row;
  bool channels_last;  // the output's and the input gradient's memory format
  int64_t out_per_group() const { return out_channels / groups; }
};

Branch make_branch(const at::Tensor& input, const at::Tensor& weight) {
  Branch b;
  b.channels = input.size(1);
  b.per_group = weight.size(1);
  b.groups = b.channels / b.per_group;
  b.out_channels = weight.size(0);
  b.rg = weight.size(2) * weight.size(3) * b.per_group;
  b.rg_pad = round_up(b.rg, kAlign);
  b.row = b.groups * b.rg_pad;
  b.channels_last = deform_channels_last(input);
  b.input = input.contiguous(at::MemoryFormat::ChannelsLast);
  b.weight = at::empty({b.out_channels, b.rg_pad}, weight.options());
  // Sizes spelled out: reshape cannot infer a -1 beside a zero size (C_out = 0).
  b.weight.narrow(1, 0, b.rg).copy_(weight.permute({0, 2, 3, 1}).reshape({b.out_channels, b.rg}));
  return b;
}

// [rows, cols] with a leading dimension padded to kAlign (rows of a matrix stay 16-byte aligned).
at::Tensor padded_matrix(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  return at::empty({rows, round_up(cols, kAlign)}, opts).narrow(1, 0, cols);
}

// Images per chunk: the most whose workspace fits kWorkspaceBytes (at least one), evened out over the batch.
int64_t chunk_images(const DeformGeom& g, int64_t per_image) {
  if (g.n == 0) return 1;
  const int64_t most =
      std::max<int64_t>(1, std::min<int64_t>(g.n, workspace_bytes() / std::max<int64_t>(1, per_image)));
  const int64_t chunks = (g.n + most - 1) / most;
  return (g.n + chunks - 1) / chunks;
}

template <typename scalar_t>
ColBranch<scalar_t> col_branch(const std::vector<Branch>& branches, size_t i, const at::Tensor& cols,
                               const at::Tensor& gcols) {
  if (i >= branches.size()) return {nullptr, nullptr, nullptr, 0, 1, 0, 0};
  const Branch& b = branches[i];
  return {b.input.const_data_ptr<scalar_t>(),
          cols.defined() ? cols.data_ptr<scalar_t>() : nullptr,
          gcols.defined() ? gcols.const_data_ptr<scalar_t>() : nullptr,
          b.channels,
          b.per_group,
          b.rg_pad,
          b.row};
}

// Lanes per item: enough for the widest branch's channels per offset group, V of them a lane.
int branch_lanes(const DeformGeom& g, const std::vector<Branch>& branches, int vec) {
  int64_t widest = 1;
  for (const Branch& b : branches) widest = std::max(widest, b.channels / g.offset_groups);
  return lanes_for((widest + vec - 1) / vec);
}

// Channels per lane of the sampling kernel and the gather, chosen once per call: kVecElements (16 bytes) when
// every run of channels a lane moves starts 16-byte aligned, i.e. in every branch C / groups (so a run stays in one
// group and its column k * C / groups + c is aligned; rows are padded to 8 elements) and C / offset_groups are
// multiples of it and the channels-last input starts aligned; else 1 (scalar loads: odd channel counts).
template <typename scalar_t>
int vector_width(const DeformGeom& g, const std::vector<Branch>& branches) {
  constexpr int V = kVecElements<scalar_t>;
  int vec = V;
  for (const Branch& b : branches) {
    if (b.per_group % V != 0 || (b.channels / g.offset_groups) % V != 0 || !aligned16(b.input.const_data_ptr())) {
      vec = 1;
    }
  }
#ifdef CSFRN_CUDA_EMU
  if (!vector_loads()) vec = 1;
  last_vector_width() = vec;
#endif
  return vec;
}

// f(std::integral_constant<int, V>{}) for V = vec, which is 1 or kVecElements<scalar_t>.
template <typename scalar_t, typename F>
void with_vector_width(int vec, const F& f) {
  if (vec == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, kVecElements<scalar_t>>{});
  }
}

// Which (scalar_t, coord_t) a call runs in: coord_t is scalar_t, or float beside half / bfloat16 (checked).
template <typename T>
struct Type {
  using type = T;
};

template <typename F>
void dispatch_deform(const at::Tensor& input, const at::Tensor& offset, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (offset.scalar_type() == at::kFloat) return f(Type<scalar_t>{}, Type<float>{});
    }
    f(Type<scalar_t>{}, Type<scalar_t>{});
  });
}

// The sampling table of a chunk: [items] DeformSample<acc_t>, as bytes.
template <typename acc_t, typename coord_t>
at::Tensor compute_samples(const DeformGeom& g, int64_t n0, int64_t nb, const at::Tensor& offset,
                           const std::optional<at::Tensor>& mask) {
  const int64_t items = nb * g.offset_groups * g.taps() * g.pixels();
  at::Tensor table = at::empty({items * int64_t(sizeof(DeformSample<acc_t>))}, offset.options().dtype(at::kByte));
  CSFRN_LAUNCH(blocks_for(items), kThreads, 0, at::cuda::getCurrentCUDAStream(), sample_kernel<coord_t, acc_t>)(
      items, n0, kernel_geom(g), offset.const_data_ptr<coord_t>(), coord_strides(offset),
      mask.has_value() ? mask->const_data_ptr<coord_t>() : nullptr, coord_strides(mask),
      reinterpret_cast<DeformSample<acc_t>*>(table.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return table;
}

template <typename acc_t>
const DeformSample<acc_t>* samples_of(const at::Tensor& table) {
  return reinterpret_cast<const DeformSample<acc_t>*>(table.const_data_ptr());
}

// Column buffers come from at::empty: aligned beyond 16 bytes, with rows of a multiple of 8 elements. grad_offset
// and grad_mask: the whole batch's, written where given (defined).
template <typename scalar_t, typename coord_t, typename acc_t>
void launch_sampling(const DeformGeom& g, int64_t n0, int64_t nb, const at::Tensor& table,
                     const std::vector<Branch>& branches, const std::vector<at::Tensor>& cols,
                     const std::vector<at::Tensor>& gcols, const at::Tensor& grad_offset, const at::Tensor& grad_mask,
                     int vec) {
  const int64_t items = nb * g.offset_groups * g.taps() * g.pixels();
  auto at_ = [](const std::vector<at::Tensor>& v, size_t i) { return i < v.size() ? v[i] : at::Tensor(); };
  const int lanes = branch_lanes(g, branches, vec);
  for (const std::vector<at::Tensor>* buffers : {&cols, &gcols}) {
    for (const at::Tensor& t : *buffers) {
      TORCH_INTERNAL_ASSERT(!t.defined() || vec == 1 || aligned16(t.const_data_ptr()));
    }
  }
  with_vector_width<scalar_t>(vec, [&](auto v) {
    CSFRN_LAUNCH(blocks_for(items, kThreads / lanes), dim3(lanes, kThreads / lanes), 0,
                 at::cuda::getCurrentCUDAStream(), sampling_kernel<decltype(v)::value, scalar_t, coord_t, acc_t>)(
        items, n0, kernel_geom(g), samples_of<acc_t>(table),
        col_branch<scalar_t>(branches, 0, at_(cols, 0), at_(gcols, 0)),
        col_branch<scalar_t>(branches, 1, at_(cols, 1), at_(gcols, 1)),
        grad_offset.defined() ? grad_offset.data_ptr<coord_t>() : nullptr,
        grad_offset.defined() ? coord_strides(grad_offset) : CoordStrides{0, 0, 0},
        grad_mask.defined() ? grad_mask.data_ptr<coord_t>() : nullptr,
        grad_mask.defined() ? coord_strides(grad_mask) : CoordStrides{0, 0, 0});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// A chunk's columns [B * pixels, row] of one group: [B * pixels, rg], leading dimension row.
at::Tensor group_cols(const at::Tensor& cols, const Branch& b, int64_t gi) {
  return cols.narrow(1, gi * b.rg_pad, b.rg);
}

// A GEMM operand (any strides, as cuBLAS takes them). Under the emulation a float16 / bfloat16 one is copied
// contiguous: the CPU's half-precision GEMM reads one element past K in a strided operand (torch 2.14), where the
// padding's garbage (a NaN) would poison the result; cuBLAS reads exactly the operand.
at::Tensor gemm_operand(const at::Tensor& t) {
#ifdef CSFRN_CUDA_EMU
  if (t.element_size() == 2) return t.contiguous();
#endif
  return t;
}

// out = beta * out + a @ b (beta 0: out's contents ignored, NaN included), a and b in the input's dtype, out in it
// or in float32 beside half / bfloat16: cuBLAS accumulates in float32 either way, and with addmm's out_dtype also
// writes float32, so the chunks of a weight gradient add up in one float32 buffer with no sum or cast in between.
void accumulate_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  if (out.scalar_type() == a.scalar_type()) {
    out.addmm_(gemm_operand(a), gemm_operand(b), beta, 1.0);
    return;
  }
#ifdef CSFRN_CUDA_EMU
  out.addmm_(a.to(out.scalar_type()), b.to(out.scalar_type()), beta, 1.0);  // addmm's out_dtype is CUDA-only
#else
  at::addmm_out(out, out, a, b, out.scalar_type(), beta, 1.0);
#endif
}

std::vector<at::Tensor> forward_cuda(const DeformGeom& g, const std::vector<Branch>& branches,
                                     const std::vector<std::optional<at::Tensor>>& biases, const at::Tensor& offset,
                                     const std::optional<at::Tensor>& mask) {
  const int64_t L = g.pixels(), items_per_image = g.offset_groups * g.taps() * L;
  const auto opts = branches[0].input.options();
  std::vector<at::Tensor> outs, out2d;  // out2d: [N * pixels, C_out] rows of the output, leading dimension % 8 == 0
  std::vector<bool> direct;             // out2d is the output itself
  for (const Branch& b : branches) {
    const auto fmt = b.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    outs.push_back(at::empty({g.n, b.out_channels, g.h_out, g.w_out}, opts.memory_format(fmt)));
    // A channels_last output whose C_out is a multiple of 8 is itself the GEMMs' output; any other gets one copy.
    direct.push_back(b.channels_last && b.out_channels % kAlign == 0);
    out2d.push_back(direct.back() ? outs.back().permute({0, 2, 3, 1}).view({g.n * L, b.out_channels})
                                  : padded_matrix(g.n * L, b.out_channels, opts));
  }
  if (g.n == 0) return outs;
  int64_t per_image = 0;
  for (const Branch& b : branches) per_image += L * b.row * b.input.element_size();
  dispatch_deform(branches[0].input, offset, [&](auto st, auto ct) {
    using scalar_t = typename decltype(st)::type;
    using coord_t = typename decltype(ct)::type;
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t chunk = chunk_images(g, per_image + items_per_image * int64_t(sizeof(DeformSample<acc_t>)));
    const int vec = vector_width<scalar_t>(g, branches);
    std::vector<at::Tensor> cols;
    for (const Branch& b : branches) cols.push_back(at::empty({chunk * L, b.row}, opts));
    for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
      const int64_t nb = std::min(chunk, g.n - n0), rows = nb * L;
      const at::Tensor table = compute_samples<acc_t, coord_t>(g, n0, nb, offset, mask);
      launch_sampling<scalar_t, coord_t, acc_t>(g, n0, nb, table, branches, cols, {}, at::Tensor(), at::Tensor(), vec);
      for (size_t i = 0; i < branches.size(); ++i) {
        const Branch& b = branches[i];
        const int64_t og = b.out_per_group();
        for (int64_t gi = 0; gi < b.groups; ++gi) {
          at::Tensor dst = out2d[i].narrow(0, n0 * L, rows).narrow(1, gi * og, og);
          const at::Tensor c = group_cols(cols[i], b, gi).narrow(0, 0, rows);
          const at::Tensor w = b.weight.narrow(0, gi * og, og).narrow(1, 0, b.rg).t();
          if (biases[i].has_value()) {
            at::addmm_out(dst, biases[i]->narrow(0, gi * og, og), gemm_operand(c), gemm_operand(w));
          } else {
            at::mm_out(dst, gemm_operand(c), gemm_operand(w));
          }
        }
      }
    }
  });
  for (size_t i = 0; i < branches.size(); ++i) {
    if (!direct[i]) {
      outs[i].copy_(out2d[i].view({g.n, g.h_out, g.w_out, branches[i].out_channels}).permute({0, 3, 1, 2}));
    }
  }
  return outs;
}

struct BackwardResult {
  std::vector<at::Tensor> grad_input, grad_weight;
  at::Tensor grad_offset, grad_mask;
};

// grad_out as [N * pixels, C_out] rows with a leading dimension % 8 == 0 (a view of a channels_last one).
at::Tensor grad_rows(const at::Tensor& grad_out, int64_t rows) {
  const int64_t c = grad_out.size(1);
  const at::Tensor nhwc = grad_out.permute({0, 2, 3, 1});
  if (c % kAlign == 0 && nhwc.is_contiguous()) return nhwc.view({rows, c});
  at::Tensor m = padded_matrix(rows, c, grad_out.options());
  m.view({grad_out.size(0), grad_out.size(2), grad_out.size(3), c}).copy_(nhwc);  // m's rows are padded: a strided view
  return m;
}

// The weight gradient [C_out, rg] ([kh][kw][C / groups] per row) in the weight's [C_out, C / groups, kh, kw].
at::Tensor weight_order(const at::Tensor& g, const Branch& b, const at::Tensor& weight) {
  return g.reshape({b.out_channels, weight.size(2), weight.size(3), b.per_group}).permute({0, 3, 1, 2}).contiguous();
}

BackwardResult backward_cuda(const DeformGeom& g, const std::vector<Branch>& branches,
                             const std::vector<at::Tensor>& grad_outs, const std::vector<at::Tensor>& weights,
                             const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                             const std::vector<bool>& need_input, const std::vector<bool>& need_weight,
                             bool need_offset, bool need_mask) {
  const int64_t taps = g.taps(), L = g.pixels(), hw = g.h * g.w, items_per_image = g.offset_groups * taps * L;
  const auto opts = branches[0].input.options(), coord_opts = offset.options();
  const at::ScalarType dtype = branches[0].input.scalar_type();
  const bool need_coords = need_offset || need_mask;
  bool any_input = false, need_gcols = need_coords;
  BackwardResult r;
  for (size_t i = 0; i < branches.size(); ++i) {
    const auto fmt = branches[i].channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    r.grad_input.push_back(need_input[i] ? at::empty(branches[i].input.sizes(), opts.memory_format(fmt))
                                         : at::empty({0}, opts));
    any_input = any_input || need_input[i];
    need_gcols = need_gcols || need_input[i];
  }
  // Every element below is written by a kernel or a GEMM: no fill. The offset's and the mask's gradients in their
  // memory formats, written there directly by the sampling kernel.
  r.grad_offset = need_offset ? at::empty({g.n, g.offset_groups * 2 * taps, g.h_out, g.w_out},
                                          coord_opts.memory_format(coords_format(offset)))
                              : at::empty({0}, coord_opts);
  r.grad_mask = need_mask ? at::empty({g.n, g.offset_groups * taps, g.h_out, g.w_out},
                                      coord_opts.memory_format(coords_format(*mask)))
                          : at::empty({0}, coord_opts);
  std::vector<at::Tensor> gw(branches.size());
  if (g.n > 0) {
    std::vector<at::Tensor> gout;
    for (const at::Tensor& go : grad_outs) gout.push_back(grad_rows(go, g.n * L));
    int64_t per_image = 0;
    for (size_t i = 0; i < branches.size(); ++i) {
      per_image +=
          L * branches[i].row * branches[i].input.element_size() * ((need_weight[i] ? 1 : 0) + (need_gcols ? 1 : 0));
    }
    if (any_input) per_image += 4 * items_per_image * 8 * 4;  // keys, sorted keys, order and the sort's own
    dispatch_deform(branches[0].input, offset, [&](auto st, auto ct) {
      using scalar_t = typename decltype(st)::type;
      using coord_t = typename decltype(ct)::type;
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t chunk = chunk_images(g, per_image + items_per_image * int64_t(sizeof(DeformSample<acc_t>)));
      const bool several = chunk < g.n;
      const int vec = vector_width<scalar_t>(g, branches);
      std::vector<at::Tensor> cols(branches.size()), gcols(branches.size());
      for (size_t i = 0; i < branches.size(); ++i) {
        if (need_weight[i]) cols[i] = at::empty({chunk * L, branches[i].row}, opts);
        if (need_gcols) gcols[i] = at::empty({chunk * L, branches[i].row}, opts);
        // The weight gradient: the GEMMs of every chunk accumulate into it (addmm, beta = 1 after the first); in
        // acc_t when several chunks of a half-precision input add up, cast once at the end.
        const auto gw_type = several ? at::toOpMathType(dtype) : dtype;
        if (need_weight[i]) gw[i] = padded_matrix(branches[i].out_channels, branches[i].rg, opts.dtype(gw_type));
      }
      for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
        const int64_t nb = std::min(chunk, g.n - n0), rows = nb * L, items = nb * items_per_image;
        const at::Tensor table = compute_samples<acc_t, coord_t>(g, n0, nb, offset, mask);
        for (size_t i = 0; i < branches.size() && need_gcols; ++i) {  // grad_cols = grad_out @ W, per group
          const Branch& b = branches[i];
          const int64_t og = b.out_per_group();
          for (int64_t gi = 0; gi < b.groups; ++gi) {
            at::Tensor dst = group_cols(gcols[i], b, gi).narrow(0, 0, rows);
            at::mm_out(dst, gemm_operand(gout[i].narrow(0, n0 * L, rows).narrow(1, gi * og, og)),
                       gemm_operand(b.weight.narrow(0, gi * og, og).narrow(1, 0, b.rg)));
          }
        }
        bool any_cols = false;
        for (size_t i = 0; i < branches.size(); ++i) any_cols = any_cols || need_weight[i];
        if (any_cols || need_coords) {
          launch_sampling<scalar_t, coord_t, acc_t>(
              g, n0, nb, table, branches, cols, need_coords ? gcols : std::vector<at::Tensor>{},
              need_offset ? r.grad_offset : at::Tensor(), need_mask ? r.grad_mask : at::Tensor(), vec);
        }
        for (size_t i = 0; i < branches.size(); ++i) {  // grad_W = grad_out^T @ cols: K = every pixel of the chunk
          if (!need_weight[i]) continue;
          const Branch& b = branches[i];
          const int64_t og = b.out_per_group();
          for (int64_t gi = 0; gi < b.groups; ++gi) {
            at::Tensor dst = gw[i].narrow(0, gi * og, og);
            accumulate_mm(dst, gout[i].narrow(0, n0 * L, rows).narrow(1, gi * og, og).t(),
                          group_cols(cols[i], b, gi).narrow(0, 0, rows), n0 == 0 ? 0.0 : 1.0);
          }
        }
        if (!any_input || hw == 0) continue;
        // The input gradient: contributions grouped by destination (a stable sort), then one gather each.
        const int64_t contributions = 4 * items, dests = nb * hw * g.offset_groups;
        at::Tensor keys = at::empty({contributions}, opts.dtype(at::kLong));
        CSFRN_LAUNCH(blocks_for(contributions), kThreads, 0, at::cuda::getCurrentCUDAStream(), keys_kernel<acc_t>)(
            contributions, kernel_geom(g), samples_of<acc_t>(table), dests, keys.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
        const at::Tensor order = std::get<1>(sorted);
        const at::Tensor bounds = at::searchsorted(std::get<0>(sorted), at::arange(dests + 1, keys.options()));
        auto grad_branch = [&](size_t i) -> GradBranch<scalar_t> {
          if (i >= branches.size() || !need_input[i]) return {nullptr, nullptr, 0, 1, 0, 0, 0, 0, 0, 0, false};
          const Branch& b = branches[i];
          const at::Tensor& gi = r.grad_input[i];
          // vector stores where the gradient is channels-last (grad_input is from at::empty: aligned)
          const bool vector_store = vec > 1 && gi.stride(1) == 1 && gi.stride(3) % vec == 0 &&
                                    gi.stride(2) % vec == 0 && gi.stride(0) % vec == 0 && aligned16(gi.data_ptr());
          return {gcols[i].const_data_ptr<scalar_t>(),
                  gi.data_ptr<scalar_t>(),
                  b.channels,
                  b.per_group,
                  b.rg_pad,
                  b.row,
                  gi.stride(0),
                  gi.stride(1),
                  gi.stride(2),
                  gi.stride(3),
                  vector_store};
        };
        const int lanes = branch_lanes(g, branches, vec);
        with_vector_width<scalar_t>(vec, [&](auto v) {
          CSFRN_LAUNCH(blocks_for(dests, kThreads / lanes), dim3(lanes, kThreads / lanes), 0,
                       at::cuda::getCurrentCUDAStream(), grad_input_kernel<decltype(v)::value, scalar_t, acc_t>)(
              dests, n0, kernel_geom(g), bounds.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
              samples_of<acc_t>(table), grad_branch(0), grad_branch(1));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      for (size_t i = 0; i < branches.size(); ++i) {
        if (need_weight[i] && gw[i].scalar_type() != dtype) gw[i] = gw[i].to(dtype);
      }
    });
  }
  for (size_t i = 0; i < branches.size(); ++i) {
    if (!need_weight[i]) {
      r.grad_weight.push_back(at::empty({0}, opts));
    } else if (g.n == 0) {
      r.grad_weight.push_back(at::zeros(weights[i].sizes(), opts));
    } else {
      r.grad_weight.push_back(weight_order(gw[i], branches[i], weights[i]));
    }
  }
  return r;
}

at::Tensor deform_conv2d_cuda(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g = check_deform_conv2d_args(input, offset, weight, bias, mask, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(input.device());
  return forward_cuda(g, {make_branch(input, weight)}, {bias}, coords_in_place(offset), coords_in_place(mask))[0];
}

std::tuple<at::Tensor, at::Tensor> dual_deform_conv2d_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
    const at::Tensor& weight_y, const std::optional<at::Tensor>& bias_x, const std::optional<at::Tensor>& bias_y,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g =
      check_dual_deform_conv2d_args(x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto outs = forward_cuda(g, {make_branch(x, weight_x), make_branch(y, weight_y)}, {bias_x, bias_y},
                                 coords_in_place(offset), coords_in_place(mask));
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 5> output_mask) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g = check_deform_conv2d_args(input, offset, weight, std::nullopt, mask, stride, padding, dilation);
  check_deform_same("input", input, "grad_out", grad_out);
  const c10::cuda::CUDAGuard guard(input.device());
  BackwardResult r = backward_cuda(g, {make_branch(input, weight)}, {grad_out}, {weight}, coords_in_place(offset),
                                   coords_in_place(mask), {output_mask[0]}, {output_mask[2]}, output_mask[1],
                                   output_mask[4] && mask.has_value());
  return {r.grad_input[0], r.grad_offset, r.grad_weight[0], grad_bias(grad_out, output_mask[3]), r.grad_mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dual_deform_conv2d_backward_cuda(const at::Tensor& grad_out_x, const at::Tensor& grad_out_y, const at::Tensor& x,
                                 const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
                                 const at::Tensor& weight_y, const std::optional<at::Tensor>& mask,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 std::array<bool, 8> output_mask) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g = check_dual_deform_conv2d_args(x, y, offset, weight_x, weight_y, std::nullopt, std::nullopt, mask,
                                                     stride, padding, dilation);
  check_deform_same("x", x, "grad_out_x", grad_out_x);
  check_deform_same("x", x, "grad_out_y", grad_out_y);
  const c10::cuda::CUDAGuard guard(x.device());
  BackwardResult r = backward_cuda(g, {make_branch(x, weight_x), make_branch(y, weight_y)}, {grad_out_x, grad_out_y},
                                   {weight_x, weight_y}, coords_in_place(offset), coords_in_place(mask),
                                   {output_mask[0], output_mask[1]}, {output_mask[3], output_mask[4]}, output_mask[2],
                                   output_mask[7] && mask.has_value());
  return {r.grad_input[0],
          r.grad_input[1],
          r.grad_offset,
          r.grad_weight[0],
          r.grad_weight[1],
          grad_bias(grad_out_x, output_mask[5]),
          grad_bias(grad_out_y, output_mask[6]),
          r.grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(CSFRN_CUDA_LIBRARY, CSFRN_CUDA_KEY, m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cuda);
  m.impl("dual_deform_conv2d", &dual_deform_conv2d_cuda);
  m.impl("dual_deform_conv2d_backward", &dual_deform_conv2d_backward_cuda);
}

#ifdef CSFRN_CUDA_EMU
TORCH_LIBRARY_FRAGMENT(csfrn_emu, m) {
  // Caps the deform kernels' workspace (bytes; 0: the default) in every later call; returns the previous cap.
  m.def("set_deform_workspace_cap(int cap) -> int", &set_deform_workspace_cap);
  // Vector loads on (the default) or off (every later call takes the scalar path); returns the previous setting.
  m.def("set_deform_vector_loads(bool on) -> bool", &set_deform_vector_loads);
  // Channels per lane (1: scalar, 16 bytes' worth: vector) of the last deform call's sampling and gather kernels.
  m.def("deform_vector_width() -> int", &deform_vector_width);
}
#endif

}  // namespace csfrn
