// Host build of the Philox header, so CI exercises the exact code the CUDA
// kernels compile. Fills words/uniforms for a contiguous index range.
#include <cstdint>

#include "fastreg/philox.h"

namespace fastreg {

void philox_words_host(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream,
                       uint64_t start) {
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < n; ++k) out[k] = philox_word(seed, stream, start + static_cast<uint64_t>(k));
}

void philox_uniforms_host(float* out, int64_t n, uint64_t seed, uint64_t stream,
                          uint64_t start) {
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < n; ++k)
    out[k] = uniform_from_word(philox_word(seed, stream, start + static_cast<uint64_t>(k)));
}

}  // namespace fastreg
