// Host build of csrc/include/fastreg/penalty.h: the same tables, items and arithmetic as the
// CUDA kernels (csrc/cuda/penalty.cu), so CI checks the maths through fastreg._C. OpenMP
// over items. Tables: see penalty.h; coefs are doubles, 3 per tensor:
//   accumulate: (l1, l2, gw)   gw = group_lasso sqrt(A C) (BLOCK) or group_lasso (EXPLICIT)
//   prox:       (tau1, inv, tau_g)   tau1 = lr l1, inv = 1/(1 + 2 lr l2), tau_g = lr gw
// scales/counts: zeroed doubles, one per explicit group; vals: nitems + nexpl doubles.
#include <cmath>
#include <cstdint>
#include <vector>

#include "fastreg/penalty.h"

namespace fastreg {
namespace {

using namespace penalty;

template <int K>
void explicit_norms(const int64_t* tab, const double* coefs, const int64_t* expl, int64_t nexpl,
                    double* scales, double* counts, double* vals_out, bool prox) {
  using S = Storage<K>;
  using T = typename S::acc;
#pragma omp parallel for schedule(dynamic)
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

template <int K>
void accumulate_items(const int64_t* tab, const double* coefs, const int64_t* items, int64_t nitems,
                      const double* scales, double* vals) {
  using S = Storage<K>;
  using T = typename S::acc;
#pragma omp parallel for schedule(dynamic)
  for (int64_t k = 0; k < nitems; ++k) {
    const int64_t t = items[3 * k], lo = items[3 * k + 1], hi = items[3 * k + 2];
    const int64_t* r = tab + t * NCOLS;
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
#pragma omp parallel for schedule(dynamic)
  for (int64_t k = 0; k < nitems; ++k) {
    const int64_t t = items[3 * k], lo = items[3 * k + 1], hi = items[3 * k + 2];
    const int64_t* r = tab + t * NCOLS;
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

}  // namespace

void penalty_accumulate_host(const int64_t* tab, int64_t /*ntensors*/, const double* coefs,
                             const int64_t* items, int64_t nitems, const int64_t* expl, int64_t nexpl,
                             double* scales, double* counts, double* vals, int kind) {
  switch (kind) {
    case K_F32: accumulate_all<K_F32>(tab, coefs, items, nitems, expl, nexpl, scales, counts, vals); break;
    case K_F64: accumulate_all<K_F64>(tab, coefs, items, nitems, expl, nexpl, scales, counts, vals); break;
    case K_F16: accumulate_all<K_F16>(tab, coefs, items, nitems, expl, nexpl, scales, counts, vals); break;
    default: accumulate_all<K_BF16>(tab, coefs, items, nitems, expl, nexpl, scales, counts, vals); break;
  }
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
