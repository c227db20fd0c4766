// fastllama's int8-activation kernels (llama.cpp's Q8 arithmetic), written once over the vector width as kernels_vec.h's
// GEMM tile is: each int32 or float lane is one output row, so a vector holds 8 rows of the weight (AVX2) or 16 (AVX-512:
// two of the layouts' groups of 8 side by side). Activations are rounded to int8 per block of 32 inputs by each row of
// x alone (quantize_x8 in kernels.cpp); a block's products are summed exactly in int32, then scaled in float32, lane by
// lane in the same order at either width. So the two instances give the same bits, and the AVX2 one, which every x86-64
// test machine runs, tests the source of both.
//
//   IVec::pairs(acc, u, s) then IVec::widen(acc): the sums of four products u8 x s8 per int32 lane over a block. AVX-512
//   VNNI's vpdpbusd adds each four into int32 in one instruction (widen does nothing); AVX2's vpmaddubsw adds them two
//   by two into int16 lanes (exact over a block of int4 weights), and widen's vpmaddwd by ones sums the pairs once.
// Included after kernels_vec.h, into the same kind of anonymous namespace.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

#ifdef FASTLLAMA_AVX512
struct IVec {  // AVX-512 F / BW / VNNI: 16 int32 lanes, two groups of 8 rows
  using T = __m512i;
  static T zero() { return _mm512_setzero_si512(); }
  static T set1(int32_t v) { return _mm512_set1_epi32(v); }
  static T low_nibbles(T v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
  static T high_nibbles(T v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
  static T pairs(T acc, T u, T s) { return _mm512_dpbusd_epi32(acc, u, s); }  // int32 sums already
  static T widen(T acc) { return acc; }
  static void keep(T& v) { asm("" : "+v"(v)); }  // as AVX2's below
  static T sub(T a, T b) { return _mm512_sub_epi32(a, b); }
  static V to_float(T v) { return _mm512_cvtepi32_ps(v); }
  // 32 bytes of each of the vector's two row groups: the group at p and the one `stride` bytes after it
  static T load_groups(const uint8_t* p, int64_t stride) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + stride)), 1);
  }
  // 8 float16 values of each of the two row groups (at p and `stride` halves after it), as float32
  static V load_halves(const uint16_t* p, int64_t stride) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + stride));
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1));
  }
  static V load_floats(const float* p, int64_t stride) {  // 8 floats of each of the two row groups
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(p)), _mm256_loadu_ps(p + stride), 1);
  }
  // The int8 layout's 8 rows x 2 inputs per 16 bytes, two such pairs per group, to 8 rows x 4 inputs per int32 lane
  static T pairs_to_quads(T v) {
    const __m512i order = _mm512_setr_epi64(0, 2, 1, 3, 4, 6, 5, 7);
    const __m512i split = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15));
    return _mm512_shuffle_epi8(_mm512_permutexvar_epi64(order, v), split);
  }
  // Signed products: vpdpbusd wants one operand unsigned, so x comes as u = x + 128 (a byte x ^ 0x80) and the 128 w it
  // adds is taken off once per block (offset_sum, shared by every row of x): exact for every int8 w and x
  static T dot_s8(T acc, T w, int32_t /* x */, int32_t u) { return _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(u), w); }
  static T offset_sum(T acc, T w) { return _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(char(0x80)), w); }
};
#else
struct IVec {  // AVX2: 8 int32 lanes, one group of 8 rows
  using T = __m256i;
  static T zero() { return _mm256_setzero_si256(); }
  static T set1(int32_t v) { return _mm256_set1_epi32(v); }
  static T low_nibbles(T v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
  static T high_nibbles(T v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
  // int16 sums of pairs: u's bytes at most 15 (int4 weights), s's at most 127 in magnitude (quantize_x8), so a
  // block's eight vpmaddubsw per lane sum to at most 8 x 2 x 15 x 127 = 30480 < 2^15, exactly
  static T pairs(T acc, T u, T s) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s)); }
  static T widen(T acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }  // the int16 pairs summed into int32
  // An empty asm that says it changes v: the sum so far must be in a register here, so GCC cannot regroup a tile's
  // integer sums (associative) into a tree that parks every product on the stack
  static void keep(T& v) { asm("" : "+v"(v)); }
  static T sub(T a, T b) { return _mm256_sub_epi32(a, b); }
  static V to_float(T v) { return _mm256_cvtepi32_ps(v); }
  static T load_groups(const uint8_t* p, int64_t) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V load_halves(const uint16_t* p, int64_t) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V load_floats(const float* p, int64_t) { return _mm256_loadu_ps(p); }
  static T pairs_to_quads(T v) {
    const __m256i split = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                           0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
    return _mm256_shuffle_epi8(_mm256_permute4x64_epi64(v, 0xD8), split);
  }
  // Signed products, llama.cpp's way: vpmaddubsw of |w| (unsigned; -128 reads as 128) by x carrying w's sign
  // (vpsignb), whose pairs reach at most 2 x 128 x 127 = 32512 < 2^15 (x is at most 127 in magnitude, quantize_x8),
  // then summed into int32 by vpmaddwd with ones: exact for every int8 w
  static T dot_s8(T acc, T w, int32_t x, int32_t /* u */) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(_mm256_set1_epi32(x), w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  static T offset_sum(T acc, T) { return acc; }  // no offset to take off
};
#endif

constexpr int kQ8Rows = Vec::N;  // output rows per vector: 8 or 16

// R rows of x against C vectors of kQ8Rows output rows each (row groups at w, w + 4 K, ...: the int4 layout,
// kernels.py's int4_to_kernel; vector c's first group at w + c kQ8Rows / 2 K): y[r][n] = sum over groups of m[n]
// xs[r][group] + sum over its blocks b of xd[b] d[n] (q[n] . x8[r] over b), llama.cpp's Q4_1 x Q8_1 dot. Per block
// and row group: 4 vectors of 32 bytes; in vector p, int32 lane n holds row n's inputs 4 p + j (low nibbles, x's
// quad p) and 4 p + 16 + j (high nibbles, quad p + 4). Each weight vector is unpacked once for R rows of x, each
// broadcast quad of x used for C weight vectors; a block's eight products per lane are summed exactly (IVec::pairs,
// IVec::widen), then scaled in float32. A row of x gets the same operations in the same order whatever R and C are.
// x8 / xd / xs / y: row r at x8 + r K (int8), xd + r K / 32, xs + r G, y + r N. dm: the int4 layout's, from the
// first group's (d, m).
template <int R, int C>
void int4_q8_tile(const int8_t* x8, const float* xd, const float* xs, int64_t K, const uint8_t* w, const uint16_t* dm,
                  int64_t G, float* y, int64_t N) {
  constexpr int64_t kGroups = kQ8Rows / 8;  // row groups of 8 per vector
  const int64_t bpg = K / 32 / G;
  V acc[R][C];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = Vec::zero();
  for (int64_t gi = 0, b = 0; gi < G; ++gi) {
    #pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const V m = IVec::load_halves(dm + c * kGroups * 16 * G + 8 * (G + gi), 16 * G);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][c] = Vec::fmadd(m, Vec::set1(xs[r * G + gi]), acc[r][c]);
    }
    for (const int64_t end = b + bpg; b < end; ++b) {
      typename IVec::T t[R][C];
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        #pragma GCC unroll 4
        for (int c = 0; c < C; ++c) t[r][c] = IVec::zero();
      #pragma GCC unroll 8
      for (int h = 0; h < 8; ++h) {  // quads 0-3: low nibbles of vectors 0-3; quads 4-7: their high nibbles
        typename IVec::T q[C];
        #pragma GCC unroll 4
        for (int c = 0; c < C; ++c) {
          const typename IVec::T v = IVec::load_groups(w + c * kGroups * 4 * K + 128 * b + 32 * (h % 4), 4 * K);
          q[c] = h < 4 ? IVec::low_nibbles(v) : IVec::high_nibbles(v);
        }
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const typename IVec::T xq = IVec::set1(reinterpret_cast<const int32_t*>(x8 + r * K + 32 * b)[h]);
          #pragma GCC unroll 4
          for (int c = 0; c < C; ++c) t[r][c] = IVec::pairs(t[r][c], q[c], xq), IVec::keep(t[r][c]);
        }
      }
      #pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const V d = IVec::load_halves(dm + c * kGroups * 16 * G + 8 * gi, 16 * G);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          acc[r][c] = Vec::fmadd(IVec::to_float(IVec::widen(t[r][c])), Vec::mul(d, Vec::set1(xd[r * K / 32 + b])),
                                 acc[r][c]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int c = 0; c < C; ++c) Vec::store(y + r * N + c * kQ8Rows, acc[r][c], Vec::N);
}

// The rows [0, M) of x in tiles of R (then one smaller tile) against C vectors of output rows starting at w
template <int R, int C>
void int4_q8_tiles(int64_t M, const int8_t* x8, const float* xd, const float* xs, int64_t K, const uint8_t* w,
                   const uint16_t* dm, int64_t G, float* y, int64_t N) {
  if constexpr (R > 0) {
    int64_t m = 0;
    for (; m + R <= M; m += R) int4_q8_tile<R, C>(x8 + m * K, xd + m * K / 32, xs + m * G, K, w, dm, G, y + m * N, N);
    if (m < M) int4_q8_tiles<R - 1, C>(M - m, x8 + m * K, xd + m * K / 32, xs + m * G, K, w, dm, G, y + m * N, N);
  }
}

// kQ8Rows output rows of an int8 layer (row groups at w, w + 8 K, ...: kernels.py's int8_to_kernel; scales s (N / 8,
// G, 8) from the first group's) for R rows of x: y[r][n] = sum over groups of s[n] (sum over its blocks b of xd[b]
// (w[n] . x8[r] over b)), the Q8_0 x Q8_0 dot. Per block and row group, 8 vectors of 32 bytes (16-byte pairs 2 p and
// 2 p + 1) rearranged once for R rows of x to 4 inputs per lane. x8: row r's int8 x, u8: the same bytes ^ 0x80.
template <int R>
void int8_q8_rows(const int8_t* x8, const uint8_t* u8, const float* xd, int64_t K, const int8_t* w, const float* s,
                  int64_t G, float* y, int64_t N) {
  const int64_t bpg = K / 32 / G;
  V acc[R];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = Vec::zero();
  for (int64_t gi = 0, b = 0; gi < G; ++gi) {
    V gacc[R];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) gacc[r] = Vec::zero();
    for (const int64_t end = b + bpg; b < end; ++b) {
      typename IVec::T t[R], offset = IVec::zero();
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) t[r] = IVec::zero();
      #pragma GCC unroll 8
      for (int p = 0; p < 8; ++p) {
        const typename IVec::T v = IVec::pairs_to_quads(
            IVec::load_groups(reinterpret_cast<const uint8_t*>(w) + 256 * b + 32 * p, 8 * K));
        offset = IVec::offset_sum(offset, v);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const int32_t* xq = reinterpret_cast<const int32_t*>(x8 + r * K + 32 * b);
          const int32_t* uq = reinterpret_cast<const int32_t*>(u8 + r * K + 32 * b);
          t[r] = IVec::dot_s8(t[r], v, xq[p], uq[p]);
        }
      }
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        gacc[r] = Vec::fmadd(IVec::to_float(IVec::sub(t[r], offset)), Vec::set1(xd[r * K / 32 + b]), gacc[r]);
    }
    const V sg = IVec::load_floats(s + 8 * gi, 8 * G);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = Vec::fmadd(sg, gacc[r], acc[r]);
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) Vec::store(y + r * N, acc[r], Vec::N);
}

// The op's work item: rows [0, M) of x, R = tile (1, 2 or 4) at a time, against `cols` (1 or 2) vectors of
// kQ8Rows output rows at w
template <int C>
void int4_q8_cols(int64_t tile, int64_t M, const int8_t* x8, const float* xd, const float* xs, int64_t K,
                  const uint8_t* w, const uint16_t* dm, int64_t G, float* y, int64_t N) {
  if (tile == 4) int4_q8_tiles<4, C>(M, x8, xd, xs, K, w, dm, G, y, N);
  else if (tile == 2) int4_q8_tiles<2, C>(M, x8, xd, xs, K, w, dm, G, y, N);
  else int4_q8_tiles<1, C>(M, x8, xd, xs, K, w, dm, G, y, N);
}

void int4_q8_block(int64_t tile, int64_t cols, int64_t M, const int8_t* x8, const float* xd, const float* xs,
                   int64_t K, const uint8_t* w, const uint16_t* dm, int64_t G, float* y, int64_t N) {
  if (cols == 2) int4_q8_cols<2>(tile, M, x8, xd, xs, K, w, dm, G, y, N);
  else int4_q8_cols<1>(tile, M, x8, xd, xs, K, w, dm, G, y, N);
}

// rows [0, M) of x, R = tile rows at a time, against kQ8Rows output rows of w1 (and of w3: y = silu(x w1) * (x w3))
void int8_q8_block(int64_t tile, int64_t M, const int8_t* x8, const uint8_t* u8, const float* xd, int64_t K,
                   const int8_t* w1, const float* s1, const int8_t* w3, const float* s3, int64_t G, float* y, int64_t N) {
  alignas(64) float g[8][kQ8Rows], u[8][kQ8Rows];
  for (int64_t m = 0; m < M;) {
    const int R = int(std::min<int64_t>(tile, M - m)) >= 8 ? 8 : int(std::min<int64_t>(tile, M - m)) >= 4 ? 4 : int(std::min<int64_t>(tile, M - m)) >= 2 ? 2 : 1;
    const auto rows = [&](const int8_t* w, const float* s, float* out, int64_t ld) {
      const int8_t* x = x8 + m * K;
      const uint8_t* xu = u8 + m * K;
      const float* d = xd + m * K / 32;
      R == 8 ? int8_q8_rows<8>(x, xu, d, K, w, s, G, out, ld) : R == 4 ? int8_q8_rows<4>(x, xu, d, K, w, s, G, out, ld)
             : R == 2 ? int8_q8_rows<2>(x, xu, d, K, w, s, G, out, ld) : int8_q8_rows<1>(x, xu, d, K, w, s, G, out, ld);
    };
    if (!w3) {
      rows(w1, s1, y + m * N, N);
    } else {
      rows(w1, s1, g[0], kQ8Rows), rows(w3, s3, u[0], kQ8Rows);
      for (int i = 0; i < R; ++i) Vec::store(y + (m + i) * N, silu_mul(Vec::load(g[i]), Vec::load(u[i])), Vec::N);
    }
    m += R;
  }
}

}  // namespace
