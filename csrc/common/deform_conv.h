// Per-element math of deformable convolution, one body for the CPU and the CUDA kernels.
// Semantics of torchvision.ops.deform_conv2d: a point a full pixel or more outside the input samples 0
// (and has zero gradient); otherwise each of the four bilinear corners that lies outside counts as 0.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace csfrn {

// A sampling point: its top-left corner (y0, x0), the fractional parts, and whether it samples anything.
template <typename acc_t>
struct BilinearPoint {
  int64_t y0, x0;
  acc_t ly, lx;
  bool inside;
};

// Where tap (i, j) of output pixel (ho, wo) samples, given its learned shift (dy, dx).
template <typename acc_t>
C10_HOST_DEVICE inline BilinearPoint<acc_t> deform_point(int64_t ho, int64_t wo, int64_t i, int64_t j,
                                                         int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                                         int64_t pad_w, int64_t dil_h, int64_t dil_w, acc_t dy,
                                                         acc_t dx, int64_t height, int64_t width) {
  const acc_t y = static_cast<acc_t>(ho * stride_h - pad_h + i * dil_h) + dy;
  const acc_t x = static_cast<acc_t>(wo * stride_w - pad_w + j * dil_w) + dx;
  BilinearPoint<acc_t> p;
  p.inside = y > acc_t(-1) && y < acc_t(height) && x > acc_t(-1) && x < acc_t(width);
  if (!p.inside) {
    p.y0 = p.x0 = 0;
    p.ly = p.lx = acc_t(0);
    return p;
  }
  const acc_t fy = std::floor(y), fx = std::floor(x);
  p.y0 = static_cast<int64_t>(fy);
  p.x0 = static_cast<int64_t>(fx);
  p.ly = y - fy;
  p.lx = x - fx;
  return p;
}

// Whether corner c (0: (y0,x0), 1: (y0,x0+1), 2: (y0+1,x0), 3: (y0+1,x0+1)) lies inside the input.
template <typename acc_t>
C10_HOST_DEVICE inline bool corner_inside(const BilinearPoint<acc_t>& p, int c, int64_t height, int64_t width) {
  const int64_t y = p.y0 + (c >> 1), x = p.x0 + (c & 1);
  return p.inside && y >= 0 && y < height && x >= 0 && x < width;
}

// Weight of each corner in the sampled value, times `scale` (the modulation mask, 1 without one).
template <typename acc_t>
C10_HOST_DEVICE inline void bilinear_weights(acc_t ly, acc_t lx, acc_t scale, acc_t w[4]) {
  const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
  w[0] = hy * hx * scale;
  w[1] = hy * lx * scale;
  w[2] = ly * hx * scale;
  w[3] = ly * lx * scale;
}

// Sampled value and its derivatives along y and x, from the four corner values (0 for corners outside).
template <typename acc_t>
C10_HOST_DEVICE inline void bilinear_value_grad(acc_t ly, acc_t lx, const acc_t v[4], acc_t& value, acc_t& d_y,
                                                acc_t& d_x) {
  const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
  value = hy * (hx * v[0] + lx * v[1]) + ly * (hx * v[2] + lx * v[3]);
  d_y = hx * (v[2] - v[0]) + lx * (v[3] - v[1]);
  d_x = hy * (v[1] - v[0]) + ly * (v[3] - v[2]);
}

// The numbers of one problem, by value for a kernel: DeformGeom's (common/deform_conv_checks.h), taps and pixels.
struct KernelGeom {
  int64_t h, w, h_out, w_out, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, offset_groups, taps, pixels;
};

// One item of the CUDA kernels, item = ((b * offset_groups + og) * taps + k) * pixels + pix of the chunk of
// images at n0: its sampling, computed once and used by every channel of its offset group.
template <typename acc_t>
struct DeformItem {
  int64_t b, n, og, k, pix;
  int64_t offset_at;  // where its dy is in offset (dx: pixels further), and its grad in the grad of offset
  int64_t mask_at;    // where its value is in the mask, and its grad in the grad of mask
  BilinearPoint<acc_t> pt;
  acc_t m;          // the mask value, 1 without a mask
  acc_t w[4];       // bilinear weights times m
  bool ok[4];       // corner c inside the input (corner_inside)
  int64_t idx[4];   // corner c's index in an H * W plane; 0 when outside
};

template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline DeformItem<acc_t> deform_item(const KernelGeom& g, int64_t it, int64_t n0,
                                                     const scalar_t* offset, const scalar_t* mask) {
  DeformItem<acc_t> d;
  d.pix = it % g.pixels;
  int64_t t = it / g.pixels;
  d.k = t % g.taps;
  t /= g.taps;
  d.og = t % g.offset_groups;
  d.b = t / g.offset_groups;
  d.n = n0 + d.b;
  d.offset_at = ((d.n * g.offset_groups + d.og) * 2 * g.taps + 2 * d.k) * g.pixels + d.pix;
  d.mask_at = ((d.n * g.offset_groups + d.og) * g.taps + d.k) * g.pixels + d.pix;
  d.pt = deform_point<acc_t>(d.pix / g.w_out, d.pix % g.w_out, d.k / g.kw, d.k % g.kw, g.stride_h, g.stride_w,
                             g.pad_h, g.pad_w, g.dil_h, g.dil_w, static_cast<acc_t>(offset[d.offset_at]),
                             static_cast<acc_t>(offset[d.offset_at + g.pixels]), g.h, g.w);
  d.m = mask ? static_cast<acc_t>(mask[d.mask_at]) : acc_t(1);
  bilinear_weights(d.pt.ly, d.pt.lx, d.m, d.w);
  for (int c = 0; c < 4; ++c) {
    d.ok[c] = corner_inside(d.pt, c, g.h, g.w);
    d.idx[c] = d.ok[c] ? (d.pt.y0 + (c >> 1)) * g.w + d.pt.x0 + (c & 1) : 0;
  }
  return d;
}

}  // namespace csfrn
