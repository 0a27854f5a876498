// Host-side argument checks of deformable convolution, shared by the CPU and CUDA launchers. The words
// match csfrn/ops/_checks.py (check_deform_*), so an error reads alike from the kernel and the reference.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include "common/checks.h"

namespace csfrn {

// Sizes of one deformable convolution problem (shared by both convolutions of the dual op).
struct DeformGeom {
  int64_t n, h, w, h_out, w_out, kh, kw;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t offset_groups;
  int64_t taps() const { return kh * kw; }
  int64_t pixels() const { return h_out * w_out; }
};

// One (input, weight) pair; groups = input channels / weight.size(1).
struct DeformBranch {
  int64_t channels, groups, out_channels;
};

inline DeformBranch check_deform_branch(const char* input_name, const at::Tensor& input, const char* weight_name,
                                        const at::Tensor& weight, const char* bias_name,
                                        const std::optional<at::Tensor>& bias) {
  check_rank(input_name, input, 4, "[N, C_in, H, W]");
  check_floating(input_name, input);
  check_rank(weight_name, weight, 4, "[C_out, C_in / groups, kh, kw]");
  const int64_t c_in = input.size(1), wc = weight.size(1);
  // Both guard divisions below (groups = c_in / wc, then C_out % groups and offset.shape[1] % (2 * kh * kw)):
  // a zero there is a SIGFPE that kills the process, not an error.
  TORCH_CHECK_VALUE(c_in >= 1, input_name, " must have at least one channel, got shape ", shape_str(input));
  TORCH_CHECK_VALUE(weight.size(2) >= 1 && weight.size(3) >= 1, weight_name,
                    " must have a kernel size [kh, kw] of at least [1, 1], got shape ", shape_str(weight));
  TORCH_CHECK_VALUE(wc >= 1 && c_in % wc == 0, weight_name, ".shape[1] (C_in / groups) must divide the ", c_in,
                    " channels of ", input_name, ", got ", weight_name, " shape ", shape_str(weight));
  const int64_t groups = c_in / wc;
  TORCH_CHECK_VALUE(weight.size(0) % groups == 0, weight_name,
                    ".shape[0] (C_out) must be divisible by groups = ", groups, ", got ", weight_name, " shape ",
                    shape_str(weight));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), bias_name, " must be a 1-D tensor of size ",
                      weight.size(0), " (", weight_name, ".shape[0]), got shape ", shape_str(*bias));
  }
  return {c_in, groups, weight.size(0)};
}

inline DeformGeom check_deform_offset(const char* input_name, const at::Tensor& input, const at::Tensor& offset,
                                      const std::optional<at::Tensor>& mask, int64_t kh, int64_t kw,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "stride, padding and dilation must be pairs");
  TORCH_CHECK_VALUE(std::min(stride[0], stride[1]) >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(std::min(padding[0], padding[1]) >= 0, "padding must be >= 0, got ", padding);
  TORCH_CHECK_VALUE(std::min(dilation[0], dilation[1]) >= 1, "dilation must be >= 1, got ", dilation);
  DeformGeom g;
  g.n = input.size(0);
  g.h = input.size(2);
  g.w = input.size(3);
  g.kh = kh;
  g.kw = kw;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  // Floor division, as Python's // (the numerator may be negative).
  auto out_size = [](int64_t in, int64_t pad, int64_t dil, int64_t k, int64_t s) {
    const int64_t num = in + 2 * pad - (dil * (k - 1) + 1);
    return (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  };
  g.h_out = out_size(g.h, g.pad_h, g.dil_h, kh, g.stride_h);
  g.w_out = out_size(g.w, g.pad_w, g.dil_w, kw, g.stride_w);
  TORCH_CHECK_VALUE(g.h_out >= 1 && g.w_out >= 1, "the output size must be positive, got [", g.h_out, ", ", g.w_out,
                    "] from ", input_name, " size [", g.h, ", ", g.w, "], kernel [", kh, ", ", kw, "], stride ", stride,
                    ", padding ", padding, ", dilation ", dilation);
  check_rank("offset", offset, 4, "[N, 2 * offset_groups * kh * kw, H_out, W_out]");
  const int64_t taps = kh * kw, oc = offset.size(1);
  TORCH_CHECK_VALUE(oc >= 1 && oc % (2 * taps) == 0,
                    "offset must have 2 * offset_groups * kh * kw channels, a positive multiple of 2 * ", kh, " * ", kw,
                    " = ", 2 * taps, ", got ", oc);
  g.offset_groups = oc / (2 * taps);
  TORCH_CHECK_VALUE(input.size(1) % g.offset_groups == 0,
                    "offset_groups = offset.shape[1] / (2 * kh * kw) = ", g.offset_groups, " must divide the ",
                    input.size(1), " channels of ", input_name);
  TORCH_CHECK_VALUE(offset.size(0) == g.n, "offset must have batch size ", g.n, " like ", input_name, ", got shape ",
                    shape_str(offset));
  TORCH_CHECK_VALUE(offset.size(2) == g.h_out && offset.size(3) == g.w_out,
                    "offset must have spatial size [H_out, W_out] = [", g.h_out, ", ", g.w_out,
                    "] (the output size), got [", offset.size(2), ", ", offset.size(3), "]");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_rank("mask", m, 4, "[N, offset_groups * kh * kw, H_out, W_out]");
    TORCH_CHECK_VALUE(m.size(1) == g.offset_groups * taps,
                      "mask must have offset_groups * kh * kw = ", g.offset_groups * taps, " channels, got ",
                      m.size(1));
    TORCH_CHECK_VALUE(m.size(0) == g.n, "mask must have batch size ", g.n, " like ", input_name, ", got shape ",
                      shape_str(m));
    TORCH_CHECK_VALUE(m.size(2) == g.h_out && m.size(3) == g.w_out, "mask must have spatial size [H_out, W_out] = [",
                      g.h_out, ", ", g.w_out, "] (the output size), got [", m.size(2), ", ", m.size(3), "]");
  }
  return g;
}

inline void check_deform_same(const char* a, const at::Tensor& ta, const char* b, const at::Tensor& tb) {
  check_same_device(a, ta, b, tb);
  check_same_dtype(a, ta, b, tb);
}

inline void check_deform_same(const char* a, const at::Tensor& ta, const char* b, const std::optional<at::Tensor>& tb) {
  if (tb.has_value()) check_deform_same(a, ta, b, *tb);
}

// The offset and the mask: on the input's device, in its dtype, or in float32 beside a float16 / bfloat16 input
// (what autocast gives on CUDA: sampling positions stay float32); the mask in the offset's dtype.
inline void check_deform_coords(const char* input_name, const at::Tensor& input, const at::Tensor& offset,
                                const std::optional<at::Tensor>& mask) {
  check_same_device(input_name, input, "offset", offset);
  const bool low = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  if (!(low && offset.scalar_type() == at::kFloat)) check_same_dtype(input_name, input, "offset", offset);
  if (mask.has_value()) {
    check_same_device(input_name, input, "mask", *mask);
    check_same_dtype("offset", offset, "mask", *mask);
  }
}

// Whether a kernel's output (and the input's gradient) is channels_last: when the input is channels_last and not
// also contiguous (csfrn/ops/_checks.py: deform_channels_last, for the fake kernels).
inline bool deform_channels_last(const at::Tensor& input) {
  return !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline DeformGeom check_deform_conv2d_args(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_deform_branch("input", input, "weight", weight, "bias", bias);
  DeformGeom g =
      check_deform_offset("input", input, offset, mask, weight.size(2), weight.size(3), stride, padding, dilation);
  check_deform_coords("input", input, offset, mask);
  check_deform_same("input", input, "weight", weight);
  check_deform_same("input", input, "bias", bias);
  return g;
}

inline DeformGeom check_dual_deform_conv2d_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& offset,
                                                const at::Tensor& weight_x, const at::Tensor& weight_y,
                                                const std::optional<at::Tensor>& bias_x,
                                                const std::optional<at::Tensor>& bias_y,
                                                const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_deform_branch("x", x, "weight_x", weight_x, "bias_x", bias_x);
  check_deform_branch("y", y, "weight_y", weight_y, "bias_y", bias_y);
  TORCH_CHECK_VALUE(weight_y.size(2) == weight_x.size(2) && weight_y.size(3) == weight_x.size(3),
                    "weight_y must have the kernel size of weight_x [kh, kw] = [", weight_x.size(2), ", ",
                    weight_x.size(3), "], got [", weight_y.size(2), ", ", weight_y.size(3), "]");
  TORCH_CHECK_VALUE(y.size(0) == x.size(0) && y.size(2) == x.size(2) && y.size(3) == x.size(3),
                    "y must have the batch and spatial size of x [N, H, W] = [", x.size(0), ", ", x.size(2), ", ",
                    x.size(3), "], got shape ", shape_str(y));
  DeformGeom g =
      check_deform_offset("x", x, offset, mask, weight_x.size(2), weight_x.size(3), stride, padding, dilation);
  TORCH_CHECK_VALUE(y.size(1) % g.offset_groups == 0,
                    "offset_groups = offset.shape[1] / (2 * kh * kw) = ", g.offset_groups, " must divide the ",
                    y.size(1), " channels of y");
  check_deform_same("x", x, "y", y);
  check_deform_coords("x", x, offset, mask);
  check_deform_same("x", x, "weight_x", weight_x);
  check_deform_same("x", x, "weight_y", weight_y);
  check_deform_same("x", x, "bias_x", bias_x);
  check_deform_same("x", x, "bias_y", bias_y);
  return g;
}

}  // namespace csfrn
