// The csfrn library: its Python module and the op schemas (listed in op_schemas.h). Kernels register per backend
// in cpu/*.cpp and cuda/*.cu; fake (meta) kernels and autograd live in Python (csfrn/ops/).
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

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

  for (const char* schema : csfrn::kOpSchemas) m.def(schema);
}
