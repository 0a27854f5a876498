// Per-element math of deformable convolution, one body for the CPU and the CUDA kernels.
// Semantics of torchvision.ops.deform_conv2d: a point a full pixel or more outside the input samples 0
// (and has zero gradient); otherwise each of the four bilinear corners that lies outside counts as 0.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace csfrn {

// One bilinear sample in an H x W plane: flat indices of the corners (y0,x0) (y0,x1) (y1,x0) (y1,x1)
// (0 for a corner outside, so reads stay in bounds), 1/0 validity of each, and the fractional parts.
template <typename acc_t>
struct BilinearSample {
  int64_t idx[4];
  acc_t valid[4];
  acc_t ly, lx;
};

// Where tap (i, j) of output pixel (ho, wo) samples, given its learned shift (dy, dx).
template <typename acc_t>
C10_HOST_DEVICE inline void deform_position(int64_t ho, int64_t wo, int64_t i, int64_t j, int64_t stride_h,
                                            int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                            int64_t dil_w, acc_t dy, acc_t dx, acc_t& y, acc_t& x) {
  y = static_cast<acc_t>(ho * stride_h - pad_h + i * dil_h) + dy;
  x = static_cast<acc_t>(wo * stride_w - pad_w + j * dil_w) + dx;
}

template <typename acc_t>
C10_HOST_DEVICE inline void bilinear_setup(acc_t y, acc_t x, int64_t height, int64_t width, BilinearSample<acc_t>& s) {
  if (!(y > acc_t(-1) && y < acc_t(height) && x > acc_t(-1) && x < acc_t(width))) {
    for (int c = 0; c < 4; ++c) {
      s.idx[c] = 0;
      s.valid[c] = acc_t(0);
    }
    s.ly = s.lx = acc_t(0);
    return;
  }
  const acc_t fy = std::floor(y), fx = std::floor(x);
  const int64_t y0 = static_cast<int64_t>(fy), x0 = static_cast<int64_t>(fx);
  s.ly = y - fy;
  s.lx = x - fx;
  const bool vy0 = y0 >= 0, vy1 = y0 + 1 < height, vx0 = x0 >= 0, vx1 = x0 + 1 < width;
  const bool ok[4] = {vy0 && vx0, vy0 && vx1, vy1 && vx0, vy1 && vx1};
  const int64_t at[4] = {y0 * width + x0, y0 * width + x0 + 1, (y0 + 1) * width + x0, (y0 + 1) * width + x0 + 1};
  for (int c = 0; c < 4; ++c) {
    s.idx[c] = ok[c] ? at[c] : 0;
    s.valid[c] = ok[c] ? acc_t(1) : acc_t(0);
  }
}

// Weight of each corner in the sampled value, times `scale` (the modulation mask, 1 without one).
template <typename acc_t>
C10_HOST_DEVICE inline void bilinear_weights(const BilinearSample<acc_t>& s, acc_t scale, acc_t w[4]) {
  const acc_t hy = acc_t(1) - s.ly, hx = acc_t(1) - s.lx;
  w[0] = hy * hx * s.valid[0] * scale;
  w[1] = hy * s.lx * s.valid[1] * scale;
  w[2] = s.ly * hx * s.valid[2] * scale;
  w[3] = s.ly * s.lx * s.valid[3] * scale;
}

// Sampled value and its derivatives along y and x from the four corner values `v` (already read at s.idx).
template <typename acc_t>
C10_HOST_DEVICE inline void bilinear_value_grad(const BilinearSample<acc_t>& s, const acc_t v_raw[4], acc_t& value,
                                                acc_t& d_y, acc_t& d_x) {
  acc_t v[4];
  for (int c = 0; c < 4; ++c) v[c] = v_raw[c] * s.valid[c];
  const acc_t hy = acc_t(1) - s.ly, hx = acc_t(1) - s.lx;
  value = hy * (hx * v[0] + s.lx * v[1]) + s.ly * (hx * v[2] + s.lx * v[3]);
  d_y = hx * (v[2] - v[0]) + s.lx * (v[3] - v[1]);
  d_x = hy * (v[1] - v[0]) + s.ly * (v[3] - v[2]);
}

}  // namespace csfrn
