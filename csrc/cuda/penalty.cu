// Multi-tensor penalty kernels (docs/penalty.md): the tensor table and the item list live in
// device memory (uploaded once per parameter list, fastreg/ops/penalty.py keeps them), one
// block per item, one launch for all the tensors of one dtype whatever their number, the
// call's value included (plus, with explicit group indices, a norm pass and a finalize pass). The
// arithmetic is csrc/include/fastreg/penalty.h, host-tested through csrc/cpu/penalty_host.cpp.
//
// Block-mode items (a range of groups of a tensor viewed as (A, B, C)): with C == 1 (the
// groups run along the contiguous dimension: 2-D "cols", vectors) one thread owns a group and
// consecutive threads read consecutive addresses; with C > 1 one warp owns a group and its
// lanes stride over the C contiguous elements of each a. Norms, then the update, in the same
// block: the second read hits L1/L2 for items of at most 2^15 elements.
#include <cstdint>

#include "cuda/launch.h"
#include "fastreg/penalty.h"

namespace fastreg {
namespace {

using namespace penalty;
constexpr int kThreads = 256;

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
  return v;
}

// Sum of v over the block, returned to thread 0.
__device__ double block_sum(double v) {
  __shared__ double part[kThreads / 32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? part[threadIdx.x] : 0.0;
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

template <int K>
__global__ void explicit_norms_kernel(const int64_t* tab, const double* coefs, const int64_t* expl,
                                      double* scales, double* counts, bool prox) {
  using S = Storage<K>;
  using T = typename S::acc;
  const int64_t* r = tab + expl[blockIdx.x] * NCOLS;
  const int64_t n = r[T_A] * r[T_B] * r[T_C];
  const auto* W = reinterpret_cast<const typename S::raw*>(r[T_W]);
  const auto* idx = reinterpret_cast<const int64_t*>(r[T_IDX]);
  const T tau1 = static_cast<T>(coefs[3 * expl[blockIdx.x]]);
  for (int64_t i = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    T w = S::load(W, i);
    if (prox) w = soft(w, tau1);
    atomicAdd(scales + r[T_SOFF] + idx[i], static_cast<double>(w * w));
    atomicAdd(counts + r[T_SOFF] + idx[i], 1.0);
  }
}

__global__ void explicit_finalize_kernel(const int64_t* tab, const double* coefs, const int64_t* expl,
                                         double* scales, const double* counts, double* vals_out,
                                         bool prox) {
  const int64_t* r = tab + expl[blockIdx.x] * NCOLS;
  const double gl = coefs[3 * expl[blockIdx.x] + 2];
  double v = 0.0;
  for (int64_t g = threadIdx.x; g < r[T_NG]; g += blockDim.x) {
    double& s = scales[r[T_SOFF] + g];
    const double tg = gl * sqrt(counts[r[T_SOFF] + g]);
    if (prox) {
      s = shrink_factor(s, tg, 1.0);
    } else {
      v += tg * sqrt(s);
      s = group_scale(s, tg);
    }
  }
  v = block_sum(v);
  if (threadIdx.x == 0 && vals_out != nullptr) vals_out[blockIdx.x] = v;
}

// The last block to finish sums every block's value (and the explicit groups' values) in
// penalty.h's fixed order, writes the call's value and re-arms the counter for the next call:
// the value needs no second launch, no memset and no host copy.
__device__ void finish_value(double* vals, int64_t nvals, unsigned* done, float* out32, double* out64) {
  __shared__ bool last;
  __threadfence();  // this block's vals[k] is visible before the counter says so
  if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  __shared__ double part[kSumLanes];
  static_assert(kThreads == kSumLanes, "one lane per thread");
  part[threadIdx.x] = lane_partial(vals, nvals, threadIdx.x);
  __syncthreads();
  for (int h = kSumLanes / 2; h > 0; h >>= 1) {
    tree_level(part, h, threadIdx.x);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (out32 != nullptr) *out32 = static_cast<float>(part[0]);
    if (out64 != nullptr) *out64 = part[0];
    *done = 0u;
  }
}

template <int K>
__global__ void accumulate_kernel(const int64_t* tab, const double* coefs, const int64_t* items,
                                  const double* scales, double* vals, int64_t nvals, unsigned* done,
                                  float* out32, double* out64) {
  using S = Storage<K>;
  using T = typename S::acc;
  const int64_t k = blockIdx.x;
  const int64_t t = items[3 * k], lo = items[3 * k + 1], hi = items[3 * k + 2];
  const int64_t* r = tab + t * NCOLS;
  const int64_t A = r[T_A], B = r[T_B], C = r[T_C];
  const auto* W = reinterpret_cast<const typename S::raw*>(r[T_W]);
  auto* G = reinterpret_cast<typename S::raw*>(r[T_G]);
  const bool init = r[T_INIT] != 0;
  const T l1 = static_cast<T>(coefs[3 * t]), l2x2 = static_cast<T>(2.0 * coefs[3 * t + 1]);
  const double gw = coefs[3 * t + 2];
  double s1 = 0.0, s2 = 0.0, sg = 0.0;
  auto update = [&](int64_t i, T f) {
    const T w = S::load(W, i);
    const T g = init ? T(0) : S::load(G, i);
    S::store(G, i, g + grad_term(w, l1, l2x2, f));
    s1 += static_cast<double>(w < T(0) ? -w : w);
    s2 += static_cast<double>(w * w);
  };
  if (r[T_MODE] == M_BLOCK) {
    if (C == 1) {
      for (int64_t b = lo + threadIdx.x; b < hi; b += blockDim.x) {
        double sq = 0.0;
        for (int64_t a = 0; a < A; ++a) {
          const T w = S::load(W, a * B + b);
          sq += static_cast<double>(w * w);
        }
        sg += gw * sqrt(sq);
        const T f = static_cast<T>(group_scale(sq, gw));
        for (int64_t a = 0; a < A; ++a) update(a * B + b, f);
      }
    } else {
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
      for (int64_t b = lo + warp; b < hi; b += nwarps) {
        double sq = 0.0;
        for (int64_t a = 0; a < A; ++a)
          for (int64_t c = lane; c < C; c += 32) {
            const T w = S::load(W, block_index(a, b, c, B, C));
            sq += static_cast<double>(w * w);
          }
        sq = __shfl_sync(0xFFFFFFFFu, warp_sum(sq), 0);
        if (lane == 0) sg += gw * sqrt(sq);
        const T f = static_cast<T>(group_scale(sq, gw));
        for (int64_t a = 0; a < A; ++a)
          for (int64_t c = lane; c < C; c += 32) update(block_index(a, b, c, B, C), f);
      }
    }
  } else if (r[T_MODE] == M_EXPLICIT) {
    const auto* idx = reinterpret_cast<const int64_t*>(r[T_IDX]);
    const double* sc = scales + r[T_SOFF];
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) update(i, static_cast<T>(sc[idx[i]]));
  } else {
    // four independent loads in flight per thread before any store: the flat items are
    // latency-bound with one
    int64_t i = lo + threadIdx.x;
    for (; i + 3 * kThreads < hi; i += 4 * kThreads) {
      T w[4], g[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) w[u] = S::load(W, i + u * kThreads);
      if (!init) {
#pragma unroll
        for (int u = 0; u < 4; ++u) g[u] = S::load(G, i + u * kThreads);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        S::store(G, i + u * kThreads, (init ? T(0) : g[u]) + grad_term(w[u], l1, l2x2, T(0)));
        s1 += static_cast<double>(w[u] < T(0) ? -w[u] : w[u]);
        s2 += static_cast<double>(w[u] * w[u]);
      }
    }
    for (; i < hi; i += kThreads) update(i, T(0));
  }
  const double v = block_sum(coefs[3 * t] * s1 + coefs[3 * t + 1] * s2 + sg);
  if (threadIdx.x == 0) vals[k] = v;
  finish_value(vals, nvals, done, out32, out64);
}

template <int K>
__global__ void prox_kernel(const int64_t* tab, const double* coefs, const int64_t* items,
                            const double* scales) {
  using S = Storage<K>;
  using T = typename S::acc;
  const int64_t k = blockIdx.x;
  const int64_t t = items[3 * k], lo = items[3 * k + 1], hi = items[3 * k + 2];
  const int64_t* r = tab + t * NCOLS;
  const int64_t A = r[T_A], B = r[T_B], C = r[T_C];
  auto* W = reinterpret_cast<typename S::raw*>(r[T_W]);
  const T tau1 = static_cast<T>(coefs[3 * t]);
  const double inv = coefs[3 * t + 1], tg = coefs[3 * t + 2];
  if (r[T_MODE] == M_BLOCK) {
    if (C == 1) {
      for (int64_t b = lo + threadIdx.x; b < hi; b += blockDim.x) {
        double sq = 0.0;
        for (int64_t a = 0; a < A; ++a) {
          const T z = soft(S::load(W, a * B + b), tau1);
          sq += static_cast<double>(z * z);
        }
        const T f = static_cast<T>(shrink_factor(sq, tg, inv));
        for (int64_t a = 0; a < A; ++a) S::store(W, a * B + b, soft(S::load(W, a * B + b), tau1) * f);
      }
    } else {
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
      for (int64_t b = lo + warp; b < hi; b += nwarps) {
        double sq = 0.0;
        for (int64_t a = 0; a < A; ++a)
          for (int64_t c = lane; c < C; c += 32) {
            const T z = soft(S::load(W, block_index(a, b, c, B, C)), tau1);
            sq += static_cast<double>(z * z);
          }
        sq = __shfl_sync(0xFFFFFFFFu, warp_sum(sq), 0);
        const T f = static_cast<T>(shrink_factor(sq, tg, inv));
        for (int64_t a = 0; a < A; ++a)
          for (int64_t c = lane; c < C; c += 32) {
            const int64_t i = block_index(a, b, c, B, C);
            S::store(W, i, soft(S::load(W, i), tau1) * f);
          }
      }
    }
  } else if (r[T_MODE] == M_EXPLICIT) {
    const auto* idx = reinterpret_cast<const int64_t*>(r[T_IDX]);
    const double* sc = scales + r[T_SOFF];
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x)
      S::store(W, i, soft(S::load(W, i), tau1) * static_cast<T>(sc[idx[i]] * inv));
  } else {
    const T f = static_cast<T>(inv);
    int64_t i = lo + threadIdx.x;
    for (; i + 3 * kThreads < hi; i += 4 * kThreads) {  // four loads in flight, as in accumulate
      T w[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) w[u] = S::load(W, i + u * kThreads);
#pragma unroll
      for (int u = 0; u < 4; ++u) S::store(W, i + u * kThreads, soft(w[u], tau1) * f);
    }
    for (; i < hi; i += kThreads) S::store(W, i, soft(S::load(W, i), tau1) * f);
  }
}

template <int K>
int accumulate_launch(const int64_t* tab, const double* coefs, const int64_t* items, int64_t nitems,
                      const int64_t* expl, int64_t nexpl, double* scales, double* counts, double* vals,
                      unsigned* done, float* out32, double* out64, cudaStream_t s) {
  if (nexpl > 0) {
    explicit_norms_kernel<K><<<dim3(static_cast<unsigned>(nexpl), 64), kThreads, 0, s>>>(
        tab, coefs, expl, scales, counts, false);
    explicit_finalize_kernel<<<static_cast<unsigned>(nexpl), kThreads, 0, s>>>(tab, coefs, expl, scales,
                                                                              counts, vals + nitems, false);
  }
  if (nitems > 0)
    accumulate_kernel<K><<<static_cast<unsigned>(nitems), kThreads, 0, s>>>(tab, coefs, items, scales, vals,
                                                                           nitems + nexpl, done, out32, out64);
  return static_cast<int>(cudaGetLastError());
}

template <int K>
int prox_launch(const int64_t* tab, const double* coefs, const int64_t* items, int64_t nitems,
                const int64_t* expl, int64_t nexpl, double* scales, double* counts, cudaStream_t s) {
  if (nexpl > 0) {
    explicit_norms_kernel<K><<<dim3(static_cast<unsigned>(nexpl), 64), kThreads, 0, s>>>(
        tab, coefs, expl, scales, counts, true);
    explicit_finalize_kernel<<<static_cast<unsigned>(nexpl), kThreads, 0, s>>>(tab, coefs, expl, scales,
                                                                              counts, nullptr, true);
  }
  if (nitems > 0) prox_kernel<K><<<static_cast<unsigned>(nitems), kThreads, 0, s>>>(tab, coefs, items, scales);
  return static_cast<int>(cudaGetLastError());
}

// Activity penalty: y = x and per-block partial values (reduced by the caller), one pass.
template <int K>
__global__ void activity_fwd_kernel(const void* xp, void* yp, int64_t n, double l1, double l2,
                                    double* partial) {
  using S = Storage<K>;
  using T = typename S::acc;
  const auto* X = static_cast<const typename S::raw*>(xp);
  auto* Y = static_cast<typename S::raw*>(yp);
  double s = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Y[i] = X[i];
    const T w = S::load(X, i);
    s += l1 * static_cast<double>(w < T(0) ? -w : w) + l2 * static_cast<double>(w * w);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// gx = gy + gv (l1 sign(x) + 2 l2 x); gv read on the device (a float64 scalar): no host sync.
template <int K>
__global__ void activity_bwd_kernel(const void* gyp, const void* xp, void* gxp, int64_t n, double l1,
                                    double l2, const double* gv) {
  using S = Storage<K>;
  using T = typename S::acc;
  const auto* GY = static_cast<const typename S::raw*>(gyp);
  const auto* X = static_cast<const typename S::raw*>(xp);
  auto* GX = static_cast<typename S::raw*>(gxp);
  const T c1 = static_cast<T>(*gv * l1), c2 = static_cast<T>(*gv * 2.0 * l2);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    S::store(GX, i, activity_grad(S::load(GY, i), S::load(X, i), c1, c2));
}

}  // namespace

// partial: at least activity_blocks(n) doubles.
int64_t activity_blocks(int64_t n) { return grid_size(n, kThreads, 1024); }

int activity_penalty_fwd_cuda(const void* x, void* y, int64_t n, double l1, double l2, double* partial,
                              int kind, uintptr_t stream) {
  if (n == 0) return 0;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto blocks = static_cast<unsigned>(activity_blocks(n));
  switch (kind) {
    case K_F32: activity_fwd_kernel<K_F32><<<blocks, kThreads, 0, s>>>(x, y, n, l1, l2, partial); break;
    case K_F64: activity_fwd_kernel<K_F64><<<blocks, kThreads, 0, s>>>(x, y, n, l1, l2, partial); break;
    case K_F16: activity_fwd_kernel<K_F16><<<blocks, kThreads, 0, s>>>(x, y, n, l1, l2, partial); break;
    default: activity_fwd_kernel<K_BF16><<<blocks, kThreads, 0, s>>>(x, y, n, l1, l2, partial); break;
  }
  return static_cast<int>(cudaGetLastError());
}

int activity_penalty_bwd_cuda(const void* gy, const void* x, void* gx, int64_t n, double l1, double l2,
                              const double* gv, int kind, uintptr_t stream) {
  if (n == 0) return 0;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto blocks = static_cast<unsigned>(grid_size(n, kThreads));
  switch (kind) {
    case K_F32: activity_bwd_kernel<K_F32><<<blocks, kThreads, 0, s>>>(gy, x, gx, n, l1, l2, gv); break;
    case K_F64: activity_bwd_kernel<K_F64><<<blocks, kThreads, 0, s>>>(gy, x, gx, n, l1, l2, gv); break;
    case K_F16: activity_bwd_kernel<K_F16><<<blocks, kThreads, 0, s>>>(gy, x, gx, n, l1, l2, gv); break;
    default: activity_bwd_kernel<K_BF16><<<blocks, kThreads, 0, s>>>(gy, x, gx, n, l1, l2, gv); break;
  }
  return static_cast<int>(cudaGetLastError());
}

int penalty_accumulate_cuda(const int64_t* tab, int64_t /*ntensors*/, const double* coefs,
                            const int64_t* items, int64_t nitems, const int64_t* expl, int64_t nexpl,
                            double* scales, double* counts, double* vals, unsigned* done, float* out32,
                            double* out64, int kind, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
#define FASTREG_ACC(KIND) \
  accumulate_launch<KIND>(tab, coefs, items, nitems, expl, nexpl, scales, counts, vals, done, out32, out64, s)
  switch (kind) {
    case K_F32: return FASTREG_ACC(K_F32);
    case K_F64: return FASTREG_ACC(K_F64);
    case K_F16: return FASTREG_ACC(K_F16);
    default: return FASTREG_ACC(K_BF16);
  }
#undef FASTREG_ACC
}

int penalty_prox_cuda(const int64_t* tab, int64_t /*ntensors*/, const double* coefs, const int64_t* items,
                      int64_t nitems, const int64_t* expl, int64_t nexpl, double* scales, double* counts,
                      int kind, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (kind) {
    case K_F32: return prox_launch<K_F32>(tab, coefs, items, nitems, expl, nexpl, scales, counts, s);
    case K_F64: return prox_launch<K_F64>(tab, coefs, items, nitems, expl, nexpl, scales, counts, s);
    case K_F16: return prox_launch<K_F16>(tab, coefs, items, nitems, expl, nexpl, scales, counts, s);
    default: return prox_launch<K_BF16>(tab, coefs, items, nitems, expl, nexpl, scales, counts, s);
  }
}

}  // namespace fastreg
