// The AVX-512 instances of kernels_vec.h's GEMM tile and kernels_q8.h's int8-activation kernels (fastllama): the same
// source as kernels.cpp's AVX2 ones, compiled here with AVX-512 enabled for this file alone. kernels.cpp calls them only
// where the CPU has AVX-512 F / BW / DQ / VL (and VNNI, for the int8-activation kernels) and the op's `width` asks for
// it (kernels.py measures which width is faster on the machine). This file includes nothing but the intrinsics and
// those headers, whose code sits in an anonymous namespace: no inline function of a shared header is compiled here with
// AVX-512 where the linker could pick it for the AVX2 code.
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")
#define FASTLLAMA_AVX512 1
#include "kernels_vec.h"
#include "kernels_q8.h"

namespace fastllama_avx512 {

void block(const float* x, int64_t K, int64_t rows, const float* p, float* y, int64_t N, int64_t cols, bool glu) {
  ::block(x, K, rows, p, y, N, cols, glu);
}

void block(const float* x, int64_t K, int64_t rows, const float* p, uint16_t* y, int64_t N, int64_t cols, bool glu) {
  ::block(x, K, rows, p, y, N, cols, glu);
}

int panel() { return kPanel; }

void int4_q8(int64_t tile, int64_t cols, int64_t M, const int8_t* x8, const float* xd, const float* xs, int64_t K,
             const uint8_t* w, const uint16_t* dm, int64_t G, float* y, int64_t N) {
  ::int4_q8_block(tile, cols, M, x8, xd, xs, K, w, dm, G, y, N);
}

void int8_q8(int64_t tile, int64_t M, const int8_t* x8, const uint8_t* u8, const float* xd, int64_t K, const int8_t* w1,
             const float* s1, const int8_t* w3, const float* s3, int64_t G, float* y, int64_t N) {
  ::int8_q8_block(tile, M, x8, u8, xd, K, w1, s1, w3, s3, G, y, N);
}

}  // namespace fastllama_avx512
