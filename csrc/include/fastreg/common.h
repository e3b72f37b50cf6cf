// Shared macros for header-only maths compiled by both g++ (host) and nvcc.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTREG_HD __host__ __device__ __forceinline__
#else
#define FASTREG_HD inline
#endif
