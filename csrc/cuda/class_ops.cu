// CUDA kernels of the class-wise ops. No atomics anywhere: every sum has a fixed order, so results are
// deterministic. Per-element math comes from common/class_ops.h, which the CPU tests exercise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/launch.h"

#include <algorithm>

#include "common/checks.h"
#include "common/class_ops.h"
#include "common/distance_grads.h"
#include "common/kernel_scope.h"

namespace csfrn {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20));
}

#define CSFRN_GRID_STRIDE(i, total) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (total); i += int64_t(blockDim.x) * gridDim.x)

// Thread (n, chunk, d, k), k fastest: a warp's threads read the same feature and label (broadcast) and
// each sums the pixels of its class k in pixel order. Slot d == D counts pixels.
template <typename scalar_t, typename acc_t>
__global__ void class_pool_partial_kernel(const scalar_t* __restrict__ f, const int64_t* __restrict__ labels,
                                          acc_t* __restrict__ partial, int64_t N, int64_t D, int64_t P, int64_t K,
                                          int64_t chunk, int64_t nchunks, int64_t ignore_index, int64_t sn,
                                          int64_t sc, int64_t sp) {
  const int64_t D1 = D + 1;
  const int64_t total = N * nchunks * D1 * K;
  CSFRN_GRID_STRIDE(t, total) {
    const int64_t k = t % K, d = (t / K) % D1, c = (t / (K * D1)) % nchunks, n = t / (K * D1 * nchunks);
    const int64_t p0 = c * chunk, p1 = min(P, p0 + chunk);
    const int64_t* ln = labels + n * P;
    const scalar_t* fd = f + n * sn + d * sc;
    acc_t acc = 0;
    for (int64_t p = p0; p < p1; ++p) {
      if (label_slot(ln[p], K, ignore_index) != k) continue;
      acc += d < D ? static_cast<acc_t>(fd[p * sp]) : acc_t(1);
    }
    partial[t] = acc;
  }
}

// Thread (n, d, k): sums the chunks in order; writes means (and counts, exact in acc_t, from slot D).
template <typename scalar_t, typename acc_t>
__global__ void class_pool_reduce_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ means,
                                         acc_t* __restrict__ counts, int64_t N, int64_t D, int64_t K,
                                         int64_t nchunks) {
  const int64_t D1 = D + 1;
  CSFRN_GRID_STRIDE(t, N * D1 * K) {
    const int64_t k = t % K, d = (t / K) % D1, n = t / (K * D1);
    acc_t sum = 0, count = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      const acc_t* base = partial + ((n * nchunks + c) * D1) * K + k;
      sum += base[d * K];
      count += base[D * K];
    }
    if (d == D)
      counts[n * K + k] = count;
    else
      means[(n * K + k) * D + d] = static_cast<scalar_t>(count > 0 ? sum / count : acc_t(0));
  }
}

// Divides by the exact counts in acc_t: a half count is inf above 65504, a bfloat16 one is rounded above 256.
template <typename scalar_t, typename acc_t>
__global__ void class_pool_backward_kernel(const scalar_t* __restrict__ grad_means, const acc_t* __restrict__ counts,
                                           const int64_t* __restrict__ labels, scalar_t* __restrict__ grad,
                                           int64_t N, int64_t D, int64_t P, int64_t K, int64_t ignore_index) {
  CSFRN_GRID_STRIDE(t, N * D * P) {
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
                                       const scalar_t* __restrict__ m, scalar_t* __restrict__ phi, int64_t N,
                                       int64_t D, int64_t P, int64_t K, acc_t delta, int64_t sn, int64_t sc,
                                       int64_t sp) {
  CSFRN_GRID_STRIDE(t, N * K * P) {
    const int64_t p = t % P, nk = t / P, n = nk / K;
    const acc_t dist = squared_distance<scalar_t, acc_t>(e + n * sn + p * sp, s + nk * D, D, sc);
    phi[t] = static_cast<scalar_t>(phi_of_decay(decay_of(dist, margin_scale(static_cast<acc_t>(m[nk]), delta))));
  }
}

// w = dL/d dist and gm = the pixel's share of dL/d margin, for every (n, k, p).
template <typename scalar_t, typename acc_t>
__global__ void center_distance_weights_kernel(const scalar_t* __restrict__ grad_phi, const scalar_t* __restrict__ e,
                                               const scalar_t* __restrict__ s, const scalar_t* __restrict__ m,
                                               acc_t* __restrict__ w, acc_t* __restrict__ gm, int64_t N, int64_t D,
                                               int64_t P, int64_t K, acc_t delta, int64_t sn, int64_t sc,
                                               int64_t sp) {
  CSFRN_GRID_STRIDE(t, N * K * P) {
    const int64_t p = t % P, nk = t / P, n = nk / K;
    const acc_t dist = squared_distance<scalar_t, acc_t>(e + n * sn + p * sp, s + nk * D, D, sc);
    const acc_t scale = margin_scale(static_cast<acc_t>(m[nk]), delta);
    phi_backward(static_cast<acc_t>(grad_phi[t]), decay_of(dist, scale), dist, scale, delta, w[t], gm[t]);
  }
}

void check_labels_cuda(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  // One device-to-host sync: a wrong label must be an error naming the value, not a silent skip.
  const at::Tensor bad = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(num_classes)));
  if (bad.any().item<bool>()) fail_bad_label(labels.masked_select(bad)[0].item<int64_t>(), num_classes, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> class_avg_pool_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                       int64_t num_classes, int64_t ignore_index) {
  const KernelScope kernel_scope;  // ATen calls inside: no autograd history, no autocast
  check_class_avg_pool_args(features, labels, num_classes);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t N = features.size(0), D = features.size(1), P = features.size(2) * features.size(3);
  const int64_t K = num_classes;
  at::Tensor means = at::zeros({N, K, D}, features.options());
  // counts in the accumulation type (float32 for half and bfloat16), exact for the backward
  at::Tensor counts = at::zeros({N, K}, features.options().dtype(at::toOpMathType(features.scalar_type())));
  if (N == 0) return {means, counts};
  check_labels_cuda(labels, K, ignore_index);
  const PixelView fv = pixel_view(features);
  const at::Tensor lab = labels.contiguous();
  // Enough chunks to fill the GPU, at most 64 partial buffers per image.
  const int64_t chunk = std::max<int64_t>(256, (P + 63) / 64), nchunks = std::max<int64_t>(1, (P + chunk - 1) / chunk);
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "class_avg_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor partial = at::empty({N, nchunks, D + 1, K}, features.options().dtype(acc_type));
    const int64_t total = partial.numel();
    CSFRN_LAUNCH(blocks_for(total), kThreads, 0, stream, class_pool_partial_kernel<scalar_t, acc_t>)(
        fv.t.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), partial.data_ptr<acc_t>(), N, D, P, K,
        chunk, nchunks, ignore_index, fv.sn, fv.sc, fv.sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    CSFRN_LAUNCH(blocks_for(N * (D + 1) * K), kThreads, 0, stream, class_pool_reduce_kernel<scalar_t, acc_t>)(
        partial.const_data_ptr<acc_t>(), means.data_ptr<scalar_t>(), counts.data_ptr<acc_t>(), N, D, K, nchunks);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_means.scalar_type(), "class_avg_pool_backward_cuda",
                                  [&] {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> center_distance_backward_cuda(
    const at::Tensor& grad_phi, const at::Tensor& embeddings, const at::Tensor& centers, const at::Tensor& margins,
    double delta, std::array<bool, 3> output_mask) {
  const KernelScope kernel_scope;  // ATen calls inside: no autograd history, no autocast
  c10::cuda::CUDAGuard guard(embeddings.device());
  const int64_t N = embeddings.size(0), D = embeddings.size(1), H = embeddings.size(2), W = embeddings.size(3);
  const int64_t P = H * W, K = centers.size(1);
  const auto opts = embeddings.options();
  const auto acc_type = embeddings.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const PixelView ev = pixel_view(embeddings);
  const at::Tensor g = grad_phi.contiguous(), s = centers.contiguous(), m = margins.contiguous();
  // w = dL/d dist and gm (the margin gradient's terms) for every (n, k, p), the size of phi.
  at::Tensor w = at::empty({N, K, P}, opts.dtype(acc_type)), gm = at::empty({N, K, P}, opts.dtype(acc_type));
  if (w.numel() > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embeddings.scalar_type(),
                                    "center_distance_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      CSFRN_LAUNCH(blocks_for(w.numel()), kThreads, 0, stream, center_distance_weights_kernel<scalar_t, acc_t>)(
          g.const_data_ptr<scalar_t>(), ev.t.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
          m.const_data_ptr<scalar_t>(), w.data_ptr<acc_t>(), gm.data_ptr<acc_t>(), N, D, P, K,
          static_cast<acc_t>(delta), ev.sn, ev.sc, ev.sp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto [grad_e, grad_s] = distance_grads_from_weights(w, embeddings, centers, output_mask[0], output_mask[1]);
  at::Tensor grad_m = output_mask[2] ? gm.sum(2).to(margins.scalar_type()) : at::empty({0}, margins.options());
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
