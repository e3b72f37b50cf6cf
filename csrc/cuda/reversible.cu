// CUDA kernels of exact reversible SGD: one fused pass per step half, the arithmetic
// from csrc/include/fastreg/reversible.h (the code CI tests on the host). Float
// reductions go to one partial sum per block (summed by torch: deterministic).
#include <cstdint>

#include "cuda/launch.h"
#include "fastreg/reversible.h"
#include "launchers.h"

namespace fastreg {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ double block_sum(double x, double* shm) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shm[warp] = x;
  __syncthreads();
  x = (threadIdx.x < (blockDim.x >> 5)) ? shm[lane] : 0.0;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  __syncthreads();
  return x;
}

template <typename T>
__global__ void fwd_kernel(int64_t* __restrict__ w, int64_t* __restrict__ v, int64_t* __restrict__ head,
                           int32_t* __restrict__ count, uint32_t* __restrict__ spill, int64_t cap,
                           const T* __restrict__ g, T* __restrict__ p_out, int64_t numel, int k,
                           rev::Coder cd, double alpha, double c1s, double lam, double inv_scale,
                           int* flag) {
  int code = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t c0 = count[i];
    int64_t wi = w[i], vi = v[i], x = head[i], c = c0;
    code |= rev::fwd_element(wi, vi, x, c, spill + i, numel, cap, static_cast<double>(g[i]), k, cd,
                             alpha, c1s, lam, inv_scale);
    w[i] = wi;
    v[i] = vi;
    head[i] = x;
    // the count moves only when a word spills (every ~32 / log2(1/gamma) steps): 60 bytes per
    // element instead of 64 on the other steps
    if (c != c0) count[i] = static_cast<int32_t>(c);
    p_out[i] = static_cast<T>(static_cast<double>(wi) * inv_scale);
  }
  if (code) atomicOr(flag, code);
}

template <typename T>
__global__ void restore_kernel(int64_t* __restrict__ w, const int64_t* __restrict__ v,
                               double* __restrict__ dw, double* __restrict__ dv, T* __restrict__ u,
                               T* __restrict__ p_out, int64_t numel, double alpha, double omg,
                               double inv_scale, double* partial) {
  __shared__ double shm[32];
  double da = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t wi = w[i];
    double ui;
    da += rev::restore_element(wi, v[i], dw[i], dv[i], alpha, omg, inv_scale, ui);
    w[i] = wi;
    u[i] = static_cast<T>(ui);
    p_out[i] = static_cast<T>(static_cast<double>(wi) * inv_scale);
  }
  da = block_sum(da, shm);
  if (threadIdx.x == 0) partial[blockIdx.x] = da;
}

template <typename T>
__global__ void rev_kernel(const int64_t* __restrict__ w, int64_t* __restrict__ v,
                           int64_t* __restrict__ head, int32_t* __restrict__ count,
                           uint32_t* __restrict__ spill, int64_t cap, const T* __restrict__ g,
                           const T* __restrict__ hvp, double* __restrict__ dw, double* __restrict__ dv,
                           int64_t numel, int k, rev::Coder cd, double gamma, double c1s, double lam,
                           double omg, double inv_scale, int* flag, double* partial) {
  __shared__ double shm[32];
  int code = 0;
  double dg = 0.0, dl = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t c0 = count[i];
    int64_t vi = v[i], x = head[i], c = c0;
    double dgi, dli;
    code |= rev::rev_element(w[i], vi, x, c, spill + i, numel, cap, static_cast<double>(g[i]),
                             static_cast<double>(hvp[i]), dw[i], dv[i], k, cd, gamma, c1s, lam, omg,
                             inv_scale, dgi, dli);
    v[i] = vi;
    head[i] = x;
    if (c != c0) count[i] = static_cast<int32_t>(c);  // only on a refill, as in fwd_kernel
    dg += dgi;
    dl += dli;
  }
  if (code) atomicOr(flag, code);
  dg = block_sum(dg, shm);
  dl = block_sum(dl, shm);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = dg;
    partial[gridDim.x + blockIdx.x] = dl;
  }
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

int reversible_fwd_cuda(int64_t* w, int64_t* v, int64_t* head, int32_t* count, uint32_t* spill,
                        int64_t cap, const void* g, void* p_out, int is_double, int64_t numel, int k,
                        int64_t n, double alpha, double c1s, double lam, double inv_scale, int* flag,
                        uintptr_t stream) {
  if (numel == 0) return 0;
  const rev::Coder cd = rev::make_coder(n);
  const int64_t blocks = grid_size(numel, kThreads);
  if (is_double)
    fwd_kernel<double><<<blocks, kThreads, 0, as_stream(stream)>>>(
        w, v, head, count, spill, cap, static_cast<const double*>(g), static_cast<double*>(p_out),
        numel, k, cd, alpha, c1s, lam, inv_scale, flag);
  else
    fwd_kernel<float><<<blocks, kThreads, 0, as_stream(stream)>>>(
        w, v, head, count, spill, cap, static_cast<const float*>(g), static_cast<float*>(p_out),
        numel, k, cd, alpha, c1s, lam, inv_scale, flag);
  return static_cast<int>(cudaGetLastError());
}

int reversible_restore_cuda(int64_t* w, const int64_t* v, double* dw, double* dv, void* u,
                            void* p_out, int is_double, int64_t numel, double alpha, double omg,
                            double inv_scale, double* partial, int64_t nparts, uintptr_t stream) {
  if (numel == 0) return 0;
  if (is_double)
    restore_kernel<double><<<nparts, kThreads, 0, as_stream(stream)>>>(
        w, v, dw, dv, static_cast<double*>(u), static_cast<double*>(p_out), numel, alpha, omg,
        inv_scale, partial);
  else
    restore_kernel<float><<<nparts, kThreads, 0, as_stream(stream)>>>(
        w, v, dw, dv, static_cast<float*>(u), static_cast<float*>(p_out), numel, alpha, omg,
        inv_scale, partial);
  return static_cast<int>(cudaGetLastError());
}

int reversible_rev_cuda(const int64_t* w, int64_t* v, int64_t* head, int32_t* count,
                        uint32_t* spill, int64_t cap, const void* g, const void* hvp, int is_double,
                        double* dw, double* dv, int64_t numel, int k, int64_t n, double gamma,
                        double c1s, double lam, double omg, double inv_scale, int* flag,
                        double* partial, int64_t nparts, uintptr_t stream) {
  if (numel == 0) return 0;
  const rev::Coder cd = rev::make_coder(n);
  if (is_double)
    rev_kernel<double><<<nparts, kThreads, 0, as_stream(stream)>>>(
        w, v, head, count, spill, cap, static_cast<const double*>(g), static_cast<const double*>(hvp),
        dw, dv, numel, k, cd, gamma, c1s, lam, omg, inv_scale, flag, partial);
  else
    rev_kernel<float><<<nparts, kThreads, 0, as_stream(stream)>>>(
        w, v, head, count, spill, cap, static_cast<const float*>(g), static_cast<const float*>(hvp),
        dw, dv, numel, k, cd, gamma, c1s, lam, omg, inv_scale, flag, partial);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace fastreg
