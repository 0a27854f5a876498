// Host-side helpers of the deformable convolution launchers, shared by the CPU and CUDA ones.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace csfrn {

// An optional tensor (a bias or the mask) made contiguous, when present.
inline std::optional<at::Tensor> contiguous_if_present(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// The bias gradient: grad_out [N, C_out, H_out, W_out] summed over all but C_out; an empty tensor when not needed.
inline at::Tensor grad_bias(const at::Tensor& grad_out, bool needed) {
  return needed ? grad_out.sum({0, 2, 3}) : at::empty({0}, grad_out.options());
}

}  // namespace csfrn
