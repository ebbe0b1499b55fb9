// The Python module vgs_kernels._C. Importing it runs the static registrations of every
// csrc/*.cpp (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL), so the ops appear under
// torch.ops.vgs_kernels. It exports no Python functions of its own.
#include <Python.h>
#include <torch/library.h>

// Every op file adds its schemas with TORCH_LIBRARY_FRAGMENT(vgs_kernels, m).
TORCH_LIBRARY(vgs_kernels, m) {}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
