// Deformable convolution on the CPU. Work goes tile by tile (one image, a run of output pixels): the
// sampling of every (offset group, tap, pixel) is computed once per tile and reused by every channel of the
// group and by both convolutions of the dual op; the column block [C_in * kh * kw, tile] stays under
// kTileBytes (no batch-sized buffer); the matmuls go to BLAS (multi-threaded); sampling, im2col and col2im
// run under at::parallel_for. The backward is deterministic: col2im is split over input channels and the
// offset / mask gradients over pixels, so no two threads ever add into one element.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

template <typename scalar_t>
struct ForwardSample {
  int64_t idx[4];
  scalar_t w[4];  // bilinear weight x validity x mask
};

void check_cpu_dtype(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                    " must be float32 or float64 on the CPU, got dtype ", t.scalar_type());
}

// Output pixels per tile: the most under the budget, then evened out over the tiles of an image.
int64_t tile_pixels(const DeformGeom& g, const std::vector<Branch>& branches, int64_t buffers, int64_t elem) {
  int64_t rows = 0;
  for (const Branch& b : branches) rows += b.channels * g.taps();
  const int64_t most = std::max<int64_t>(64, kTileBytes / std::max<int64_t>(1, rows * buffers * elem));
  const int64_t tiles = (g.pixels() + most - 1) / most;
  return (g.pixels() + tiles - 1) / tiles;
}

// Calls f(item, sample, mask) for every item = (offset group * taps + tap) * np + p of the tile [p0, p0 + np).
template <typename scalar_t, typename F>
void for_each_sample(const DeformGeom& g, const scalar_t* off_n, const scalar_t* mask_n, int64_t p0, int64_t np,
                     const F& f) {
  const int64_t taps = g.taps(), L = g.pixels();
  at::parallel_for(0, g.offset_groups * taps * np, 512, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t p = it % np, gk = it / np, k = gk % taps, og = gk / taps;
      const int64_t pix = p0 + p;
      const scalar_t dy = off_n[(og * 2 * taps + 2 * k) * L + pix];
      const scalar_t dx = off_n[(og * 2 * taps + 2 * k + 1) * L + pix];
      scalar_t y, x;
      deform_position(pix / g.w_out, pix % g.w_out, k / g.kw, k % g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w,
                      g.dil_h, g.dil_w, dy, dx, y, x);
      BilinearSample<scalar_t> s;
      bilinear_setup(y, x, g.h, g.w, s);
      f(it, s, mask_n ? mask_n[gk * L + pix] : scalar_t(1));
    }
  });
}

// cols[c * taps + k, p] = sampled input channel c at tap k of pixel p (times the mask); parallel over channels.
template <typename scalar_t>
void im2col(const DeformGeom& g, const scalar_t* in_n, int64_t channels, const ForwardSample<scalar_t>* smp,
            int64_t np, scalar_t* cols) {
  const int64_t taps = g.taps(), hw = g.h * g.w, per_group = channels / g.offset_groups;
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const scalar_t* plane = in_n + c * hw;
      const int64_t og = c / per_group;
      for (int64_t k = 0; k < taps; ++k) {
        const ForwardSample<scalar_t>* s = smp + (og * taps + k) * np;
        scalar_t* col = cols + (c * taps + k) * np;
        for (int64_t p = 0; p < np; ++p) {
          col[p] = s[p].w[0] * plane[s[p].idx[0]] + s[p].w[1] * plane[s[p].idx[1]] + s[p].w[2] * plane[s[p].idx[2]] +
                   s[p].w[3] * plane[s[p].idx[3]];
        }
      }
    }
  });
}

// The transpose of im2col: grad_input[c] += scatter of grad_cols rows of channel c; parallel over channels.
template <typename scalar_t>
void col2im(const DeformGeom& g, const scalar_t* grad_cols, int64_t channels, const ForwardSample<scalar_t>* smp,
            int64_t np, scalar_t* grad_in_n) {
  const int64_t taps = g.taps(), hw = g.h * g.w, per_group = channels / g.offset_groups;
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      scalar_t* plane = grad_in_n + c * hw;
      const int64_t og = c / per_group;
      for (int64_t k = 0; k < taps; ++k) {
        const ForwardSample<scalar_t>* s = smp + (og * taps + k) * np;
        const scalar_t* gc = grad_cols + (c * taps + k) * np;
        for (int64_t p = 0; p < np; ++p) {
          const scalar_t v = gc[p];
          for (int j = 0; j < 4; ++j) plane[s[p].idx[j]] += s[p].w[j] * v;
        }
      }
    }
  });
}

// Rows [rows_begin, +rows) of a [rows_total, np] block that lives at the start of a flat buffer.
at::Tensor block(const at::Tensor& flat, int64_t rows_total, int64_t np) {
  return flat.narrow(0, 0, rows_total * np).view({rows_total, np});
}

template <typename scalar_t>
std::vector<at::Tensor> forward_impl(const DeformGeom& g, const std::vector<Branch>& branches,
                                     const std::vector<std::optional<at::Tensor>>& biases, const at::Tensor& offset,
                                     const std::optional<at::Tensor>& mask) {
  const int64_t taps = g.taps(), L = g.pixels();
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < branches.size(); ++i) {
    const Branch& b = branches[i];
    outs.push_back(biases[i].has_value()
                       ? biases[i]->view({1, b.out_channels, 1}).expand({g.n, b.out_channels, L}).contiguous()
                       : at::zeros({g.n, b.out_channels, L}, b.input.options()));
  }
  if (g.n == 0) return outs;
  const int64_t P = tile_pixels(g, branches, 1, sizeof(scalar_t));
  std::vector<ForwardSample<scalar_t>> smp(g.offset_groups * taps * P);
  std::vector<at::Tensor> cols;
  for (const Branch& b : branches) cols.push_back(at::empty({b.channels * taps * P}, b.input.options()));
  const scalar_t* off = offset.data_ptr<scalar_t>();
  const scalar_t* msk = mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr;
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t p0 = 0; p0 < L; p0 += P) {
      const int64_t np = std::min(P, L - p0);
      for_each_sample(g, off + n * g.offset_groups * 2 * taps * L, msk ? msk + n * g.offset_groups * taps * L : msk,
                      p0, np, [&](int64_t it, const BilinearSample<scalar_t>& s, scalar_t m) {
                        ForwardSample<scalar_t>& f = smp[it];
                        bilinear_weights(s, m, f.w);
                        for (int j = 0; j < 4; ++j) f.idx[j] = s.idx[j];
                      });
      for (size_t i = 0; i < branches.size(); ++i) {
        const Branch& b = branches[i];
        im2col(g, b.input.data_ptr<scalar_t>() + n * b.channels * g.h * g.w, b.channels, smp.data(), np,
               cols[i].data_ptr<scalar_t>());
        const at::Tensor c2 = block(cols[i], b.channels * taps, np);
        const int64_t rows = b.channels / b.groups * taps, og = b.out_channels / b.groups;
        for (int64_t gi = 0; gi < b.groups; ++gi) {
          outs[i][n].narrow(0, gi * og, og).narrow(1, p0, np).addmm_(b.weight.narrow(0, gi * og, og),
                                                                      c2.narrow(0, gi * rows, rows));
        }
      }
    }
  }
  return outs;
}

// Gradients of every branch: input (need_input[i]), weight (need_weight[i]); offset and mask shared.
struct BackwardResult {
  std::vector<at::Tensor> grad_input, grad_weight;
  at::Tensor grad_offset, grad_mask;
};

template <typename scalar_t>
BackwardResult backward_impl(const DeformGeom& g, const std::vector<Branch>& branches,
                             const std::vector<at::Tensor>& grad_outs, const at::Tensor& offset,
                             const std::optional<at::Tensor>& mask, const std::vector<bool>& need_input,
                             const std::vector<bool>& need_weight, bool need_offset, bool need_mask) {
  const int64_t taps = g.taps(), L = g.pixels(), hw = g.h * g.w, og_count = g.offset_groups;
  const auto opts = offset.options();
  BackwardResult r;
  bool need_grad_cols = need_offset || need_mask;
  for (size_t i = 0; i < branches.size(); ++i) {
    const Branch& b = branches[i];
    r.grad_input.push_back(need_input[i] ? at::zeros({g.n, b.channels, g.h, g.w}, opts) : at::empty({0}, opts));
    r.grad_weight.push_back(need_weight[i] ? at::zeros_like(b.weight) : at::empty({0}, opts));
    need_grad_cols = need_grad_cols || need_input[i];
  }
  r.grad_offset = need_offset ? at::zeros({g.n, og_count * 2 * taps, g.h_out, g.w_out}, opts) : at::empty({0}, opts);
  r.grad_mask = need_mask ? at::zeros({g.n, og_count * taps, g.h_out, g.w_out}, opts) : at::empty({0}, opts);
  if (g.n == 0) return r;

  const int64_t P = tile_pixels(g, branches, 2, sizeof(scalar_t));
  const int64_t items = og_count * taps * P;
  std::vector<ForwardSample<scalar_t>> smp(items);
  std::vector<BilinearSample<scalar_t>> bil(need_offset || need_mask ? items : 0);
  std::vector<scalar_t> msk_tile(need_offset || need_mask ? items : 0);
  std::vector<scalar_t> acc_y(need_offset ? items : 0), acc_x(need_offset ? items : 0), acc_m(need_mask ? items : 0);
  std::vector<at::Tensor> cols, grad_cols;
  for (size_t i = 0; i < branches.size(); ++i) {
    const int64_t rows = branches[i].channels * taps;
    cols.push_back(need_weight[i] ? at::empty({rows * P}, opts) : at::Tensor());
    grad_cols.push_back(need_grad_cols ? at::empty({rows * P}, opts) : at::Tensor());
  }
  const scalar_t* off = offset.data_ptr<scalar_t>();
  const scalar_t* msk = mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr;

  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t p0 = 0; p0 < L; p0 += P) {
      const int64_t np = std::min(P, L - p0);
      for_each_sample(g, off + n * og_count * 2 * taps * L, msk ? msk + n * og_count * taps * L : msk, p0, np,
                      [&](int64_t it, const BilinearSample<scalar_t>& s, scalar_t m) {
                        ForwardSample<scalar_t>& f = smp[it];
                        bilinear_weights(s, m, f.w);
                        for (int j = 0; j < 4; ++j) f.idx[j] = s.idx[j];
                        if (!bil.empty()) {
                          bil[it] = s;
                          msk_tile[it] = m;
                        }
                      });
      for (size_t i = 0; i < branches.size(); ++i) {
        const Branch& b = branches[i];
        const scalar_t* in_n = b.input.data_ptr<scalar_t>() + n * b.channels * hw;
        const int64_t rows = b.channels / b.groups * taps, og = b.out_channels / b.groups;
        const at::Tensor gout = grad_outs[i][n].narrow(1, p0, np);  // [C_out, np]
        if (need_weight[i]) {
          im2col(g, in_n, b.channels, smp.data(), np, cols[i].data_ptr<scalar_t>());
          const at::Tensor c2 = block(cols[i], b.channels * taps, np);
          for (int64_t gi = 0; gi < b.groups; ++gi) {
            r.grad_weight[i].narrow(0, gi * og, og).addmm_(gout.narrow(0, gi * og, og), c2.narrow(0, gi * rows, rows).t());
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
                 r.grad_input[i].data_ptr<scalar_t>() + n * b.channels * hw);
        }
      }
      if (!(need_offset || need_mask)) continue;
      // Offset / mask gradients: sum over the channels of both convolutions, split over pixels.
      at::parallel_for(0, np, 16, [&](int64_t begin, int64_t end) {
        for (int64_t gk = 0; gk < og_count * taps; ++gk) {
          for (int64_t p = begin; p < end; ++p) {
            if (need_offset) acc_y[gk * np + p] = acc_x[gk * np + p] = scalar_t(0);
            if (need_mask) acc_m[gk * np + p] = scalar_t(0);
          }
        }
        for (size_t i = 0; i < branches.size(); ++i) {
          const Branch& b = branches[i];
          const scalar_t* in_n = b.input.data_ptr<scalar_t>() + n * b.channels * hw;
          const scalar_t* gcols = grad_cols[i].data_ptr<scalar_t>();
          const int64_t per_group = b.channels / og_count;
          for (int64_t c = 0; c < b.channels; ++c) {
            const scalar_t* plane = in_n + c * hw;
            const int64_t og = c / per_group;
            for (int64_t k = 0; k < taps; ++k) {
              const int64_t base = (og * taps + k) * np;
              const scalar_t* gc = gcols + (c * taps + k) * np;
              for (int64_t p = begin; p < end; ++p) {
                const BilinearSample<scalar_t>& s = bil[base + p];
                const scalar_t v[4] = {plane[s.idx[0]], plane[s.idx[1]], plane[s.idx[2]], plane[s.idx[3]]};
                scalar_t value, d_y, d_x;
                bilinear_value_grad(s, v, value, d_y, d_x);
                const scalar_t gv = gc[p];
                if (need_offset) {
                  acc_y[base + p] += gv * d_y;
                  acc_x[base + p] += gv * d_x;
                }
                if (need_mask) acc_m[base + p] += gv * value;
              }
            }
          }
        }
        scalar_t* goff = need_offset ? r.grad_offset.data_ptr<scalar_t>() + n * og_count * 2 * taps * L : nullptr;
        scalar_t* gmsk = need_mask ? r.grad_mask.data_ptr<scalar_t>() + n * og_count * taps * L : nullptr;
        for (int64_t gk = 0; gk < og_count * taps; ++gk) {
          for (int64_t p = begin; p < end; ++p) {
            const int64_t it = gk * np + p;
            if (need_offset) {
              goff[(2 * gk) * L + p0 + p] = acc_y[it] * msk_tile[it];
              goff[(2 * gk + 1) * L + p0 + p] = acc_x[it] * msk_tile[it];
            }
            if (need_mask) gmsk[gk * L + p0 + p] = acc_m[it];
          }
        }
      });
    }
  }
  return r;
}

Branch make_branch(const at::Tensor& input, const at::Tensor& weight) {
  const int64_t groups = input.size(1) / weight.size(1);
  return {input.contiguous(), weight.contiguous().view({weight.size(0), -1}), input.size(1), groups, weight.size(0)};
}

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformGeom g = check_deform_conv2d_args(input, offset, weight, bias, mask, stride, padding, dilation);
  check_cpu_dtype("input", input);
  const std::vector<Branch> branches{make_branch(input, weight)};
  const auto m = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_cpu", [&] {
    outs = forward_impl<scalar_t>(g, branches, {bias}, offset.contiguous(), m);
  });
  return outs[0].view({g.n, weight.size(0), g.h_out, g.w_out});
}

std::tuple<at::Tensor, at::Tensor> dual_deform_conv2d_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
    const at::Tensor& weight_y, const std::optional<at::Tensor>& bias_x, const std::optional<at::Tensor>& bias_y,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformGeom g =
      check_dual_deform_conv2d_args(x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation);
  check_cpu_dtype("x", x);
  const std::vector<Branch> branches{make_branch(x, weight_x), make_branch(y, weight_y)};
  const auto m = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dual_deform_conv2d_cpu", [&] {
    outs = forward_impl<scalar_t>(g, branches, {bias_x, bias_y}, offset.contiguous(), m);
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
  const DeformGeom g = check_deform_conv2d_args(input, offset, weight, std::nullopt, mask, stride, padding, dilation);
  check_cpu_dtype("input", input);
  check_deform_same("input", input, "grad_out", grad_out);
  const std::vector<Branch> branches{make_branch(input, weight)};
  const auto m = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  const at::Tensor go = grad_out.contiguous().view({g.n, weight.size(0), g.pixels()});
  BackwardResult r;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    r = backward_impl<scalar_t>(g, branches, {go}, offset.contiguous(), m, {output_mask[0]}, {output_mask[2]},
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
  const DeformGeom g = check_dual_deform_conv2d_args(x, y, offset, weight_x, weight_y, std::nullopt, std::nullopt,
                                                     mask, stride, padding, dilation);
  check_cpu_dtype("x", x);
  check_deform_same("x", x, "grad_out_x", grad_out_x);
  check_deform_same("x", x, "grad_out_y", grad_out_y);
  const std::vector<Branch> branches{make_branch(x, weight_x), make_branch(y, weight_y)};
  const auto m = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  const at::Tensor gx = grad_out_x.contiguous().view({g.n, weight_x.size(0), g.pixels()});
  const at::Tensor gy = grad_out_y.contiguous().view({g.n, weight_y.size(0), g.pixels()});
  BackwardResult r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dual_deform_conv2d_backward_cpu", [&] {
    r = backward_impl<scalar_t>(g, branches, {gx, gy}, offset.contiguous(), m, {output_mask[0], output_mask[1]},
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
