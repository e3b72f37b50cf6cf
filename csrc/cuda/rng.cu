// CUDA build of the Philox header: the same words as every other backend.
#include <cstdint>

#include "fastreg/philox.h"
#include "cuda/launch.h"

namespace fastreg {

__global__ void philox_words_kernel(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream,
                                    uint64_t start) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[k] = philox_word(seed, stream, start + static_cast<uint64_t>(k));
}

int philox_words_cuda(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start,
                      uintptr_t stream_handle) {
  if (n == 0) return 0;
  const int threads = 256;
  const int64_t blocks = grid_size(n, threads);
  philox_words_kernel<<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      out, n, seed, stream, start);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace fastreg
