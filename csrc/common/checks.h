// Host-side argument checks shared by the CPU and CUDA launchers of every op; the per-op checks build on them
// (class_ops_checks.h, deform_conv_checks.h). TORCH_CHECK_VALUE raises ValueError in Python; the words match
// csfrn/ops/_checks.py so an error reads alike from the kernel and the reference.
#pragma once
#include <ATen/ATen.h>
#include <sstream>
#include <string>

namespace csfrn {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// The dtype as Python spells it ("torch.float32"), so messages match the Python checks.
inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "torch.float32";
    case at::kDouble:
      return "torch.float64";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kLong:
      return "torch.int64";
    case at::kInt:
      return "torch.int32";
    case at::kShort:
      return "torch.int16";
    case at::kChar:
      return "torch.int8";
    case at::kByte:
      return "torch.uint8";
    case at::kBool:
      return "torch.bool";
    default:
      return std::string("torch.") + c10::toString(t);
  }
}

inline void check_rank(const char* name, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must be a ", rank, "-D tensor ", layout, ", got shape ", shape_str(t));
}

inline void check_floating(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got dtype ",
                    dtype_str(t.scalar_type()));
}

inline void check_same_device(const char* a, const at::Tensor& ta, const char* b, const at::Tensor& tb) {
  TORCH_CHECK_VALUE(ta.device() == tb.device(), "all tensors must be on one device, got ", a, " on ", ta.device(), ", ",
                    b, " on ", tb.device());
}

inline void check_same_dtype(const char* a, const at::Tensor& ta, const char* b, const at::Tensor& tb) {
  TORCH_CHECK_VALUE(ta.scalar_type() == tb.scalar_type(), "all floating-point tensors must share one dtype, got ", a,
                    " ", dtype_str(ta.scalar_type()), ", ", b, " ", dtype_str(tb.scalar_type()));
}

}  // namespace csfrn
