// Host-side argument checks of the class-wise ops (class_avg_pool, center_distance) and the pixel view of their
// [N, C, H, W] inputs, shared by the CPU and CUDA launchers. The words match csfrn/ops/_checks.py.
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"

namespace csfrn {

inline void check_class_avg_pool_args(const at::Tensor& features, const at::Tensor& labels, int64_t num_classes) {
  check_rank("features", features, 4, "[N, D, H, W]");
  check_floating("features", features);
  check_rank("labels", labels, 3, "[N, H, W]");
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong, "labels must be an int64 tensor, got dtype ",
                    dtype_str(labels.scalar_type()));
  TORCH_CHECK_VALUE(
      labels.size(0) == features.size(0) && labels.size(1) == features.size(2) && labels.size(2) == features.size(3),
      "labels must have shape [N, H, W] = [", features.size(0), ", ", features.size(2), ", ", features.size(3),
      "] to match features ", shape_str(features), ", got ", shape_str(labels));
  TORCH_CHECK_VALUE(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  check_same_device("features", features, "labels", labels);
}

inline void check_center_distance_args(const at::Tensor& embeddings, const at::Tensor& centers,
                                       const at::Tensor& margins) {
  check_rank("embeddings", embeddings, 4, "[N, D, H, W]");
  check_rank("centers", centers, 3, "[N, K, D]");
  check_rank("margins", margins, 2, "[N, K]");
  check_floating("embeddings", embeddings);
  check_floating("centers", centers);
  check_floating("margins", margins);
  const int64_t n = embeddings.size(0), d = embeddings.size(1);
  TORCH_CHECK_VALUE(centers.size(0) == n && centers.size(2) == d, "centers must have shape [N, K, D] with N = ", n,
                    " and D = ", d, " from embeddings ", shape_str(embeddings), ", got ", shape_str(centers));
  TORCH_CHECK_VALUE(margins.size(0) == n && margins.size(1) == centers.size(1), "margins must have shape [N, K] = [", n,
                    ", ", centers.size(1), "] to match centers ", shape_str(centers), ", got ", shape_str(margins));
  check_same_device("embeddings", embeddings, "centers", centers);
  check_same_device("embeddings", embeddings, "margins", margins);
  check_same_dtype("embeddings", embeddings, "centers", centers);
  check_same_dtype("embeddings", embeddings, "margins", margins);
}

[[noreturn]] inline void fail_bad_label(int64_t value, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_VALUE(false, "labels must be in [0, num_classes=", num_classes, ") or equal ignore_index=", ignore_index,
                    ", got label value ", value);
  abort();  // unreachable
}

// A [N, C, H, W] tensor whose pixels can be walked with one stride (NCHW and channels_last both can);
// anything else is copied to NCHW. Returns the tensor and (stride_n, stride_c, stride_pixel).
struct PixelView {
  at::Tensor t;
  int64_t sn, sc, sp;
};

inline PixelView pixel_view(const at::Tensor& x) {
  auto ok = [](const at::Tensor& t) {
    return t.size(3) <= 1 || t.size(2) <= 1 || t.stride(2) == t.size(3) * t.stride(3);
  };
  at::Tensor t = ok(x) ? x : x.contiguous();
  const int64_t sp = t.size(3) > 1 ? t.stride(3) : (t.size(2) > 1 ? t.stride(2) : 1);
  return {t, t.stride(0), t.stride(1), sp};
}

}  // namespace csfrn
