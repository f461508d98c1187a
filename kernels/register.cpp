// The single op-registration file: every torch.ops.quantkit.* schema is declared here, once.
// Implementations register per backend with TORCH_LIBRARY_IMPL(quantkit, CPU|CUDA, m) in kernels/cpu and
// kernels/cuda; fake (meta) implementations live in quantkit/ops (torch.library.register_fake).
//
// Bit layout shared by CPU, CUDA and ONNX export (also documented in quantkit/ops/layout.py):
//   values are packed along the reduction dimension (the last dimension; channels for NHWC activations)
//   into little-endian int32 words: element k sits in bit (k % 32) of word (k / 32);
//   bit 1 means +1 (x >= 0), bit 0 means -1; the tail of the last word is zero in every operand.
#include <torch/library.h>
#include <Python.h>

// Importing quantkit._C runs the static TORCH_LIBRARY initializers below; no pybind11 is needed.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(quantkit, m) {
  // ---- bit packing -------------------------------------------------------------------------------------
  // (schemas added by the packing/binary kernels)

  // ---- binary (XNOR / AND-popcount) GEMM, conv2d, attention products ------------------------------------

  // ---- integer l1 (adder) GEMM and conv2d ---------------------------------------------------------------
}
