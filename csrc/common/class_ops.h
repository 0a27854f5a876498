// Per-element math of the class-wise ops, one body for the CPU and the CUDA kernels.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>
#include <limits>

namespace csfrn {

// Slot of a label: its class, -1 when ignored, -2 when out of range (an error the launcher reports with
// validate=True; with validate=False the kernels skip the pixel as they skip an ignored one). Every kernel
// indexes by a slot >= 0 only, so no label value, however large or negative, reaches an address.
C10_HOST_DEVICE inline int64_t label_slot(int64_t label, int64_t num_classes, int64_t ignore_index) {
  if (label == ignore_index) return -1;
  return (label >= 0 && label < num_classes) ? label : -2;
}

// The mean of a class from its feature sum and pixel count; an absent class (count 0) has mean 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t class_mean(acc_t sum, acc_t count) {
  return count > acc_t(0) ? sum / count : acc_t(0);
}

// exp(delta * m): the class-aware margin turns into a per-class scale of the squared distance.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t margin_scale(acc_t margin, acc_t delta) {
  return std::exp(delta * margin);
}

// decay = exp(-dist * scale), dist the squared Euclidean distance; phi = 1 - decay (paper Eq. 2, practical
// form). Decays below the smallest normal number are flushed to zero: such terms vanish to working precision,
// and denormals carried through the CPU sums slow them down a hundredfold. (The CPU kernels compute the same
// decay with a vectorised exp.)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t flush_tiny(acc_t decay) {
  return decay < std::numeric_limits<acc_t>::min() ? acc_t(0) : decay;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t decay_of(acc_t dist, acc_t scale) {
  return flush_tiny(static_cast<acc_t>(std::exp(-dist * scale)));
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t phi_of_decay(acc_t decay) {
  return acc_t(1) - decay;
}

// Backward of phi for an upstream gradient g:
//   w  = dL/d dist                          = g * scale * decay
//   gm = this pixel's share of dL/d margin  = w * dist * delta      (d scale / d margin = delta * scale)
template <typename acc_t>
C10_HOST_DEVICE inline void phi_backward(acc_t g, acc_t decay, acc_t dist, acc_t scale, acc_t delta, acc_t& w,
                                         acc_t& gm) {
  w = g * scale * decay;
  gm = w * dist * delta;
}

}  // namespace csfrn
