// Declarations of every native entry point the binding file exposes. Host
// functions always exist; *_cuda ones only in a CUDA build. Each returns a
// cudaError_t as int (0 = success) so the binding can raise with its name.
#pragma once
#include <cstdint>

namespace fastreg {

// rng (csrc/cpu/rng_host.cpp, csrc/cuda/rng.cu)
void philox_words_host(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start);
void philox_uniforms_host(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start);
#ifdef FASTREG_WITH_CUDA
int philox_words_cuda(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start,
                      uintptr_t stream_handle);
#endif

// ---- reversible: csrc/cpu/reversible_host.cpp, csrc/cuda/reversible.cu ----
struct ReversibleSums {
  int code;
  double dg, dl;
};
int reversible_fwd_host(int64_t* w, int64_t* v, int64_t* head, int32_t* count, uint32_t* spill,
                        int64_t cap, const void* g, void* p_out, int is_double, int64_t numel,
                        int k, int64_t n, double alpha, double c1s, double lam, double inv_scale);
double reversible_restore_host(int64_t* w, const int64_t* v, double* dw, double* dv, void* u,
                               void* p_out, int is_double, int64_t numel, double alpha, double omg,
                               double inv_scale);
ReversibleSums reversible_rev_host(const int64_t* w, int64_t* v, int64_t* head, int32_t* count,
                                   uint32_t* spill, int64_t cap, const void* g, const void* hvp,
                                   int is_double, double* dw, double* dv, int64_t numel, int k,
                                   int64_t n, double gamma, double c1s, double lam, double omg,
                                   double inv_scale);
#ifdef FASTREG_WITH_CUDA
int reversible_fwd_cuda(int64_t* w, int64_t* v, int64_t* head, int32_t* count, uint32_t* spill,
                        int64_t cap, const void* g, void* p_out, int is_double, int64_t numel, int k,
                        int64_t n, double alpha, double c1s, double lam, double inv_scale, int* flag,
                        uintptr_t stream);
int reversible_restore_cuda(int64_t* w, const int64_t* v, double* dw, double* dv, void* u,
                            void* p_out, int is_double, int64_t numel, double alpha, double omg,
                            double inv_scale, double* partial, int64_t nparts, uintptr_t stream);
int reversible_rev_cuda(const int64_t* w, int64_t* v, int64_t* head, int32_t* count,
                        uint32_t* spill, int64_t cap, const void* g, const void* hvp, int is_double,
                        double* dw, double* dv, int64_t numel, int k, int64_t n, double gamma,
                        double c1s, double lam, double omg, double inv_scale, int* flag,
                        double* partial, int64_t nparts, uintptr_t stream);
#endif
// ---- end reversible ----

// ---- penalty: csrc/cpu/penalty_host.cpp, csrc/cuda/penalty.cu; tables in fastreg/penalty.h ----
// returns the call's value, vals summed in penalty.h's fixed order (ordered_sum)
double penalty_accumulate_host(const int64_t* tab, int64_t ntensors, const double* coefs, const int64_t* items,
                               int64_t nitems, const int64_t* expl, int64_t nexpl, double* scales,
                               double* counts, double* vals, int kind);
void penalty_prox_host(const int64_t* tab, int64_t ntensors, const double* coefs, const int64_t* items,
                       int64_t nitems, const int64_t* expl, int64_t nexpl, double* scales, double* counts,
                       int kind);
#ifdef FASTREG_WITH_CUDA
// The last block to finish sums vals (nitems + nexpl, penalty.h's fixed order) into *out32
// (and *out64 when not null) and resets *done (an unsigned counter that must start at 0), so a
// warm call is one launch (two more with explicit groups) and no copy.
int penalty_accumulate_cuda(const int64_t* tab, int64_t ntensors, const double* coefs, const int64_t* items,
                            int64_t nitems, const int64_t* expl, int64_t nexpl, double* scales,
                            double* counts, double* vals, unsigned* done, float* out32, double* out64,
                            int kind, uintptr_t stream);
int penalty_prox_cuda(const int64_t* tab, int64_t ntensors, const double* coefs, const int64_t* items,
                      int64_t nitems, const int64_t* expl, int64_t nexpl, double* scales, double* counts,
                      int kind, uintptr_t stream);
// partial: 1024 zeroed doubles (one per block, at most 1024 blocks); gv: a float64 device scalar
int activity_penalty_fwd_cuda(const void* x, void* y, int64_t n, double l1, double l2, double* partial,
                              int kind, uintptr_t stream);
int activity_penalty_bwd_cuda(const void* gy, const void* x, void* gx, int64_t n, double l1, double l2,
                              const double* gv, int kind, uintptr_t stream);
#endif
double activity_penalty_fwd_host(const void* x, void* y, int64_t n, double l1, double l2, int kind);
void activity_penalty_bwd_host(const void* gy, const void* x, void* gx, int64_t n, double c1, double c2,
                               int kind);
// ---- end penalty ----

}  // namespace fastreg
