// Host-side tail of the center_distance backward on the GPU (the CPU kernel fuses it into its chunk loop). Given
// w[n,k,p] = dL/d dist (a tensor the size of phi), the embedding and centre gradients are two batched matmuls:
//   grad_s = -2 (w e^T - s * sum_p w),   grad_e = 2 (e * sum_k w - s^T w),
// so no [N, K, D, P] tensor is ever made. The caller (a launcher) holds a KernelScope: no autocast here.
#pragma once
#include <ATen/ATen.h>

namespace csfrn {

inline std::tuple<at::Tensor, at::Tensor> distance_grads_from_weights(const at::Tensor& w, const at::Tensor& embeddings,
                                                                     const at::Tensor& centers, bool need_e,
                                                                     bool need_s) {
  const auto opts = embeddings.options();
  at::Tensor grad_e = at::empty({0}, opts), grad_s = at::empty({0}, opts);
  if (!need_e && !need_s) return {grad_e, grad_s};
  const int64_t N = embeddings.size(0), D = embeddings.size(1);
  // P spelled out: reshape cannot infer a -1 beside a zero size (empty batch, D = 0).
  const at::Tensor e = embeddings.to(w.scalar_type()).reshape({N, D, w.size(2)});
  const at::Tensor s = centers.to(w.scalar_type());
  // baddbmm folds the scaling and the subtraction into the matmul: one elementwise pass each. No centres
  // (K = 0): the embedding gradient is zero; the formula would give e * 0, NaN where an embedding is inf.
  if (need_e && w.size(1) == 0)
    grad_e = at::zeros(embeddings.sizes(), opts);
  else if (need_e)
    grad_e = at::baddbmm(e * w.sum(1, /*keepdim=*/true), s.transpose(1, 2), w, /*beta=*/2, /*alpha=*/-2)
                 .to(embeddings.scalar_type())
                 .reshape(embeddings.sizes());
  if (need_s)
    grad_s = at::baddbmm(s * w.sum(2, /*keepdim=*/true), w, e.transpose(1, 2), /*beta=*/2, /*alpha=*/-2)
                 .to(centers.scalar_type());
  return {grad_e, grad_s};
}

}  // namespace csfrn
