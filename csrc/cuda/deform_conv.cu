// Deformable convolution on CUDA. Images go in chunks whose column buffer [B, C_in * kh * kw, H_out * W_out]
// stays under kColumnBytes (any batch size; the last chunk is simply smaller). One thread per
// (image, offset group, tap, output pixel) computes the sampling once and loops over every channel of the
// group, of both convolutions for the dual op; the matmuls go to cuBLAS (float32 accumulation for half and
// bfloat16). The backward's grad of input scatters with atomicAdd into a float32 (float64) buffer: not
// deterministic, so it alerts under torch.use_deterministic_algorithms(True); offset, mask and weight
// gradients are deterministic (one thread per output element, and cuBLAS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/launch.h"

#include <algorithm>
#include <vector>

#include "common/cuda_helpers.cuh"
#include "common/deform_conv.h"
#include "common/deform_conv_checks.h"
#include "common/deform_conv_launch.h"
#include "common/kernel_scope.h"

namespace csfrn {
namespace {

constexpr int64_t kColumnBytes = int64_t(256) << 20;

KernelGeom kernel_geom(const DeformGeom& g) {
  return {g.h,      g.w,      g.h_out, g.w_out, g.kh,          g.kw,   g.stride_h, g.stride_w,
          g.pad_h,  g.pad_w,  g.dil_h, g.dil_w, g.offset_groups, g.taps(), g.pixels()};
}

// One convolution's tensors for a kernel: its input and its columns (or grad of columns) for the chunk.
template <typename scalar_t>
struct KernelBranch {
  const scalar_t* input;  // [N, C, H, W]
  scalar_t* cols;         // [B, C * taps, pixels] of the chunk
  int64_t channels;       // 0: absent
};

template <typename scalar_t, typename acc_t>
__global__ void im2col_kernel(int64_t items, int64_t n0, KernelGeom g, const scalar_t* __restrict__ offset,
                              const scalar_t* __restrict__ mask, KernelBranch<scalar_t> b0,
                              KernelBranch<scalar_t> b1) {
  const int64_t hw = g.h * g.w;
  CSFRN_KERNEL_LOOP(it, items) {
    const DeformItem<acc_t> d = deform_item<acc_t>(g, it, n0, offset, mask);
    const KernelBranch<scalar_t> branches[2] = {b0, b1};
    for (int bi = 0; bi < 2; ++bi) {
      const KernelBranch<scalar_t>& br = branches[bi];
      if (br.channels == 0) continue;
      const int64_t per_group = br.channels / g.offset_groups;
      for (int64_t c = d.og * per_group; c < (d.og + 1) * per_group; ++c) {
        const scalar_t* plane = br.input + (d.n * br.channels + c) * hw;
        acc_t v = acc_t(0);
        // Corners outside are skipped, never read: a zero weight times plane[0] would turn an inf or NaN
        // there into NaN (the CPU kernel reads zero padding), and with H * W = 0 plane[0] does not exist.
        for (int j = 0; j < 4; ++j) {
          if (d.ok[j]) v += d.w[j] * static_cast<acc_t>(plane[d.idx[j]]);
        }
        br.cols[((d.b * br.channels + c) * g.taps + d.k) * g.pixels + d.pix] = static_cast<scalar_t>(v);
      }
    }
  }
}

// grad of input (atomicAdd into acc_t buffers), offset and mask from the grad of the columns of both branches.
template <typename scalar_t, typename acc_t>
__global__ void col2im_coords_kernel(int64_t items, int64_t n0, KernelGeom g, const scalar_t* __restrict__ offset,
                                     const scalar_t* __restrict__ mask, KernelBranch<scalar_t> b0,
                                     KernelBranch<scalar_t> b1, acc_t* grad_in0, acc_t* grad_in1,
                                     scalar_t* grad_offset, scalar_t* grad_mask) {
  const int64_t hw = g.h * g.w;
  CSFRN_KERNEL_LOOP(it, items) {
    const DeformItem<acc_t> d = deform_item<acc_t>(g, it, n0, offset, mask);
    acc_t sum_y = acc_t(0), sum_x = acc_t(0), sum_m = acc_t(0);
    const KernelBranch<scalar_t> branches[2] = {b0, b1};
    acc_t* grads[2] = {grad_in0, grad_in1};
    for (int bi = 0; bi < 2; ++bi) {
      const KernelBranch<scalar_t>& br = branches[bi];
      if (br.channels == 0) continue;
      const int64_t per_group = br.channels / g.offset_groups;
      for (int64_t c = d.og * per_group; c < (d.og + 1) * per_group; ++c) {
        const acc_t gv = static_cast<acc_t>(br.cols[((d.b * br.channels + c) * g.taps + d.k) * g.pixels + d.pix]);
        const int64_t plane_at = (d.n * br.channels + c) * hw;
        if (grads[bi] != nullptr && d.pt.inside) {
          for (int j = 0; j < 4; ++j) {
            if (d.ok[j]) atomicAdd(grads[bi] + plane_at + d.idx[j], d.w[j] * gv);
          }
        }
        if (grad_offset != nullptr || grad_mask != nullptr) {
          acc_t v[4];
          for (int j = 0; j < 4; ++j) v[j] = d.ok[j] ? static_cast<acc_t>(br.input[plane_at + d.idx[j]]) : acc_t(0);
          acc_t value, d_y, d_x;
          bilinear_value_grad(d.pt.ly, d.pt.lx, v, value, d_y, d_x);
          sum_y += gv * d_y;
          sum_x += gv * d_x;
          sum_m += gv * value;
        }
      }
    }
    if (grad_offset != nullptr) {
      grad_offset[d.offset_at] = static_cast<scalar_t>(sum_y * d.m);
      grad_offset[d.offset_at + g.pixels] = static_cast<scalar_t>(sum_x * d.m);
    }
    if (grad_mask != nullptr) grad_mask[d.mask_at] = static_cast<scalar_t>(sum_m);
  }
}

// One convolution of a (dual) call.
struct Branch {
  at::Tensor input;   // [N, C, H, W], contiguous
  at::Tensor weight;  // [groups, C_out / groups, C / groups * taps], contiguous
  int64_t channels, groups, out_channels;
};

Branch make_branch(const at::Tensor& input, const at::Tensor& weight) {
  const int64_t groups = input.size(1) / weight.size(1);
  // Sizes spelled out: view cannot infer a -1 beside a zero size (C_out = 0).
  return {input.contiguous(),
          weight.contiguous().view({groups, weight.size(0) / groups, weight.size(1) * weight.size(2) * weight.size(3)}),
          input.size(1), groups, weight.size(0)};
}

// Images per chunk so that the columns of all branches stay under the budget.
int64_t chunk_images(const DeformGeom& g, const std::vector<Branch>& branches, int64_t elem) {
  int64_t per_image = 0;
  for (const Branch& b : branches) per_image += b.channels * g.taps() * g.pixels() * elem;
  return std::max<int64_t>(1, std::min<int64_t>(g.n, kColumnBytes / std::max<int64_t>(1, per_image)));
}

template <typename scalar_t>
KernelBranch<scalar_t> kernel_branch(const std::vector<Branch>& branches, const std::vector<at::Tensor>& cols,
                                     size_t i) {
  if (i >= branches.size() || !cols[i].defined()) return {nullptr, nullptr, 0};
  return {branches[i].input.data_ptr<scalar_t>(), cols[i].data_ptr<scalar_t>(), branches[i].channels};
}

template <typename scalar_t>
void launch_im2col(const DeformGeom& g, int64_t n0, int64_t nb, const at::Tensor& offset,
                   const std::optional<at::Tensor>& mask, const std::vector<Branch>& branches,
                   const std::vector<at::Tensor>& cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t items = nb * g.offset_groups * g.taps() * g.pixels();
  if (items == 0) return;
  CSFRN_LAUNCH(blocks_for(items), kThreads, 0, at::cuda::getCurrentCUDAStream(), im2col_kernel<scalar_t, acc_t>)(
      items, n0, kernel_geom(g), offset.data_ptr<scalar_t>(),
      mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr, kernel_branch<scalar_t>(branches, cols, 0),
      kernel_branch<scalar_t>(branches, cols, 1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [B, groups, rows, pixels] view of a chunk's columns.
at::Tensor grouped(const at::Tensor& cols, const Branch& b, int64_t nb, const DeformGeom& g) {
  return cols.view({nb, b.groups, b.channels / b.groups * g.taps(), g.pixels()});
}

std::vector<at::Tensor> forward_cuda(const DeformGeom& g, const std::vector<Branch>& branches,
                                     const std::vector<std::optional<at::Tensor>>& biases, const at::Tensor& offset,
                                     const std::optional<at::Tensor>& mask) {
  const int64_t taps = g.taps(), L = g.pixels();
  std::vector<at::Tensor> outs;
  for (const Branch& b : branches) outs.push_back(at::empty({g.n, b.out_channels, L}, b.input.options()));
  if (g.n == 0) return outs;
  const int64_t chunk = chunk_images(g, branches, branches[0].input.element_size());
  std::vector<at::Tensor> cols;
  for (const Branch& b : branches) cols.push_back(at::empty({chunk, b.channels * taps, L}, b.input.options()));
  for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
    const int64_t nb = std::min(chunk, g.n - n0);
    std::vector<at::Tensor> chunk_cols;
    for (const at::Tensor& c : cols) chunk_cols.push_back(c.narrow(0, 0, nb));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, offset.scalar_type(), "deform_im2col_cuda", [&] {
      launch_im2col<scalar_t>(g, n0, nb, offset, mask, branches, chunk_cols);
    });
    for (size_t i = 0; i < branches.size(); ++i) {
      const Branch& b = branches[i];
      outs[i].narrow(0, n0, nb).view({nb, b.groups, b.out_channels / b.groups, L})
          .copy_(at::matmul(b.weight.unsqueeze(0), grouped(chunk_cols[i], b, nb, g)));
    }
  }
  for (size_t i = 0; i < branches.size(); ++i) {
    if (biases[i].has_value()) outs[i].add_(biases[i]->view({1, -1, 1}));
  }
  return outs;
}

struct BackwardResult {
  std::vector<at::Tensor> grad_input, grad_weight;
  at::Tensor grad_offset, grad_mask;
};

BackwardResult backward_cuda(const DeformGeom& g, const std::vector<Branch>& branches,
                             const std::vector<at::Tensor>& grad_outs, const at::Tensor& offset,
                             const std::optional<at::Tensor>& mask, const std::vector<bool>& need_input,
                             const std::vector<bool>& need_weight, bool need_offset, bool need_mask,
                             const char* op_name) {
  const int64_t taps = g.taps(), L = g.pixels();
  const auto opts = offset.options();
  const auto acc_opts = opts.dtype(at::toOpMathType(offset.scalar_type()));
  BackwardResult r;
  const bool need_coords = need_offset || need_mask;
  bool any_input = false;
  for (size_t i = 0; i < branches.size(); ++i) {
    r.grad_input.push_back(need_input[i] ? at::zeros({g.n, branches[i].channels, g.h, g.w}, acc_opts)
                                         : at::Tensor());
    r.grad_weight.push_back(need_weight[i] ? at::zeros(branches[i].weight.sizes(), acc_opts) : at::Tensor());
    any_input = any_input || need_input[i];
  }
  if (any_input) at::globalContext().alertNotDeterministic(op_name);
  r.grad_offset = need_offset ? at::empty({g.n, g.offset_groups * 2 * taps, g.h_out, g.w_out}, opts)
                              : at::empty({0}, opts);
  r.grad_mask = need_mask ? at::empty({g.n, g.offset_groups * taps, g.h_out, g.w_out}, opts) : at::empty({0}, opts);

  const int64_t chunk = g.n == 0 ? 1 : chunk_images(g, branches, offset.element_size());
  for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
    const int64_t nb = std::min(chunk, g.n - n0);
    // Weight gradients: recompute the columns of the branches that need one.
    std::vector<at::Tensor> cols(branches.size());
    bool any_weight = false;
    for (size_t i = 0; i < branches.size(); ++i) {
      if (need_weight[i]) {
        cols[i] = at::empty({nb, branches[i].channels * taps, L}, opts);
        any_weight = true;
      }
    }
    if (any_weight) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, offset.scalar_type(), "deform_im2col_cuda", [&] {
        launch_im2col<scalar_t>(g, n0, nb, offset, mask, branches, cols);
      });
      for (size_t i = 0; i < branches.size(); ++i) {
        if (!need_weight[i]) continue;
        const Branch& b = branches[i];
        const at::Tensor gout = grad_outs[i].narrow(0, n0, nb).view({nb, b.groups, b.out_channels / b.groups, L});
        const at::Tensor per_image = at::matmul(gout, grouped(cols[i], b, nb, g).transpose(2, 3));
        r.grad_weight[i].add_(at::sum(per_image, at::IntArrayRef{0}, false, at::toOpMathType(offset.scalar_type())));
      }
      cols.assign(branches.size(), at::Tensor());
    }
    if (!(any_input || need_coords)) continue;
    std::vector<at::Tensor> grad_cols;
    for (size_t i = 0; i < branches.size(); ++i) {
      const Branch& b = branches[i];
      const at::Tensor gout = grad_outs[i].narrow(0, n0, nb).view({nb, b.groups, b.out_channels / b.groups, L});
      grad_cols.push_back(at::matmul(b.weight.transpose(1, 2).unsqueeze(0), gout).contiguous());
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, offset.scalar_type(), "deform_col2im_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t items = nb * g.offset_groups * taps * L;
      if (items == 0) return;
      auto grad_in = [&](size_t i) {
        return i < branches.size() && need_input[i] ? r.grad_input[i].data_ptr<acc_t>() : nullptr;
      };
      CSFRN_LAUNCH(blocks_for(items), kThreads, 0, at::cuda::getCurrentCUDAStream(),
                   col2im_coords_kernel<scalar_t, acc_t>)(
          items, n0, kernel_geom(g), offset.data_ptr<scalar_t>(),
          mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr, kernel_branch<scalar_t>(branches, grad_cols, 0),
          kernel_branch<scalar_t>(branches, grad_cols, 1), grad_in(0), grad_in(1),
          need_offset ? r.grad_offset.data_ptr<scalar_t>() : nullptr,
          need_mask ? r.grad_mask.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  for (size_t i = 0; i < branches.size(); ++i) {
    r.grad_input[i] = need_input[i] ? r.grad_input[i].to(offset.scalar_type()) : at::empty({0}, opts);
    r.grad_weight[i] = need_weight[i] ? r.grad_weight[i].to(offset.scalar_type()) : at::empty({0}, opts);
  }
  return r;
}

at::Tensor deform_conv2d_cuda(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g = check_deform_conv2d_args(input, offset, weight, bias, mask, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto outs =
      forward_cuda(g, {make_branch(input, weight)}, {bias}, offset.contiguous(), contiguous_if_present(mask));
  return outs[0].view({g.n, weight.size(0), g.h_out, g.w_out});
}

std::tuple<at::Tensor, at::Tensor> dual_deform_conv2d_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
    const at::Tensor& weight_y, const std::optional<at::Tensor>& bias_x, const std::optional<at::Tensor>& bias_y,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g =
      check_dual_deform_conv2d_args(x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto outs = forward_cuda(g, {make_branch(x, weight_x), make_branch(y, weight_y)}, {bias_x, bias_y},
                                 offset.contiguous(), contiguous_if_present(mask));
  return {outs[0].view({g.n, weight_x.size(0), g.h_out, g.w_out}),
          outs[1].view({g.n, weight_y.size(0), g.h_out, g.w_out})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const std::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 5> output_mask) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g = check_deform_conv2d_args(input, offset, weight, std::nullopt, mask, stride, padding, dilation);
  check_deform_same("input", input, "grad_out", grad_out);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor go = grad_out.contiguous().view({g.n, weight.size(0), g.pixels()});
  BackwardResult r = backward_cuda(g, {make_branch(input, weight)}, {go}, offset.contiguous(),
                                   contiguous_if_present(mask), {output_mask[0]}, {output_mask[2]}, output_mask[1],
                                   output_mask[4] && mask.has_value(), "csfrn::deform_conv2d_backward on CUDA "
                                   "(grad of input uses atomicAdd; the CPU kernel is deterministic)");
  at::Tensor gw = output_mask[2] ? r.grad_weight[0].view(weight.sizes()) : r.grad_weight[0];
  return {r.grad_input[0], r.grad_offset, gw, grad_bias(grad_out, output_mask[3]), r.grad_mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dual_deform_conv2d_backward_cuda(const at::Tensor& grad_out_x, const at::Tensor& grad_out_y, const at::Tensor& x,
                                 const at::Tensor& y, const at::Tensor& offset, const at::Tensor& weight_x,
                                 const at::Tensor& weight_y, const std::optional<at::Tensor>& mask,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 std::array<bool, 8> output_mask) {
  const KernelScope kernel_scope;  // the matmuls inside: no autograd history, no autocast
  const DeformGeom g = check_dual_deform_conv2d_args(x, y, offset, weight_x, weight_y, std::nullopt, std::nullopt,
                                                     mask, stride, padding, dilation);
  check_deform_same("x", x, "grad_out_x", grad_out_x);
  check_deform_same("x", x, "grad_out_y", grad_out_y);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gx = grad_out_x.contiguous().view({g.n, weight_x.size(0), g.pixels()});
  const at::Tensor gy = grad_out_y.contiguous().view({g.n, weight_y.size(0), g.pixels()});
  BackwardResult r = backward_cuda(g, {make_branch(x, weight_x), make_branch(y, weight_y)}, {gx, gy},
                                   offset.contiguous(), contiguous_if_present(mask), {output_mask[0], output_mask[1]},
                                   {output_mask[3], output_mask[4]}, output_mask[2],
                                   output_mask[7] && mask.has_value(), "csfrn::dual_deform_conv2d_backward on CUDA "
                                   "(grads of x and y use atomicAdd; the CPU kernel is deterministic)");
  at::Tensor gwx = output_mask[3] ? r.grad_weight[0].view(weight_x.sizes()) : r.grad_weight[0];
  at::Tensor gwy = output_mask[4] ? r.grad_weight[1].view(weight_y.sizes()) : r.grad_weight[1];
  return {r.grad_input[0], r.grad_input[1], r.grad_offset, gwx, gwy,
          grad_bias(grad_out_x, output_mask[5]), grad_bias(grad_out_y, output_mask[6]), r.grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(CSFRN_CUDA_LIBRARY, CSFRN_CUDA_KEY, m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cuda);
  m.impl("dual_deform_conv2d", &dual_deform_conv2d_cuda);
  m.impl("dual_deform_conv2d_backward", &dual_deform_conv2d_backward_cuda);
}

}  // namespace csfrn
