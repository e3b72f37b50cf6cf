// Host build of csrc/include/fastreg/penalty.h: the same tables, items and arithmetic as the
// CUDA kernels (csrc/cuda/penalty.cu), so CI checks the maths through fastreg._C. OpenMP
// over items. Tables: see penalty.h; coefs are doubles, 3 per tensor:
//   accumulate: (l1, l2, gw)   gw = group_lasso sqrt(A C) (BLOCK) or group_lasso (EXPLICIT)
//   prox:       (tau1, inv, tau_g)   tau1 = lr l1, inv = 1/(1 + 2 lr l2), tau_g = lr gw
// scales/counts: zeroed doubles, one per explicit group; vals: nitems + nexpl doubles. The
// accumulate entry returns the call's value: ordered_sum of vals (penalty.h).
#include <cmath>
#include <cstdint>
#include <vector>

#include "fastreg/penalty.h"

namespace fastreg {
namespace {

using namespace penalty;

// ---- vectorised segments (float32 / float64 storage: the CPU hot path). `omp simd reduction`
// lets the compiler vectorise the sums without -ffast-math, so NaN/Inf keep IEEE semantics.
constexpr int64_t kSub = 1024;
// AVX-512 masks let the compiler if-convert sign/abs/soft with IEEE NaN semantics (measured on
// the 2-core EPYC: ~15x faster than the SSE2 build); other CPUs take the default clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTREG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTREG_CLONES
#endif

// Sums of |w| and w^2 over [lo, hi), in compute-type partial sums of <= kSub elements. The
// L1+L2 gradient is stored by a separate loop (store_grad): with the sums inside the loop that
// stores G, GCC kept the vector accumulators on the stack, and the store-to-load chain made the
// loop compute-bound (measured 1.7-2x slower, in and out of cache).
template <typename T>
FASTREG_CLONES void sum_abs_sq(const T* __restrict W, int64_t lo, int64_t hi, double& s1, double& s2) {
  for (int64_t b0 = lo; b0 < hi; b0 += kSub) {
    const int64_t b1 = b0 + kSub < hi ? b0 + kSub : hi;
    T p1 = 0, p2 = 0;
#pragma omp simd reduction(+ : p1, p2)
    for (int64_t i = b0; i < b1; ++i) {
      const T w = W[i];
      p1 += w < T(0) ? -w : w;
      p2 += w * w;
    }
    s1 += static_cast<double>(p1);
    s2 += static_cast<double>(p2);
  }
}

template <typename T>
FASTREG_CLONES void store_grad(const T* __restrict W, T* __restrict G, int64_t lo, int64_t hi, bool init, T l1,
                               T l2x2, T f) {
  if (init) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) G[i] = grad_term(W[i], l1, l2x2, f);
  } else {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) G[i] = G[i] + grad_term(W[i], l1, l2x2, f);
  }
}

// Ungrouped: block by block, so the sums' loop reads W from L1.
template <typename T>
void seg_grad(const T* W, T* G, int64_t lo, int64_t hi, bool init, T l1, T l2x2, double& s1, double& s2) {
  for (int64_t b0 = lo; b0 < hi; b0 += kSub) {
    const int64_t b1 = b0 + kSub < hi ? b0 + kSub : hi;
    store_grad(W, G, b0, b1, init, l1, l2x2, T(0));
    sum_abs_sq(W, b0, b1, s1, s2);
  }
}

// Sum of soft(w, tau)^2 over [lo, hi) (a row group's norm before the prox), in compute-type
// partial sums of <= kSub elements.
template <typename T>
FASTREG_CLONES double seg_soft_sumsq(const T* __restrict W, int64_t lo, int64_t hi, T tau) {
  double total = 0.0;
  for (int64_t b0 = lo; b0 < hi; b0 += kSub) {
    const int64_t b1 = b0 + kSub < hi ? b0 + kSub : hi;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = b0; i < b1; ++i) {
      const T z = soft_mag(W[i], tau);  // soft(w)^2 bit for bit, 2x cheaper here
      s += z * z;
    }
    total += static_cast<double>(s);
  }
  return total;
}

template <typename T>
FASTREG_CLONES void seg_prox(T* __restrict W, int64_t lo, int64_t hi, T tau, T f) {
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) W[i] = soft(W[i], tau) * f;
}

// Short slices: per element of the A runs W + a * stride (a < A, m elements each), the sum of
// squares into the float64 sums. Accumulate (abs given): squares of w, and the sum of |w| over
// all of them into s1, so that the storing pass (cols_store_grad) needs no reduction. Prox
// (abs null): squares of soft(w, tau). Blocks of kRows runs are summed in the storage type
// first (a float32 partial of <= 16 terms is good to ~1e-6) and widened once per block,
// instead of widening every square.
constexpr int64_t kRows = 16;
template <typename T>
FASTREG_CLONES void cols_sumsq(const T* __restrict W, int64_t stride, int64_t A, double* __restrict sums,
                               T* __restrict part, T* __restrict abs, double& s1, int64_t m, T tau) {
  for (int64_t a0 = 0; a0 < A; a0 += kRows) {
    const int64_t a1 = a0 + kRows < A ? a0 + kRows : A;
    for (int64_t j = 0; j < m; ++j) part[j] = T(0);
    if (abs)
      for (int64_t j = 0; j < m; ++j) abs[j] = T(0);
    for (int64_t a = a0; a < a1; ++a) {
      const T* R = W + a * stride;
      if (abs) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) {
          const T w = R[j];
          part[j] += w * w;
          abs[j] += w < T(0) ? -w : w;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) {
          const T z = soft_mag(R[j], tau);
          part[j] += z * z;
        }
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) sums[j] += static_cast<double>(part[j]);
    if (abs) {
      double t = 0.0;
#pragma omp simd reduction(+ : t)
      for (int64_t j = 0; j < m; ++j) t += static_cast<double>(abs[j]);
      s1 += t;
    }
  }
}

template <typename T>
FASTREG_CLONES void cols_store_grad(const T* __restrict W, T* __restrict G, const T* __restrict f, int64_t m,
                                    bool init, T l1, T l2x2) {
  if (init) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) G[j] = grad_term(W[j], l1, l2x2, f[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) G[j] = G[j] + grad_term(W[j], l1, l2x2, f[j]);
  }
}

template <typename T>
FASTREG_CLONES void cols_prox(T* __restrict W, const T* __restrict f, int64_t m, T tau) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) W[j] = soft(W[j], tau) * f[j];
}

// One item of a float32/float64 tensor (accumulate). Returns false for other storage.
template <int K>
bool fast_accumulate_item(const int64_t* r, const double* cf, int64_t lo, int64_t hi, double& out) {
  if constexpr (K != K_F32 && K != K_F64) {
    return false;
  } else {
    using T = typename Storage<K>::raw;
    const int64_t A = r[T_A], B = r[T_B], C = r[T_C];
    const T* W = reinterpret_cast<const T*>(r[T_W]);
    T* G = reinterpret_cast<T*>(r[T_G]);
    const bool init = r[T_INIT] != 0;
    const T l1 = static_cast<T>(cf[0]), l2x2 = static_cast<T>(2.0 * cf[1]);
    double s1 = 0.0, s2 = 0.0, sg = 0.0;
    if (r[T_MODE] == M_FLAT) {
      seg_grad(W, G, lo, hi, init, l1, l2x2, s1, s2);
    } else if (r[T_MODE] == M_BLOCK && C >= 64) {
      // one reading pass per group gives its norm and the L1/L2 sums; then one storing pass
      for (int64_t b = lo; b < hi; ++b) {
        double ab = 0.0, sq = 0.0;
        for (int64_t a = 0; a < A; ++a) sum_abs_sq(W, (a * B + b) * C, (a * B + b + 1) * C, ab, sq);
        s1 += ab;
        s2 += sq;
        sg += cf[2] * std::sqrt(sq);
        const T f = static_cast<T>(group_scale(sq, cf[2]));
        for (int64_t a = 0; a < A; ++a) store_grad(W, G, (a * B + b) * C, (a * B + b + 1) * C, init, l1, l2x2, f);
      }
    } else if (r[T_MODE] == M_BLOCK) {
      // short slices (C < 64: 2-D "cols", 3x3 "channels", vectors): for each a the item's
      // slices are one contiguous run of m = (hi - lo) C elements; square-sum them element-wise
      // over a, reduce over c, expand the group scale per element, update run by run.
      const int64_t m = (hi - lo) * C;
      std::vector<double> acc(m, 0.0);  // float64 sums over a (A may be large)
      std::vector<T> fs(m), pabs(m);  // fs: cols_sumsq's partial sums, then the group scales
      cols_sumsq(W + lo * C, B * C, A, acc.data(), fs.data(), pabs.data(), s1, m, T(0));
      for (int64_t j = 0; j < hi - lo; ++j) {
        double sq = 0.0;
        for (int64_t c = 0; c < C; ++c) sq += acc[j * C + c];
        s2 += sq;
        sg += cf[2] * std::sqrt(sq);
        const T f = static_cast<T>(group_scale(sq, cf[2]));
        for (int64_t c = 0; c < C; ++c) fs[j * C + c] = f;
      }
      for (int64_t a = 0; a < A; ++a)
        cols_store_grad(W + (a * B + lo) * C, G + (a * B + lo) * C, fs.data(), m, init, l1, l2x2);
    } else {
      return false;
    }
    out = cf[0] * s1 + cf[1] * s2 + sg;
    return true;
  }
}

template <int K>
bool fast_prox_item(const int64_t* r, const double* cf, int64_t lo, int64_t hi) {
  if constexpr (K != K_F32 && K != K_F64) {
    return false;
  } else {
    using T = typename Storage<K>::raw;
    const int64_t A = r[T_A], B = r[T_B], C = r[T_C];
    T* W = reinterpret_cast<T*>(r[T_W]);
    const T tau = static_cast<T>(cf[0]);
    if (r[T_MODE] == M_FLAT) {
      seg_prox(W, lo, hi, tau, static_cast<T>(cf[1]));
    } else if (r[T_MODE] == M_BLOCK && C >= 64) {
      for (int64_t b = lo; b < hi; ++b) {
        double sq = 0.0;
        for (int64_t a = 0; a < A; ++a) sq += seg_soft_sumsq(W, (a * B + b) * C, (a * B + b + 1) * C, tau);
        const T f = static_cast<T>(shrink_factor(sq, cf[2], cf[1]));
        for (int64_t a = 0; a < A; ++a) seg_prox(W, (a * B + b) * C, (a * B + b + 1) * C, tau, f);
      }
    } else if (r[T_MODE] == M_BLOCK) {  // short slices, as in fast_accumulate_item
      const int64_t m = (hi - lo) * C;
      std::vector<double> acc(m, 0.0);  // float64 sums over a (A may be large)
      std::vector<T> fs(m);  // the partial sums of cols_sumsq, then the shrink factors
      double unused = 0.0;
      cols_sumsq(W + lo * C, B * C, A, acc.data(), fs.data(), static_cast<T*>(nullptr), unused, m, tau);
      for (int64_t j = 0; j < hi - lo; ++j) {
        double sq = 0.0;
        for (int64_t c = 0; c < C; ++c) sq += acc[j * C + c];
        const T f = static_cast<T>(shrink_factor(sq, cf[2], cf[1]));
        for (int64_t c = 0; c < C; ++c) fs[j * C + c] = f;
      }
      for (int64_t a = 0; a < A; ++a) cols_prox(W + (a * B + lo) * C, fs.data(), m, tau);
    } else {
      return false;
    }
    return true;
  }
}

template <int K>
void explicit_norms(const int64_t* tab, const double* coefs, const int64_t* expl, int64_t nexpl,
                    double* scales, double* counts, double* vals_out, bool prox) {
  using S = Storage<K>;
  using T = typename S::acc;
  if (nexpl <= 0) return;  // no parallel region at all: waking the pool is not free
#pragma omp parallel for schedule(dynamic) if (nexpl > 1)
  for (int64_t j = 0; j < nexpl; ++j) {
    const int64_t* r = tab + expl[j] * NCOLS;
    const int64_t n = r[T_A] * r[T_B] * r[T_C];
    const auto* W = reinterpret_cast<const typename S::raw*>(r[T_W]);
    const auto* idx = reinterpret_cast<const int64_t*>(r[T_IDX]);
    double* sq = scales + r[T_SOFF];
    double* cnt = counts + r[T_SOFF];
    const double* cf = coefs + expl[j] * 3;
    const T tau1 = static_cast<T>(cf[0]);
    for (int64_t i = 0; i < n; ++i) {
      T w = S::load(W, i);
      if (prox) w = soft(w, tau1);
      sq[idx[i]] += static_cast<double>(w * w);
      cnt[idx[i]] += 1.0;
    }
    double v = 0.0;
    for (int64_t g = 0; g < r[T_NG]; ++g) {
      const double tg = cf[2] * std::sqrt(cnt[g]);
      if (prox) {
        sq[g] = shrink_factor(sq[g], tg, 1.0);
      } else {
        v += tg * std::sqrt(sq[g]);
        sq[g] = group_scale(sq[g], tg);
      }
    }
    vals_out[j] = v;
  }
}

// Elements covered by the items: below 2^16 one thread does it all (waking the pool costs
// more than the work, and much more on a loaded machine).
constexpr int64_t kParallelMin = 1 << 16;
inline int64_t item_work(const int64_t* tab, const int64_t* items, int64_t nitems) {
  int64_t total = 0;
  for (int64_t k = 0; k < nitems; ++k) {
    const int64_t* r = tab + items[3 * k] * NCOLS;
    const int64_t span = items[3 * k + 2] - items[3 * k + 1];
    total += r[T_MODE] == M_BLOCK ? span * r[T_A] * r[T_C] : span;
  }
  return total;
}

template <int K>
void accumulate_items(const int64_t* tab, const double* coefs, const int64_t* items, int64_t nitems,
                      const double* scales, double* vals) {
  using S = Storage<K>;
  using T = typename S::acc;
  const bool par = item_work(tab, items, nitems) >= kParallelMin;
#pragma omp parallel for schedule(dynamic) if (par)
  for (int64_t k = 0; k < nitems; ++k) {
    const int64_t t = items[3 * k], lo = items[3 * k + 1], hi = items[3 * k + 2];
    const int64_t* r = tab + t * NCOLS;
    if (fast_accumulate_item<K>(r, coefs + 3 * t, lo, hi, vals[k])) continue;
    const int64_t A = r[T_A], B = r[T_B], C = r[T_C];
    const auto* W = reinterpret_cast<const typename S::raw*>(r[T_W]);
    auto* G = reinterpret_cast<typename S::raw*>(r[T_G]);
    const bool init = r[T_INIT] != 0;
    const T l1 = static_cast<T>(coefs[3 * t]), l2x2 = static_cast<T>(2.0 * coefs[3 * t + 1]);
    double s1 = 0.0, s2 = 0.0, sg = 0.0;
    auto update = [&](int64_t i, T f) {
      const T w = S::load(W, i);
      const T g = init ? T(0) : S::load(G, i);
      S::store(G, i, g + grad_term(w, l1, l2x2, f));
      s1 += static_cast<double>(w < T(0) ? -w : w);
      s2 += static_cast<double>(w * w);
    };
    if (r[T_MODE] == M_BLOCK) {
      std::vector<double> sums(hi - lo, 0.0);
      for (int64_t a = 0; a < A; ++a)
        for (int64_t b = lo; b < hi; ++b)
          for (int64_t c = 0; c < C; ++c) {
            const T w = S::load(W, block_index(a, b, c, B, C));
            sums[b - lo] += static_cast<double>(w * w);
          }
      for (auto& s : sums) {
        sg += coefs[3 * t + 2] * std::sqrt(s);
        s = group_scale(s, coefs[3 * t + 2]);
      }
      for (int64_t a = 0; a < A; ++a)
        for (int64_t b = lo; b < hi; ++b)
          for (int64_t c = 0; c < C; ++c) update(block_index(a, b, c, B, C), static_cast<T>(sums[b - lo]));
    } else if (r[T_MODE] == M_EXPLICIT) {
      const auto* idx = reinterpret_cast<const int64_t*>(r[T_IDX]);
      const double* sc = scales + r[T_SOFF];
      for (int64_t i = lo; i < hi; ++i) update(i, static_cast<T>(sc[idx[i]]));
    } else {
      for (int64_t i = lo; i < hi; ++i) update(i, T(0));
    }
    vals[k] = coefs[3 * t] * s1 + coefs[3 * t + 1] * s2 + sg;
  }
}

template <int K>
void prox_items(const int64_t* tab, const double* coefs, const int64_t* items, int64_t nitems,
                const double* scales) {
  using S = Storage<K>;
  using T = typename S::acc;
  const bool par = item_work(tab, items, nitems) >= kParallelMin;
#pragma omp parallel for schedule(dynamic) if (par)
  for (int64_t k = 0; k < nitems; ++k) {
    const int64_t t = items[3 * k], lo = items[3 * k + 1], hi = items[3 * k + 2];
    const int64_t* r = tab + t * NCOLS;
    if (fast_prox_item<K>(r, coefs + 3 * t, lo, hi)) continue;
    const int64_t A = r[T_A], B = r[T_B], C = r[T_C];
    auto* W = reinterpret_cast<typename S::raw*>(r[T_W]);
    const T tau1 = static_cast<T>(coefs[3 * t]);
    const double inv = coefs[3 * t + 1];
    if (r[T_MODE] == M_BLOCK) {
      std::vector<double> sums(hi - lo, 0.0);
      for (int64_t a = 0; a < A; ++a)
        for (int64_t b = lo; b < hi; ++b)
          for (int64_t c = 0; c < C; ++c) {
            const T z = soft(S::load(W, block_index(a, b, c, B, C)), tau1);
            sums[b - lo] += static_cast<double>(z * z);
          }
      for (auto& s : sums) s = shrink_factor(s, coefs[3 * t + 2], inv);
      for (int64_t a = 0; a < A; ++a)
        for (int64_t b = lo; b < hi; ++b) {
          const T f = static_cast<T>(sums[b - lo]);
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = block_index(a, b, c, B, C);
            S::store(W, i, soft(S::load(W, i), tau1) * f);
          }
        }
    } else if (r[T_MODE] == M_EXPLICIT) {
      const auto* idx = reinterpret_cast<const int64_t*>(r[T_IDX]);
      const double* sc = scales + r[T_SOFF];
      for (int64_t i = lo; i < hi; ++i)
        S::store(W, i, soft(S::load(W, i), tau1) * static_cast<T>(sc[idx[i]] * inv));
    } else {
      const T f = static_cast<T>(inv);
      for (int64_t i = lo; i < hi; ++i) S::store(W, i, soft(S::load(W, i), tau1) * f);
    }
  }
}

template <int K>
void accumulate_all(const int64_t* tab, const double* coefs, const int64_t* items, int64_t nitems,
                    const int64_t* expl, int64_t nexpl, double* scales, double* counts, double* vals) {
  explicit_norms<K>(tab, coefs, expl, nexpl, scales, counts, vals + nitems, false);
  accumulate_items<K>(tab, coefs, items, nitems, scales, vals);
}

template <int K>
void prox_all(const int64_t* tab, const double* coefs, const int64_t* items, int64_t nitems,
              const int64_t* expl, int64_t nexpl, double* scales, double* counts) {
  std::vector<double> unused(nexpl > 0 ? nexpl : 1);
  explicit_norms<K>(tab, coefs, expl, nexpl, scales, counts, unused.data(), true);
  prox_items<K>(tab, coefs, items, nitems, scales);
}

template <int K>
void activity_fwd(const void* xp, void* yp, int64_t n, double l1, double l2, double* out) {
  using S = Storage<K>;
  using T = typename S::acc;
  const auto* X = static_cast<const typename S::raw*>(xp);
  auto* Y = static_cast<typename S::raw*>(yp);
  double s1 = 0.0, s2 = 0.0;
#pragma omp parallel for reduction(+ : s1, s2) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    Y[i] = X[i];
    const T w = S::load(X, i);
    s1 += static_cast<double>(w < T(0) ? -w : w);
    s2 += static_cast<double>(w * w);
  }
  *out = l1 * s1 + l2 * s2;
}

template <int K>
void activity_bwd(const void* gyp, const void* xp, void* gxp, int64_t n, double c1, double c2) {
  using S = Storage<K>;
  using T = typename S::acc;
  const auto* GY = static_cast<const typename S::raw*>(gyp);
  const auto* X = static_cast<const typename S::raw*>(xp);
  auto* GX = static_cast<typename S::raw*>(gxp);
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i)
    S::store(GX, i, activity_grad(S::load(GY, i), S::load(X, i), static_cast<T>(c1), static_cast<T>(c2)));
}

}  // namespace

double activity_penalty_fwd_host(const void* x, void* y, int64_t n, double l1, double l2, int kind) {
  double v = 0.0;
  switch (kind) {
    case K_F32: activity_fwd<K_F32>(x, y, n, l1, l2, &v); break;
    case K_F64: activity_fwd<K_F64>(x, y, n, l1, l2, &v); break;
    case K_F16: activity_fwd<K_F16>(x, y, n, l1, l2, &v); break;
    default: activity_fwd<K_BF16>(x, y, n, l1, l2, &v); break;
  }
  return v;
}

void activity_penalty_bwd_host(const void* gy, const void* x, void* gx, int64_t n, double c1, double c2,
                               int kind) {
  switch (kind) {
    case K_F32: activity_bwd<K_F32>(gy, x, gx, n, c1, c2); break;
    case K_F64: activity_bwd<K_F64>(gy, x, gx, n, c1, c2); break;
    case K_F16: activity_bwd<K_F16>(gy, x, gx, n, c1, c2); break;
    default: activity_bwd<K_BF16>(gy, x, gx, n, c1, c2); break;
  }
}

double penalty_accumulate_host(const int64_t* tab, int64_t /*ntensors*/, const double* coefs,
                               const int64_t* items, int64_t nitems, const int64_t* expl, int64_t nexpl,
                               double* scales, double* counts, double* vals, int kind) {
  switch (kind) {
    case K_F32: accumulate_all<K_F32>(tab, coefs, items, nitems, expl, nexpl, scales, counts, vals); break;
    case K_F64: accumulate_all<K_F64>(tab, coefs, items, nitems, expl, nexpl, scales, counts, vals); break;
    case K_F16: accumulate_all<K_F16>(tab, coefs, items, nitems, expl, nexpl, scales, counts, vals); break;
    default: accumulate_all<K_BF16>(tab, coefs, items, nitems, expl, nexpl, scales, counts, vals); break;
  }
  return ordered_sum(vals, nitems + nexpl);  // the order the CUDA kernel's last block sums in
}

void penalty_prox_host(const int64_t* tab, int64_t /*ntensors*/, const double* coefs, const int64_t* items,
                       int64_t nitems, const int64_t* expl, int64_t nexpl, double* scales, double* counts,
                       int kind) {
  switch (kind) {
    case K_F32: prox_all<K_F32>(tab, coefs, items, nitems, expl, nexpl, scales, counts); break;
    case K_F64: prox_all<K_F64>(tab, coefs, items, nitems, expl, nexpl, scales, counts); break;
    case K_F16: prox_all<K_F16>(tab, coefs, items, nitems, expl, nexpl, scales, counts); break;
    default: prox_all<K_BF16>(tab, coefs, items, nitems, expl, nexpl, scales, counts); break;
  }
}

}  // namespace fastreg
