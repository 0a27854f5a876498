// Deformable convolution on the CPU. Work goes in units of (image, run of output pixels) spread over the
// threads, one parallel region per call. In a unit the sampling of every (offset group, tap, pixel) is
// computed once and reused by every channel of the group and by both convolutions of the dual op; the
// column block [C_in * kh * kw, unit pixels] stays under kTileBytes per thread (no batch-sized buffer;
// besides it only a zero-padded copy of one image per thread); the matmuls go to BLAS on the unit's thread.
// The backward is deterministic for a given thread count: each unit writes its own offset / mask gradient
// pixels, and the weight gradients and the input gradients of images split between threads are per-thread
// partial sums added in a fixed order afterwards.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

#include "common/deform_conv.h"
#include "common/deform_conv_checks.h"

namespace csfrn {
namespace {

// Column buffers of one tile (all convolutions together) stay under this size.
constexpr int64_t kTileBytes = int64_t(16) << 20;

// One convolution of a (dual) call.
struct Branch {
  at::Tensor input;   // [N, C, H, W], contiguous
  at::Tensor weight;  // [C_out, C / groups * kh * kw], contiguous
  int64_t channels, groups, out_channels;
};

// Sampling of one (offset group, tap, output pixel) of a tile. Reads go to a zero-padded copy of the
// image (1 row above, 2 below, 1 column each side): the four corners are base, base + 1, base + Wp and
// base + Wp + 1 with no bounds checks, corners outside the image read 0 (torchvision's rule), and a point
// that samples nothing gets a base whose four corners are all padding.
template <typename scalar_t>
struct Sample {
  int64_t base;
  scalar_t w[4];  // bilinear weights times the mask
  scalar_t ly, lx, m;
};

// Channels handled together per sample read: the sampling is loaded once for all of them.
constexpr int64_t kChannelBlock = 8;

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

// Pixels per unit: the most whose column buffers fit kTileBytes, fewer when the batch alone would leave
// threads idle, then evened out over the image.
Units make_units(const DeformGeom& g, const std::vector<Branch>& branches, int64_t buffers, int64_t elem) {
  int64_t rows = 0;
  for (const Branch& b : branches) rows += b.channels * g.taps();
  const int64_t L = g.pixels(), threads = at::get_num_threads();
  int64_t most = std::max<int64_t>(64, kTileBytes / std::max<int64_t>(1, rows * buffers * elem));
  const int64_t wanted = (threads + g.n - 1) / std::max<int64_t>(1, g.n);
  most = std::min(most, std::max<int64_t>(16, (L + wanted - 1) / wanted));
  const int64_t tiles = (L + most - 1) / most;
  const int64_t pixels = (L + tiles - 1) / tiles;
  const int64_t per_image = (L + pixels - 1) / pixels;
  return {pixels, per_image, g.n * per_image};
}

int64_t padded_width(const DeformGeom& g) { return g.w + 2; }
int64_t padded_plane(const DeformGeom& g) { return (g.h + 3) * (g.w + 2); }

// A zero [C, H + 3, W + 2] buffer whose interior receives one image at a time.
at::Tensor padded_buffer(const DeformGeom& g, int64_t channels, const at::TensorOptions& opts) {
  return at::zeros({channels, g.h + 3, g.w + 2}, opts);
}

at::Tensor interior(const at::Tensor& padded, const DeformGeom& g) {
  return padded.narrow(1, 1, g.h).narrow(2, 1, g.w);
}

// Sampling of every item = (offset group * taps + tap) * np + p of the tile [p0, p0 + np) of image n.
template <typename scalar_t>
void compute_samples(const DeformGeom& g, const scalar_t* off_n, const scalar_t* mask_n, int64_t p0, int64_t np,
                     Sample<scalar_t>* smp) {
  const int64_t taps = g.taps(), L = g.pixels(), wp = padded_width(g), nowhere = (g.h + 1) * wp;
  at::parallel_for(0, g.offset_groups * taps * np, 512, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t p = it % np, gk = it / np, k = gk % taps, og = gk / taps;
      const int64_t pix = p0 + p;
      const BilinearPoint<scalar_t> pt = deform_point<scalar_t>(
          pix / g.w_out, pix % g.w_out, k / g.kw, k % g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h,
          g.dil_w, off_n[(og * 2 * taps + 2 * k) * L + pix], off_n[(og * 2 * taps + 2 * k + 1) * L + pix], g.h, g.w);
      Sample<scalar_t>& s = smp[it];
      s.m = mask_n ? mask_n[gk * L + pix] : scalar_t(1);
      s.base = pt.inside ? (pt.y0 + 1) * wp + pt.x0 + 1 : nowhere;
      s.ly = pt.ly;
      s.lx = pt.lx;
      bilinear_weights(pt.ly, pt.lx, pt.inside ? s.m : scalar_t(0), s.w);
    }
  });
}

// Calls f(og, c0, cb) in parallel for blocks [c0, c0 + cb) of channels, none crossing an offset group.
template <typename F>
void for_channel_blocks(int64_t channels, int64_t offset_groups, const F& f) {
  const int64_t per_group = channels / offset_groups;
  const int64_t blocks = (per_group + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, offset_groups * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t og = it / blocks, c0 = og * per_group + (it % blocks) * kChannelBlock;
      f(og, c0, std::min(kChannelBlock, (og + 1) * per_group - c0));
    }
  });
}

// cols[c * taps + k, p] = channel c sampled at tap k of pixel p, times the mask.
template <typename scalar_t>
void im2col(const DeformGeom& g, const scalar_t* padded, int64_t channels, const Sample<scalar_t>* smp, int64_t np,
            scalar_t* cols) {
  const int64_t taps = g.taps(), wp = padded_width(g), plane = padded_plane(g);
  for_channel_blocks(channels, g.offset_groups, [&](int64_t og, int64_t c0, int64_t cb) {
    for (int64_t k = 0; k < taps; ++k) {
      const Sample<scalar_t>* s = smp + (og * taps + k) * np;
      scalar_t* col = cols + (c0 * taps + k) * np;
      for (int64_t p = 0; p < np; ++p) {
        const scalar_t w0 = s[p].w[0], w1 = s[p].w[1], w2 = s[p].w[2], w3 = s[p].w[3];
        const scalar_t* src = padded + c0 * plane + s[p].base;
        for (int64_t i = 0; i < cb; ++i) {
          const scalar_t* q = src + i * plane;
          col[i * taps * np + p] = w0 * q[0] + w1 * q[1] + w2 * q[wp] + w3 * q[wp + 1];
        }
      }
    }
  });
}

// The transpose of im2col, into a padded gradient buffer. Each thread owns whole channels: deterministic.
template <typename scalar_t>
void col2im(const DeformGeom& g, const scalar_t* grad_cols, int64_t channels, const Sample<scalar_t>* smp,
            int64_t np, scalar_t* grad_padded) {
  const int64_t taps = g.taps(), wp = padded_width(g), plane = padded_plane(g);
  for_channel_blocks(channels, g.offset_groups, [&](int64_t og, int64_t c0, int64_t cb) {
    for (int64_t k = 0; k < taps; ++k) {
      const Sample<scalar_t>* s = smp + (og * taps + k) * np;
      const scalar_t* gc = grad_cols + (c0 * taps + k) * np;
      for (int64_t p = 0; p < np; ++p) {
        const scalar_t w0 = s[p].w[0], w1 = s[p].w[1], w2 = s[p].w[2], w3 = s[p].w[3];
        scalar_t* dst = grad_padded + c0 * plane + s[p].base;
        for (int64_t i = 0; i < cb; ++i) {
          const scalar_t v = gc[i * taps * np + p];
          scalar_t* q = dst + i * plane;
          q[0] += w0 * v;
          q[1] += w1 * v;
          q[wp] += w2 * v;
          q[wp + 1] += w3 * v;
        }
      }
    }
  });
}

// Rows [0, rows) of a [rows, np] block that lives at the start of a flat buffer.
at::Tensor block(const at::Tensor& flat, int64_t rows, int64_t np) {
  return flat.narrow(0, 0, rows * np).view({rows, np});
}

template <typename scalar_t>
std::vector<at::Tensor> forward_impl(const DeformGeom& g, const std::vector<Branch>& branches,
                                     const std::vector<std::optional<at::Tensor>>& biases, const at::Tensor& offset,
                                     const std::optional<at::Tensor>& mask) {
  const int64_t taps = g.taps(), L = g.pixels();
  const auto opts = offset.options();
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < branches.size(); ++i) {
    const Branch& b = branches[i];
    outs.push_back(biases[i].has_value()
                       ? biases[i]->view({1, b.out_channels, 1}).expand({g.n, b.out_channels, L}).contiguous()
                       : at::zeros({g.n, b.out_channels, L}, opts));
  }
  if (g.n == 0) return outs;
  const Units u = make_units(g, branches, 1, sizeof(scalar_t));
  const scalar_t* off = offset.data_ptr<scalar_t>();
  const scalar_t* msk = mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr;
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
        for (size_t i = 0; i < branches.size(); ++i) interior(padded[i], g).copy_(branches[i].input[n]);
        image = n;
      }
      compute_samples(g, off + n * g.offset_groups * 2 * taps * L, msk ? msk + n * g.offset_groups * taps * L : msk,
                      p0, np, smp.data());
      for (size_t i = 0; i < branches.size(); ++i) {
        const Branch& b = branches[i];
        im2col(g, padded[i].data_ptr<scalar_t>(), b.channels, smp.data(), np, cols[i].data_ptr<scalar_t>());
        const at::Tensor c2 = block(cols[i], b.channels * taps, np);
        const int64_t rows = b.channels / b.groups * taps, og = b.out_channels / b.groups;
        for (int64_t gi = 0; gi < b.groups; ++gi) {
          outs[i][n].narrow(0, gi * og, og).narrow(1, p0, np).addmm_(b.weight.narrow(0, gi * og, og),
                                                                      c2.narrow(0, gi * rows, rows));
        }
      }
    }
  });
  return outs;
}

// Offset / mask gradients of one unit: sums over the channels of every convolution (both, for the dual op).
template <typename scalar_t>
void coords_grad(const DeformGeom& g, const std::vector<Branch>& branches, const std::vector<at::Tensor>& padded,
                 const std::vector<at::Tensor>& grad_cols, const Sample<scalar_t>* smp, int64_t np,
                 scalar_t* grad_offset_n, scalar_t* grad_mask_n, int64_t p0, std::vector<scalar_t>& acc) {
  const int64_t taps = g.taps(), L = g.pixels(), items = g.offset_groups * taps * np;
  const int64_t wp = padded_width(g), plane = padded_plane(g);
  acc.assign(3 * items, scalar_t(0));
  scalar_t *acc_y = acc.data(), *acc_x = acc_y + items, *acc_m = acc_x + items;
  for (size_t i = 0; i < branches.size(); ++i) {
    const Branch& b = branches[i];
    const scalar_t* src = padded[i].data_ptr<scalar_t>();
    const scalar_t* gcols = grad_cols[i].data_ptr<scalar_t>();
    const int64_t per_group = b.channels / g.offset_groups;
    for (int64_t og = 0; og < g.offset_groups; ++og) {
      for (int64_t c0 = og * per_group; c0 < (og + 1) * per_group; c0 += kChannelBlock) {
        const int64_t cb = std::min(kChannelBlock, (og + 1) * per_group - c0);
        for (int64_t k = 0; k < taps; ++k) {
          const int64_t base = (og * taps + k) * np;
          const scalar_t* gc = gcols + (c0 * taps + k) * np;
          for (int64_t p = 0; p < np; ++p) {
            const Sample<scalar_t>& s = smp[base + p];
            scalar_t sy = 0, sx = 0, sm = 0;
            for (int64_t j = 0; j < cb; ++j) {
              const scalar_t* q = src + (c0 + j) * plane + s.base;
              const scalar_t v[4] = {q[0], q[1], q[wp], q[wp + 1]};
              scalar_t value, d_y, d_x;
              bilinear_value_grad(s.ly, s.lx, v, value, d_y, d_x);
              const scalar_t gv = gc[j * taps * np + p];
              sy += gv * d_y;
              sx += gv * d_x;
              sm += gv * value;
            }
            acc_y[base + p] += sy;
            acc_x[base + p] += sx;
            acc_m[base + p] += sm;
          }
        }
      }
    }
  }
  for (int64_t gk = 0; gk < g.offset_groups * taps; ++gk) {
    for (int64_t p = 0; p < np; ++p) {
      const int64_t it = gk * np + p;
      if (grad_offset_n != nullptr) {
        grad_offset_n[(2 * gk) * L + p0 + p] = acc_y[it] * smp[it].m;
        grad_offset_n[(2 * gk + 1) * L + p0 + p] = acc_x[it] * smp[it].m;
      }
      if (grad_mask_n != nullptr) grad_mask_n[gk * L + p0 + p] = acc_m[it];
    }
  }
}

// Gradients of every branch: input (need_input[i]), weight (need_weight[i]); offset and mask shared.
struct BackwardResult {
  std::vector<at::Tensor> grad_input, grad_weight;
  at::Tensor grad_offset, grad_mask;
};

// What one thread's run of units leaves to add up after the parallel region, in the order of `begin`.
struct PartialGrads {
  int64_t begin;
  std::vector<at::Tensor> grad_weight;                               // per branch
  std::vector<std::pair<int64_t, std::vector<at::Tensor>>> images;  // grad of input of images shared with others
};

template <typename scalar_t>
BackwardResult backward_impl(const DeformGeom& g, const std::vector<Branch>& branches,
                             const std::vector<at::Tensor>& grad_outs, const at::Tensor& offset,
                             const std::optional<at::Tensor>& mask, const std::vector<bool>& need_input,
                             const std::vector<bool>& need_weight, bool need_offset, bool need_mask) {
  const int64_t taps = g.taps(), L = g.pixels(), og_count = g.offset_groups;
  const auto opts = offset.options();
  BackwardResult r;
  const bool need_coords = need_offset || need_mask;
  bool need_grad_cols = need_coords;
  for (size_t i = 0; i < branches.size(); ++i) {
    const Branch& b = branches[i];
    r.grad_input.push_back(need_input[i] ? at::zeros({g.n, b.channels, g.h, g.w}, opts) : at::empty({0}, opts));
    r.grad_weight.push_back(need_weight[i] ? at::zeros_like(b.weight) : at::empty({0}, opts));
    need_grad_cols = need_grad_cols || need_input[i];
  }
  r.grad_offset = need_offset ? at::zeros({g.n, og_count * 2 * taps, g.h_out, g.w_out}, opts) : at::empty({0}, opts);
  r.grad_mask = need_mask ? at::zeros({g.n, og_count * taps, g.h_out, g.w_out}, opts) : at::empty({0}, opts);
  if (g.n == 0) return r;

  const Units u = make_units(g, branches, 2, sizeof(scalar_t));
  const scalar_t* off = offset.data_ptr<scalar_t>();
  const scalar_t* msk = mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr;
  std::mutex partial_mutex;
  std::vector<PartialGrads> partials;

  at::parallel_for(0, u.count, 1, [&](int64_t begin, int64_t end) {
    PartialGrads mine{begin, {}, {}};
    std::vector<Sample<scalar_t>> smp(og_count * taps * u.pixels);
    std::vector<scalar_t> acc;
    std::vector<at::Tensor> cols, grad_cols, padded, grad_padded;
    for (size_t i = 0; i < branches.size(); ++i) {
      const int64_t rows = branches[i].channels * taps;
      cols.push_back(need_weight[i] ? at::empty({rows * u.pixels}, opts) : at::Tensor());
      grad_cols.push_back(need_grad_cols ? at::empty({rows * u.pixels}, opts) : at::Tensor());
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
        if (!need_input[i]) {
          parts.emplace_back();
        } else if (whole) {
          r.grad_input[i][image].copy_(interior(grad_padded[i], g));
        } else {
          parts.push_back(interior(grad_padded[i], g).clone());
        }
      }
      if (!whole) mine.images.emplace_back(image, std::move(parts));
    };
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t n = unit / u.per_image, p0 = (unit % u.per_image) * u.pixels, np = std::min(u.pixels, L - p0);
      if (n != image) {
        finish_image();
        image = n;
        for (size_t i = 0; i < branches.size(); ++i) {
          if (padded[i].defined()) interior(padded[i], g).copy_(branches[i].input[n]);
          if (grad_padded[i].defined()) grad_padded[i].zero_();
        }
      }
      compute_samples(g, off + n * og_count * 2 * taps * L, msk ? msk + n * og_count * taps * L : msk, p0, np,
                      smp.data());
      for (size_t i = 0; i < branches.size(); ++i) {
        const Branch& b = branches[i];
        const int64_t rows = b.channels / b.groups * taps, og = b.out_channels / b.groups;
        const at::Tensor gout = grad_outs[i][n].narrow(1, p0, np);  // [C_out, np]
        if (need_weight[i]) {
          im2col(g, padded[i].data_ptr<scalar_t>(), b.channels, smp.data(), np, cols[i].data_ptr<scalar_t>());
          const at::Tensor c2 = block(cols[i], b.channels * taps, np);
          for (int64_t gi = 0; gi < b.groups; ++gi) {
            mine.grad_weight[i].narrow(0, gi * og, og).addmm_(gout.narrow(0, gi * og, og),
                                                              c2.narrow(0, gi * rows, rows).t());
          }
        }
        if (need_grad_cols) {
          const at::Tensor gc = block(grad_cols[i], b.channels * taps, np);
          for (int64_t gi = 0; gi < b.groups; ++gi) {
            at::Tensor dst = gc.narrow(0, gi * rows, rows);
            at::mm_out(dst, b.weight.narrow(0, gi * og, og).t(), gout.narrow(0, gi * og, og));
          }
        }
        if (need_input[i]) {
          col2im(g, grad_cols[i].data_ptr<scalar_t>(), b.channels, smp.data(), np,
                 grad_padded[i].data_ptr<scalar_t>());
        }
      }
      if (need_coords) {
        coords_grad(g, branches, padded, grad_cols, smp.data(), np,
                    need_offset ? r.grad_offset.data_ptr<scalar_t>() + n * og_count * 2 * taps * L : nullptr,
                    need_mask ? r.grad_mask.data_ptr<scalar_t>() + n * og_count * taps * L : nullptr, p0, acc);
      }
    }
    finish_image();
    const std::lock_guard<std::mutex> lock(partial_mutex);
    partials.push_back(std::move(mine));
  });

  // Add the runs' partial sums in a fixed order: the result does not depend on thread timing.
  std::sort(partials.begin(), partials.end(),
            [](const PartialGrads& a, const PartialGrads& b) { return a.begin < b.begin; });
  for (const PartialGrads& part : partials) {
    for (size_t i = 0; i < branches.size(); ++i) {
      if (need_weight[i]) r.grad_weight[i].add_(part.grad_weight[i]);
    }
    for (const auto& [n, grads] : part.images) {
      for (size_t i = 0; i < branches.size(); ++i) {
        if (need_input[i]) r.grad_input[i][n].add_(grads[i]);
      }
    }
  }
  return r;
}

// Kernels work on detached tensors: the guard against recording autograd history does not reach the worker
// threads, whose matmuls must not record any either.
Branch make_branch(const at::Tensor& input, const at::Tensor& weight) {
  const int64_t groups = input.size(1) / weight.size(1);
  // Sizes spelled out: view cannot infer a -1 beside a zero size (C_out = 0).
  return {input.detach().contiguous(),
          weight.detach().contiguous().view({weight.size(0), weight.size(1) * weight.size(2) * weight.size(3)}),
          input.size(1), groups, weight.size(0)};
}

at::Tensor plain(const at::Tensor& t) { return t.detach().contiguous(); }

std::optional<at::Tensor> plain(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(plain(*t)) : std::nullopt;
}

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  // A kernel: the matmuls inside must not record autograd history.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DeformGeom g = check_deform_conv2d_args(input, offset, weight, bias, mask, stride, padding, dilation);
  check_cpu_dtype("input", input);
  const std::vector<Branch> branches{make_branch(input, weight)};
  const auto m = plain(mask);
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_cpu", [&] {
    outs = forward_impl<scalar_t>(g, branches, {bias}, plain(offset), m);
  });
  return outs[0].view({g.n, weight.size(0), g.h_out, g.w_out});
}

std::tuple<at::Tensor, at::Tensor> dual_deform_conv2d_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
    const at::Tensor& weight_y, const std::optional<at::Tensor>& bias_x, const std::optional<at::Tensor>& bias_y,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  // A kernel: the matmuls inside must not record autograd history.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DeformGeom g =
      check_dual_deform_conv2d_args(x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation);
  check_cpu_dtype("x", x);
  const std::vector<Branch> branches{make_branch(x, weight_x), make_branch(y, weight_y)};
  const auto m = plain(mask);
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dual_deform_conv2d_cpu", [&] {
    outs = forward_impl<scalar_t>(g, branches, {bias_x, bias_y}, plain(offset), m);
  });
  return {outs[0].view({g.n, weight_x.size(0), g.h_out, g.w_out}),
          outs[1].view({g.n, weight_y.size(0), g.h_out, g.w_out})};
}

at::Tensor grad_bias(const at::Tensor& grad_out, bool needed) {
  return needed ? grad_out.sum({0, 2, 3}) : at::empty({0}, grad_out.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 5> output_mask) {
  // A kernel: the matmuls inside must not record autograd history.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DeformGeom g = check_deform_conv2d_args(input, offset, weight, std::nullopt, mask, stride, padding, dilation);
  check_cpu_dtype("input", input);
  check_deform_same("input", input, "grad_out", grad_out);
  const std::vector<Branch> branches{make_branch(input, weight)};
  const auto m = plain(mask);
  const at::Tensor go = plain(grad_out).view({g.n, weight.size(0), g.pixels()});
  BackwardResult r;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    r = backward_impl<scalar_t>(g, branches, {go}, plain(offset), m, {output_mask[0]}, {output_mask[2]},
                                output_mask[1], output_mask[4] && mask.has_value());
  });
  at::Tensor gw = output_mask[2] ? r.grad_weight[0].view(weight.sizes()) : r.grad_weight[0];
  return {r.grad_input[0], r.grad_offset, gw, grad_bias(grad_out, output_mask[3]), r.grad_mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dual_deform_conv2d_backward_cpu(const at::Tensor& grad_out_x, const at::Tensor& grad_out_y, const at::Tensor& x,
                                const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
                                const at::Tensor& weight_y, const std::optional<at::Tensor>& mask,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                std::array<bool, 8> output_mask) {
  // A kernel: the matmuls inside must not record autograd history.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DeformGeom g = check_dual_deform_conv2d_args(x, y, offset, weight_x, weight_y, std::nullopt, std::nullopt,
                                                     mask, stride, padding, dilation);
  check_cpu_dtype("x", x);
  check_deform_same("x", x, "grad_out_x", grad_out_x);
  check_deform_same("x", x, "grad_out_y", grad_out_y);
  const std::vector<Branch> branches{make_branch(x, weight_x), make_branch(y, weight_y)};
  const auto m = plain(mask);
  const at::Tensor gx = plain(grad_out_x).view({g.n, weight_x.size(0), g.pixels()});
  const at::Tensor gy = plain(grad_out_y).view({g.n, weight_y.size(0), g.pixels()});
  BackwardResult r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dual_deform_conv2d_backward_cpu", [&] {
    r = backward_impl<scalar_t>(g, branches, {gx, gy}, plain(offset), m, {output_mask[0], output_mask[1]},
                                {output_mask[3], output_mask[4]}, output_mask[2], output_mask[7] && mask.has_value());
  });
  at::Tensor gwx = output_mask[3] ? r.grad_weight[0].view(weight_x.sizes()) : r.grad_weight[0];
  at::Tensor gwy = output_mask[4] ? r.grad_weight[1].view(weight_y.sizes()) : r.grad_weight[1];
  return {r.grad_input[0], r.grad_input[1], r.grad_offset, gwx, gwy,
          grad_bias(grad_out_x, output_mask[5]), grad_bias(grad_out_y, output_mask[6]), r.grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(csfrn, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
  m.impl("dual_deform_conv2d", &dual_deform_conv2d_cpu);
  m.impl("dual_deform_conv2d_backward", &dual_deform_conv2d_backward_cpu);
}

}  // namespace csfrn
