// Host build of csrc/include/fastreg/reversible.h: the exact arithmetic the CUDA
// kernels run, compiled for the CPU (OpenMP), so CI tests it through fastreg._C.
#include <cstdint>

#include "fastreg/reversible.h"
#include "launchers.h"

namespace fastreg {

namespace {

template <typename T>
int fwd_host(int64_t* w, int64_t* v, int64_t* head, int32_t* count, uint32_t* spill, int64_t cap,
             const T* g, T* p_out, int64_t numel, int k, int64_t n, double alpha, double c1s,
             double lam, double inv_scale) {
  const rev::Coder cd = rev::make_coder(n);
  int code = 0;
#pragma omp parallel for schedule(static) reduction(| : code)
  for (int64_t i = 0; i < numel; ++i) {
    int64_t wi = w[i], vi = v[i], x = head[i], c = count[i];
    code |= rev::fwd_element(wi, vi, x, c, spill + i, numel, cap, static_cast<double>(g[i]), k, cd,
                             alpha, c1s, lam, inv_scale);
    w[i] = wi;
    v[i] = vi;
    head[i] = x;
    count[i] = static_cast<int32_t>(c);
    p_out[i] = static_cast<T>(static_cast<double>(wi) * inv_scale);
  }
  return code;
}

template <typename T>
double restore_host(int64_t* w, const int64_t* v, double* dw, double* dv, T* u, T* p_out,
                    int64_t numel, double alpha, double omg, double inv_scale) {
  double da = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : da)
  for (int64_t i = 0; i < numel; ++i) {
    int64_t wi = w[i];
    double ui;
    da += rev::restore_element(wi, v[i], dw[i], dv[i], alpha, omg, inv_scale, ui);
    w[i] = wi;
    u[i] = static_cast<T>(ui);
    p_out[i] = static_cast<T>(static_cast<double>(wi) * inv_scale);
  }
  return da;
}

template <typename T>
ReversibleSums rev_host(const int64_t* w, int64_t* v, int64_t* head, int32_t* count,
                        uint32_t* spill, int64_t cap, const T* g, const T* hvp, double* dw,
                        double* dv, int64_t numel, int k, int64_t n, double gamma, double c1s,
                        double lam, double omg, double inv_scale) {
  const rev::Coder cd = rev::make_coder(n);
  int code = 0;
  double dg = 0.0, dl = 0.0;
#pragma omp parallel for schedule(static) reduction(| : code) reduction(+ : dg, dl)
  for (int64_t i = 0; i < numel; ++i) {
    int64_t vi = v[i], x = head[i], c = count[i];
    double dgi, dli;
    code |= rev::rev_element(w[i], vi, x, c, spill + i, numel, cap, static_cast<double>(g[i]),
                             static_cast<double>(hvp[i]), dw[i], dv[i], k, cd, gamma, c1s, lam,
                             omg, inv_scale, dgi, dli);
    v[i] = vi;
    head[i] = x;
    count[i] = static_cast<int32_t>(c);
    dg += dgi;
    dl += dli;
  }
  return {code, dg, dl};
}

}  // namespace

int reversible_fwd_host(int64_t* w, int64_t* v, int64_t* head, int32_t* count, uint32_t* spill,
                        int64_t cap, const void* g, void* p_out, int is_double, int64_t numel,
                        int k, int64_t n, double alpha, double c1s, double lam, double inv_scale) {
  if (is_double)
    return fwd_host(w, v, head, count, spill, cap, static_cast<const double*>(g),
                    static_cast<double*>(p_out), numel, k, n, alpha, c1s, lam, inv_scale);
  return fwd_host(w, v, head, count, spill, cap, static_cast<const float*>(g),
                  static_cast<float*>(p_out), numel, k, n, alpha, c1s, lam, inv_scale);
}

double reversible_restore_host(int64_t* w, const int64_t* v, double* dw, double* dv, void* u,
                               void* p_out, int is_double, int64_t numel, double alpha, double omg,
                               double inv_scale) {
  if (is_double)
    return restore_host(w, v, dw, dv, static_cast<double*>(u), static_cast<double*>(p_out), numel,
                        alpha, omg, inv_scale);
  return restore_host(w, v, dw, dv, static_cast<float*>(u), static_cast<float*>(p_out), numel,
                      alpha, omg, inv_scale);
}

ReversibleSums reversible_rev_host(const int64_t* w, int64_t* v, int64_t* head, int32_t* count,
                                   uint32_t* spill, int64_t cap, const void* g, const void* hvp,
                                   int is_double, double* dw, double* dv, int64_t numel, int k,
                                   int64_t n, double gamma, double c1s, double lam, double omg,
                                   double inv_scale) {
  if (is_double)
    return rev_host(w, v, head, count, spill, cap, static_cast<const double*>(g),
                    static_cast<const double*>(hvp), dw, dv, numel, k, n, gamma, c1s, lam, omg,
                    inv_scale);
  return rev_host(w, v, head, count, spill, cap, static_cast<const float*>(g),
                  static_cast<const float*>(hvp), dw, dv, numel, k, n, gamma, c1s, lam, omg,
                  inv_scale);
}

}  // namespace fastreg
