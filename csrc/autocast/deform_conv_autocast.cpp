// Autocast for deformable convolution: under torch.autocast every floating-point argument is cast to one
// dtype and the op runs in it. CUDA: the autocast dtype (float16 or bfloat16; the kernels accumulate in
// float32), not a forced float32. CPU: float32, because the CPU kernels implement float32 and float64 only.
// float64 arguments are left alone, as torch's own autocast does.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace csfrn {
namespace {

template <c10::DeviceType device>
at::ScalarType run_dtype() {
  return device == c10::DeviceType::CUDA ? at::autocast::get_autocast_dtype(device) : at::kFloat;
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor deform_conv2d_autocast(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("csfrn::deform_conv2d", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                               at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  const at::ScalarType dt = run_dtype<device>();
  using at::autocast::cached_cast;
  return op.call(cached_cast(dt, input, device), cached_cast(dt, offset, device), cached_cast(dt, weight, device),
                 cached_cast(dt, bias, device), cached_cast(dt, mask, device), stride, padding, dilation);
}

template <c10::DeviceType device, c10::DispatchKey key>
std::tuple<at::Tensor, at::Tensor> dual_deform_conv2d_autocast(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
    const at::Tensor& weight_y, const std::optional<at::Tensor>& bias_x, const std::optional<at::Tensor>& bias_y,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("csfrn::dual_deform_conv2d", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  const at::ScalarType dt = run_dtype<device>();
  using at::autocast::cached_cast;
  return op.call(cached_cast(dt, x, device), cached_cast(dt, y, device), cached_cast(dt, offset, device),
                 cached_cast(dt, weight_x, device), cached_cast(dt, weight_y, device), cached_cast(dt, bias_x, device),
                 cached_cast(dt, bias_y, device), cached_cast(dt, mask, device), stride, padding, dilation);
}

}  // namespace

TORCH_LIBRARY_IMPL(csfrn, AutocastCUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("dual_deform_conv2d", &dual_deform_conv2d_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(csfrn, AutocastCPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("dual_deform_conv2d", &dual_deform_conv2d_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

}  // namespace csfrn
