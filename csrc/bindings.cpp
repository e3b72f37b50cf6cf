// The one binding file: every native entry point of fastreg._C. Pointers come
// in as integers (tensor.data_ptr()) with sizes; Python validates everything
// before calling here (DESIGN.md: validation at the Python boundary).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launchers.h"

#ifdef FASTREG_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

#ifdef FASTREG_WITH_CUDA
void check_cuda(int err, const char* what) {
  if (err != 0)
    throw std::runtime_error(std::string("fastreg._C.") + what + ": " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastreg native kernels (C++ host build; CUDA kernels when built with CUDA)";
#ifdef FASTREG_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_device_count", []() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  });
#else
  m.attr("with_cuda") = false;
  m.def("cuda_device_count", []() { return 0; });
#endif

  // ---- rng ----
  m.def("philox_words_host", [](uintptr_t out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start) {
    py::gil_scoped_release nogil;
    fastreg::philox_words_host(ptr<uint32_t>(out), n, seed, stream, start);
  });
  m.def("philox_uniforms_host", [](uintptr_t out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start) {
    py::gil_scoped_release nogil;
    fastreg::philox_uniforms_host(ptr<float>(out), n, seed, stream, start);
  });
#ifdef FASTREG_WITH_CUDA
  m.def("philox_words_cuda", [](uintptr_t out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start,
                                uintptr_t cuda_stream) {
    check_cuda(fastreg::philox_words_cuda(ptr<uint32_t>(out), n, seed, stream, start, cuda_stream),
               "philox_words_cuda");
  });
#endif
  // ---- families register below, one block each ----
}
