// Host-side helpers of the deformable convolution launchers, shared by the CPU and CUDA ones.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include "common/deform_conv.h"
#include "common/deform_conv_checks.h"

namespace csfrn {

// Whether the kernels can address an offset or mask [N, C, H_out, W_out] t as it is (common/deform_conv.h:
// CoordStrides): its rows and columns form one run of pixels of a single stride. True for NCHW-contiguous and
// channels_last tensors, and for views of them such as a slice of channels; false for, e.g., H and W swapped.
inline bool pixels_collapse(const at::Tensor& t) {
  return t.size(2) <= 1 || t.size(3) <= 1 || t.stride(2) == t.size(3) * t.stride(3);
}

// The strides the kernels address t with (pixels_collapse(t) must hold).
inline CoordStrides coord_strides(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(pixels_collapse(t), "an offset or mask whose pixels are not one run: ", t.strides());
  const int64_t p = t.size(3) > 1 ? t.stride(3) : (t.size(2) > 1 ? t.stride(2) : 1);
  return {t.stride(0), t.stride(1), p};
}

// The strides of an optional tensor (the mask), zeros when absent (never read then).
inline CoordStrides coord_strides(const std::optional<at::Tensor>& t) {
  return t.has_value() ? coord_strides(*t) : CoordStrides{0, 0, 0};
}

// An offset or mask as the kernels read it: itself where its pixels are one run (NCHW, channels_last: no copy),
// else copied contiguous once. The kernels read it only through its data pointer.
inline at::Tensor coords_in_place(const at::Tensor& t) { return pixels_collapse(t) ? t : t.contiguous(); }

inline std::optional<at::Tensor> coords_in_place(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(coords_in_place(*t)) : std::nullopt;
}

// The memory format of the offset's (mask's) gradient: the offset's (mask's), by the rule of the output and the
// input (deform_channels_last): channels_last when the tensor is channels_last and not also contiguous.
inline at::MemoryFormat coords_format(const at::Tensor& t) {
  return deform_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The bias gradient: grad_out [N, C_out, H_out, W_out] summed over all but C_out; an empty tensor when not needed.
inline at::Tensor grad_bias(const at::Tensor& grad_out, bool needed) {
  return needed ? grad_out.sum({0, 2, 3}) : at::empty({0}, grad_out.options());
}

}  // namespace csfrn
