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
C10_HOST_DEVICE inline BilinearPoint<acc_t> deform_point(int64_t ho, int64_t wo, int64_t i, int64_t j, int64_t stride_h,
                                                         int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                                         int64_t dil_w, acc_t dy, acc_t dx, int64_t height,
                                                         int64_t width) {
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

// Where an offset or mask [N, C, H_out, W_out] keeps element (n, c, pix = h * W_out + w): at n * n + c * c +
// pix * p. Both layouts the kernels read and write in place have one pixel stride: NCHW-contiguous (c = H_out *
// W_out, p = 1) and channels_last (c = 1, p = C); so have views of them whose rows and columns stay one run of
// pixels, such as a slice of channels (common/deform_conv_launch.h: coord_strides).
struct CoordStrides {
  int64_t n, c, p;
};

// The sampling of one item of the CUDA kernels, item = ((b * pixels + pix) * offset_groups + og) * taps + k for
// image b of the chunk of images at n0: computed once (sample_kernel), then read by every channel of the offset
// group, by both convolutions of the dual op, by the backward's sort and by the input-gradient gather.
template <typename acc_t>
struct DeformSample {
  int64_t pixel[4];  // corner c's pixel b * H * W + y * W + x in the chunk's images; -1 outside (never read)
  acc_t w[4];        // bilinear weight of corner c times the mask; 0 for a point that samples nothing
  acc_t ly, lx;      // the fractional parts (the offset gradient's derivatives)
  acc_t m;           // the mask value, 1 without a mask
};

template <typename acc_t, typename coord_t>
C10_HOST_DEVICE inline DeformSample<acc_t> deform_sample(const KernelGeom& g, int64_t item, int64_t n0,
                                                         const coord_t* offset, CoordStrides os, const coord_t* mask,
                                                         CoordStrides ms) {
  const int64_t k = item % g.taps;
  int64_t t = item / g.taps;
  const int64_t og = t % g.offset_groups;
  t /= g.offset_groups;
  const int64_t pix = t % g.pixels, b = t / g.pixels, n = n0 + b;
  const int64_t offset_at = n * os.n + (og * 2 * g.taps + 2 * k) * os.c + pix * os.p;
  const BilinearPoint<acc_t> pt = deform_point<acc_t>(
      pix / g.w_out, pix % g.w_out, k / g.kw, k % g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w,
      static_cast<acc_t>(offset[offset_at]), static_cast<acc_t>(offset[offset_at + os.c]), g.h, g.w);
  DeformSample<acc_t> s;
  s.m = mask ? static_cast<acc_t>(mask[n * ms.n + (og * g.taps + k) * ms.c + pix * ms.p]) : acc_t(1);
  s.ly = pt.ly;
  s.lx = pt.lx;
  bilinear_weights(pt.ly, pt.lx, pt.inside ? s.m : acc_t(0), s.w);
  for (int c = 0; c < 4; ++c) {
    s.pixel[c] = corner_inside(pt, c, g.h, g.w) ? (b * g.h + pt.y0 + (c >> 1)) * g.w + pt.x0 + (c & 1) : -1;
  }
  return s;
}

}  // namespace csfrn
