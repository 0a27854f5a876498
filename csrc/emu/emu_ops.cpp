// The test-only library of the CUDA emulation (see cuda_emu.h): the csfrn op schemas again, in namespace
// csfrn_emu, whose CPU kernels are csrc/cuda/*.cu compiled by the host compiler; and the emulation's test hooks.
// Built by tests/cuda_emu.py, never by setup.py.
#include <torch/library.h>

#include "autocast/deform_conv_autocast.h"
#include "emu/cuda_emu.h"
#include "op_schemas.h"

TORCH_LIBRARY(csfrn_emu, m) {
  for (const char* schema : csfrn::kOpSchemas) m.def(schema);
  // Runs at most `cap` blocks along x in every later launch (0: no cap); returns the previous cap.
  m.def("set_grid_x_cap(int cap) -> int", &csfrn::emu::set_grid_x_cap);
  // The number of kernel launches so far (the launches a GPU would run; refused ones do not count).
  m.def("launch_count() -> int", &csfrn::emu::launch_count);
}

namespace {
struct EmuOps {
  static constexpr const char* single = "csfrn_emu::deform_conv2d";
  static constexpr const char* dual = "csfrn_emu::dual_deform_conv2d";
};
constexpr auto kCUDA = c10::DeviceType::CUDA;
constexpr auto kCPU = c10::DeviceType::CPU;
}  // namespace

// CUDA's autocast rule for the emulated deform convs, on CPU tensors under torch.autocast("cpu"): the emulated
// CUDA kernels then run in the autocast dtype with float32 offsets and mask, as on a GPU.
TORCH_LIBRARY_IMPL(csfrn_emu, AutocastCPU, m) {
  m.impl("deform_conv2d", &csfrn::deform_conv2d_autocast<EmuOps, kCUDA, kCPU, c10::DispatchKey::AutocastCPU>);
  m.impl("dual_deform_conv2d", &csfrn::dual_deform_conv2d_autocast<EmuOps, kCUDA, kCPU, c10::DispatchKey::AutocastCPU>);
}
