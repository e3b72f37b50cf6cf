// Launch helpers shared by the .cu files (no torch headers here: kernels take raw
// pointers and a stream handle from Python, which keeps nvcc builds fast).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fastreg {

// Grid-stride loops: cap the grid, never overflow the 32-bit grid dimension.
inline int64_t grid_size(int64_t n, int threads, int64_t cap = 65535LL * 8) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, cap));
}

}  // namespace fastreg
