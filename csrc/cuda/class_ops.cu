// CUDA kernels of the class-wise ops. No atomics anywhere: every sum has a fixed order, so results are
// deterministic. Per-element math comes from common/class_ops.h, which the CPU tests exercise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/launch.h"

#include <algorithm>

#include "common/class_ops.h"
#include "common/class_ops_checks.h"
#include "common/cuda_helpers.cuh"
#include "common/kernel_scope.h"

namespace csfrn {
namespace {

// ---- class_avg_pool forward: O(N * P * (D + 1)) work, no atomics, a fixed summation order ----
// A block takes units (image n, chunk of pixels, tile of channels) and sums, per class, the unit's channels and the
// pixel count in shared memory:
//   1. the slots of kPoolTile pixels, and their features [channels][kPoolTile], are staged in shared memory, read
//      along pixels (NCHW) or along channels (channels_last): coalesced either way;
//   2. thread (copy g, role r) adds the staged values of pixels g, g + copies, ... to acc[g][slot][r] (role r ==
//      channels adds 1: the count). Every accumulator has one owner thread, so no atomics and a fixed order;
//   3. the copies are summed in order into the unit's partial sums, or, with one chunk per image, into the means
//      and counts.
// class_pool_reduce_kernel sums the chunks in order. The plan (class_pool_plan) takes few chunks: enough units to
// fill the GPU, at least 256 pixels each, and a partial buffer N * chunks * K * (D + 1) at most half the features.
// When not even one channel's accumulators fit in shared memory (K in the thousands), class_pool_global_kernel
// walks every image with one thread per (n, channel) into a global [N, K, D + 1] buffer instead.
constexpr int kPoolTile = 64;           // pixels staged per step
constexpr int64_t kPoolMinChunk = 256;  // pixels per chunk, at least
constexpr int kPoolMaxCopies = 8;

struct PoolPlan {
  int64_t channels;  // per unit (the last tile may have fewer)
  int64_t dtiles;    // channel tiles per image
  int64_t copies;    // accumulator copies per block
  int64_t chunk;     // pixels per chunk, a multiple of kPoolTile
  int64_t nchunks;   // chunks per image
  size_t smem;       // dynamic shared memory, bytes
  bool shared;       // false: class_pool_global_kernel
};

size_t class_pool_smem(int64_t K, int64_t channels, int64_t copies, size_t acc_bytes) {
  return (copies * K * (channels + 1) + channels * (kPoolTile + 1)) * acc_bytes + kPoolTile * sizeof(int);
}

PoolPlan class_pool_plan(int64_t N, int64_t D, int64_t P, int64_t K, size_t acc_bytes) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const size_t budget = prop->sharedMemPerBlock;  // 48 KiB: no opt-in needed
  PoolPlan plan{0, 1, 1, 0, 1, 0, false};
  // Channel tiles: as few as fit (channels + 1 roles per copy <= kThreads).
  for (int64_t dtiles = std::max<int64_t>(1, (D + kThreads - 2) / (kThreads - 1));; ++dtiles) {
    const int64_t ch = (D + dtiles - 1) / dtiles;
    if (class_pool_smem(K, ch, 1, acc_bytes) <= budget) {
      plan.channels = ch;
      break;
    }
    if (ch <= 1) return plan;  // K too large for shared memory
  }
  plan.dtiles = plan.channels > 0 ? (D + plan.channels - 1) / plan.channels : 1;
  const int64_t row = K * (plan.channels + 1) * static_cast<int64_t>(acc_bytes);
  const int64_t room =
      static_cast<int64_t>(budget) - static_cast<int64_t>(class_pool_smem(K, plan.channels, 0, acc_bytes));
  plan.copies = std::max<int64_t>(1, std::min<int64_t>({kThreads / (plan.channels + 1), room / row, kPoolMaxCopies}));
  int64_t nchunks = (4 * prop->multiProcessorCount + N * plan.dtiles - 1) / (N * plan.dtiles);
  nchunks = std::min(nchunks, (P + kPoolMinChunk - 1) / kPoolMinChunk);
  nchunks = std::min(nchunks, P * std::max<int64_t>(D, 1) / (2 * K * (D + 1)));
  nchunks = std::max<int64_t>(1, nchunks);
  plan.chunk = ((P + nchunks - 1) / nchunks + kPoolTile - 1) / kPoolTile * kPoolTile;
  plan.nchunks = (P + plan.chunk - 1) / plan.chunk;
  plan.smem = class_pool_smem(K, plan.channels, plan.copies, acc_bytes);
  plan.shared = true;
  return plan;
}

template <typename scalar_t, typename acc_t>
__global__ void class_pool_shared_kernel(const scalar_t* __restrict__ f, const int64_t* __restrict__ labels,
                                         acc_t* __restrict__ partial, scalar_t* __restrict__ means,
                                         acc_t* __restrict__ counts, int64_t N, int64_t D, int64_t P, int64_t K,
                                         int64_t ignore_index, int64_t sn, int64_t sc, int64_t sp, PoolPlan plan) {
  const int64_t S = plan.channels + 1, copies = plan.copies;
  acc_t* acc = dynamic_shared<acc_t>();                                        // [copies][K][S]
  acc_t* tile = acc + copies * K * S;                                          // [channels][kPoolTile + 1]
  int* slot = reinterpret_cast<int*>(tile + plan.channels * (kPoolTile + 1));  // [kPoolTile]
  // Block-local indices are ints: a 64-bit division costs tens of instructions on a GPU.
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int g = tid / static_cast<int>(S), r = tid % static_cast<int>(S);  // copy g, role r
  const bool along_pixels = !(sc == 1 && sp != 1);
  const int64_t units = N * plan.nchunks * plan.dtiles;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t t = u % plan.dtiles, c = (u / plan.dtiles) % plan.nchunks, n = u / (plan.dtiles * plan.nchunks);
    const int64_t d0 = t * plan.channels;
    const int dn = static_cast<int>(min(plan.channels, D - d0));  // this unit's channels; row dn counts
    const int64_t p_end = min(P, (c + 1) * plan.chunk);
    const scalar_t* fn = f + n * sn + d0 * sc;
    const int64_t* ln = labels + n * P;
    for (int64_t i = tid; i < copies * K * S; i += nthreads) acc[i] = acc_t(0);
    for (int64_t q0 = c * plan.chunk; q0 < p_end; q0 += kPoolTile) {
      const int np = static_cast<int>(min(int64_t(kPoolTile), p_end - q0));
      __syncthreads();  // acc zeroed, the previous tile consumed
      for (int i = tid; i < np; i += nthreads) slot[i] = static_cast<int>(label_slot(ln[q0 + i], K, ignore_index));
      for (int e = tid; e < dn * np; e += nthreads) {
        const int d = along_pixels ? e / np : e % dn, p = along_pixels ? e % np : e / dn;
        tile[d * (kPoolTile + 1) + p] = static_cast<acc_t>(fn[d * sc + (q0 + p) * sp]);
      }
      __syncthreads();
      if (g < copies && r <= dn) {
        acc_t* a = acc + g * K * S + r;
        const acc_t* v = tile + r * (kPoolTile + 1);
        for (int p = g; p < np; p += static_cast<int>(copies)) {
          const int s = slot[p];
          if (s >= 0) a[s * S] += r < dn ? v[p] : acc_t(1);
        }
      }
    }
    __syncthreads();
    for (int i = tid; i < K * S; i += nthreads) {
      const int k = i / static_cast<int>(S), j = i % static_cast<int>(S);
      if (j > dn || (j == dn && t != 0)) continue;  // the count is written by the first tile only
      acc_t sum = 0, count = 0;
      for (int64_t h = 0; h < copies; ++h) {
        sum += acc[(h * K + k) * S + j];
        count += acc[(h * K + k) * S + dn];
      }
      if (plan.nchunks > 1)
        partial[((n * plan.nchunks + c) * K + k) * (D + 1) + (j == dn ? D : d0 + j)] = sum;
      else if (j == dn)
        counts[n * K + k] = count;
      else
        means[(n * K + k) * D + d0 + j] = static_cast<scalar_t>(class_mean(sum, count));
    }
    __syncthreads();  // before the next unit zeroes acc
  }
}

// Thread (n, j): every pixel of image n in order, into column j of partial[n] ([K][D + 1]; j == D counts), which
// it zeroes first: it owns that column, so partial needs no fill.
template <typename scalar_t, typename acc_t>
__global__ void class_pool_global_kernel(const scalar_t* __restrict__ f, const int64_t* __restrict__ labels,
                                         acc_t* __restrict__ partial, int64_t N, int64_t D, int64_t P, int64_t K,
                                         int64_t ignore_index, int64_t sn, int64_t sc, int64_t sp) {
  CSFRN_KERNEL_LOOP(t, N * (D + 1)) {
    const int64_t j = t % (D + 1), n = t / (D + 1);
    acc_t* row = partial + n * K * (D + 1) + j;
    for (int64_t k = 0; k < K; ++k) row[k * (D + 1)] = acc_t(0);
    const int64_t* ln = labels + n * P;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t s = label_slot(ln[p], K, ignore_index);
      if (s >= 0) row[s * (D + 1)] += j < D ? static_cast<acc_t>(f[n * sn + j * sc + p * sp]) : acc_t(1);
    }
  }
}

// Thread (n, k, j), j fastest: sums the chunks of partial [N][nchunks][K][D + 1] in order; writes the means and
// (j == D) the counts.
template <typename scalar_t, typename acc_t>
__global__ void class_pool_reduce_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ means,
                                         acc_t* __restrict__ counts, int64_t N, int64_t D, int64_t K, int64_t nchunks) {
  CSFRN_KERNEL_LOOP(t, N * K * (D + 1)) {
    const int64_t j = t % (D + 1), nk = t / (D + 1), n = nk / K, k = nk % K;
    acc_t sum = 0, count = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      const acc_t* row = partial + ((n * nchunks + c) * K + k) * (D + 1);
      sum += row[j];
      count += row[D];
    }
    if (j == D)
      counts[nk] = count;
    else
      means[nk * D + j] = static_cast<scalar_t>(class_mean(sum, count));
  }
}

// Divides by the exact counts in acc_t: a half count is inf above 65504, a bfloat16 one is rounded above 256.
template <typename scalar_t, typename acc_t>
__global__ void class_pool_backward_kernel(const scalar_t* __restrict__ grad_means, const acc_t* __restrict__ counts,
                                           const int64_t* __restrict__ labels, scalar_t* __restrict__ grad, int64_t N,
                                           int64_t D, int64_t P, int64_t K, int64_t ignore_index) {
  CSFRN_KERNEL_LOOP(t, N * D * P) {
    const int64_t p = t % P, d = (t / P) % D, n = t / (P * D);
    const int64_t k = label_slot(labels[n * P + p], K, ignore_index);
    grad[t] = k < 0 ? scalar_t(0)
                    : static_cast<scalar_t>(static_cast<acc_t>(grad_means[(n * K + k) * D + d]) / counts[n * K + k]);
  }
}

// Thread (n, k, p), p fastest: coalesced embedding reads, the centre is a broadcast.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t squared_distance(const scalar_t* __restrict__ e, const scalar_t* __restrict__ s,
                                                  int64_t D, int64_t sc) {
  acc_t dist = 0;
  for (int64_t d = 0; d < D; ++d) {
    const acc_t t = static_cast<acc_t>(e[d * sc]) - static_cast<acc_t>(s[d]);
    dist += t * t;
  }
  return dist;
}

template <typename scalar_t, typename acc_t>
__global__ void center_distance_kernel(const scalar_t* __restrict__ e, const scalar_t* __restrict__ s,
                                       const scalar_t* __restrict__ m, scalar_t* __restrict__ phi, int64_t N, int64_t D,
                                       int64_t P, int64_t K, acc_t delta, int64_t sn, int64_t sc, int64_t sp) {
  CSFRN_KERNEL_LOOP(t, N * K * P) {
    const int64_t p = t % P, nk = t / P, n = nk / K;
    const acc_t dist = squared_distance<scalar_t, acc_t>(e + n * sn + p * sp, s + nk * D, D, sc);
    phi[t] = static_cast<scalar_t>(phi_of_decay(decay_of(dist, margin_scale(static_cast<acc_t>(m[nk]), delta))));
  }
}

// Backward, launch 1 of 3. Thread (n, k, p): w = dL/d dist and (gm non-null) gm = the pixel's share of dL/d margin.
template <typename scalar_t, typename acc_t>
__global__ void center_distance_weights_kernel(const scalar_t* __restrict__ grad_phi, const scalar_t* __restrict__ e,
                                               const scalar_t* __restrict__ s, const scalar_t* __restrict__ m,
                                               acc_t* __restrict__ w, acc_t* __restrict__ gm, int64_t N, int64_t D,
                                               int64_t P, int64_t K, acc_t delta, int64_t sn, int64_t sc, int64_t sp) {
  CSFRN_KERNEL_LOOP(t, N * K * P) {
    const int64_t p = t % P, nk = t / P, n = nk / K;
    const acc_t dist = squared_distance<scalar_t, acc_t>(e + n * sn + p * sp, s + nk * D, D, sc);
    const acc_t scale = margin_scale(static_cast<acc_t>(m[nk]), delta);
    acc_t wt, gmt;
    phi_backward(static_cast<acc_t>(grad_phi[t]), decay_of(dist, scale), dist, scale, delta, wt, gmt);
    w[t] = wt;
    if (gm != nullptr) gm[t] = gmt;
  }
}

// Launch 2 of 3. Thread (n, d, p), p fastest (coalesced w reads, the centre a broadcast): the embedding gradient
//   grad_e[n, d, p] = 2 sum_k w[n, k, p] (e[n, d, p] - s[n, k, d]),
// k in order, written in the output dtype ([N, D, H, W] contiguous). K = 0 gives 0 (no inf * 0).
template <typename scalar_t, typename acc_t>
__global__ void center_distance_grad_e_kernel(const acc_t* __restrict__ w, const scalar_t* __restrict__ e,
                                              const scalar_t* __restrict__ s, scalar_t* __restrict__ grad_e, int64_t N,
                                              int64_t D, int64_t P, int64_t K, int64_t sn, int64_t sc, int64_t sp) {
  CSFRN_KERNEL_LOOP(t, N * D * P) {
    const int64_t p = t % P, nd = t / P, d = nd % D, n = nd / D;
    const acc_t ev = static_cast<acc_t>(e[n * sn + d * sc + p * sp]);
    const acc_t* wp = w + n * K * P + p;
    const scalar_t* sd = s + n * K * D + d;
    acc_t acc = 0;
    for (int64_t k = 0; k < K; ++k) acc += wp[k * P] * (ev - static_cast<acc_t>(sd[k * D]));
    grad_e[t] = static_cast<scalar_t>(acc_t(2) * acc);
  }
}

// The sum of v over the block (blockDim.x a multiple of 32), in a fixed order: lanes by shuffles, then warps in
// order through red[blockDim.x / 32]. The result is valid on thread 0; the caller syncs before reusing red.
constexpr int kWarp = 32;

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* red) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0)
    for (int i = 0; i < static_cast<int>(blockDim.x) / kWarp; ++i) total += red[i];
  return total;
}

// Launch 3 of 3. A block (of min(kThreads, P rounded up to a warp) threads) per unit (n, k, j) for j in [j0, j1),
// its threads striding over the pixels:
//   j <  D: grad_s[n, k, j] = -2 sum_p w[n, k, p] (e[n, j, p] - s[n, k, j])
//   j == D: grad_m[n, k]    = sum_p gm[n, k, p]
// then one fixed-order block sum: no atomics, one owner per output.
template <typename scalar_t, typename acc_t>
__global__ void center_distance_center_grads_kernel(const acc_t* __restrict__ w, const acc_t* __restrict__ gm,
                                                    const scalar_t* __restrict__ e, const scalar_t* __restrict__ s,
                                                    scalar_t* __restrict__ grad_s, scalar_t* __restrict__ grad_m,
                                                    int64_t N, int64_t D, int64_t P, int64_t K, int64_t j0, int64_t j1,
                                                    int64_t sn, int64_t sc, int64_t sp) {
  __shared__ acc_t red[kThreads / kWarp];
  const int64_t J = j1 - j0;
  for (int64_t u = blockIdx.x; u < N * K * J; u += gridDim.x) {
    const int64_t j = j0 + u % J, nk = u / J, n = nk / K;
    const acc_t* wk = w + nk * P;
    acc_t a = 0;
    if (j < D) {
      const acc_t centre = static_cast<acc_t>(s[nk * D + j]);
      const scalar_t* ej = e + n * sn + j * sc;
      for (int64_t p = threadIdx.x; p < P; p += blockDim.x) a += wk[p] * (static_cast<acc_t>(ej[p * sp]) - centre);
    } else {
      const acc_t* gk = gm + nk * P;
      for (int64_t p = threadIdx.x; p < P; p += blockDim.x) a += gk[p];
    }
    a = block_sum(a, red);
    if (threadIdx.x == 0) {
      if (j < D)
        grad_s[nk * D + j] = static_cast<scalar_t>(acc_t(-2) * a);
      else
        grad_m[nk] = static_cast<scalar_t>(a);
    }
    __syncthreads();  // red is read before the next unit writes it
  }
}

void check_labels_cuda(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  // One device-to-host sync: a wrong label must be an error naming the value, not a silent skip.
  const at::Tensor bad = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(num_classes)));
  if (bad.any().item<bool>()) fail_bad_label(labels.masked_select(bad)[0].item<int64_t>(), num_classes, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> class_avg_pool_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                       int64_t num_classes, int64_t ignore_index, bool validate) {
  const KernelScope kernel_scope;  // ATen calls inside: no autograd history, no autocast
  check_class_avg_pool_args(features, labels, num_classes);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t N = features.size(0), D = features.size(1), K = num_classes;
  // Every element of both is written by the last kernel below (absent classes: mean 0, count 0), so no fill.
  at::Tensor means = at::empty({N, K, D}, features.options());
  // counts in the accumulation type (float32 for half and bfloat16), exact for the backward
  at::Tensor counts = at::empty({N, K}, features.options().dtype(at::toOpMathType(features.scalar_type())));
  if (N == 0) return {means, counts};
  // Without validate, no sync: the kernels skip bad labels' pixels (label_slot -2) as they skip ignored ones.
  if (validate) check_labels_cuda(labels, K, ignore_index);
  const int64_t P = features.size(2) * features.size(3);
  if (P == 0) return {means.zero_(), counts.zero_()};  // no pixels: no kernel runs
  const PixelView fv = pixel_view(features);
  const at::Tensor lab = labels.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "class_avg_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const PoolPlan plan = class_pool_plan(N, D, P, K, sizeof(acc_t));
    const scalar_t* f = fv.t.const_data_ptr<scalar_t>();
    at::Tensor partial;
    if (plan.shared) {
      if (plan.nchunks > 1) partial = at::empty({N, plan.nchunks, K, D + 1}, features.options().dtype(acc_type));
      CSFRN_LAUNCH(std::min<int64_t>(N * plan.nchunks * plan.dtiles, kMaxBlocks), kThreads, plan.smem, stream,
                   class_pool_shared_kernel<scalar_t, acc_t>)(
          f, lab.const_data_ptr<int64_t>(), plan.nchunks > 1 ? partial.data_ptr<acc_t>() : nullptr,
          means.data_ptr<scalar_t>(), counts.data_ptr<acc_t>(), N, D, P, K, ignore_index, fv.sn, fv.sc, fv.sp, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (plan.nchunks == 1) return;
    } else {
      partial = at::empty({N, 1, K, D + 1}, features.options().dtype(acc_type));  // zeroed by its kernel
      CSFRN_LAUNCH(blocks_for(N * (D + 1)), kThreads, 0, stream, class_pool_global_kernel<scalar_t, acc_t>)(
          f, lab.const_data_ptr<int64_t>(), partial.data_ptr<acc_t>(), N, D, P, K, ignore_index, fv.sn, fv.sc, fv.sp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    CSFRN_LAUNCH(blocks_for(N * K * (D + 1)), kThreads, 0, stream, class_pool_reduce_kernel<scalar_t, acc_t>)(
        partial.const_data_ptr<acc_t>(), means.data_ptr<scalar_t>(), counts.data_ptr<acc_t>(), N, D, K,
        partial.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {means, counts};
}

at::Tensor class_avg_pool_backward_cuda(const at::Tensor& grad_means, const at::Tensor& labels,
                                        const at::Tensor& counts, int64_t ignore_index) {
  const KernelScope kernel_scope;  // ATen calls inside: no autograd history, no autocast
  c10::cuda::CUDAGuard guard(grad_means.device());
  const int64_t N = grad_means.size(0), K = grad_means.size(1), D = grad_means.size(2);
  const int64_t H = labels.size(1), W = labels.size(2), P = H * W;
  at::Tensor grad = at::empty({N, D, H, W}, grad_means.options());
  if (grad.numel() == 0) return grad;
  const at::Tensor g = grad_means.contiguous(), lab = labels.contiguous();
  const at::Tensor cnt = counts.to(at::toOpMathType(grad_means.scalar_type())).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_means.scalar_type(), "class_avg_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        CSFRN_LAUNCH(blocks_for(grad.numel()), kThreads, 0, stream, class_pool_backward_kernel<scalar_t, acc_t>)(
            g.const_data_ptr<scalar_t>(), cnt.const_data_ptr<acc_t>(), lab.const_data_ptr<int64_t>(),
            grad.data_ptr<scalar_t>(), N, D, P, K, ignore_index);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad;
}

at::Tensor center_distance_cuda(const at::Tensor& embeddings, const at::Tensor& centers, const at::Tensor& margins,
                                double delta) {
  const KernelScope kernel_scope;  // ATen calls inside: no autograd history, no autocast
  check_center_distance_args(embeddings, centers, margins);
  c10::cuda::CUDAGuard guard(embeddings.device());
  const int64_t N = embeddings.size(0), D = embeddings.size(1), H = embeddings.size(2), W = embeddings.size(3);
  const int64_t P = H * W, K = centers.size(1);
  at::Tensor phi = at::empty({N, K, H, W}, embeddings.options());
  if (phi.numel() == 0) return phi;
  const PixelView ev = pixel_view(embeddings);
  const at::Tensor s = centers.contiguous(), m = margins.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(), "center_distance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    CSFRN_LAUNCH(blocks_for(phi.numel()), kThreads, 0, stream, center_distance_kernel<scalar_t, acc_t>)(
        ev.t.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
        phi.data_ptr<scalar_t>(), N, D, P, K, static_cast<acc_t>(delta), ev.sn, ev.sc, ev.sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return phi;
}

// Three launches, whatever the output mask (fewer when it asks for less): w (and the margin terms) per (n, k, p);
// the embedding gradient per (n, d, p); the centre and margin gradients as one block sum per (n, k, channel).
// Two buffers the size of phi in the accumulation type, no fill, no cast pass: every output is written in its
// dtype by the kernel that owns it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> center_distance_backward_cuda(const at::Tensor& grad_phi,
                                                                             const at::Tensor& embeddings,
                                                                             const at::Tensor& centers,
                                                                             const at::Tensor& margins, double delta,
                                                                             std::array<bool, 3> output_mask) {
  const KernelScope kernel_scope;  // ATen calls inside: no autograd history, no autocast
  c10::cuda::CUDAGuard guard(embeddings.device());
  const int64_t N = embeddings.size(0), D = embeddings.size(1), H = embeddings.size(2), W = embeddings.size(3);
  const int64_t P = H * W, K = centers.size(1);
  const bool need_e = output_mask[0], need_s = output_mask[1], need_m = output_mask[2];
  const auto opts = embeddings.options();
  at::Tensor grad_e = need_e ? at::empty({N, D, H, W}, opts) : at::empty({0}, opts);
  at::Tensor grad_s = need_s ? at::empty({N, K, D}, centers.options()) : at::empty({0}, centers.options());
  at::Tensor grad_m = need_m ? at::empty({N, K}, margins.options()) : at::empty({0}, margins.options());
  if (!need_e && !need_s && !need_m) return {grad_e, grad_s, grad_m};
  const auto acc_type = at::toOpMathType(embeddings.scalar_type());
  const PixelView ev = pixel_view(embeddings);
  const at::Tensor g = grad_phi.contiguous(), s = centers.contiguous(), m = margins.contiguous();
  at::Tensor w = at::empty({N, K, P}, opts.dtype(acc_type));
  at::Tensor gm = need_m ? at::empty({N, K, P}, opts.dtype(acc_type)) : at::empty({0}, opts.dtype(acc_type));
  // the units of launch 3: channels j < D for the centre gradient, j == D for the margin gradient
  const int64_t j0 = need_s ? 0 : D, j1 = need_m ? D + 1 : D;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, embeddings.scalar_type(), "center_distance_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* e = ev.t.const_data_ptr<scalar_t>();
        const scalar_t* sp = s.const_data_ptr<scalar_t>();
        acc_t* wp = w.data_ptr<acc_t>();
        if (w.numel() > 0) {
          CSFRN_LAUNCH(blocks_for(w.numel()), kThreads, 0, stream, center_distance_weights_kernel<scalar_t, acc_t>)(
              g.const_data_ptr<scalar_t>(), e, sp, m.const_data_ptr<scalar_t>(), wp,
              need_m ? gm.data_ptr<acc_t>() : nullptr, N, D, P, K, static_cast<acc_t>(delta), ev.sn, ev.sc, ev.sp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (need_e && grad_e.numel() > 0) {  // K = 0 included: zeros
          CSFRN_LAUNCH(blocks_for(grad_e.numel()), kThreads, 0, stream, center_distance_grad_e_kernel<scalar_t, acc_t>)(
              wp, e, sp, grad_e.data_ptr<scalar_t>(), N, D, P, K, ev.sn, ev.sc, ev.sp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        const int64_t units = N * K * (j1 - j0);
        if (units > 0) {  // P = 0 included: zeros
          // as many threads as pixels, in whole warps, up to kThreads: small images leave no idle warps
          const int threads = static_cast<int>(std::clamp<int64_t>((P + kWarp - 1) / kWarp * kWarp, kWarp, kThreads));
          CSFRN_LAUNCH(static_cast<unsigned int>(std::min(units, kMaxBlocks)), threads, 0, stream,
                       center_distance_center_grads_kernel<scalar_t, acc_t>)(
              wp, need_m ? gm.data_ptr<acc_t>() : nullptr, e, sp, need_s ? grad_s.data_ptr<scalar_t>() : nullptr,
              need_m ? grad_m.data_ptr<scalar_t>() : nullptr, N, D, P, K, j0, j1, ev.sn, ev.sc, ev.sp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {grad_e, grad_s, grad_m};
}

}  // namespace

TORCH_LIBRARY_IMPL(CSFRN_CUDA_LIBRARY, CSFRN_CUDA_KEY, m) {
  m.impl("class_avg_pool", &class_avg_pool_cuda);
  m.impl("class_avg_pool_backward", &class_avg_pool_backward_cuda);
  m.impl("center_distance", &center_distance_cuda);
  m.impl("center_distance_backward", &center_distance_backward_cuda);
}

}  // namespace csfrn
