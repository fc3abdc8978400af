// The one registration block of fineviti's C++ ops: every schema of the C++/CUDA torch.ops.fineviti.* ops is declared
// here (the Triton-backed ops of fineviti/ops/ register theirs in Python with torch.library.custom_op, in the same
// namespace).
//
// To add an op: append one `m.def(...)` line with its schema under a comment naming its family, and
// register the implementations in the family's own files with TORCH_LIBRARY_IMPL(fineviti, CPU, m)
// (csrc/<family>.cpp) and TORCH_LIBRARY_IMPL(fineviti, CUDA, m) (csrc/<family>.cu). CMakeLists.txt
// globs csrc/*.cpp and csrc/*.cu, so a new file needs no build change. Training ops are functional
// (they return tensors); their autograd lives in Python (fineviti/ops/).
//
// Loading the shared library (`import fineviti._C`, done by `import fineviti`) runs the static
// registrations below; the Python module itself defines nothing.

#include <Python.h>
#include <torch/library.h>

#include <string>

namespace fineviti {

// Whether the CUDA sources were compiled into this library, and for which TORCH_CUDA_ARCH_LIST.
bool cuda_built() {
#ifdef FINEVITI_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_arch_list() {
#ifdef FINEVITI_CUDA_ARCH_LIST
  return FINEVITI_CUDA_ARCH_LIST;
#else
  return "";
#endif
}

}  // namespace fineviti

TORCH_LIBRARY(fineviti, m) {
  // Build information (no tensors: one implementation for every backend).
  m.def("cuda_built() -> bool", &fineviti::cuda_built);
  m.def("cuda_arch_list() -> str", &fineviti::cuda_arch_list);

  // positions.cpp, positions.cu: packed (row, col) positions and cu_seqlens of a batch of patch grids.
  m.def("build_positions(Tensor grid_hw, int merge) -> (Tensor, Tensor)");

  // rope.cpp, rope.cu: 2D rotary position embedding (Qwen2-VL vision RoPE); autograd in fineviti/ops/rope.py.
  m.def("rope_2d(Tensor x, Tensor pos, float theta, bool inverse, bool check_pos) -> Tensor");
  m.def("rope_2d_qk(Tensor q, Tensor k, Tensor pos, float theta, bool inverse, bool check_pos) -> (Tensor, Tensor)");
  m.def("rope_2d_(Tensor(a!) x, Tensor pos, float theta, bool inverse, bool check_pos) -> ()");

  // planner.cpp: windowed first-fit packing of sample lengths into token-budget packs (host-side data planner).
  m.def("plan_packs(Tensor lengths, int budget, int window) -> (Tensor pack_offsets, Tensor order)");
}

// `import fineviti._C` needs a module init function; the module is empty on purpose.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
