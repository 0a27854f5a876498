// Autocast of csfrn's deformable convolutions (the rule: autocast/deform_conv_autocast.h).
#include <torch/library.h>

#include "autocast/deform_conv_autocast.h"

namespace csfrn {
namespace {

struct CsfrnOps {
  static constexpr const char* single = "csfrn::deform_conv2d";
  static constexpr const char* dual = "csfrn::dual_deform_conv2d";
};

constexpr auto kCUDA = c10::DeviceType::CUDA;
constexpr auto kCPU = c10::DeviceType::CPU;

}  // namespace

TORCH_LIBRARY_IMPL(csfrn, AutocastCUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_autocast<CsfrnOps, kCUDA, kCUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("dual_deform_conv2d", &dual_deform_conv2d_autocast<CsfrnOps, kCUDA, kCUDA, c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(csfrn, AutocastCPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_autocast<CsfrnOps, kCPU, kCPU, c10::DispatchKey::AutocastCPU>);
  m.impl("dual_deform_conv2d", &dual_deform_conv2d_autocast<CsfrnOps, kCPU, kCPU, c10::DispatchKey::AutocastCPU>);
}

}  // namespace csfrn
