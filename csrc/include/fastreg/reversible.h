// Exact reversible momentum SGD: the per-element arithmetic, __host__ __device__.
// docs/reversible.md has the maths. The same operations, in the same order, as
// kernels/numba/reversible.py and fastreg/ops/reversible.py (the PyTorch oracle);
// csrc/cpu/reversible_host.cpp compiles this header for the host, so CI tests the
// code the CUDA kernels run.
//
// Per element: w, v int64 fixed point (value = int * 2^-F, |int| < 2^62); the coder
// state x ("head") in [2^31, 2^63), 2^31 = empty; spill words (uint32) at
// spill[j * stride] for j < c (the element's column).
#pragma once
#include <cmath>
#include <cstdint>

#include "fastreg/common.h"

namespace fastreg {
namespace rev {

constexpr int64_t kL = int64_t(1) << 31;
constexpr int64_t kMask31 = (int64_t(1) << 31) - 1;
constexpr int64_t kMask32 = (int64_t(1) << 32) - 1;
constexpr int64_t kLimit = int64_t(1) << 62;
constexpr double kDLimit = 2305843009213693952.0;  // 2^61

constexpr int kBadNonfinite = 1;
constexpr int kBadVRange = 2;
constexpr int kBadWRange = 4;
constexpr int kBadCapacity = 8;

// Rounded arithmetic without FMA contraction, so host and device give the same bits.
FASTREG_HD double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTREG_HD double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTREG_HD double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTREG_HD double rint_even(double x) { return rint(x); }  // default mode: ties to even
FASTREG_HD int64_t iabs(int64_t x) { return x < 0 ? -x : x; }

// Quasi-uniform code over n symbols with total frequency 2^31: symbols s < rr have
// frequency q + 1, the others q (q = 2^31 / n, rr = 2^31 mod n).
struct Coder {
  int64_t n, q, rr, thr;
  double invn, invq, invq1;
};

FASTREG_HD Coder make_coder(int64_t n) {
  Coder cd;
  cd.n = n;
  cd.q = kL / n;
  cd.rr = kL - cd.q * n;
  cd.thr = cd.rr * (cd.q + 1);
  cd.invn = 1.0 / static_cast<double>(n);
  cd.invq = 1.0 / static_cast<double>(cd.q);
  cd.invq1 = 1.0 / static_cast<double>(cd.q + 1);
  return cd;
}

// (a // b, a mod b) with floor semantics, 1 <= b < 2^31, invb = 1.0 / b: a double
// estimate, one refinement, exact integer fix-up (no 64-bit hardware division).
FASTREG_HD void floordiv_small(int64_t a, int64_t b, double invb, int64_t& q, int64_t& r) {
  q = static_cast<int64_t>(floor(mul(static_cast<double>(a), invb)));
  r = a - q * b;
  const int64_t q2 = static_cast<int64_t>(floor(mul(static_cast<double>(r), invb)));
  q += q2;
  r -= q2 * b;
  while (r < 0) {
    r += b;
    q -= 1;
  }
  while (r >= b) {
    r -= b;
    q += 1;
  }
}

// a / b for 0 <= a < 2^31, 1 <= b < 2^31: the double estimate is off by at most one.
FASTREG_HD int64_t div_31(int64_t a, int64_t b, double invb) {
  int64_t s = static_cast<int64_t>(mul(static_cast<double>(a), invb));
  const int64_t r = a - s * b;
  if (r < 0)
    s -= 1;
  else if (r >= b)
    s += 1;
  return s;
}

// Renormalise before a push: move the low word of x to the spill when x >= bound.
// A zero word on an empty spill is not stored (the canonical empty stack).
FASTREG_HD void emit(int64_t& x, int64_t& c, uint32_t* spill, int64_t stride, int64_t cap,
                     int64_t bound, int& bad) {
  if (x >= bound) {
    const int64_t word = x & kMask32;
    if (c > 0 || word != 0) {
      if (c < cap) {
        spill[c * stride] = static_cast<uint32_t>(word);
        c += 1;
      } else {
        bad |= kBadCapacity;
      }
    }
    x >>= 32;
  }
}

// Renormalise before a pop: shift in the top spill word (0 when empty) when x < below.
FASTREG_HD void refill(int64_t& x, int64_t& c, const uint32_t* spill, int64_t stride, int64_t below) {
  if (x < below) {
    int64_t word = 0;
    if (c > 0) {
      c -= 1;
      word = static_cast<int64_t>(spill[c * stride]);
    }
    x = (x << 32) | word;
  }
}

// rint((1 - gamma) 2^F (g + lam w)) in the kernels' exact order: c1s = (1 - gamma) 2^F.
FASTREG_HD double increment(double g, int64_t w, double c1s, double lam, double inv_scale) {
  const double wf = mul(static_cast<double>(w), inv_scale);
  double t = mul(lam, wf);
  t = add(g, t);
  t = mul(c1s, t);
  return rint_even(t);
}

// One forward step of one element. Returns status bits (0: ok).
FASTREG_HD int fwd_element(int64_t& w, int64_t& v, int64_t& x, int64_t& c, uint32_t* spill,
                           int64_t stride, int64_t cap, double g, int k, const Coder& cd,
                           double alpha, double c1s, double lam, double inv_scale) {
  int bad = 0;
  const int64_t dmask = (int64_t(1) << k) - 1;
  int64_t vi = v;
  int64_t wi = w;
  // v <- gamma v exactly (bits back): pop a symbol s mod n from the head, then push the
  // low k bits of v. Popping first keeps the head in one 32-bit window, so the coder
  // spills a word only every ~32 / log2(1/gamma) steps and never refills here.
  const int64_t lo = vi & dmask;
  const int64_t vh = vi >> k;
  const int64_t slot = x & kMask31;
  int64_t s, f, cum;
  if (slot < cd.thr) {
    s = div_31(slot, cd.q + 1, cd.invq1);
    f = cd.q + 1;
    cum = s * (cd.q + 1);
  } else {
    s = div_31(slot - cd.thr, cd.q, cd.invq);
    cum = cd.thr + s * cd.q;
    s += cd.rr;
    f = cd.q;
  }
  x = f * (x >> 31) + slot - cum;  // in [f, f 2^32)
  emit(x, c, spill, stride, cap, int64_t(1) << (63 - k), bad);
  x = (x << k) | lo;  // back in [2^31, 2^63)
  vi = vh * cd.n + s;
  // v -= (1 - gamma)(g + lam w); w += alpha v, both rounded to the grid
  double dv = increment(g, wi, c1s, lam, inv_scale);
  if (!(fabs(dv) < kDLimit)) {
    bad |= kBadNonfinite;
    dv = 0.0;
  }
  vi = vi - static_cast<int64_t>(dv);
  if (!(iabs(vi) < kLimit)) {
    bad |= kBadVRange;
    vi = 0;
  }
  double dw = rint_even(mul(alpha, static_cast<double>(vi)));
  if (!(fabs(dw) < kDLimit)) {
    bad |= kBadWRange;
    dw = 0.0;
  }
  wi = wi + static_cast<int64_t>(dw);
  if (!(iabs(wi) < kLimit)) {
    bad |= kBadWRange;
    wi = 0;
  }
  v = vi;
  w = wi;
  return bad;
}

// First half of a reverse step: w_{t+1} -> w_t; returns dw . v (times 2^-F) for d alpha.
FASTREG_HD double restore_element(int64_t& w, int64_t v, double& dw, double& dv, double alpha,
                                  double omg, double inv_scale, double& u) {
  const double vf = static_cast<double>(v);
  const double dwi = dw;
  const double da = mul(dwi, mul(vf, inv_scale));
  const double inc = rint_even(mul(alpha, vf));
  w = w - static_cast<int64_t>(inc);
  const double dvt = add(dv, mul(alpha, dwi));
  dv = dvt;
  u = mul(omg, dvt);
  return da;
}

// Second half of a reverse step (after the HVP): v_{t+1} -> v_t exactly, then the
// hypergradient updates. dg / dl receive this element's d gamma and dv . w terms.
FASTREG_HD int rev_element(int64_t w, int64_t& v, int64_t& x, int64_t& c, uint32_t* spill,
                           int64_t stride, int64_t cap, double g, double hvp, double& dw,
                           double& dv, int k, const Coder& cd, double gamma, double c1s,
                           double lam, double omg, double inv_scale, double& dg, double& dl) {
  int bad = 0;
  const double wf = mul(static_cast<double>(w), inv_scale);
  double inc = increment(g, w, c1s, lam, inv_scale);
  if (!(fabs(inc) < kDLimit)) {
    bad |= kBadNonfinite;
    inc = 0.0;
  }
  int64_t vi = v + static_cast<int64_t>(inc);
  if (!(iabs(vi) < kLimit)) {
    bad |= kBadVRange;
    vi = 0;
  }
  // v <- v / gamma exactly: s = v mod n goes back into the head, the low k bits come out
  int64_t vh, s;
  floordiv_small(vi, cd.n, cd.invn, vh, s);
  int64_t f, cum;
  if (s < cd.rr) {
    f = cd.q + 1;
    cum = s * (cd.q + 1);
  } else {
    f = cd.q;
    cum = cd.thr + (s - cd.rr) * cd.q;
  }
  // the forward step's inverse: pop the low k bits, refill the word the forward step
  // spilled (it did exactly when what is left is below f), push s back
  const int64_t lo = x & ((int64_t(1) << k) - 1);
  x >>= k;
  refill(x, c, spill, stride, f);
  int64_t xq, xr;
  floordiv_small(x, f, f == cd.q ? cd.invq : cd.invq1, xq, xr);
  x = (xq << 31) + cum + xr;
  vi = vh * (int64_t(1) << k) + lo;
  v = vi;
  const double dvt = dv;
  dg = mul(dvt, add(mul(static_cast<double>(vi), inv_scale), add(g, mul(lam, wf))));
  dl = mul(dvt, wf);
  dw = sub(dw, add(hvp, mul(mul(omg, lam), dvt)));
  dv = mul(gamma, dvt);
  return bad;
}

}  // namespace rev
}  // namespace fastreg
