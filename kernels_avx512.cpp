// The AVX-512 instance of kernels_vec.h's GEMM tile (fastllama): the same source as kernels.cpp's AVX2 one, compiled
// here with AVX-512 enabled for this file alone. kernels.cpp calls it only where the CPU has AVX-512 F / BW / DQ / VL
// and the op's `width` asks for it (kernels.py measures which width is faster on the machine). This file includes
// nothing but the intrinsics and kernels_vec.h, whose code sits in an anonymous namespace: no inline function of a
// shared header is compiled here with AVX-512 where the linker could pick it for the AVX2 code.
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")
#define FASTLLAMA_AVX512 1
#include "kernels_vec.h"

namespace fastllama_avx512 {

void block(const float* x, int64_t K, int64_t rows, const float* p, float* y, int64_t N, int64_t cols, bool glu) {
  ::block(x, K, rows, p, y, N, cols, glu);
}

void block(const float* x, int64_t K, int64_t rows, const float* p, uint16_t* y, int64_t N, int64_t cols, bool glu) {
  ::block(x, K, rows, p, y, N, cols, glu);
}

int panel() { return kPanel; }

}  // namespace fastllama_avx512
