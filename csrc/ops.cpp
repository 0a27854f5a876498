// Every csfrn op schema, in one place. Kernels register per backend in cpu/*.cpp and cuda/*.cu;
// fake (meta) kernels and autograd live in Python (csfrn/ops/).
#include <Python.h>
#include <torch/library.h>

// `import csfrn._C` loads this shared library, whose static initialisers register the ops below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace csfrn {
bool built_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace csfrn

TORCH_LIBRARY(csfrn, m) {
  m.def("built_with_cuda() -> bool", &csfrn::built_with_cuda);

  // Class-wise average pooling: per image, the mean feature vector of every class, and the pixel counts in the
  // accumulation type (float32 for half and bfloat16: exact, for the backward; csfrn.ops.class_avg_pool returns
  // them in the features' dtype). The backward takes counts of any real dtype and divides in the accumulation type.
  m.def("class_avg_pool(Tensor features, Tensor labels, int num_classes, int ignore_index) -> (Tensor, Tensor)");
  m.def("class_avg_pool_backward(Tensor grad_means, Tensor labels, Tensor counts, int ignore_index) -> Tensor");

  // Gaussian centre distance with class-aware margins: phi = 1 - exp(-||b - s_k||^2 * exp(delta * m_k)).
  m.def("center_distance(Tensor embeddings, Tensor centers, Tensor margins, float delta) -> Tensor");
  // Gradients not asked for in output_mask come back as empty tensors.
  m.def("center_distance_backward(Tensor grad_phi, Tensor embeddings, Tensor centers, Tensor margins, float delta, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- Deformable convolution (torchvision.ops.deform_conv2d semantics; DCN v2 when a mask is given) ----
  // groups = input.size(1) / weight.size(1); offset_groups = offset.size(1) / (2 * kh * kw).
  m.def("deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias, Tensor? mask, int[2] stride, "
        "int[2] padding, int[2] dilation) -> Tensor");
  // Gradients of (input, offset, weight, bias, mask); those not asked for in output_mask come back empty.
  m.def("deform_conv2d_backward(Tensor grad_out, Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
        "int[2] stride, int[2] padding, int[2] dilation, bool[5] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // AAM's pair: two deformable convolutions on one offset field (and mask), sampled once.
  m.def("dual_deform_conv2d(Tensor x, Tensor y, Tensor offset, Tensor weight_x, Tensor weight_y, Tensor? bias_x, "
        "Tensor? bias_y, Tensor? mask, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor)");
  // Gradients of (x, y, offset, weight_x, weight_y, bias_x, bias_y, mask), as above.
  m.def("dual_deform_conv2d_backward(Tensor grad_out_x, Tensor grad_out_y, Tensor x, Tensor y, Tensor offset, "
        "Tensor weight_x, Tensor weight_y, Tensor? mask, int[2] stride, int[2] padding, int[2] dilation, "
        "bool[8] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
