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

}  // namespace fastreg
