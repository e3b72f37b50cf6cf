// Philox4x32-10 (Salmon et al., Random123) and the fastreg random-number spec
// (docs/rng.md): one definition for the host build and the CUDA kernels.
#pragma once
#include "fastreg/common.h"

namespace fastreg {

struct Philox4x32 {
  uint32_t v[4];
};

FASTREG_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                    uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;  // unsigned: wraps by definition
    k1 += 0xBB67AE85u;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The four words of counter c = i >> 2 for a call with (seed, stream).
FASTREG_HD Philox4x32 philox_block(uint64_t seed, uint64_t stream, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// word(i) of the spec.
FASTREG_HD uint32_t philox_word(uint64_t seed, uint64_t stream, uint64_t index) {
  return philox_block(seed, stream, index >> 2).v[index & 3];
}

// u(i) = ((word >> 9) + 0.5) * 2^-23: exact in float32, in (0, 1).
FASTREG_HD float uniform_from_word(uint32_t word) {
  return (static_cast<float>(word >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// Dropout keep decision: integer compare against t = min(round(p * 2^32), 2^32 - 1);
// t = 2^32 (p = 1) keeps nothing, which is why t is 64-bit.
FASTREG_HD bool keep_from_word(uint32_t word, uint64_t threshold) {
  return static_cast<uint64_t>(word) >= threshold;
}

}  // namespace fastreg
