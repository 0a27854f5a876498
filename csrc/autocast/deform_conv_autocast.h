// Autocast for deformable convolution: under torch.autocast the input, weights and biases are cast to the dtype
// the kernels run in, the offset and mask to the dtype positions are computed in. CUDA: the autocast dtype
// (float16 or bfloat16; the kernels accumulate in float32), with offset and mask in float32 (bfloat16 would
// quantise a sampling position at 97 px to about 1/64 px). CPU: float32 for all, the CPU kernels' own.
// float64 arguments are left alone, as torch's own autocast does. csfrn/ops/deform_conv.py (autocast_dtype) runs
// the reference twins by the same rule.
#pragma once
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace csfrn {

// The dtype an argument runs in under autocast to `amp` by the rule of device `rule`; `coords`: offset or mask.
inline at::ScalarType deform_autocast_dtype(c10::DeviceType rule, bool coords, at::ScalarType amp) {
  return rule == c10::DeviceType::CUDA && !coords ? amp : at::kFloat;
}

// The wrappers, for ops Ops::single / Ops::dual, casting tensors on `device` by `rule`'s rule, below `key`.
template <typename Ops, c10::DeviceType rule, c10::DeviceType device, c10::DispatchKey key>
at::Tensor deform_conv2d_autocast(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(Ops::single, "")
          .template typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                     at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  const at::ScalarType amp = at::autocast::get_autocast_dtype(device);
  const at::ScalarType dt = deform_autocast_dtype(rule, false, amp), ct = deform_autocast_dtype(rule, true, amp);
  using at::autocast::cached_cast;
  return op.call(cached_cast(dt, input, device), cached_cast(ct, offset, device), cached_cast(dt, weight, device),
                 cached_cast(dt, bias, device), cached_cast(ct, mask, device), stride, padding, dilation);
}

template <typename Ops, c10::DeviceType rule, c10::DeviceType device, c10::DispatchKey key>
std::tuple<at::Tensor, at::Tensor> dual_deform_conv2d_autocast(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
    const at::Tensor& weight_y, const std::optional<at::Tensor>& bias_x, const std::optional<at::Tensor>& bias_y,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(Ops::dual, "")
          .template typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  const at::ScalarType amp = at::autocast::get_autocast_dtype(device);
  const at::ScalarType dt = deform_autocast_dtype(rule, false, amp), ct = deform_autocast_dtype(rule, true, amp);
  using at::autocast::cached_cast;
  return op.call(cached_cast(dt, x, device), cached_cast(dt, y, device), cached_cast(ct, offset, device),
                 cached_cast(dt, weight_x, device), cached_cast(dt, weight_y, device), cached_cast(dt, bias_x, device),
                 cached_cast(dt, bias_y, device), cached_cast(ct, mask, device), stride, padding, dilation);
}

}  // namespace csfrn
