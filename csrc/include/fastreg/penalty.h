// Penalty maths shared by the CUDA kernels (csrc/cuda/penalty.cu) and their host build
// (csrc/cpu/penalty_host.cpp, tested in CI through fastreg._C). docs/penalty.md.
//
// The work is described exactly as for the Numba kernels (kernels/numba/penalty.py):
// a tensor table of int64 rows (address of w, address of grad, A, B, C, mode, init,
// address of the explicit group index, offset of its groups in the scale table, number
// of groups) and a list of items (tensor, lo, hi). An item is a flat element range
// (mode FLAT / EXPLICIT) or a range of groups b in [lo, hi) of a tensor viewed as
// (A, B, C) whose groups are the B slices (mode BLOCK).
#pragma once
#include <cmath>
#include <cstdint>

#include "fastreg/common.h"

namespace fastreg {
namespace penalty {

enum : int { T_W = 0, T_G, T_A, T_B, T_C, T_MODE, T_INIT, T_IDX, T_SOFF, T_NG, NCOLS };
enum : int { M_FLAT = 0, M_BLOCK = 1, M_EXPLICIT = 2 };
// storage kinds passed by Python: float32, float64, float16, bfloat16
enum : int { K_F32 = 0, K_F64 = 1, K_F16 = 2, K_BF16 = 3 };

// ---------------------------------------------------------------- storage <-> compute
FASTREG_HD float f32_from_bits(uint32_t u) {
  union { uint32_t u; float f; } v;
  v.u = u;
  return v.f;
}
FASTREG_HD uint32_t bits_from_f32(float f) {
  union { uint32_t u; float f; } v;
  v.f = f;
  return v.u;
}

FASTREG_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.960464477539063e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return f32_from_bits(sign | 0x7F800000u | (m << 13));
  return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

// Round to nearest even (F. Giesen's float_to_half_fast3_rtne), NaN -> quiet NaN.
FASTREG_HD uint16_t float_to_half(float f) {
  uint32_t x = bits_from_f32(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint32_t o;
  if (x >= 0x47800000u) {
    o = x > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (x < 0x38800000u) {
    const uint32_t magic = 0x3F000000u;
    o = bits_from_f32(f32_from_bits(x) + f32_from_bits(magic)) - magic;
  } else {
    const uint32_t odd = (x >> 13) & 1u;
    x += 0xC8000FFFu + odd;
    o = x >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

FASTREG_HD float bf16_to_float(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

FASTREG_HD uint16_t float_to_bf16(float f) {
  uint32_t x = bits_from_f32(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

// Storage<K>: raw element type, compute type, load/store.
template <int K> struct Storage;
template <> struct Storage<K_F32> {
  using raw = float;
  using acc = float;
  static FASTREG_HD float load(const raw* p, int64_t i) { return p[i]; }
  static FASTREG_HD void store(raw* p, int64_t i, float v) { p[i] = v; }
};
template <> struct Storage<K_F64> {
  using raw = double;
  using acc = double;
  static FASTREG_HD double load(const raw* p, int64_t i) { return p[i]; }
  static FASTREG_HD void store(raw* p, int64_t i, double v) { p[i] = v; }
};
template <> struct Storage<K_F16> {
  using raw = uint16_t;
  using acc = float;
  static FASTREG_HD float load(const raw* p, int64_t i) { return half_to_float(p[i]); }
  static FASTREG_HD void store(raw* p, int64_t i, float v) { p[i] = float_to_half(v); }
};
template <> struct Storage<K_BF16> {
  using raw = uint16_t;
  using acc = float;
  static FASTREG_HD float load(const raw* p, int64_t i) { return bf16_to_float(p[i]); }
  static FASTREG_HD void store(raw* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
};

// ---------------------------------------------------------------- element maths
// sign(w) with sign(0) = 0 and sign(NaN) = NaN.
template <typename T> FASTREG_HD T sgn(T w) { return w > T(0) ? T(1) : (w < T(0) ? T(-1) : w); }

// d/dw of l1 |w| + l2 w^2 + (group term with scale f = gl sqrt(|g|) / ||w_g||).
template <typename T> FASTREG_HD T grad_term(T w, T l1, T l2x2, T f) { return l1 * sgn(w) + (l2x2 + f) * w; }

// Soft-thresholding sign(w) max(|w| - tau, 0); NaN stays NaN.
template <typename T> FASTREG_HD T soft(T w, T tau) {
  const T a = (w < T(0) ? -w : w) - tau;
  return sgn(w) * (a > T(0) ? a : T(0));
}

// |soft(w, tau)| = max(|w| - tau, 0), NaN staying NaN: soft(w, tau)^2 without the sign, which
// squaring drops anyway (the same bits). Cheaper in the norm loops than soft (one select).
template <typename T> FASTREG_HD T soft_mag(T w, T tau) {
  const T a = (w < T(0) ? -w : w) - tau;
  return a < T(0) ? T(0) : a;
}

// Group-lasso gradient scale gw / ||w_g|| from the sum of squares; the subgradient 0 at a zero
// norm; NaN propagates. gw = group_lasso * sqrt(|g|).
FASTREG_HD double group_scale(double sumsq, double gw) {
  const double n = sqrt(sumsq);
  return n > 0.0 ? gw / n : (n == 0.0 ? 0.0 : n);
}

// Proximal factor of a group: max(0, 1 - tau_g / ||z_g||) * inv, where z = soft(w, lr l1),
// tau_g = lr group_lasso sqrt(|g|) and inv = 1 / (1 + 2 lr l2). 0 for a zero group, NaN stays.
FASTREG_HD double shrink_factor(double sumsq, double tau_g, double inv) {
  const double n = sqrt(sumsq);
  if (n > 0.0) {
    const double f = 1.0 - tau_g / n;
    return (f > 0.0 ? f : 0.0) * inv;
  }
  return n == 0.0 ? 0.0 : n;
}

// Activity penalty backward: gy + gv (l1 sign(x) + 2 l2 x) with c1 = gv l1, c2 = 2 gv l2.
template <typename T> FASTREG_HD T activity_grad(T gy, T x, T c1, T c2) { return gy + (c1 * sgn(x) + c2 * x); }

// ---------------------------------------------------------------- the call's value
// The value of a call is the sum of its per-item values (then the explicit groups' values),
// summed in one fixed order on every path, so that the host build, the CUDA kernel's last
// block, and a launch from cached or freshly built tables give the same bits: kSumLanes
// strided partial sums, then a pairwise tree over the lanes. The device runs one lane per
// thread of its last block; the host runs the lanes in turn (ordered_sum).
constexpr int kSumLanes = 256;

FASTREG_HD double lane_partial(const volatile double* vals, int64_t n, int lane) {
  double s = 0.0;
  for (int64_t i = lane; i < n; i += kSumLanes) s += vals[i];
  return s;
}

// One level of the tree: lanes [0, half) add lanes [half, 2 half).
FASTREG_HD void tree_level(double* part, int half, int lane) {
  if (lane < half) part[lane] += part[lane + half];
}

inline double ordered_sum(const double* vals, int64_t n) {
  double part[kSumLanes];
  for (int l = 0; l < kSumLanes; ++l) part[l] = lane_partial(vals, n, l);
  for (int h = kSumLanes / 2; h > 0; h >>= 1)
    for (int l = 0; l < h; ++l) tree_level(part, h, l);
  return part[0];
}

// Element index of (a, b, c) in a tensor viewed as (A, B, C).
FASTREG_HD int64_t block_index(int64_t a, int64_t b, int64_t c, int64_t B, int64_t C) {
  return (a * B + b) * C + c;
}

}  // namespace penalty
}  // namespace fastreg
