// Per-element math of the class-wise ops, one body for the CPU and the CUDA kernels.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace csfrn {

// Slot of a label: its class, -1 when ignored, -2 when out of range (an error the launcher reports).
C10_HOST_DEVICE inline int64_t label_slot(int64_t label, int64_t num_classes, int64_t ignore_index) {
  if (label == ignore_index) return -1;
  return (label >= 0 && label < num_classes) ? label : -2;
}

// exp(delta * m): the class-aware margin turns into a per-class scale of the squared distance.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t margin_scale(acc_t margin, acc_t delta) {
  return std::exp(delta * margin);
}

// phi = 1 - exp(-dist * scale), dist the squared Euclidean distance (paper Eq. 2, practical form).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t phi_of(acc_t dist, acc_t scale) {
  return acc_t(1) - std::exp(-dist * scale);
}

// Backward of phi for an upstream gradient g:
//   w  = d L / d dist  = g * scale * exp(-dist * scale)
//   gm = d L / d margin contribution of this pixel = w * dist * delta
template <typename acc_t>
C10_HOST_DEVICE inline void phi_backward(acc_t g, acc_t dist, acc_t scale, acc_t delta, acc_t& w, acc_t& gm) {
  w = g * scale * std::exp(-dist * scale);
  gm = w * dist * delta;
}

}  // namespace csfrn
