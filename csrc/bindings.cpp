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

  // ---- reversible ----
  m.def("reversible_fwd_host", [](uintptr_t w, uintptr_t v, uintptr_t head, uintptr_t count, uintptr_t spill,
                                  int64_t cap, uintptr_t g, uintptr_t p_out, int is_double, int64_t numel,
                                  int k, int64_t n, double alpha, double c1s, double lam, double inv_scale) {
    py::gil_scoped_release nogil;
    return fastreg::reversible_fwd_host(ptr<int64_t>(w), ptr<int64_t>(v), ptr<int64_t>(head),
                                        ptr<int32_t>(count), ptr<uint32_t>(spill), cap, ptr<const void>(g),
                                        ptr<void>(p_out), is_double, numel, k, n, alpha, c1s, lam, inv_scale);
  });
  m.def("reversible_restore_host", [](uintptr_t w, uintptr_t v, uintptr_t dw, uintptr_t dv, uintptr_t u,
                                      uintptr_t p_out, int is_double, int64_t numel, double alpha, double omg,
                                      double inv_scale) {
    py::gil_scoped_release nogil;
    return fastreg::reversible_restore_host(ptr<int64_t>(w), ptr<const int64_t>(v), ptr<double>(dw),
                                            ptr<double>(dv), ptr<void>(u), ptr<void>(p_out), is_double, numel,
                                            alpha, omg, inv_scale);
  });
  m.def("reversible_rev_host", [](uintptr_t w, uintptr_t v, uintptr_t head, uintptr_t count, uintptr_t spill,
                                  int64_t cap, uintptr_t g, uintptr_t hvp, int is_double, uintptr_t dw,
                                  uintptr_t dv, int64_t numel, int k, int64_t n, double gamma, double c1s,
                                  double lam, double omg, double inv_scale) {
    fastreg::ReversibleSums s;
    {
      py::gil_scoped_release nogil;
      s = fastreg::reversible_rev_host(ptr<const int64_t>(w), ptr<int64_t>(v), ptr<int64_t>(head),
                                       ptr<int32_t>(count), ptr<uint32_t>(spill), cap, ptr<const void>(g),
                                       ptr<const void>(hvp), is_double, ptr<double>(dw), ptr<double>(dv), numel,
                                       k, n, gamma, c1s, lam, omg, inv_scale);
    }
    return py::make_tuple(s.code, s.dg, s.dl);
  });
#ifdef FASTREG_WITH_CUDA
  m.def("reversible_fwd_cuda", [](uintptr_t w, uintptr_t v, uintptr_t head, uintptr_t count, uintptr_t spill,
                                  int64_t cap, uintptr_t g, uintptr_t p_out, int is_double, int64_t numel,
                                  int k, int64_t n, double alpha, double c1s, double lam, double inv_scale,
                                  uintptr_t flag, uintptr_t stream) {
    check_cuda(fastreg::reversible_fwd_cuda(ptr<int64_t>(w), ptr<int64_t>(v), ptr<int64_t>(head),
                                            ptr<int32_t>(count), ptr<uint32_t>(spill), cap, ptr<const void>(g),
                                            ptr<void>(p_out), is_double, numel, k, n, alpha, c1s, lam,
                                            inv_scale, ptr<int>(flag), stream),
               "reversible_fwd_cuda");
  });
  m.def("reversible_restore_cuda", [](uintptr_t w, uintptr_t v, uintptr_t dw, uintptr_t dv, uintptr_t u,
                                      uintptr_t p_out, int is_double, int64_t numel, double alpha, double omg,
                                      double inv_scale, uintptr_t partial, int64_t nparts, uintptr_t stream) {
    check_cuda(fastreg::reversible_restore_cuda(ptr<int64_t>(w), ptr<const int64_t>(v), ptr<double>(dw),
                                                ptr<double>(dv), ptr<void>(u), ptr<void>(p_out), is_double,
                                                numel, alpha, omg, inv_scale, ptr<double>(partial), nparts,
                                                stream),
               "reversible_restore_cuda");
  });
  m.def("reversible_rev_cuda", [](uintptr_t w, uintptr_t v, uintptr_t head, uintptr_t count, uintptr_t spill,
                                  int64_t cap, uintptr_t g, uintptr_t hvp, int is_double, uintptr_t dw,
                                  uintptr_t dv, int64_t numel, int k, int64_t n, double gamma, double c1s,
                                  double lam, double omg, double inv_scale, uintptr_t flag, uintptr_t partial,
                                  int64_t nparts, uintptr_t stream) {
    check_cuda(fastreg::reversible_rev_cuda(ptr<const int64_t>(w), ptr<int64_t>(v), ptr<int64_t>(head),
                                            ptr<int32_t>(count), ptr<uint32_t>(spill), cap, ptr<const void>(g),
                                            ptr<const void>(hvp), is_double, ptr<double>(dw), ptr<double>(dv),
                                            numel, k, n, gamma, c1s, lam, omg, inv_scale, ptr<int>(flag),
                                            ptr<double>(partial), nparts, stream),
               "reversible_rev_cuda");
  });
#endif
  // ---- end reversible ----

  // ---- penalty ----
  m.def("penalty_accumulate_host", [](uintptr_t tab, int64_t nt, uintptr_t coefs, uintptr_t items, int64_t nitems,
                                      uintptr_t expl, int64_t nexpl, uintptr_t scales, uintptr_t counts,
                                      uintptr_t vals, int kind) {
    py::gil_scoped_release nogil;
    return fastreg::penalty_accumulate_host(ptr<const int64_t>(tab), nt, ptr<const double>(coefs), ptr<const int64_t>(items),
                                     nitems, ptr<const int64_t>(expl), nexpl, ptr<double>(scales),
                                     ptr<double>(counts), ptr<double>(vals), kind);
  });
  m.def("penalty_prox_host", [](uintptr_t tab, int64_t nt, uintptr_t coefs, uintptr_t items, int64_t nitems,
                                uintptr_t expl, int64_t nexpl, uintptr_t scales, uintptr_t counts, int kind) {
    py::gil_scoped_release nogil;
    fastreg::penalty_prox_host(ptr<const int64_t>(tab), nt, ptr<const double>(coefs), ptr<const int64_t>(items),
                               nitems, ptr<const int64_t>(expl), nexpl, ptr<double>(scales), ptr<double>(counts),
                               kind);
  });
#ifdef FASTREG_WITH_CUDA
  m.def("penalty_accumulate_cuda", [](uintptr_t tab, int64_t nt, uintptr_t coefs, uintptr_t items, int64_t nitems,
                                      uintptr_t expl, int64_t nexpl, uintptr_t scales, uintptr_t counts,
                                      uintptr_t vals, uintptr_t done, uintptr_t out32, uintptr_t out64, int kind,
                                      uintptr_t stream) {
    check_cuda(fastreg::penalty_accumulate_cuda(ptr<const int64_t>(tab), nt, ptr<const double>(coefs),
                                                ptr<const int64_t>(items), nitems, ptr<const int64_t>(expl), nexpl,
                                                ptr<double>(scales), ptr<double>(counts), ptr<double>(vals),
                                                ptr<unsigned>(done), ptr<float>(out32), ptr<double>(out64), kind,
                                                stream),
               "penalty_accumulate_cuda");
  });
  m.def("penalty_prox_cuda", [](uintptr_t tab, int64_t nt, uintptr_t coefs, uintptr_t items, int64_t nitems,
                                uintptr_t expl, int64_t nexpl, uintptr_t scales, uintptr_t counts, int kind,
                                uintptr_t stream) {
    check_cuda(fastreg::penalty_prox_cuda(ptr<const int64_t>(tab), nt, ptr<const double>(coefs),
                                          ptr<const int64_t>(items), nitems, ptr<const int64_t>(expl), nexpl,
                                          ptr<double>(scales), ptr<double>(counts), kind, stream),
               "penalty_prox_cuda");
  });
  m.def("activity_penalty_fwd_cuda", [](uintptr_t x, uintptr_t y, int64_t n, double l1, double l2,
                                        uintptr_t partial, int kind, uintptr_t stream) {
    check_cuda(fastreg::activity_penalty_fwd_cuda(ptr<const void>(x), ptr<void>(y), n, l1, l2,
                                                  ptr<double>(partial), kind, stream),
               "activity_penalty_fwd_cuda");
  });
  m.def("activity_penalty_bwd_cuda", [](uintptr_t gy, uintptr_t x, uintptr_t gx, int64_t n, double l1,
                                        double l2, uintptr_t gv, int kind, uintptr_t stream) {
    check_cuda(fastreg::activity_penalty_bwd_cuda(ptr<const void>(gy), ptr<const void>(x), ptr<void>(gx), n,
                                                  l1, l2, ptr<const double>(gv), kind, stream),
               "activity_penalty_bwd_cuda");
  });
#endif
  m.def("activity_penalty_fwd_host", [](uintptr_t x, uintptr_t y, int64_t n, double l1, double l2, int kind) {
    py::gil_scoped_release nogil;
    return fastreg::activity_penalty_fwd_host(ptr<const void>(x), ptr<void>(y), n, l1, l2, kind);
  });
  m.def("activity_penalty_bwd_host", [](uintptr_t gy, uintptr_t x, uintptr_t gx, int64_t n, double c1,
                                        double c2, int kind) {
    py::gil_scoped_release nogil;
    fastreg::activity_penalty_bwd_host(ptr<const void>(gy), ptr<const void>(x), ptr<void>(gx), n, c1, c2,
                                       kind);
  });
  // ---- end penalty ----
}
