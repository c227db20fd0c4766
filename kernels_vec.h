// The float arithmetic of fastllama's kernels written once over the vector width (ggml's simd-mappings idea): `Vec`
// maps the few vector operations used here to AVX2's 8 lanes (kernels.cpp) or to AVX-512's 16 (kernels_avx512.cpp,
// which defines FASTLLAMA_AVX512 and enables AVX-512 for itself). Everything else is written against Vec once: e^x,
// silu, bf16 rounding, and the GEMM's register tile (gemm_block). Each lane computes what it computes at any width,
// in the same order: the two instances give the same bits, and the AVX2 one, which every x86-64 test machine runs,
// tests the source of both. Included by both files into an anonymous namespace of its own: nothing here is shared
// between them at link time (code compiled for AVX-512 must never stand in for its AVX2 twin).
#include <immintrin.h>

#include <cstdint>

namespace {

#ifdef FASTLLAMA_AVX512
struct Vec {  // AVX-512 F / BW / DQ / VL: 16 floats
  using T = __m512;
  static constexpr int N = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T load(const float* p) { return _mm512_load_ps(p); }  // 64-byte aligned
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T negative_abs(T a) { return _mm512_or_ps(a, _mm512_set1_ps(-0.f)); }  // -|a|
  static T round(T a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T pow2(T n) {  // 2^n for whole n in the normal range
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(e);
  }
  static T where_negative(T sel, T a, T b) {  // b where sel's sign bit is set, else a
    return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(sel)), a, b);
  }
  static T round_bf16_bits(T v, T& nan) {  // the integer rounding to bf16 (see round_bf16); nan: v's NaN lanes' value
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    nan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000))));
  }
  static T where_nan(T v, T a, T b) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), a, b); }
  static void store(float* y, T v, int n) {  // the first n lanes (8 or 16)
    if (n == 16) _mm512_storeu_ps(y, v);
    else _mm256_storeu_ps(y, _mm512_castps512_ps256(v));
  }
  static void store_high_halves(uint16_t* y, T v, int n) {  // each lane's high 16 bits (a bf16's), first n lanes
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
    if (n == 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), h);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_castsi256_si128(h));
  }
};
#else
struct Vec {  // AVX2 + FMA: 8 floats
  using T = __m256;
  static constexpr int N = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T load(const float* p) { return _mm256_load_ps(p); }  // 32-byte aligned
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T negative_abs(T a) { return _mm256_or_ps(a, _mm256_set1_ps(-0.f)); }
  static T round(T a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T pow2(T n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(e);
  }
  static T where_negative(T sel, T a, T b) { return _mm256_blendv_ps(a, b, sel); }  // blendv reads the sign bit
  static T round_bf16_bits(T v, T& nan) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(int(0xFFFF0000))));
  }
  static T where_nan(T v, T a, T b) { return _mm256_blendv_ps(a, b, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)); }
  static void store(float* y, T v, int) { _mm256_storeu_ps(y, v); }
  static void store_high_halves(uint16_t* y, T v, int) {
    const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y),
                     _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  }
};
#endif

using V = Vec::T;

// e^x for x <= 0 (Cephes' expf: 2^n times a degree-6 polynomial of the remainder; relative error ~1e-7)
inline V exp_neg(V x) {
  x = Vec::max(x, Vec::set1(-87.f));
  const V n = Vec::round(Vec::mul(x, Vec::set1(1.44269504088896341f)));
  V r = Vec::fnmadd(n, Vec::set1(0.693359375f), x);
  r = Vec::fnmadd(n, Vec::set1(-2.12194440e-4f), r);
  constexpr float c[] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  V p = Vec::set1(1.9875691500e-4f);
  #pragma GCC unroll 5
  for (int i = 0; i < 5; ++i) p = Vec::fmadd(p, r, Vec::set1(c[i]));
  const V y = Vec::fmadd(Vec::mul(p, r), r, Vec::add(r, Vec::set1(1.f)));
  return Vec::mul(y, Vec::pow2(n));
}

// silu(g) * u = g * sigmoid(g) * u, sigmoid from e = e^-|g| (exp_neg wants x <= 0): 1 / (1 + e) for g >= 0, e / (1 + e)
// below
inline V silu_mul(V g, V u) {
  const V e = exp_neg(Vec::negative_abs(g));
  const V num = Vec::where_negative(g, Vec::set1(1.f), e);
  return Vec::mul(Vec::mul(g, Vec::div(num, Vec::add(Vec::set1(1.f), e))), u);
}

// float32 values rounded to the nearest bf16 (ties to even), kept as float32: what a bf16 output would hold. NaN gives
// the quiet NaN 0x7FC0, as Tensor.to(bfloat16) does (the integer rounding could turn a NaN into inf).
inline V round_bf16(V v) {
  V nan;
  const V rounded = Vec::round_bf16_bits(v, nan);
  return Vec::where_nan(v, rounded, nan);
}

// The first n lanes of v to y: float32, or bf16 (uint16_t: the bits of round_bf16's floats' high halves).
inline void store(float* y, V v, int n) { Vec::store(y, v, n); }
inline void store(uint16_t* y, V v, int n) { Vec::store_high_halves(y, round_bf16(v), n); }

// silu(g) * u for the products g = x @ w1.T, u = x @ w3.T; for a bf16 output (Y uint16_t) both are rounded to bf16 first,
// as two bf16 linears would give them to silu and the multiply
template <typename Y>
inline V glu(V g, V u) {
  if constexpr (sizeof(Y) == 2) g = round_bf16(g), u = round_bf16(u);
  return silu_mul(g, u);
}

// ---- the GEMM's register tile ----------------------------------------------------------------------------------

constexpr int kPanel = 2 * Vec::N;  // a panel's columns: rows of the weight, unpacked to float32 (kernels.cpp's gemm)
constexpr int kTileRows = Vec::N == 16 ? 12 : 6;  // rows of x per tile at G = 1: 2 kTileRows accumulators

// R rows of y, `cols` (a multiple of 8, at most kPanel) columns: x's R rows times G panels of kPanel columns (G = 1:
// y = x @ w.T; G = 2: w1's and w3's panels, y = glu). Per input k: 2 G panel loads and R broadcasts of x for 2 R G
// multiply-adds into 2 R G accumulators. Each output is one chain of multiply-adds over k in order, at any R and
// any width: a row's result does not depend on the rows beside it, nor on the instance.
template <int R, int G, typename Y>
inline void tile(const float* x, int64_t K, const float* p, Y* y, int64_t N, int64_t cols) {
  V a[R][G][2];  // registers, if every loop over its indices is unrolled (GCC -O3 leaves some loops for later)
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int g = 0; g < G; ++g) a[r][g][0] = a[r][g][1] = Vec::zero();
  for (int64_t k = 0; k < K; ++k) {
    V b[G][2];
    #pragma GCC unroll 16
    for (int g = 0; g < G; ++g)
      b[g][0] = Vec::load(p + (g * K + k) * kPanel), b[g][1] = Vec::load(p + (g * K + k) * kPanel + Vec::N);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const V v = Vec::set1(x[r * K + k]);
      #pragma GCC unroll 16
      for (int g = 0; g < G; ++g)
        a[r][g][0] = Vec::fmadd(v, b[g][0], a[r][g][0]), a[r][g][1] = Vec::fmadd(v, b[g][1], a[r][g][1]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 2
    for (int c = 0; c < 2; ++c) {
      const int n = cols - c * Vec::N < Vec::N ? int(cols - c * Vec::N) : Vec::N;
      if (n > 0) store(y + r * N + c * Vec::N, G == 1 ? a[r][0][c] : glu<Y>(a[r][0][c], a[r][G - 1][c]), n);
    }
}

// `rows` rows of y against the panels: R at a time, then the rest by a smaller tile
template <int R, int G, typename Y>
void tiles(const float* x, int64_t K, int64_t rows, const float* p, Y* y, int64_t N, int64_t cols) {
  if constexpr (R > 0) {
    int64_t m = 0;
    for (; m + R <= rows; m += R) tile<R, G>(x + m * K, K, p, y + m * N, N, cols);
    if (m < rows) tiles<R - 1, G>(x + m * K, K, rows - m, p, y + m * N, N, cols);
  }
}

// One GEMM work item: rows x (rows, K) float32 against a panel (glu: w1's then w3's), into y's `cols` columns.
template <typename Y>
void block(const float* x, int64_t K, int64_t rows, const float* p, Y* y, int64_t N, int64_t cols, bool glu) {
  if (glu) tiles<kTileRows / 2, 2>(x, K, rows, p, y, N, cols);
  else tiles<kTileRows, 1>(x, K, rows, p, y, N, cols);
}

}  // namespace
