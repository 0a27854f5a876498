// CPU kernels of the class-wise ops: class average pooling and Gaussian centre distances.
//
// Work is split into fixed-size pixel chunks per image (the split depends on the shape only, never on the
// thread count), each chunk accumulates into its own small buffer, and the buffers are reduced in chunk
// order: results are bitwise reproducible whatever the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/class_ops.h"
#include "common/class_ops_checks.h"
#include "common/cpu_clones.h"
#include "common/kernel_scope.h"

namespace csfrn {
namespace {

// "No bad label" as a pixel index (an index, not a label value: every int64 is a possible label value).
constexpr int64_t kNoBadLabel = std::numeric_limits<int64_t>::max();

// Pixel chunk for the pooling reductions: at most 16 partial buffers per image, at least 2048 pixels each.
int64_t pool_chunk(int64_t pixels) { return std::max<int64_t>(2048, (pixels + 15) / 16); }

// Keeps the smallest index of a bad label any thread has seen: the error names the first one in memory order,
// whatever the thread count.
void note_bad_label(std::atomic<int64_t>& first, int64_t index) {
  int64_t seen = first.load();
  while (index < seen && !first.compare_exchange_weak(seen, index)) {
  }
}

// Sums values[p] into bank[(p % 4) * (K + 1) + slot[p]]: four banks break the chain of dependent adds that
// neighbouring pixels of one class would otherwise form; slot K is the bucket of ignored pixels (no branch).
template <typename scalar_t, typename acc_t>
inline void bank_sum(acc_t* __restrict__ bank, const int32_t* __restrict__ slot, const scalar_t* __restrict__ values,
                     int64_t K, int64_t np) {
  std::fill(bank, bank + 4 * (K + 1), acc_t(0));
  int64_t p = 0;
  for (; p + 4 <= np; p += 4)
    for (int64_t j = 0; j < 4; ++j) bank[j * (K + 1) + slot[p + j]] += static_cast<acc_t>(values[p + j]);
  for (; p < np; ++p) bank[slot[p]] += static_cast<acc_t>(values[p]);
}

// slot[p] = the label of pixel p when it is a class, K when it is ignore_index or outside [0, K). Returns the
// index p of the first label that is neither (the forward reports it), or kNoBadLabel.
inline int64_t fill_slots_portable(int32_t* __restrict__ slot, const int64_t* __restrict__ labels, int64_t np,
                                   int64_t K, int64_t ignore_index) {
  int64_t bad = kNoBadLabel;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t k = label_slot(labels[p], K, ignore_index);
    if (k == -2 && bad == kNoBadLabel) bad = p;
    slot[p] = static_cast<int32_t>(k < 0 ? K : k);
  }
  return bad;
}

// count[k] += number of pixels in slot k, for k < K; four banks of counters, as in bank_sum.
template <typename acc_t>
inline void add_slot_counts(acc_t* __restrict__ count, int64_t stride, const int32_t* __restrict__ slot, int64_t np,
                            int64_t K, std::vector<int32_t>& banks) {
  banks.assign(4 * (K + 1), 0);
  int32_t* b = banks.data();
  int64_t p = 0;
  for (; p + 4 <= np; p += 4)
    for (int64_t j = 0; j < 4; ++j) ++b[j * (K + 1) + slot[p + j]];
  for (; p < np; ++p) ++b[slot[p]];
  for (int64_t k = 0; k < K; ++k)
    count[k * stride] += static_cast<acc_t>(b[k] + b[(K + 1) + k] + b[2 * (K + 1) + k] + b[3 * (K + 1) + k]);
}

// ---------------------------------------------------------------- AVX-512 paths of the pooling (float32)
// Used when torch itself runs its AVX-512 kernels (torch.backends.cpu.get_cpu_capability(); the
// ATEN_CPU_CAPABILITY variable lowers it, which is how the tests also reach the portable loops).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

bool use_avx512() {
  static const bool yes = at::get_cpu_capability() == "AVX512";
  return yes;
}

#pragma GCC push_options
#pragma GCC target("avx512f")
#pragma GCC diagnostic push
// gcc 12's intrinsics start from _mm512_undefined_ps(), which this warning takes for an uninitialised read
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {

inline __m512 lo64(__m512 x, __m512 y) {
  return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x), _mm512_castps_pd(y)));
}
inline __m512 hi64(__m512 x, __m512 y) {
  return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x), _mm512_castps_pd(y)));
}

// r[i][j] -> r[j][i] for a 16x16 block of floats: 32-bit, then 64-bit interleaves within 128-bit lanes, then
// two rounds of 128-bit lane shuffles.
inline void transpose16(__m512 r[16]) {
  __m512 a[16], b[16];
  for (int k = 0; k < 8; ++k) {
    a[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    a[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    b[4 * k] = lo64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 1] = hi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 2] = lo64(a[4 * k + 1], a[4 * k + 3]);
    b[4 * k + 3] = hi64(a[4 * k + 1], a[4 * k + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // b[4g + m] holds pixel 4L + m of channels 4g..4g+3 in 128-bit lane L
    const __m512 c0 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0x88), c1 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0xDD);
    const __m512 c2 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0x88);
    const __m512 c3 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0xDD);
    r[m] = _mm512_shuffle_f32x4(c0, c2, 0x88);
    r[4 + m] = _mm512_shuffle_f32x4(c1, c3, 0x88);
    r[8 + m] = _mm512_shuffle_f32x4(c0, c2, 0xDD);
    r[12 + m] = _mm512_shuffle_f32x4(c1, c3, 0xDD);
  }
}

// Class sums of channels c0..c0+15 over one pixel chunk of an NCHW plane set: each 16 channels x 16 pixels tile
// is transposed in registers, so a pixel adds its 16 channels to its class row with one vector add. Pixel j of
// a tile goes to bank j % 4: neighbouring pixels of one class then do not wait on each other's adds. Rows of
// bank b: b * (K + 1) + slot, slot K being the ignored pixels. Adds the banks into buf[k * D1 + c0 + i].
void pool_block16(float* __restrict__ buf, int64_t D1, float* __restrict__ bank, const int32_t* __restrict__ slot,
                  const float* __restrict__ f, int64_t sc, int64_t c0, int64_t np, int64_t K) {
  const int64_t rows = K + 1;
  std::fill(bank, bank + 4 * rows * 16, 0.0f);
  auto add = [&](int64_t j, int64_t p, __m512 v) {
    float* a = bank + ((j & 3) * rows + slot[p]) * 16;
    _mm512_store_ps(a, _mm512_add_ps(_mm512_load_ps(a), v));
  };
  const float* fc = f + c0 * sc;
  int64_t p0 = 0;
  for (; p0 + 16 <= np; p0 += 16) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(fc + i * sc + p0);
    transpose16(r);
    for (int j = 0; j < 16; ++j) add(j, p0 + j, r[j]);
  }
  if (p0 < np) {  // the last, partial tile: absent pixels load as zeros and are not added
    const __mmask16 m = static_cast<__mmask16>((1u << (np - p0)) - 1);
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(m, fc + i * sc + p0);
    transpose16(r);
    for (int j = 0; j < np - p0; ++j) add(j, p0 + j, r[j]);
  }
  for (int64_t k = 0; k < K; ++k) {
    float* out = buf + k * D1 + c0;
    const float *b0 = bank + k * 16, *b1 = b0 + rows * 16, *b2 = b1 + rows * 16, *b3 = b2 + rows * 16;
    for (int i = 0; i < 16; ++i) out[i] += (b0[i] + b1[i]) + (b2[i] + b3[i]);
  }
}

// fill_slots_portable, eight labels at a time: an unsigned compare finds the classes, a narrowing move
// stores the slots. Bad labels only set a mask; the portable loop then finds the first of them.
int64_t fill_slots(int32_t* __restrict__ slot, const int64_t* __restrict__ labels, int64_t np, int64_t K,
                   int64_t ignore_index) {
  const __m512i k = _mm512_set1_epi64(K), ignore = _mm512_set1_epi64(ignore_index);
  __mmask8 bad = 0;
  for (int64_t p = 0; p < np; p += 8) {
    const __mmask8 m = np - p >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << (np - p)) - 1);
    const __m512i l = _mm512_maskz_loadu_epi64(m, labels + p);
    const __mmask8 ignored = _mm512_cmpeq_epi64_mask(l, ignore);
    const __mmask8 cls = _mm512_cmplt_epu64_mask(l, k) & ~ignored;
    bad |= m & ~cls & ~ignored;
    _mm512_mask_cvtepi64_storeu_epi32(slot + p, m, _mm512_mask_blend_epi64(cls, k, l));
  }
  return bad ? fill_slots_portable(slot, labels, np, K, ignore_index) : kNoBadLabel;
}

// out[p] = row[slot[p]] for one (image, channel) row of the pooling's gradient, row holding the K + 1 <= 32
// table entries (zero-padded to 32): a two-register permute does 16 lookups at once.
void lookup_row32(float* __restrict__ out, const float* __restrict__ row, const int32_t* __restrict__ slot, int64_t P) {
  const __m512 lo = _mm512_loadu_ps(row), hi = _mm512_loadu_ps(row + 16);
  int64_t p = 0;
  for (; p + 16 <= P; p += 16) _mm512_storeu_ps(out + p, _mm512_permutex2var_ps(lo, _mm512_loadu_si512(slot + p), hi));
  if (p < P) {
    const __mmask16 m = static_cast<__mmask16>((1u << (P - p)) - 1);
    _mm512_mask_storeu_ps(out + p, m, _mm512_permutex2var_ps(lo, _mm512_maskz_loadu_epi32(m, slot + p), hi));
  }
}

}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

// Class sums of the channels of one chunk, 16 at a time; returns the first channel left to the portable loop.
inline int64_t pool_blocks16(float* buf, int64_t D1, float* bank, const int32_t* slot, const float* f, int64_t sc,
                             int64_t D, int64_t np, int64_t K) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) avx512::pool_block16(buf, D1, bank, slot, f, sc, d, np, K);
  return d;
}

inline bool lookup_row32(float* out, const float* row, const int32_t* slot, int64_t P) {
  avx512::lookup_row32(out, row, slot, P);
  return true;
}

inline int64_t fill_slots(int32_t* slot, const int64_t* labels, int64_t np, int64_t K, int64_t ignore_index) {
  return use_avx512() ? avx512::fill_slots(slot, labels, np, K, ignore_index)
                      : fill_slots_portable(slot, labels, np, K, ignore_index);
}
#else
bool use_avx512() { return false; }
inline int64_t fill_slots(int32_t* slot, const int64_t* labels, int64_t np, int64_t K, int64_t ignore_index) {
  return fill_slots_portable(slot, labels, np, K, ignore_index);
}
#endif
// Elsewhere (double, other CPUs) there is no vector path: the portable loops do all the work.
template <typename scalar_t>
bool lookup_row32(scalar_t*, const scalar_t*, const int32_t*, int64_t) {
  return false;
}
template <typename acc_t, typename scalar_t>
int64_t pool_blocks16(acc_t*, int64_t, float*, const int32_t*, const scalar_t*, int64_t, int64_t, int64_t, int64_t) {
  return 0;
}

std::tuple<at::Tensor, at::Tensor> class_avg_pool_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                      int64_t num_classes, int64_t ignore_index, bool validate) {
  const KernelScope kernel_scope;  // ATen calls inside: no autograd history, no autocast
  check_class_avg_pool_args(features, labels, num_classes);
  const int64_t N = features.size(0), D = features.size(1), P = features.size(2) * features.size(3);
  const int64_t K = num_classes, D1 = D + 1;  // one extra slot per class for the pixel count
  TORCH_CHECK_VALUE(K < std::numeric_limits<int32_t>::max(), "num_classes must be < 2^31, got ", K);
  // Both written in full by the reduction below (absent classes too), so no zero-fill.
  at::Tensor means = at::empty({N, K, D}, features.options());
  // counts in the accumulation type, as on CUDA (the same dtype here: the CPU kernels run float32 and float64)
  at::Tensor counts = at::empty({N, K}, features.options().dtype(at::toOpMathType(features.scalar_type())));
  if (N == 0) return {means, counts};

  const PixelView fv = pixel_view(features);
  const at::Tensor lab = labels.contiguous();
  const int64_t chunk = pool_chunk(P), nchunks = P == 0 ? 1 : (P + chunk - 1) / chunk;
  std::atomic<int64_t> bad{kNoBadLabel};  // index into labels of the first bad label

  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "class_avg_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partial(static_cast<size_t>(N * nchunks * K * D1), acc_t(0));
    const scalar_t* f = fv.t.const_data_ptr<scalar_t>();
    const int64_t* l = lab.const_data_ptr<int64_t>();

    const bool simd = std::is_same_v<scalar_t, float> && use_avx512() && fv.sp == 1 && D >= 16;
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int32_t> slot(chunk), count_banks;
      std::vector<acc_t> bank(4 * (K + 1));
      // the AVX-512 path's four banks of [K + 1][16] rows, 64-byte aligned
      std::vector<float> tile_store(simd ? 4 * (K + 1) * 16 + 16 : 0);
      void* tiles_at = tile_store.data();
      size_t room = tile_store.size() * sizeof(float);
      float* tiles =
          simd ? static_cast<float*>(std::align(64, 4 * (K + 1) * 16 * sizeof(float), tiles_at, room)) : nullptr;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / nchunks, p0 = (b % nchunks) * chunk, np = std::min(chunk, P - p0);
        acc_t* buf = partial.data() + b * K * D1;
        const scalar_t* fn = f + n * fv.sn + p0 * fv.sp;
        // bad labels get slot K (ignored); with validate the first one is reported below
        const int64_t first_bad = fill_slots(slot.data(), l + n * P + p0, np, K, ignore_index);
        if (validate && first_bad != kNoBadLabel) note_bad_label(bad, n * P + p0 + first_bad);
        add_slot_counts(buf + D, D1, slot.data(), np, K, count_banks);
        auto fold_banks = [&](int64_t d) {  // add the four banks of one channel into buf[k][d]
          for (int64_t k = 0; k < K; ++k)
            buf[k * D1 + d] += bank[k] + bank[(K + 1) + k] + bank[2 * (K + 1) + k] + bank[3 * (K + 1) + k];
        };
        if (fv.sp == 1) {  // NCHW: walk each channel plane in memory order
          int64_t d = simd ? pool_blocks16(buf, D1, tiles, slot.data(), fn, fv.sc, D, np, K) : 0;
          for (; d < D; ++d) {
            bank_sum(bank.data(), slot.data(), fn + d * fv.sc, K, np);
            fold_banks(d);
          }
        } else {  // channels_last: each pixel's channels are adjacent
          for (int64_t p = 0; p < np; ++p) {
            if (slot[p] == K) continue;
            const scalar_t* fp = fn + p * fv.sp;
            acc_t* row = buf + slot[p] * D1;
            for (int64_t d = 0; d < D; ++d) row[d] += static_cast<acc_t>(fp[d * fv.sc]);
          }
        }
      }
    });
    if (bad.load() != kNoBadLabel) return;

    scalar_t* m = means.data_ptr<scalar_t>();
    acc_t* c = counts.data_ptr<acc_t>();
    // Small reductions run on this thread: waking the pool would cost more than the adds.
    const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 16) / (nchunks * D1));
    at::parallel_for(0, N * K, grain, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> sum(D1);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / K, k = i % K;
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t ch = 0; ch < nchunks; ++ch) {
          const acc_t* buf = partial.data() + ((n * nchunks + ch) * K + k) * D1;
          for (int64_t d = 0; d < D1; ++d) sum[d] += buf[d];
        }
        const acc_t count = sum[D];
        c[i] = count;
        for (int64_t d = 0; d < D; ++d) m[i * D + d] = static_cast<scalar_t>(class_mean(sum[d], count));
      }
    });
  });
  if (bad.load() != kNoBadLabel) fail_bad_label(lab.const_data_ptr<int64_t>()[bad.load()], K, ignore_index);
  return {means, counts};
}

at::Tensor class_avg_pool_backward_cpu(const at::Tensor& grad_means, const at::Tensor& labels, const at::Tensor& counts,
                                       int64_t ignore_index) {
  const KernelScope kernel_scope;  // ATen calls inside: no autograd history, no autocast
  const int64_t N = grad_means.size(0), K = grad_means.size(1), D = grad_means.size(2);
  const int64_t H = labels.size(1), W = labels.size(2), P = H * W;
  at::Tensor grad = at::empty({N, D, H, W}, grad_means.options());
  if (grad.numel() == 0) return grad;
  const at::Tensor g = grad_means.contiguous(), lab = labels.contiguous();
  const at::Tensor cnt = counts.to(at::toOpMathType(grad_means.scalar_type())).contiguous();

  AT_DISPATCH_FLOATING_TYPES(grad_means.scalar_type(), "class_avg_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // d means[n,k,d] / d features[n,d,p] = 1 / counts[n,k] for the pixels p of class k, so
    // grad[n,d,p] = table[n][d][slot of p] with table = grad_means / counts, transposed, and a zero column K
    // for ignored pixels and for labels outside [0, K) (the forward refused them, or ignored them with
    // validate=false). Rows of up to 32 entries are looked up 16 pixels at a time by the AVX-512 path; they are
    // zero-padded to 32 for it.
    const bool simd = std::is_same_v<scalar_t, float> && use_avx512() && K + 1 <= 32;
    const int64_t R = simd ? 32 : K + 1;
    std::vector<scalar_t> table(N * D * R, scalar_t(0));
    const scalar_t* gm = g.const_data_ptr<scalar_t>();
    const acc_t* cn = cnt.const_data_ptr<acc_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const acc_t count = cn[n * K + k];
        if (count > 0)
          for (int64_t d = 0; d < D; ++d)
            table[(n * D + d) * R + k] = static_cast<scalar_t>(static_cast<acc_t>(gm[(n * K + k) * D + d]) / count);
      }
    // One parallel region over (image, pixel chunk) units: a unit finds its pixels' slots once and writes
    // its stretch of every channel row.
    const int64_t* l = lab.const_data_ptr<int64_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const int64_t chunk = pool_chunk(P), nchunks = (P + chunk - 1) / chunk;
    at::parallel_for(0, N * nchunks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int32_t> slot(chunk);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / nchunks, p0 = (b % nchunks) * chunk, np = std::min(chunk, P - p0);
        fill_slots(slot.data(), l + n * P + p0, np, K, ignore_index);  // bad labels get a zero gradient
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t* row = table.data() + (n * D + d) * R;
          scalar_t* o = out + (n * D + d) * P + p0;
          if (simd && lookup_row32(o, row, slot.data(), np)) continue;
          for (int64_t p = 0; p < np; ++p) o[p] = row[slot[p]];
        }
      }
    });
  });
  return grad;
}

// ---------------------------------------------------------------- centre distances
// Pixel chunk of the distance kernels: a chunk of embeddings ([D][kDistChunk]) stays in L1/L2 while every
// centre is compared with it.
constexpr int64_t kDistChunk = 256;

// The float / double with the bits of `bits` (std::bit_cast, spelled for C++17 builds such as older torch's).
template <typename To, typename From>
inline To bits_as(From bits) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To out;
  std::memcpy(&out, &bits, sizeof(To));
  return out;
}

// exp(x) for x <= 0, vectorisable (no libm call): Cody-Waite range reduction and Cephes' polynomials, within
// 2 ulp; results below the smallest normal number are 0 (as flush_tiny does on the GPU). NaN stays NaN.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return underflow ? 0.0f : y * bits_as<float>((static_cast<int32_t>(n) + 127) << 23);
}

inline double exp_nonpositive(double x) {
  const bool underflow = x < -708.0;
  x = underflow ? -708.0 : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double n = (x * 1.4426950408889634 + magic) - magic;
  const double r = (x - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
  const double rr = r * r;
  const double px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1);
  const double q =
      ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr +
      2.00000000000000000009e0;
  const double y = 1.0 + 2.0 * px / (q - px);
  return underflow ? 0.0 : y * bits_as<double>((static_cast<int64_t>(n) + 1023) << 52);
}

// decay[p] = exp(-scale * sum_d (e[d][p] - c[d])^2) for one chunk and one centre; dist kept for the backward.
template <typename T>
CSFRN_ALWAYS_INLINE void chunk_decay_impl(T* __restrict__ dist, T* __restrict__ decay, const T* __restrict__ e,
                                          const T* __restrict__ c, T scale, int64_t D, int64_t np) {
  // 64 pixels at a time over all channels: four independent chains of 16-pixel partial sums, in registers.
  constexpr int64_t kLanes = 16, kGroups = 4;
  int64_t p0 = 0;
  for (; p0 + kGroups * kLanes <= np; p0 += kGroups * kLanes) {
    T acc[kGroups][kLanes] = {};
    for (int64_t d = 0; d < D; ++d) {
      const T cd = c[d];
      for (int64_t g = 0; g < kGroups; ++g) {
        const T* __restrict__ ed = e + d * kDistChunk + p0 + g * kLanes;
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const T t = ed[j] - cd;
          acc[g][j] += t * t;
        }
      }
    }
    for (int64_t g = 0; g < kGroups; ++g)
      for (int64_t j = 0; j < kLanes; ++j) dist[p0 + g * kLanes + j] = acc[g][j];
  }
  for (; p0 < np; ++p0) {  // the last pixels of a short chunk, in the same order of sums
    T acc = 0;
    for (int64_t d = 0; d < D; ++d) {
      const T t = e[d * kDistChunk + p0] - c[d];
      acc += t * t;
    }
    dist[p0] = acc;
  }
#pragma omp simd
  for (int64_t p = 0; p < np; ++p) decay[p] = exp_nonpositive(-dist[p] * scale);
}

CSFRN_CPU_CLONES void chunk_decay(float* dist, float* decay, const float* e, const float* c, float scale, int64_t D,
                                  int64_t np) {
  chunk_decay_impl(dist, decay, e, c, scale, D, np);
}
CSFRN_CPU_CLONES void chunk_decay(double* dist, double* decay, const double* e, const double* c, double scale,
                                  int64_t D, int64_t np) {
  chunk_decay_impl(dist, decay, e, c, scale, D, np);
}

// Calls body(b, n, p0, np, eb, ctr, work) for every (image, pixel chunk) b in parallel, with the chunk's
// embeddings staged as eb[d * kDistChunk + p], the image's centres as ctr[k * D + d], both in the accumulation
// type, and `work` elements of scratch space owned by the calling thread.
template <typename scalar_t, typename acc_t, typename Body>
void for_each_pixel_chunk(const PixelView& ev, const scalar_t* centers, int64_t N, int64_t D, int64_t P, int64_t K,
                          int64_t work, const Body& body) {
  const scalar_t* e = ev.t.const_data_ptr<scalar_t>();
  const int64_t nchunks = (P + kDistChunk - 1) / kDistChunk;
  at::parallel_for(0, N * nchunks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> eb(D * kDistChunk), ctr(K * D), scratch(work);
    int64_t staged_n = -1;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / nchunks, p0 = (b % nchunks) * kDistChunk, np = std::min(kDistChunk, P - p0);
      if (n != staged_n) {
        for (int64_t i = 0; i < K * D; ++i) ctr[i] = static_cast<acc_t>(centers[n * K * D + i]);
        staged_n = n;
      }
      const scalar_t* en = e + n * ev.sn + p0 * ev.sp;
      for (int64_t d = 0; d < D; ++d) {
        acc_t* row = eb.data() + d * kDistChunk;
        if (ev.sp == 1)  // NCHW: each channel's pixels are contiguous
          std::copy(en + d * ev.sc, en + d * ev.sc + np, row);
        else
          for (int64_t p = 0; p < np; ++p) row[p] = static_cast<acc_t>(en[d * ev.sc + p * ev.sp]);
      }
      body(b, n, p0, np, eb.data(), ctr.data(), scratch.data());
    }
  });
}

at::Tensor center_distance_cpu(const at::Tensor& embeddings, const at::Tensor& centers, const at::Tensor& margins,
                               double delta) {
  const KernelScope kernel_scope;  // ATen calls inside: no autograd history, no autocast
  check_center_distance_args(embeddings, centers, margins);
  const int64_t N = embeddings.size(0), D = embeddings.size(1), H = embeddings.size(2), W = embeddings.size(3);
  const int64_t P = H * W, K = centers.size(1);
  at::Tensor phi = at::empty({N, K, H, W}, embeddings.options());
  if (phi.numel() == 0) return phi;
  const PixelView ev = pixel_view(embeddings);
  const at::Tensor s = centers.contiguous(), m = margins.contiguous();

  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "center_distance_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    scalar_t* out = phi.data_ptr<scalar_t>();
    const acc_t dl = static_cast<acc_t>(delta);
    for_each_pixel_chunk<scalar_t, acc_t>(
        ev, s.const_data_ptr<scalar_t>(), N, D, P, K, 0,
        [&](int64_t, int64_t n, int64_t p0, int64_t np, const acc_t* eb, const acc_t* ctr, acc_t*) {
          acc_t dist[kDistChunk], decay[kDistChunk];
          for (int64_t k = 0; k < K; ++k) {
            chunk_decay(dist, decay, eb, ctr + k * D, margin_scale(static_cast<acc_t>(mp[n * K + k]), dl), D, np);
            scalar_t* o = out + (n * K + k) * P + p0;
            for (int64_t p = 0; p < np; ++p) o[p] = static_cast<scalar_t>(phi_of_decay(decay[p]));
          }
        });
  });
  return phi;
}

// The embedding and centre gradients of one chunk, from w[k][p] = dL/d dist (rows kDistChunk apart), the
// chunk's embeddings e[d][p] (rows kDistChunk apart) and the same transposed, et[p][d]:
//   ge[d][p] = 2 (e[d][p] sum_k w[k][p] - sum_k s[k][d] w[k][p])     written to the chunk's gradient rows
//   A[k][d] += sum_p w[k][p] e[d][p],  A[k][D] += sum_p w[k][p]       the centre gradient's two sums
// Both are register-blocked: NR channel rows x 16 pixels of ge, NK centres x 16 channels of A, so every
// loaded vector feeds NR (NK) independent FMA chains and no horizontal sums are needed.
constexpr int64_t kLanes = 16;

template <int NR, typename T>
CSFRN_ALWAYS_INLINE void ge_block(T* __restrict__ ge, int64_t ge_stride, const T* __restrict__ w,
                                  const T* __restrict__ e, const T* __restrict__ wsum, const T* __restrict__ s,
                                  int64_t D, int64_t K, int64_t d0, int64_t p0) {
  T acc[NR][kLanes];
  for (int i = 0; i < NR; ++i)
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) acc[i][j] = e[(d0 + i) * kDistChunk + p0 + j] * wsum[p0 + j];
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict__ wk = w + k * kDistChunk + p0;
    for (int i = 0; i < NR; ++i) {
      const T sk = s[k * D + d0 + i];
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) acc[i][j] -= sk * wk[j];
    }
  }
  for (int i = 0; i < NR; ++i)
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) ge[(d0 + i) * ge_stride + p0 + j] = T(2) * acc[i][j];
}

template <int NK, typename T>
CSFRN_ALWAYS_INLINE void a_block(T* __restrict__ A, const T* __restrict__ w, const T* __restrict__ et, int64_t D,
                                 int64_t k0, int64_t d0, int64_t np) {
  T acc[NK][kLanes] = {};
  for (int64_t p = 0; p < np; ++p) {
    const T* __restrict__ ep = et + p * D + d0;
    for (int i = 0; i < NK; ++i) {
      const T wv = w[(k0 + i) * kDistChunk + p];
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) acc[i][j] += wv * ep[j];
    }
  }
  for (int i = 0; i < NK; ++i)
    for (int64_t j = 0; j < kLanes; ++j) A[(k0 + i) * (D + 1) + d0 + j] += acc[i][j];
}

template <typename T>
CSFRN_ALWAYS_INLINE void chunk_distance_grads_impl(T* __restrict__ ge, int64_t ge_stride, T* __restrict__ A,
                                                   const T* __restrict__ w, const T* __restrict__ e,
                                                   const T* __restrict__ et, const T* __restrict__ s, int64_t D,
                                                   int64_t K, int64_t np, bool need_e, bool need_s) {
  const int64_t full_p = np - np % kLanes;
  if (need_e) {
    T wsum[kDistChunk];
    for (int64_t p = 0; p < np; ++p) wsum[p] = T(0);
    for (int64_t k = 0; k < K; ++k)
#pragma omp simd
      for (int64_t p = 0; p < np; ++p) wsum[p] += w[k * kDistChunk + p];
    for (int64_t p0 = 0; p0 < full_p; p0 += kLanes) {
      int64_t d0 = 0;
      for (; d0 + 8 <= D; d0 += 8) ge_block<8>(ge, ge_stride, w, e, wsum, s, D, K, d0, p0);
      for (; d0 < D; ++d0) ge_block<1>(ge, ge_stride, w, e, wsum, s, D, K, d0, p0);
    }
    for (int64_t d = 0; d < D; ++d)  // the pixels past the last group of sixteen
      for (int64_t p = full_p; p < np; ++p) {
        T acc = e[d * kDistChunk + p] * wsum[p];
        for (int64_t k = 0; k < K; ++k) acc -= s[k * D + d] * w[k * kDistChunk + p];
        ge[d * ge_stride + p] = T(2) * acc;
      }
  }
  if (need_s) {
    const int64_t D1 = D + 1, full_d = D - D % kLanes;
    for (int64_t k = 0; k < K; ++k) {
      T total = 0;
      for (int64_t p = 0; p < np; ++p) total += w[k * kDistChunk + p];
      A[k * D1 + D] += total;
    }
    for (int64_t d0 = 0; d0 < full_d; d0 += kLanes) {
      int64_t k0 = 0;
      for (; k0 + 8 <= K; k0 += 8) a_block<8>(A, w, et, D, k0, d0, np);
      for (; k0 + 2 <= K; k0 += 2) a_block<2>(A, w, et, D, k0, d0, np);
      for (; k0 < K; ++k0) a_block<1>(A, w, et, D, k0, d0, np);
    }
    for (int64_t k = 0; k < K; ++k)  // the channels past the last group of sixteen
      for (int64_t d = full_d; d < D; ++d) {
        T sum = 0;
        for (int64_t p = 0; p < np; ++p) sum += w[k * kDistChunk + p] * e[d * kDistChunk + p];
        A[k * D1 + d] += sum;
      }
  }
}

CSFRN_CPU_CLONES void chunk_distance_grads(float* ge, int64_t ge_stride, float* A, const float* w, const float* e,
                                           const float* et, const float* s, int64_t D, int64_t K, int64_t np,
                                           bool need_e, bool need_s) {
  chunk_distance_grads_impl(ge, ge_stride, A, w, e, et, s, D, K, np, need_e, need_s);
}
CSFRN_CPU_CLONES void chunk_distance_grads(double* ge, int64_t ge_stride, double* A, const double* w, const double* e,
                                           const double* et, const double* s, int64_t D, int64_t K, int64_t np,
                                           bool need_e, bool need_s) {
  chunk_distance_grads_impl(ge, ge_stride, A, w, e, et, s, D, K, np, need_e, need_s);
}

// One pass per pixel chunk: the decays are recomputed, turned into w = dL/d dist for every centre (kept in a
// chunk-sized buffer, never a tensor the size of phi), and w gives the chunk's rows of the embedding gradient
// and its shares of the centre and margin gradients. The shares are reduced in chunk order afterwards.
std::tuple<at::Tensor, at::Tensor, at::Tensor> center_distance_backward_cpu(const at::Tensor& grad_phi,
                                                                            const at::Tensor& embeddings,
                                                                            const at::Tensor& centers,
                                                                            const at::Tensor& margins, double delta,
                                                                            std::array<bool, 3> output_mask) {
  const KernelScope kernel_scope;  // ATen calls inside: no autograd history, no autocast
  const int64_t N = embeddings.size(0), D = embeddings.size(1), H = embeddings.size(2), W = embeddings.size(3);
  const int64_t P = H * W, K = centers.size(1), D1 = D + 1;
  const bool need_e = output_mask[0], need_s = output_mask[1], need_m = output_mask[2];
  at::Tensor grad_e = need_e ? at::empty({N, D, H, W}, embeddings.options()) : at::empty({0}, embeddings.options());
  at::Tensor grad_s = need_s ? at::zeros({N, K, D}, centers.options()) : at::empty({0}, centers.options());
  at::Tensor grad_m = need_m ? at::zeros({N, K}, margins.options()) : at::empty({0}, margins.options());
  if (!need_e && !need_s && !need_m) return {grad_e, grad_s, grad_m};
  if (N * K * P == 0) {  // no distances: the embedding gradient is zero too (K = 0), and nothing else is left
    if (need_e) grad_e.zero_();
    return {grad_e, grad_s, grad_m};
  }
  const PixelView ev = pixel_view(embeddings);
  const at::Tensor g = grad_phi.contiguous(), s = centers.contiguous(), m = margins.contiguous();
  const int64_t nchunks = (P + kDistChunk - 1) / kDistChunk;

  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "center_distance_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    static_assert(std::is_same_v<acc_t, scalar_t>, "the CPU kernels accumulate in float or double");
    // per chunk: the centre sums A[k][0..D] (D + 1 each) and the margin shares, reduced below in chunk order
    std::vector<acc_t> part_s(need_s ? N * nchunks * K * D1 : 0), part_m(N * nchunks * K);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    scalar_t* gep = need_e ? grad_e.data_ptr<scalar_t>() : nullptr;
    const acc_t dl = static_cast<acc_t>(delta);
    // scratch: w for every centre, then the chunk's embeddings pixel-major (for the centre sums)
    for_each_pixel_chunk<scalar_t, acc_t>(
        ev, s.const_data_ptr<scalar_t>(), N, D, P, K, (K + D) * kDistChunk,
        [&](int64_t b, int64_t n, int64_t p0, int64_t np, const acc_t* eb, const acc_t* ctr, acc_t* wb) {
          acc_t dist[kDistChunk], decay[kDistChunk];
          for (int64_t k = 0; k < K; ++k) {
            const acc_t scale = margin_scale(static_cast<acc_t>(mp[n * K + k]), dl);
            chunk_decay(dist, decay, eb, ctr + k * D, scale, D, np);
            const scalar_t* gk = gp + (n * K + k) * P + p0;
            acc_t* wk = wb + k * kDistChunk;
            acc_t gm_sum = 0;
            for (int64_t p = 0; p < np; ++p) {
              acc_t gm;
              phi_backward(static_cast<acc_t>(gk[p]), decay[p], dist[p], scale, dl, wk[p], gm);
              gm_sum += gm;
            }
            part_m[b * K + k] = gm_sum;
          }
          acc_t* et = wb + K * kDistChunk;
          if (need_s)
            for (int64_t d = 0; d < D; ++d)
              for (int64_t p = 0; p < np; ++p) et[p * D + d] = eb[d * kDistChunk + p];
          if (need_e || need_s)
            chunk_distance_grads(need_e ? gep + n * D * P + p0 : nullptr, P,
                                 need_s ? part_s.data() + b * K * D1 : nullptr, wb, eb, et, ctr, D, K, np, need_e,
                                 need_s);
        });
    // grad_s = -2 (sum_p w e^T - s sum_p w), grad_m = the margin shares, both summed over chunks in order
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* gsp = need_s ? grad_s.data_ptr<scalar_t>() : nullptr;
    scalar_t* gmp = need_m ? grad_m.data_ptr<scalar_t>() : nullptr;
    std::vector<acc_t> sums(D1);  // one centre's two sums over the chunks
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        if (need_m) {
          acc_t sum = 0;
          for (int64_t c = 0; c < nchunks; ++c) sum += part_m[(n * nchunks + c) * K + k];
          gmp[n * K + k] = static_cast<scalar_t>(sum);
        }
        if (need_s) {
          std::fill(sums.begin(), sums.end(), acc_t(0));
          for (int64_t c = 0; c < nchunks; ++c) {
            const acc_t* a = part_s.data() + ((n * nchunks + c) * K + k) * D1;
            for (int64_t d = 0; d < D1; ++d) sums[d] += a[d];
          }
          for (int64_t d = 0; d < D; ++d) {
            const acc_t centre = static_cast<acc_t>(sp[(n * K + k) * D + d]);
            gsp[(n * K + k) * D + d] = static_cast<scalar_t>(-2 * (sums[d] - centre * sums[D]));
          }
        }
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
