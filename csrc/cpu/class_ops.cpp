// CPU kernels of the class-wise ops: class average pooling and Gaussian centre distances.
//
// Work is split into fixed-size pixel chunks per image (the split depends on the shape only, never on the
// thread count), each chunk accumulates into its own small buffer, and the buffers are reduced in chunk
// order: results are bitwise reproducible whatever the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/class_ops.h"

namespace csfrn {
namespace {

constexpr int64_t kNoBadLabel = std::numeric_limits<int64_t>::min();

// Pixel chunk for the pooling reductions: at most 16 partial buffers per image, at least 2048 pixels each.
int64_t pool_chunk(int64_t pixels) { return std::max<int64_t>(2048, (pixels + 15) / 16); }

// Records the first out-of-range label seen by any thread.
void note_bad_label(std::atomic<int64_t>& bad, int64_t value) {
  int64_t expected = kNoBadLabel;
  bad.compare_exchange_strong(expected, value);
}

std::tuple<at::Tensor, at::Tensor> class_avg_pool_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                      int64_t num_classes, int64_t ignore_index) {
  check_class_avg_pool_args(features, labels, num_classes);
  const int64_t N = features.size(0), D = features.size(1), P = features.size(2) * features.size(3);
  const int64_t K = num_classes, D1 = D + 1;  // one extra slot per class for the pixel count
  at::Tensor means = at::zeros({N, K, D}, features.options());
  at::Tensor counts = at::zeros({N, K}, features.options());
  if (N == 0) return {means, counts};

  const PixelView fv = pixel_view(features);
  const at::Tensor lab = labels.contiguous();
  const int64_t chunk = pool_chunk(P), nchunks = P == 0 ? 1 : (P + chunk - 1) / chunk;
  std::atomic<int64_t> bad{kNoBadLabel};

  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "class_avg_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partial(static_cast<size_t>(N * nchunks * K * D1), acc_t(0));
    const scalar_t* f = fv.t.const_data_ptr<scalar_t>();
    const int64_t* l = lab.const_data_ptr<int64_t>();

    at::parallel_for(0, N * nchunks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> slot(chunk);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / nchunks, p0 = (b % nchunks) * chunk, np = std::min(chunk, P - p0);
        acc_t* buf = partial.data() + b * K * D1;
        const scalar_t* fn = f + n * fv.sn + p0 * fv.sp;
        for (int64_t p = 0; p < np; ++p) {
          const int64_t label = l[n * P + p0 + p];
          slot[p] = label_slot(label, K, ignore_index);
          if (slot[p] == -2) note_bad_label(bad, label);
          if (slot[p] >= 0) buf[slot[p] * D1 + D] += acc_t(1);
        }
        if (fv.sp == 1) {  // NCHW: walk each channel plane in memory order
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t* fd = fn + d * fv.sc;
            for (int64_t p = 0; p < np; ++p)
              if (slot[p] >= 0) buf[slot[p] * D1 + d] += static_cast<acc_t>(fd[p]);
          }
        } else {  // channels_last: each pixel's channels are adjacent
          for (int64_t p = 0; p < np; ++p) {
            if (slot[p] < 0) continue;
            const scalar_t* fp = fn + p * fv.sp;
            acc_t* row = buf + slot[p] * D1;
            for (int64_t d = 0; d < D; ++d) row[d] += static_cast<acc_t>(fp[d * fv.sc]);
          }
        }
      }
    });
    if (bad.load() != kNoBadLabel) return;

    scalar_t* m = means.data_ptr<scalar_t>();
    scalar_t* c = counts.data_ptr<scalar_t>();
    at::parallel_for(0, N * K, 16, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> sum(D1);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / K, k = i % K;
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t ch = 0; ch < nchunks; ++ch) {
          const acc_t* buf = partial.data() + ((n * nchunks + ch) * K + k) * D1;
          for (int64_t d = 0; d < D1; ++d) sum[d] += buf[d];
        }
        const acc_t count = sum[D];
        c[i] = static_cast<scalar_t>(count);
        if (count > 0)
          for (int64_t d = 0; d < D; ++d) m[i * D + d] = static_cast<scalar_t>(sum[d] / count);
      }
    });
  });
  if (bad.load() != kNoBadLabel) fail_bad_label(bad.load(), K, ignore_index);
  return {means, counts};
}

at::Tensor class_avg_pool_backward_cpu(const at::Tensor& grad_means, const at::Tensor& labels,
                                       const at::Tensor& counts, int64_t ignore_index) {
  const int64_t N = grad_means.size(0), K = grad_means.size(1), D = grad_means.size(2);
  const int64_t H = labels.size(1), W = labels.size(2), P = H * W;
  at::Tensor grad = at::empty({N, D, H, W}, grad_means.options());
  if (grad.numel() == 0) return grad;
  const at::Tensor g = grad_means.contiguous(), lab = labels.contiguous(), cnt = counts.contiguous();

  AT_DISPATCH_FLOATING_TYPES(grad_means.scalar_type(), "class_avg_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gm = g.const_data_ptr<scalar_t>();
    const scalar_t* cn = cnt.const_data_ptr<scalar_t>();
    const int64_t* l = lab.const_data_ptr<int64_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    // d means[n,k,d] / d features[n,d,p] = 1 / counts[n,k] for pixels p of class k.
    at::parallel_for(0, N * D, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / D, d = i % D;
        const int64_t* ln = l + n * P;
        scalar_t* o = out + i * P;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t k = label_slot(ln[p], K, ignore_index);
          o[p] = k < 0 ? scalar_t(0)
                       : static_cast<scalar_t>(static_cast<acc_t>(gm[(n * K + k) * D + d]) /
                                               static_cast<acc_t>(cn[n * K + k]));
        }
      }
    });
  });
  return grad;
}

// Pixel chunk of the distance kernels: small enough that a chunk of embeddings stays in L1/L2.
constexpr int64_t kDistChunk = 256;

at::Tensor center_distance_cpu(const at::Tensor& embeddings, const at::Tensor& centers, const at::Tensor& margins,
                               double delta) {
  check_center_distance_args(embeddings, centers, margins);
  const int64_t N = embeddings.size(0), D = embeddings.size(1), H = embeddings.size(2), W = embeddings.size(3);
  const int64_t P = H * W, K = centers.size(1);
  at::Tensor phi = at::empty({N, K, H, W}, embeddings.options());
  if (phi.numel() == 0) return phi;
  const PixelView ev = pixel_view(embeddings);
  const at::Tensor s = centers.contiguous(), m = margins.contiguous();
  const int64_t nchunks = (P + kDistChunk - 1) / kDistChunk;

  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "center_distance_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* e = ev.t.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    scalar_t* out = phi.data_ptr<scalar_t>();
    const acc_t dl = static_cast<acc_t>(delta);
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> eb(D * kDistChunk), dist(kDistChunk);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / nchunks, p0 = (b % nchunks) * kDistChunk, np = std::min(kDistChunk, P - p0);
        for (int64_t d = 0; d < D; ++d)  // stage the chunk as [D][np] in the accumulation type
          for (int64_t p = 0; p < np; ++p)
            eb[d * kDistChunk + p] = static_cast<acc_t>(e[n * ev.sn + d * ev.sc + (p0 + p) * ev.sp]);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* sk = sp + (n * K + k) * D;
          std::fill(dist.begin(), dist.begin() + np, acc_t(0));
          for (int64_t d = 0; d < D; ++d) {
            const acc_t c = static_cast<acc_t>(sk[d]);
            const acc_t* ed = eb.data() + d * kDistChunk;
            for (int64_t p = 0; p < np; ++p) {
              const acc_t t = ed[p] - c;
              dist[p] += t * t;
            }
          }
          const acc_t scale = margin_scale(static_cast<acc_t>(mp[n * K + k]), dl);
          scalar_t* o = out + (n * K + k) * P + p0;
          for (int64_t p = 0; p < np; ++p) o[p] = static_cast<scalar_t>(phi_of(dist[p], scale));
        }
      }
    });
  });
  return phi;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> center_distance_backward_cpu(
    const at::Tensor& grad_phi, const at::Tensor& embeddings, const at::Tensor& centers, const at::Tensor& margins,
    double delta, std::array<bool, 3> output_mask) {
  const int64_t N = embeddings.size(0), D = embeddings.size(1), H = embeddings.size(2), W = embeddings.size(3);
  const int64_t P = H * W, K = centers.size(1);
  const auto opts = embeddings.options();
  at::Tensor grad_e = output_mask[0] ? at::empty({N, D, H, W}, opts) : at::empty({0}, opts);
  at::Tensor grad_s = output_mask[1] ? at::zeros({N, K, D}, opts) : at::empty({0}, opts);
  at::Tensor grad_m = output_mask[2] ? at::zeros({N, K}, opts) : at::empty({0}, opts);
  if (N == 0 || K == 0 || P == 0) {
    if (output_mask[0]) grad_e.zero_();  // no class pulls on the embeddings
    return {grad_e, grad_s, grad_m};
  }
  const PixelView ev = pixel_view(embeddings);
  const at::Tensor g = grad_phi.contiguous(), s = centers.contiguous(), m = margins.contiguous();
  const int64_t nchunks = (P + kDistChunk - 1) / kDistChunk;
  const bool need_e = output_mask[0], need_s = output_mask[1], need_m = output_mask[2];

  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "center_distance_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* e = ev.t.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const acc_t dl = static_cast<acc_t>(delta);
    // Per-chunk partial sums of the centre and margin gradients, reduced in chunk order below.
    std::vector<acc_t> part_s(need_s ? N * nchunks * K * D : 0), part_m(need_m ? N * nchunks * K : 0);
    scalar_t* ge_out = need_e ? grad_e.data_ptr<scalar_t>() : nullptr;

    at::parallel_for(0, N * nchunks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> eb(D * kDistChunk), ge(D * kDistChunk), dist(kDistChunk), w(kDistChunk);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / nchunks, p0 = (b % nchunks) * kDistChunk, np = std::min(kDistChunk, P - p0);
        for (int64_t d = 0; d < D; ++d)
          for (int64_t p = 0; p < np; ++p)
            eb[d * kDistChunk + p] = static_cast<acc_t>(e[n * ev.sn + d * ev.sc + (p0 + p) * ev.sp]);
        std::fill(ge.begin(), ge.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* sk = sp + (n * K + k) * D;
          std::fill(dist.begin(), dist.begin() + np, acc_t(0));
          for (int64_t d = 0; d < D; ++d) {
            const acc_t c = static_cast<acc_t>(sk[d]);
            const acc_t* ed = eb.data() + d * kDistChunk;
            for (int64_t p = 0; p < np; ++p) {
              const acc_t t = ed[p] - c;
              dist[p] += t * t;
            }
          }
          const acc_t scale = margin_scale(static_cast<acc_t>(mp[n * K + k]), dl);
          const scalar_t* gk = gp + (n * K + k) * P + p0;
          acc_t gm_sum = 0;
          for (int64_t p = 0; p < np; ++p) {
            acc_t gm;
            phi_backward(static_cast<acc_t>(gk[p]), dist[p], scale, dl, w[p], gm);
            gm_sum += gm;
          }
          if (need_m) part_m[b * K + k] = gm_sum;
          if (!need_e && !need_s) continue;
          // d dist / d e = 2 (e - s_k), d dist / d s_k = -2 (e - s_k)
          acc_t* ps = need_s ? part_s.data() + (b * K + k) * D : nullptr;
          for (int64_t d = 0; d < D; ++d) {
            const acc_t c = static_cast<acc_t>(sk[d]);
            const acc_t* ed = eb.data() + d * kDistChunk;
            acc_t* gd = ge.data() + d * kDistChunk;
            acc_t acc = 0;
            for (int64_t p = 0; p < np; ++p) {
              const acc_t t = w[p] * (ed[p] - c);
              acc += t;
              gd[p] += t;
            }
            if (ps) ps[d] = acc_t(-2) * acc;
          }
        }
        if (need_e)
          for (int64_t d = 0; d < D; ++d)  // grad_e is contiguous NCHW
            for (int64_t p = 0; p < np; ++p)
              ge_out[(n * D + d) * P + p0 + p] = static_cast<scalar_t>(acc_t(2) * ge[d * kDistChunk + p]);
      }
    });

    if (need_s || need_m) {
      scalar_t* gs = need_s ? grad_s.data_ptr<scalar_t>() : nullptr;
      scalar_t* gmo = need_m ? grad_m.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, N * K, 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t n = i / K, k = i % K;
          if (need_m) {
            acc_t acc = 0;
            for (int64_t ch = 0; ch < nchunks; ++ch) acc += part_m[(n * nchunks + ch) * K + k];
            gmo[i] = static_cast<scalar_t>(acc);
          }
          if (need_s)
            for (int64_t d = 0; d < D; ++d) {
              acc_t acc = 0;
              for (int64_t ch = 0; ch < nchunks; ++ch) acc += part_s[((n * nchunks + ch) * K + k) * D + d];
              gs[i * D + d] = static_cast<scalar_t>(acc);
            }
        }
      });
    }
  });
  return {grad_e, grad_s, grad_m};
}

}  // namespace

TORCH_LIBRARY_IMPL(csfrn, CPU, m) {
  m.impl("class_avg_pool", &class_avg_pool_cpu);
  m.impl("class_avg_pool_backward", &class_avg_pool_backward_cpu);
  m.impl("center_distance", &center_distance_cpu);
  m.impl("center_distance_backward", &center_distance_backward_cpu);
}

}  // namespace csfrn
