// Deformable convolution on the CPU, sampling channels-last. Work goes in units of (image, run of output pixels)
// spread over the threads, one parallel region per call. Each thread keeps a zero-padded channels-last copy
// [H + 3][W + 2][C] of its current image, so the four bilinear corners of a sample are four contiguous C-vectors,
// and the columns of a unit are pixel-major [np][groups][taps][C / groups]: filling them, scattering their
// gradient back and the offset / mask gradient sums are plain loops over contiguous channels, which the compiler
// vectorises (the NCHW layout made each of them a gather across planes). The weights are permuted once per call
// to [C_out][kh][kw][C / groups] to match; the matmuls go to BLAS on the unit's thread, one per group, on strided
// views. The backward makes one sampling pass per unit that does all three of columns, scatter and sums.
// The sampling of every (pixel, offset group, tap) is computed once per unit and reused by every channel and by
// both convolutions of the dual op. Memory: a unit's column buffers and samples stay under kTileBytes per thread;
// besides them only the padded image (and its gradient) per thread, no batch-sized buffer.
// The backward is deterministic for a given thread count: a unit runs start to end on one thread, each unit
// writes its own offset / mask gradient pixels, and the weight gradients and the input gradients of images split
// between threads are per-thread partial sums added in a fixed order afterwards.
// Groups of one or two channels loop across the groups of an offset group (strided columns); groups of 3 to 7
// channels take short scalar runs. Small groups are the one shape family where the NCHW kernel this replaced was
// faster (measured up to 1.6x on the forward, 1.5x on forward + backward for 2-channel groups).
// The output and the input's gradient keep the input's memory format (deform_channels_last): a channels_last
// output takes the same matmuls transposed ([pixels, C_out] rows), the gradient the padded buffer's interior as is.
// The offset and the mask are read in place through their strides (common/deform_conv.h: CoordStrides), NCHW or
// channels_last alike (any layout whose pixels are not one run is copied contiguous once), and their gradients are
// written directly in their memory formats: no copy of either on the way in or out.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#include "common/cpu_clones.h"
#include "common/deform_conv.h"
#include "common/deform_conv_checks.h"
#include "common/deform_conv_launch.h"
#include "common/kernel_scope.h"

namespace csfrn {
namespace {

// Column buffers and samples of one tile (all convolutions together) stay under this size.
constexpr int64_t kTileBytes = int64_t(16) << 20;

// Channel runs shorter than this are too short for a vector loop.
constexpr int64_t kShortRun = 8;
// Groups of at most this many channels are looped across (see Segment).
constexpr int64_t kAcrossGroups = 2;

// A run of channels inside one group and one offset group: contiguous in the padded image and, for each tap,
// in a pixel's row of columns, where channel c0 + j of tap k sits at col + k * (C / groups) + j. Groups of one or
// two channels that lie whole in an offset group make one segment instead: count groups of len channels, their
// columns kh * kw * len apart; its loops run across the groups (faster than runs of one or two channels;
// measured slower than scalar runs for four).
struct Segment {
  int64_t c0, len, og, col, count;
};

// One convolution of a (dual) call.
struct Branch {
  at::Tensor input;   // [N, C, H, W], contiguous
  at::Tensor weight;  // [C_out, kh * kw * C / groups]: [C_out][kh][kw][C / groups], the columns' order
  int64_t channels, groups, out_channels;
  bool channels_last;             // the output's and the input gradient's memory format (the input's)
  std::vector<Segment> segments;  // by channel
};

// What the sampling loops need to know of a branch.
struct Layout {
  int64_t channels, per_group, taps, offset_groups, wp;
  const Segment* segs;
  int64_t nseg;
};

// Sampling of one (output pixel, offset group, tap) of a tile. Reads go to a zero-padded copy of the image
// (1 row above, 2 below, 1 column each side): the corners are pixels base, base + 1, base + Wp, base + Wp + 1
// with no bounds checks, corners outside the image read 0 (torchvision's rule), and a point that samples
// nothing gets a base whose four corners are all padding.
template <typename scalar_t>
struct Sample {
  int64_t base;
  scalar_t w[4];  // bilinear weights times the mask
  scalar_t ly, lx, m;
};

void check_cpu_dtype(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                    " must be float32 or float64 on the CPU, got dtype ", t.scalar_type());
}

// Work goes in units = (image, run of output pixels), handed to the threads in contiguous runs (the static
// split of at::parallel_for). A unit runs start to end on one thread, BLAS included (nested parallel regions
// run serially): one parallel region per call, so threads never wait on each other mid-call, which also
// keeps them efficient on a machine shared with other work.
struct Units {
  int64_t pixels, per_image, count;  // output pixels per unit, units per image, units in all
};

// Pixels per unit: the most whose column buffers and samples fit kTileBytes, fewer when the batch alone would
// leave threads idle, then evened out over the image.
Units make_units(const DeformGeom& g, const std::vector<Branch>& branches, int64_t buffers, int64_t elem,
                 int64_t sample_bytes) {
  int64_t rows = 0;
  for (const Branch& b : branches) rows += b.channels * g.taps();
  const int64_t L = g.pixels(), threads = at::get_num_threads();
  const int64_t per_pixel = rows * buffers * elem + g.offset_groups * g.taps() * sample_bytes;
  int64_t most = std::max<int64_t>(64, kTileBytes / std::max<int64_t>(1, per_pixel));
  const int64_t wanted = (threads + g.n - 1) / std::max<int64_t>(1, g.n);
  most = std::min(most, std::max<int64_t>(16, (L + wanted - 1) / wanted));
  const int64_t tiles = (L + most - 1) / most;
  const int64_t pixels = (L + tiles - 1) / tiles;
  const int64_t per_image = (L + pixels - 1) / pixels;
  return {pixels, per_image, g.n * per_image};
}

int64_t padded_width(const DeformGeom& g) { return g.w + 2; }

// A zero channels-last [H + 3][W + 2][C] buffer whose interior receives one image at a time.
at::Tensor padded_buffer(const DeformGeom& g, int64_t channels, const at::TensorOptions& opts) {
  return at::zeros({(g.h + 3) * (g.w + 2) * channels}, opts);
}

Layout layout_of(const DeformGeom& g, const Branch& b) {
  return {b.channels,
          b.channels / b.groups,
          g.taps(),
          g.offset_groups,
          padded_width(g),
          b.segments.data(),
          static_cast<int64_t>(b.segments.size())};
}

// dst[j * dst_stride + i] = src[i * src_stride + j]. Inner loop along dst: each source line then serves the next
// columns from L1/L2 (measured 2x faster than 16 x 16 blocks for C = 512, a power-of-two stride).
template <typename scalar_t>
CSFRN_ALWAYS_INLINE void transpose_impl(const scalar_t* __restrict__ src, int64_t src_stride,
                                        scalar_t* __restrict__ dst, int64_t dst_stride, int64_t rows, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
#pragma omp simd
    for (int64_t i = 0; i < rows; ++i) dst[j * dst_stride + i] = src[i * src_stride + j];
  }
}

// The loops over a run of channels. Runs shorter than kShortRun (a group or offset group of few channels) take
// plain scalar loops: the vector loop's set-up and remainder would cost more than the run.

// o[c] = w0 q0[c] + w1 q1[c] + w2 q2[c] + w3 q3[c]: one channel run of one sample; for a segment of count
// small groups, channel j of group r goes to o[r * stride + j].
template <typename scalar_t>
CSFRN_ALWAYS_INLINE void sample_run(scalar_t* o, const scalar_t* q0, int64_t C, int64_t wpc, const scalar_t* w,
                                    int64_t len, int64_t count, int64_t stride) {
  const scalar_t *q1 = q0 + C, *q2 = q0 + wpc, *q3 = q2 + C;
  const scalar_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  if (count > 1 && len == 1) {
#pragma omp simd
    for (int64_t r = 0; r < count; ++r) o[r * stride] = w0 * q0[r] + w1 * q1[r] + w2 * q2[r] + w3 * q3[r];
    return;
  }
  if (count > 1) {
    for (int64_t j = 0; j < len; ++j) {
#pragma omp simd
      for (int64_t r = 0; r < count; ++r) {
        const int64_t c = r * len + j;
        o[r * stride + j] = w0 * q0[c] + w1 * q1[c] + w2 * q2[c] + w3 * q3[c];
      }
    }
    return;
  }
  if (len < kShortRun) {
    for (int64_t c = 0; c < len; ++c) o[c] = w0 * q0[c] + w1 * q1[c] + w2 * q2[c] + w3 * q3[c];
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) o[c] = w0 * q0[c] + w1 * q1[c] + w2 * q2[c] + w3 * q3[c];
}

// a[j] += sum_c v[c] * corner j [c] (v at r * stride + j for channel j of small group r).
template <typename scalar_t>
CSFRN_ALWAYS_INLINE void dot_run(scalar_t* a, const scalar_t* v, const scalar_t* q0, int64_t C, int64_t wpc,
                                 int64_t len, int64_t count, int64_t stride) {
  const scalar_t *q1 = q0 + C, *q2 = q0 + wpc, *q3 = q2 + C;
  scalar_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  if (count > 1 && len == 1) {
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t x = v[r * stride];
      s0 += x * q0[r];
      s1 += x * q1[r];
      s2 += x * q2[r];
      s3 += x * q3[r];
    }
  } else if (count > 1) {
    for (int64_t j = 0; j < len; ++j) {
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t r = 0; r < count; ++r) {
        const int64_t c = r * len + j;
        const scalar_t x = v[r * stride + j];
        s0 += x * q0[c];
        s1 += x * q1[c];
        s2 += x * q2[c];
        s3 += x * q3[c];
      }
    }
  } else if (len < kShortRun) {
    for (int64_t c = 0; c < len; ++c) {
      s0 += v[c] * q0[c];
      s1 += v[c] * q1[c];
      s2 += v[c] * q2[c];
      s3 += v[c] * q3[c];
    }
  } else {
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t c = 0; c < len; ++c) {
      const scalar_t x = v[c];
      s0 += x * q0[c];
      s1 += x * q1[c];
      s2 += x * q2[c];
      s3 += x * q3[c];
    }
  }
  a[0] += s0;
  a[1] += s1;
  a[2] += s2;
  a[3] += s3;
}

// corner j [c] += w[j] * v[c] (v at r * stride + j for channel j of small group r). The four corner vectors are
// C apart or more, and the run is at most C long: no two overlap.
template <typename scalar_t>
CSFRN_ALWAYS_INLINE void scatter_run(scalar_t* g0, int64_t C, int64_t wpc, const scalar_t* w, const scalar_t* v,
                                     int64_t len, int64_t count, int64_t stride) {
  scalar_t *g1 = g0 + C, *g2 = g0 + wpc, *g3 = g2 + C;
  const scalar_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  if (count > 1 && len == 1) {
#pragma omp simd
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t x = v[r * stride];
      g0[r] += w0 * x;
      g1[r] += w1 * x;
      g2[r] += w2 * x;
      g3[r] += w3 * x;
    }
    return;
  }
  if (count > 1) {
    for (int64_t j = 0; j < len; ++j) {
#pragma omp simd
      for (int64_t r = 0; r < count; ++r) {
        const int64_t c = r * len + j;
        const scalar_t x = v[r * stride + j];
        g0[c] += w0 * x;
        g1[c] += w1 * x;
        g2[c] += w2 * x;
        g3[c] += w3 * x;
      }
    }
    return;
  }
  if (len < kShortRun) {
    for (int64_t c = 0; c < len; ++c) {
      g0[c] += w0 * v[c];
      g1[c] += w1 * v[c];
      g2[c] += w2 * v[c];
      g3[c] += w3 * v[c];
    }
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) {
    const scalar_t x = v[c];
    g0[c] += w0 * x;
    g1[c] += w1 * x;
    g2[c] += w2 * x;
    g3[c] += w3 * x;
  }
}

// cols[p][col(c, k)] = channel c sampled at tap k of pixel p, times the mask.
template <typename scalar_t>
CSFRN_ALWAYS_INLINE void im2col_impl(const Layout& lay, const scalar_t* pad, const Sample<scalar_t>* smp, int64_t np,
                                     scalar_t* cols) {
  const int64_t C = lay.channels, row = C * lay.taps, per_pixel = lay.offset_groups * lay.taps, wpc = lay.wp * C;
  for (int64_t p = 0; p < np; ++p) {
    for (int64_t si = 0; si < lay.nseg; ++si) {
      const Segment sg = lay.segs[si];
      for (int64_t k = 0; k < lay.taps; ++k) {
        const Sample<scalar_t>& s = smp[p * per_pixel + sg.og * lay.taps + k];
        sample_run(cols + p * row + sg.col + k * lay.per_group, pad + s.base * C + sg.c0, C, wpc, s.w, sg.len, sg.count,
                   lay.taps * lay.per_group);
      }
    }
  }
}

// The backward's sampling pass over one unit, each part optional: the columns for the weight gradient (cols),
// the transpose of im2col into the padded input gradient (grad_pad), and acc[item][j] += sum over the item's
// channels of grad_cols * corner j (acc): the sampled value and its derivatives are linear in the corners, so
// these four sums give the offset and mask gradients. One pass reads each corner and grad_cols vector once.
// A unit runs on one thread, in a fixed order: deterministic.
template <typename scalar_t, bool kCols, bool kInput, bool kCoords>
CSFRN_ALWAYS_INLINE void backward_pass_impl(const Layout& lay, const scalar_t* pad, const scalar_t* grad_cols,
                                            const Sample<scalar_t>* smp, int64_t np, scalar_t* cols, scalar_t* grad_pad,
                                            scalar_t* acc) {
  const int64_t C = lay.channels, row = C * lay.taps, per_pixel = lay.offset_groups * lay.taps, wpc = lay.wp * C;
  for (int64_t p = 0; p < np; ++p) {
    for (int64_t si = 0; si < lay.nseg; ++si) {
      const Segment sg = lay.segs[si];
      for (int64_t k = 0; k < lay.taps; ++k) {
        const int64_t item = p * per_pixel + sg.og * lay.taps + k, at = p * row + sg.col + k * lay.per_group;
        const Sample<scalar_t>& s = smp[item];
        const int64_t corner = s.base * C + sg.c0;
        const int64_t stride = lay.taps * lay.per_group;
        if constexpr (kCols) sample_run(cols + at, pad + corner, C, wpc, s.w, sg.len, sg.count, stride);
        if constexpr (kCoords) {
          dot_run(acc + 4 * item, grad_cols + at, pad + corner, C, wpc, sg.len, sg.count, stride);
        }
        if constexpr (kInput) scatter_run(grad_pad + corner, C, wpc, s.w, grad_cols + at, sg.len, sg.count, stride);
      }
    }
  }
}

// backward_pass_impl with the parts whose buffers are given (not null).
template <typename scalar_t>
CSFRN_ALWAYS_INLINE void backward_pass_any(const Layout& lay, const scalar_t* pad, const scalar_t* grad_cols,
                                           const Sample<scalar_t>* smp, int64_t np, scalar_t* cols, scalar_t* grad_pad,
                                           scalar_t* acc) {
  switch ((cols ? 1 : 0) | (grad_pad ? 2 : 0) | (acc ? 4 : 0)) {
#define CSFRN_PASS(M)                                                                                          \
  case M:                                                                                                      \
    backward_pass_impl<scalar_t, (M & 1) != 0, (M & 2) != 0, (M & 4) != 0>(lay, pad, grad_cols, smp, np, cols, \
                                                                           grad_pad, acc);                     \
    break;
    CSFRN_PASS(1)
    CSFRN_PASS(2)
    CSFRN_PASS(3)
    CSFRN_PASS(4)
    CSFRN_PASS(5)
    CSFRN_PASS(6)
    CSFRN_PASS(7)
#undef CSFRN_PASS
    default:
      break;
  }
}

// The clones, one per dtype (target_clones does not take templates).
#define CSFRN_DEFORM_KERNELS(T)                                                                               \
  CSFRN_CPU_CLONES void transpose(const T* src, int64_t ss, T* dst, int64_t ds, int64_t rows, int64_t cols) { \
    transpose_impl(src, ss, dst, ds, rows, cols);                                                             \
  }                                                                                                           \
  CSFRN_CPU_CLONES void im2col(const Layout& lay, const T* pad, const Sample<T>* smp, int64_t np, T* cols) {  \
    im2col_impl(lay, pad, smp, np, cols);                                                                     \
  }                                                                                                           \
  CSFRN_CPU_CLONES void backward_pass(const Layout& lay, const T* pad, const T* gcols, const Sample<T>* smp,  \
                                      int64_t np, T* cols, T* gpad, T* acc) {                                 \
    backward_pass_any(lay, pad, gcols, smp, np, cols, gpad, acc);                                             \
  }
CSFRN_DEFORM_KERNELS(float)
CSFRN_DEFORM_KERNELS(double)
#undef CSFRN_DEFORM_KERNELS

// Image [C, H, W] into the interior of a padded channels-last buffer (ATen's strided copy is fast this way).
void to_channels_last(const DeformGeom& g, const at::Tensor& image, at::Tensor& pad) {
  const int64_t C = image.size(0);
  pad.view({g.h + 3, g.w + 2, C}).narrow(0, 1, g.h).narrow(1, 1, g.w).copy_(image.permute({1, 2, 0}));
}

// The interior of a padded channels-last buffer into an image [C, H, W].
template <typename scalar_t>
void from_channels_last(const DeformGeom& g, const scalar_t* pad, int64_t C, scalar_t* image) {
  const int64_t wp = padded_width(g);
  for (int64_t y = 0; y < g.h; ++y) transpose(pad + ((y + 1) * wp + 1) * C, C, image + y * g.w, g.h * g.w, g.w, C);
}

// Sampling of every item = (p * offset groups + offset group) * taps + tap of the tile [p0, p0 + np) of image n,
// whose offsets and mask start at off_n and mask_n and are read through their strides (in place: NCHW or
// channels_last). Pixels innermost, so (ho, wo) advance without divisions.
template <typename scalar_t>
void compute_samples(const DeformGeom& g, const scalar_t* off_n, CoordStrides os, const scalar_t* mask_n,
                     CoordStrides ms, int64_t p0, int64_t np, Sample<scalar_t>* smp) {
  const int64_t taps = g.taps(), items = g.offset_groups * taps;
  const int64_t wp = padded_width(g), nowhere = (g.h + 1) * wp;
  for (int64_t gk = 0; gk < items; ++gk) {
    const int64_t og = gk / taps, k = gk % taps, i = k / g.kw, j = k % g.kw;
    const scalar_t* dy = off_n + (og * 2 * taps + 2 * k) * os.c;
    const scalar_t* dx = dy + os.c;
    const scalar_t* mk = mask_n ? mask_n + gk * ms.c : nullptr;
    int64_t ho = p0 / g.w_out, wo = p0 % g.w_out;
    for (int64_t pix = p0; pix < p0 + np; ++pix) {
      const BilinearPoint<scalar_t> pt =
          deform_point<scalar_t>(ho, wo, i, j, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w,
                                 dy[pix * os.p], dx[pix * os.p], g.h, g.w);
      Sample<scalar_t>& s = smp[(pix - p0) * items + gk];
      s.m = mk ? mk[pix * ms.p] : scalar_t(1);
      s.base = pt.inside ? (pt.y0 + 1) * wp + pt.x0 + 1 : nowhere;
      s.ly = pt.ly;
      s.lx = pt.lx;
      bilinear_weights(pt.ly, pt.lx, pt.inside ? s.m : scalar_t(0), s.w);
      if (++wo == g.w_out) {
        wo = 0;
        ++ho;
      }
    }
  }
}

// The [np, C * taps] columns of a unit, at the start of a flat buffer.
at::Tensor block(const at::Tensor& flat, int64_t np, int64_t row) {
  return flat.narrow(0, 0, np * row).view({np, row});
}

template <typename scalar_t>
std::vector<at::Tensor> forward_impl(const DeformGeom& g, const std::vector<Branch>& branches,
                                     const std::vector<std::optional<at::Tensor>>& biases, const at::Tensor& offset,
                                     const std::optional<at::Tensor>& mask) {
  const int64_t taps = g.taps(), L = g.pixels();
  const auto opts = offset.options();
  // Every output element is written by one matmul (beta = 0, or the bias copied in by addmm_out): no fill.
  // outs: [N, C_out, L], or [N, L, C_out] for a channels_last output (the same matmuls, transposed).
  std::vector<at::Tensor> outs, bias;
  for (size_t i = 0; i < branches.size(); ++i) {
    const Branch& b = branches[i];
    outs.push_back(b.channels_last ? at::empty({g.n, L, b.out_channels}, opts)
                                   : at::empty({g.n, b.out_channels, L}, opts));
    bias.push_back(biases[i].has_value() ? biases[i]->detach() : at::Tensor());
  }
  if (g.n == 0) return outs;
  const Units u = make_units(g, branches, 1, sizeof(scalar_t), sizeof(Sample<scalar_t>));
  const scalar_t* off = offset.const_data_ptr<scalar_t>();
  const scalar_t* msk = mask.has_value() ? mask->const_data_ptr<scalar_t>() : nullptr;
  const CoordStrides os = coord_strides(offset), ms = coord_strides(mask);
  at::parallel_for(0, u.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<Sample<scalar_t>> smp(g.offset_groups * taps * u.pixels);
    std::vector<at::Tensor> cols, padded;
    for (const Branch& b : branches) {
      cols.push_back(at::empty({b.channels * taps * u.pixels}, opts));
      padded.push_back(padded_buffer(g, b.channels, opts));
    }
    int64_t image = -1;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t n = unit / u.per_image, p0 = (unit % u.per_image) * u.pixels, np = std::min(u.pixels, L - p0);
      if (n != image) {
        for (size_t i = 0; i < branches.size(); ++i) to_channels_last(g, branches[i].input[n], padded[i]);
        image = n;
      }
      compute_samples(g, off + n * os.n, os, msk ? msk + n * ms.n : msk, ms, p0, np, smp.data());
      for (size_t i = 0; i < branches.size(); ++i) {
        const Branch& b = branches[i];
        im2col(layout_of(g, b), padded[i].data_ptr<scalar_t>(), smp.data(), np, cols[i].data_ptr<scalar_t>());
        const at::Tensor c2 = block(cols[i], np, b.channels * taps);
        const int64_t rows = b.channels / b.groups * taps, og = b.out_channels / b.groups;
        for (int64_t gi = 0; gi < b.groups; ++gi) {
          const at::Tensor w = b.weight.narrow(0, gi * og, og), c = c2.narrow(1, gi * rows, rows);
          if (b.channels_last) {  // [np, og] = columns [np, rows] @ w^T
            at::Tensor dst = outs[i][n].narrow(0, p0, np).narrow(1, gi * og, og);
            if (bias[i].defined()) {
              at::addmm_out(dst, bias[i].narrow(0, gi * og, og), c, w.t());
            } else {
              at::mm_out(dst, c, w.t());
            }
            continue;
          }
          at::Tensor dst = outs[i][n].narrow(0, gi * og, og).narrow(1, p0, np);
          if (bias[i].defined()) {
            at::addmm_out(dst, bias[i].narrow(0, gi * og, og).view({og, 1}), w, c.t());
          } else {
            at::mm_out(dst, w, c.t());
          }
        }
      }
    }
  });
  return outs;
}

// Gradients of every branch: input (need_input[i]), weight (need_weight[i]); offset and mask shared.
struct BackwardResult {
  std::vector<at::Tensor> grad_input, grad_weight;
  at::Tensor grad_offset, grad_mask;
};

// What one thread's run of units leaves to add up after the parallel region, in the order of `begin`.
struct PartialGrads {
  int64_t begin;
  std::vector<at::Tensor> grad_weight;                              // per branch
  std::vector<std::pair<int64_t, std::vector<at::Tensor>>> images;  // grad of input of images shared with others
};

template <typename scalar_t>
BackwardResult backward_impl(const DeformGeom& g, const std::vector<Branch>& branches,
                             const std::vector<at::Tensor>& grad_outs, const at::Tensor& offset,
                             const std::optional<at::Tensor>& mask, const std::vector<bool>& need_input,
                             const std::vector<bool>& need_weight, bool need_offset, bool need_mask) {
  const int64_t taps = g.taps(), L = g.pixels(), og_count = g.offset_groups, items = og_count * taps;
  const auto opts = offset.options();
  BackwardResult r;
  const bool need_coords = need_offset || need_mask;
  bool need_grad_cols = need_coords;
  for (size_t i = 0; i < branches.size(); ++i) {
    const Branch& b = branches[i];
    const auto fmt = b.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    r.grad_input.push_back(need_input[i] ? at::empty({g.n, b.channels, g.h, g.w}, opts.memory_format(fmt))
                                         : at::empty({0}, opts));
    r.grad_weight.push_back(need_weight[i] ? at::zeros_like(b.weight) : at::empty({0}, opts));
    need_grad_cols = need_grad_cols || need_input[i];
  }
  // The offset's and the mask's gradients in their memory formats, written there directly (through their strides):
  // every element by the unit of its pixel, no fill (at::zeros would drop the memory format).
  r.grad_offset = need_offset ? at::empty({g.n, items * 2, g.h_out, g.w_out}, opts.memory_format(coords_format(offset)))
                              : at::empty({0}, opts);
  r.grad_mask = need_mask ? at::empty({g.n, items, g.h_out, g.w_out}, opts.memory_format(coords_format(*mask)))
                          : at::empty({0}, opts);
  if (g.n == 0) return r;

  const Units u = make_units(g, branches, 2, sizeof(scalar_t), sizeof(Sample<scalar_t>));
  const scalar_t* off = offset.const_data_ptr<scalar_t>();
  const scalar_t* msk = mask.has_value() ? mask->const_data_ptr<scalar_t>() : nullptr;
  const CoordStrides os = coord_strides(offset), ms = coord_strides(mask);
  const CoordStrides gos = need_offset ? coord_strides(r.grad_offset) : CoordStrides{0, 0, 0};
  const CoordStrides gms = need_mask ? coord_strides(r.grad_mask) : CoordStrides{0, 0, 0};
  std::mutex partial_mutex;
  std::vector<PartialGrads> partials;

  at::parallel_for(0, u.count, 1, [&](int64_t begin, int64_t end) {
    PartialGrads mine{begin, {}, {}};
    std::vector<Sample<scalar_t>> smp(items * u.pixels);
    std::vector<scalar_t> acc;
    std::vector<at::Tensor> cols, grad_cols, padded, grad_padded;
    for (size_t i = 0; i < branches.size(); ++i) {
      const int64_t row = branches[i].channels * taps;
      cols.push_back(need_weight[i] ? at::empty({row * u.pixels}, opts) : at::Tensor());
      grad_cols.push_back(need_grad_cols ? at::empty({row * u.pixels}, opts) : at::Tensor());
      padded.push_back(need_weight[i] || need_coords ? padded_buffer(g, branches[i].channels, opts) : at::Tensor());
      grad_padded.push_back(need_input[i] ? padded_buffer(g, branches[i].channels, opts) : at::Tensor());
      mine.grad_weight.push_back(need_weight[i] ? at::zeros_like(branches[i].weight) : at::Tensor());
    }
    int64_t image = -1;
    // The grad of input of an image goes straight to its place when this run holds all of the image's units;
    // otherwise it is kept and added after the parallel region.
    auto finish_image = [&] {
      if (image < 0) return;
      const bool whole = image * u.per_image >= begin && (image + 1) * u.per_image <= end;
      std::vector<at::Tensor> parts;
      for (size_t i = 0; i < branches.size(); ++i) {
        const int64_t C = branches[i].channels;
        if (!need_input[i]) {
          parts.emplace_back();
          continue;
        }
        at::Tensor dst = whole ? r.grad_input[i][image] : at::empty({C, g.h, g.w}, opts);
        if (dst.is_contiguous()) {
          from_channels_last(g, grad_padded[i].data_ptr<scalar_t>(), C, dst.data_ptr<scalar_t>());
        } else {  // a channels_last input's gradient: the padded buffer's interior as it is
          dst.permute({1, 2, 0}).copy_(grad_padded[i].view({g.h + 3, g.w + 2, C}).narrow(0, 1, g.h).narrow(1, 1, g.w));
        }
        if (!whole) parts.push_back(dst);
      }
      if (!whole) mine.images.emplace_back(image, std::move(parts));
    };
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t n = unit / u.per_image, p0 = (unit % u.per_image) * u.pixels, np = std::min(u.pixels, L - p0);
      if (n != image) {
        finish_image();
        image = n;
        for (size_t i = 0; i < branches.size(); ++i) {
          if (padded[i].defined()) to_channels_last(g, branches[i].input[n], padded[i]);
          if (grad_padded[i].defined()) grad_padded[i].zero_();
        }
      }
      compute_samples(g, off + n * os.n, os, msk ? msk + n * ms.n : msk, ms, p0, np, smp.data());
      if (need_coords) acc.assign(4 * items * np, scalar_t(0));
      for (size_t i = 0; i < branches.size(); ++i) {
        const Branch& b = branches[i];
        const Layout lay = layout_of(g, b);
        const int64_t rows = b.channels / b.groups * taps, og = b.out_channels / b.groups, row = b.channels * taps;
        const at::Tensor gout = grad_outs[i][n].narrow(1, p0, np);  // [C_out, np]
        if (need_grad_cols) {
          const at::Tensor gc = block(grad_cols[i], np, row);
          for (int64_t gi = 0; gi < b.groups; ++gi) {
            at::Tensor dst = gc.narrow(1, gi * rows, rows);
            at::mm_out(dst, gout.narrow(0, gi * og, og).t(), b.weight.narrow(0, gi * og, og));
          }
        }
        backward_pass(lay, padded[i].defined() ? padded[i].data_ptr<scalar_t>() : nullptr,
                      need_grad_cols ? grad_cols[i].data_ptr<scalar_t>() : nullptr, smp.data(), np,
                      need_weight[i] ? cols[i].data_ptr<scalar_t>() : nullptr,
                      need_input[i] ? grad_padded[i].data_ptr<scalar_t>() : nullptr,
                      need_coords ? acc.data() : nullptr);
        if (need_weight[i]) {
          const at::Tensor c2 = block(cols[i], np, row);
          for (int64_t gi = 0; gi < b.groups; ++gi) {
            mine.grad_weight[i]
                .narrow(0, gi * og, og)
                .addmm_(gout.narrow(0, gi * og, og), c2.narrow(1, gi * rows, rows));
          }
        }
      }
      if (need_coords) {
        scalar_t* go = need_offset ? r.grad_offset.data_ptr<scalar_t>() + n * gos.n : nullptr;
        scalar_t* gm = need_mask ? r.grad_mask.data_ptr<scalar_t>() + n * gms.n : nullptr;
        for (int64_t p = 0; p < np; ++p) {
          for (int64_t gk = 0; gk < items; ++gk) {
            const int64_t it = p * items + gk;
            const Sample<scalar_t>& s = smp[it];
            scalar_t value, d_y, d_x;
            bilinear_value_grad(s.ly, s.lx, acc.data() + 4 * it, value, d_y, d_x);
            if (go != nullptr) {
              go[(2 * gk) * gos.c + (p0 + p) * gos.p] = d_y * s.m;
              go[(2 * gk + 1) * gos.c + (p0 + p) * gos.p] = d_x * s.m;
            }
            if (gm != nullptr) gm[gk * gms.c + (p0 + p) * gms.p] = value;
          }
        }
      }
    }
    finish_image();
    const std::lock_guard<std::mutex> lock(partial_mutex);
    partials.push_back(std::move(mine));
  });

  // Add the runs' partial sums in a fixed order: the result does not depend on thread timing.
  std::sort(partials.begin(), partials.end(),
            [](const PartialGrads& a, const PartialGrads& b) { return a.begin < b.begin; });
  std::set<int64_t> written;  // split images: the first part is copied (grad_input starts uninitialised)
  for (const PartialGrads& part : partials) {
    for (size_t i = 0; i < branches.size(); ++i) {
      if (need_weight[i]) r.grad_weight[i].add_(part.grad_weight[i]);
    }
    for (const auto& [n, grads] : part.images) {
      const bool first = written.insert(n).second;
      for (size_t i = 0; i < branches.size(); ++i) {
        if (!need_input[i]) continue;
        if (first) {
          r.grad_input[i][n].copy_(grads[i]);
        } else {
          r.grad_input[i][n].add_(grads[i]);
        }
      }
    }
  }
  return r;
}

// Runs of channels that share a group and an offset group, with their columns.
std::vector<Segment> make_segments(int64_t channels, int64_t groups, int64_t offset_groups, int64_t taps) {
  const int64_t per_group = channels / groups, per_og = channels / offset_groups;
  std::vector<Segment> segs;
  for (int64_t c = 0; c < channels;) {
    const int64_t gi = c / per_group, og = c / per_og;
    const int64_t end = std::min((gi + 1) * per_group, (og + 1) * per_og);
    if (per_group <= kAcrossGroups && per_og % per_group == 0) {  // the rest of the offset group's (whole) groups
      const int64_t count = ((og + 1) * per_og - c) / per_group;
      segs.push_back({c, per_group, og, gi * taps * per_group, count});
      c += count * per_group;
      continue;
    }
    segs.push_back({c, end - c, og, gi * taps * per_group + c - gi * per_group, 1});
    c = end;
  }
  return segs;
}

// Kernels work on detached tensors: the guard against recording autograd history does not reach the worker
// threads, whose matmuls must not record any either.
Branch make_branch(const at::Tensor& input, const at::Tensor& weight, int64_t offset_groups) {
  const int64_t groups = input.size(1) / weight.size(1), taps = weight.size(2) * weight.size(3);
  // Sizes spelled out: view cannot infer a -1 beside a zero size (C_out = 0).
  return {input.detach().contiguous(),
          weight.detach().permute({0, 2, 3, 1}).contiguous().view({weight.size(0), taps * weight.size(1)}),
          input.size(1),
          groups,
          weight.size(0),
          deform_channels_last(input),
          make_segments(input.size(1), groups, offset_groups, taps)};
}

// The weight gradient [C_out, kh * kw * C / groups] back in the weight's [C_out, C / groups, kh, kw] order.
at::Tensor weight_order(const at::Tensor& grad, const at::Tensor& weight, bool needed) {
  if (!needed) return grad;
  return grad.view({weight.size(0), weight.size(2), weight.size(3), weight.size(1)}).permute({0, 3, 1, 2}).contiguous();
}

// A forward's output [N, C_out, H_out, W_out] in the input's memory format.
at::Tensor output_shape(const DeformGeom& g, const Branch& b, const at::Tensor& out) {
  if (b.channels_last) return out.view({g.n, g.h_out, g.w_out, b.out_channels}).permute({0, 3, 1, 2});
  return out.view({g.n, b.out_channels, g.h_out, g.w_out});
}

// Detached (see make_branch). The offset and the mask are not (coords_in_place): they are read only through their
// data pointers, by no ATen call.
at::Tensor plain(const at::Tensor& t) { return t.detach().contiguous(); }

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g = check_deform_conv2d_args(input, offset, weight, bias, mask, stride, padding, dilation);
  check_cpu_dtype("input", input);
  const std::vector<Branch> branches{make_branch(input, weight, g.offset_groups)};
  const auto m = coords_in_place(mask);
  const at::Tensor off = coords_in_place(offset);
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_cpu",
                             [&] { outs = forward_impl<scalar_t>(g, branches, {bias}, off, m); });
  return output_shape(g, branches[0], outs[0]);
}

std::tuple<at::Tensor, at::Tensor> dual_deform_conv2d_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
    const at::Tensor& weight_y, const std::optional<at::Tensor>& bias_x, const std::optional<at::Tensor>& bias_y,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g =
      check_dual_deform_conv2d_args(x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation);
  check_cpu_dtype("x", x);
  const std::vector<Branch> branches{make_branch(x, weight_x, g.offset_groups),
                                     make_branch(y, weight_y, g.offset_groups)};
  const auto m = coords_in_place(mask);
  const at::Tensor off = coords_in_place(offset);
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dual_deform_conv2d_cpu",
                             [&] { outs = forward_impl<scalar_t>(g, branches, {bias_x, bias_y}, off, m); });
  return {output_shape(g, branches[0], outs[0]), output_shape(g, branches[1], outs[1])};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 5> output_mask) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g = check_deform_conv2d_args(input, offset, weight, std::nullopt, mask, stride, padding, dilation);
  check_cpu_dtype("input", input);
  check_deform_same("input", input, "grad_out", grad_out);
  const std::vector<Branch> branches{make_branch(input, weight, g.offset_groups)};
  const auto m = coords_in_place(mask);
  const at::Tensor off = coords_in_place(offset);
  const at::Tensor go = plain(grad_out).view({g.n, weight.size(0), g.pixels()});
  BackwardResult r;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    r = backward_impl<scalar_t>(g, branches, {go}, off, m, {output_mask[0]}, {output_mask[2]}, output_mask[1],
                                output_mask[4] && mask.has_value());
  });
  return {r.grad_input[0], r.grad_offset, weight_order(r.grad_weight[0], weight, output_mask[2]),
          grad_bias(grad_out, output_mask[3]), r.grad_mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dual_deform_conv2d_backward_cpu(const at::Tensor& grad_out_x, const at::Tensor& grad_out_y, const at::Tensor& x,
                                const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
                                const at::Tensor& weight_y, const std::optional<at::Tensor>& mask,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                std::array<bool, 8> output_mask) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g = check_dual_deform_conv2d_args(x, y, offset, weight_x, weight_y, std::nullopt, std::nullopt, mask,
                                                     stride, padding, dilation);
  check_cpu_dtype("x", x);
  check_deform_same("x", x, "grad_out_x", grad_out_x);
  check_deform_same("x", x, "grad_out_y", grad_out_y);
  const std::vector<Branch> branches{make_branch(x, weight_x, g.offset_groups),
                                     make_branch(y, weight_y, g.offset_groups)};
  const auto m = coords_in_place(mask);
  const at::Tensor off = coords_in_place(offset);
  const at::Tensor gx = plain(grad_out_x).view({g.n, weight_x.size(0), g.pixels()});
  const at::Tensor gy = plain(grad_out_y).view({g.n, weight_y.size(0), g.pixels()});
  BackwardResult r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dual_deform_conv2d_backward_cpu", [&] {
    r = backward_impl<scalar_t>(g, branches, {gx, gy}, off, m, {output_mask[0], output_mask[1]},
                                {output_mask[3], output_mask[4]}, output_mask[2], output_mask[7] && mask.has_value());
  });
  return {r.grad_input[0],
          r.grad_input[1],
          r.grad_offset,
          weight_order(r.grad_weight[0], weight_x, output_mask[3]),
          weight_order(r.grad_weight[1], weight_y, output_mask[4]),
          grad_bias(grad_out_x, output_mask[5]),
          grad_bias(grad_out_y, output_mask[6]),
          r.grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(csfrn, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
  m.impl("dual_deform_conv2d", &dual_deform_conv2d_cpu);
  m.impl("dual_deform_conv2d_backward", &dual_deform_conv2d_backward_cpu);
}

}  // namespace csfrn
