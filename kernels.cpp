// Matrix products for x86 CPUs with AVX2 + FMA (fastllama): weight-only int8 / int4, float32 / bf16.
//
// Decoding reads every weight once per token, so a quantized linear layer is a GEMV whose speed is
// set by how fast weights stream in and turn into sums. Both kernels round the activations per block of
// 32 (quantize_x) so that products are integer multiply-adds, and scale each block's integer dot once.
// A decode step of M <= 16 rows (GEMV_MAX_ROWS) unpacks each weight vector once for a tile of rows of x, and
// every row's result is bit for bit what it would be alone (a request's output never depends on its batch).
// More rows (prefill) go to one float32 GEMM (gemm) on panels unpacked from each weight format; its register tile is
// written once over the vector width (kernels_vec.h) and runs at AVX2's 8 floats or AVX-512's 16 (kernels_avx512.cpp),
// as the ops' `width` says, with the same bits.
//
//   int8_linear(x (M, K) float/bf16, w (N, K) int8, scales (N / 8, G, 8) float32) -> (M, N) in x's dtype
//       y = x16 @ (w * scales[:, k // (K / G)]).T     x16: x rounded to int16 per block (error ~1e-5 relative)
//       G = 1: per channel; G = K / 32: Q8_0-like. Rows in groups of 8, computed together in the 8 lanes of a vector.
//       M > 16: y = x @ (w * scales).T in float32 (the GEMM on pack_int8's panels)
//   int8_glu(x, w1, s1, w3, s3) -> silu(int8_linear(x, w1, s1)) * int8_linear(x, w3, s3), in one call
//   int4_linear(x (M, K), w (N, K / 2) uint8, dm (N / 8, 2, G, 8) float16) -> (M, N)
//       y = x16 @ (q * d + m).T with (d, m) per group (llama.cpp's Q4_1 arithmetic), dm (N / 8, 2, G, 8):
//       rows in groups of 8, each group's outputs computed together in the 8 lanes of one vector.
//       M > 16: y = x @ (q * d + m).T in float32 (pack_int4's panels)
//   dense_linear(x (M, K), w (N, K) float32 or bf16, as stored) -> (M, N) in x's dtype: x @ w.T in float32 sums;
//       x float32, or bf16 with a bf16 w. M <= 16: GEMVs (dense_rows); more rows: the GEMM on pack's panels
//   dense_glu(x, w1, w3) -> silu(x @ w1.T) * (x @ w3.T), in one call
//
// torch.ops.fastllama.*: kernels.py defines their schemas, builds this file (with kernels_avx512.cpp) and holds the
// PyTorch reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels_vec.h"  // exp_neg, silu_mul, round_bf16, store, glu and the GEMM tile, written over the vector width
#include "kernels_q8.h"  // the int8-activation kernels, written over the vector width

namespace fastllama_avx512 {  // kernels_avx512.cpp: kernels_vec.h's GEMM tile compiled for AVX-512
void block(const float* x, int64_t K, int64_t rows, const float* p, float* y, int64_t N, int64_t cols, bool glu);
void block(const float* x, int64_t K, int64_t rows, const float* p, uint16_t* y, int64_t N, int64_t cols, bool glu);
int panel();
void int4_q8(int64_t tile, int64_t cols, int64_t M, const int8_t* x8, const float* xd, const float* xs, int64_t K,
             const uint8_t* w, const uint16_t* dm, int64_t G, float* y, int64_t N);
void int8_q8(int64_t tile, int64_t M, const int8_t* x8, const uint8_t* u8, const float* xd, int64_t K, const int8_t* w1,
             const float* s1, const int8_t* w3, const float* s3, int64_t G, float* y, int64_t N);
}  // namespace fastllama_avx512

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Activations rounded to int16 per block of 32: x[k] ~= q[k] * d[k / 32], d = max |x| / qmax over the block.
// The rounding error (at most 1/(2 qmax) of the block's largest value) is far below bf16's, so results match
// x @ w.T in float to ~1e-5; in exchange every product is an integer multiply-add.
// Split::no stores q as int16 (for vpmaddwd, int8 kernel; qmax = 32767). Split::bytes stores each block as
// 32 high bytes h then 32 low bytes l, q = 256 h + l, both signed (for vpmaddubsw, int4 kernel; qmax = 127 * 256
// keeps h within int8). sums, when given (int4's m terms), gets the sum of the rounded x over each group of
// bpg blocks (zeroed by the caller).
enum class Split { no, bytes };

// A block of 32 inputs into v[0..3]; returns its largest magnitude
inline float load_block(const float* x, __m256 v[4]) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

template <Split S>
void quantize_x(const float* x, int64_t K, void* out, float* d, float* sums, int64_t bpg) {
  constexpr float qmax = S == Split::no ? 32767.f : 127.f * 256.f;
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256 v[4];
    const float mx = load_block(x + 32 * b, v);
    d[b] = mx / qmax;
    const __m256 inv = _mm256_set1_ps(mx > 0.f ? qmax / mx : 0.f);
    __m256i r[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // round half to even
    if (sums) {
      const __m256i t = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
      sums[b / bpg] += d[b] * hsum(_mm256_cvtepi32_ps(t));
    }
    // packs interleaves 128-bit halves; the permutes restore the order
    if constexpr (S == Split::no) {
      int16_t* q = static_cast<int16_t*>(out) + 32 * b;
      for (int i = 0; i < 4; i += 2)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 8 * i),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(r[i], r[i + 1]), 0xD8));
    } else {
      __m256i h[4], l[4];
      for (int i = 0; i < 4; ++i) {  // l = ((q + 128) & 255) - 128 in [-128, 127], h = (q - l) / 256 in [-127, 127]
        l[i] = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(r[i], _mm256_set1_epi32(128)), _mm256_set1_epi32(255)),
                                _mm256_set1_epi32(128));
        h[i] = _mm256_srai_epi32(_mm256_sub_epi32(r[i], l[i]), 8);
      }
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      int8_t* q = static_cast<int8_t*>(out) + 64 * b;
      for (auto [src, dst] : {std::pair{h, q}, std::pair{l, q + 32}}) {
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(src[0], src[1]), _mm256_packs_epi32(src[2], src[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(p, order));
      }
    }
  }
}

// Activations rounded to int8 per block of 32 (llama.cpp's Q8_0 / Q8_1): x[k] ~= q[k] * d[k / 32], d = max |x| / 127
// over the block, q = x / d rounded half to even. sums (when given, zeroed by the caller): per group of bpg blocks, the
// sum of d q over the group (the int4 kernels' m terms), block by block.
void quantize_x8(const float* x, int64_t K, int8_t* q, float* d, float* sums, int64_t bpg) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256 v[4];
    const float mx = load_block(x + 32 * b, v);
    d[b] = mx / 127.f;
    const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
    __m256i r[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // round half to even
    if (sums) {
      const __m256i t = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
      sums[b / bpg] += d[b] * hsum(_mm256_cvtepi32_ps(t));
    }
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), _mm256_permutevar8x32_epi32(p, order));
  }
}

// f(begin, end) over [0, n) on torch's threads, chunk items at a time. Each thread owns a contiguous share and
// takes chunks from its front; when it runs out it takes chunks from the back of the other shares. So each
// share is still read front to back as one stream, and a thread that starts late (woken after the others) or
// loses its core for a while is helped instead of waited for, as a static split (at::parallel_for) must.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  const int T = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n / chunk, 1)));
  if (T <= 1 || omp_in_parallel()) return f(0, n);
  struct alignas(64) Share { std::atomic<uint64_t> v; };  // (end << 32) | begin of what is left
  std::vector<Share> shares(T);
  for (int t = 0; t < T; ++t) shares[t].v = (uint64_t((t + 1) * n / T) << 32) | uint64_t(t * n / T);
  auto take = [chunk](Share& s, bool front, int64_t& b, int64_t& e) {
    uint64_t cur = s.v.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t lo = cur & 0xFFFFFFFF, hi = cur >> 32;
      if (lo >= hi) return false;
      b = front ? lo : std::max(lo, hi - chunk), e = front ? std::min(hi, lo + chunk) : hi;
      const uint64_t next = front ? (uint64_t(hi) << 32) | uint64_t(e) : (uint64_t(b) << 32) | uint64_t(lo);
      if (s.v.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return true;
    }
  };
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num();
    int64_t b, e;
    while (take(shares[t], true, b, e)) f(b, e);
    for (int o = 1; o < T; ++o)
      while (take(shares[(t + o) % T], false, b, e)) f(b, e);
  }
}

// x as float32 (M, K) rows, without a dispatcher call when it already is one
inline at::Tensor as_float(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
}

inline at::Tensor in_dtype(const at::Tensor& y, at::ScalarType t) { return y.scalar_type() == t ? y : y.to(t); }

inline __m256i load16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Eight output rows at once, one per int32 lane, for R rows of x: y[m][r] = sum_k x[m][k] * w[r, k] * s[r, k / g].
// Layout per group of 8 rows: for each pair i of inputs, 16 bytes hold w[r, 2 i] and w[r, 2 i + 1] of rows r = 0..7;
// vpmovsxbw widens them to int16 once, and one vpmaddwd per row of x with its broadcast pair (x[2 i], x[2 i + 1])
// adds each weight row's two products in its own lane. Sums stay exact in int32 over a block of 32 (16 pairs of at
// most 2 * 128 * 32767). s: the 8 rows' scales for each of the G groups. One sequential stream per row group, no
// per-row horizontal sums. Each row of x gets the same operations in the same order whatever R is (the integer sums
// are exact; the float ones follow the blocks), so a row's result does not depend on the rows beside it.
// xq / xd / y: row m at xq + m K, xd + m K / 32, y + m N.
template <int R>
void int8_rows8(const int16_t* xq, const float* xd, int64_t K, const int8_t* w, const float* s, int64_t G, float* y,
                int64_t N) {
  const int64_t bpg = K / G / 32;
  __m256 acc[R];
  #pragma GCC unroll 16
  for (int m = 0; m < R; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t gi = 0, b = 0; gi < G; ++gi) {
    __m256 gacc[R];
    #pragma GCC unroll 16
    for (int m = 0; m < R; ++m) gacc[m] = _mm256_setzero_ps();
    for (const int64_t end = b + bpg; b < end; ++b) {
      __m256i t[R];
      #pragma GCC unroll 16
      for (int m = 0; m < R; ++m) t[m] = _mm256_setzero_si256();
      #pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const __m256i wi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 256 * b + 16 * i)));
        #pragma GCC unroll 16
        for (int m = 0; m < R; ++m) {
          const int32_t* xp = reinterpret_cast<const int32_t*>(xq + m * K);
          t[m] = _mm256_add_epi32(t[m], _mm256_madd_epi16(wi, _mm256_set1_epi32(xp[16 * b + i])));
          IVec::keep(t[m]);
        }
      }
      #pragma GCC unroll 16
      for (int m = 0; m < R; ++m)
        gacc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[m]), _mm256_set1_ps(xd[m * K / 32 + b]), gacc[m]);
    }
    const __m256 sg = _mm256_loadu_ps(s + 8 * gi);
    #pragma GCC unroll 16
    for (int m = 0; m < R; ++m) acc[m] = _mm256_fmadd_ps(sg, gacc[m], acc[m]);
  }
  #pragma GCC unroll 16
  for (int m = 0; m < R; ++m) _mm256_storeu_ps(y + m * N, acc[m]);
}

// Eight output rows at once, one per float lane, for R rows of x: y[m][r] = sum_k x[m][k] * (q[r, k] * d + m), (d, m)
// per group. Layout per group of 8 rows and block b of 32 inputs: 128 bytes; byte 32 p + 4 r + j holds q[r, 32 b + 4 p
// + j] (low nibble) and q[r, 32 b + 4 (p + 4) + j] (high nibble): one vpmaddubsw multiplies 4 inputs of 8 rows.
// The nibbles are unpacked once for all R rows of x. xq: per block, x's high bytes then its low bytes
// (quantize_x<Split::bytes>), each multiplied separately. dm: d of the 8 rows for each of the G groups, then their m
// (float16). xs[gi] = sum of the rounded x over group gi. No per-row work is left: no horizontal sums, one FMA per
// block for all eight rows. As int8_rows8, a row's operations do not depend on R.
// xq / xd / xs / y: row m at xq + 2 m K, xd + m K / 32, xs + m G, y + m N.
template <int R>
void int4_rows8(const int8_t* xq, const float* xd, const float* xs, int64_t K, const uint8_t* w,
                const uint16_t* dm, int64_t G, float* y, int64_t N) {
  const int64_t bpg = K / 32 / G;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), c256 = _mm256_set1_epi16(256);
  __m256 acc[R], acc_m[R];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = acc_m[r] = _mm256_setzero_ps();
  for (int64_t gi = 0, b = 0; gi < G; ++gi) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + 8 * gi)));
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + 8 * (G + gi))));
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc_m[r] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(xs + r * G + gi), acc_m[r]);
    for (const int64_t end = b + bpg; b < end; ++b) {
      const __m256i* wb = reinterpret_cast<const __m256i*>(w + 128 * b);
      // vpmaddubsw: unsigned q times signed bytes, pairs summed to int16; eight sums stay below 8 * 2 * 15 * 128 < 2^15
      __m256i sh[R], sl[R];
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) sh[r] = sl[r] = _mm256_setzero_si256();
      #pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m256i v = _mm256_loadu_si256(wb + p);
        const __m256i qa = _mm256_and_si256(v, low), qb = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const int32_t* xh = reinterpret_cast<const int32_t*>(xq + 2 * r * K + 64 * b);
          const int32_t* xl = xh + 8;
          sh[r] = _mm256_add_epi16(sh[r], _mm256_maddubs_epi16(qa, _mm256_set1_epi32(xh[p])));
          sh[r] = _mm256_add_epi16(sh[r], _mm256_maddubs_epi16(qb, _mm256_set1_epi32(xh[p + 4])));
          sl[r] = _mm256_add_epi16(sl[r], _mm256_maddubs_epi16(qa, _mm256_set1_epi32(xl[p])));
          sl[r] = _mm256_add_epi16(sl[r], _mm256_maddubs_epi16(qb, _mm256_set1_epi32(xl[p + 4])));
          IVec::keep(sh[r]), IVec::keep(sl[r]);
        }
      }
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256i t = _mm256_add_epi32(_mm256_madd_epi16(sh[r], c256), _mm256_madd_epi16(sl[r], ones));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(d, _mm256_broadcast_ss(xd + r * K / 32 + b)), acc[r]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * N, _mm256_add_ps(acc[r], acc_m[r]));
}

// f(std::integral_constant<int, R>, m) over rows [0, M) of x in tiles of R rows: R at a time, the rest in one
// smaller tile. Which tile a row lands in changes nothing in its result (the row kernels' promise).
template <int R, typename F>
inline void row_tiles(int64_t M, const F& f, int64_t first = 0) {
  int64_t m = 0;
  for (; m + R <= M; m += R) f(std::integral_constant<int, R>{}, first + m);
  if constexpr (R > 1)
    if (m < M) row_tiles<R - 1>(M - m, f, first + m);
}

// Rows of x per pass over a weight group: 1, 2 or 4, the op's `tile` argument (kernels.row_tile measures which is
// fastest on the machine; every choice gives the same bits). 0, the schema's default, is 1: a default that
// kernels.run never passes, so that every compiled graph names its tile (kernels.OPS says why).
constexpr int kMaxTile = 4;

inline int64_t check_tile(int64_t tile) {
  TORCH_CHECK(tile == 0 || tile == 1 || tile == 2 || tile == 4, "tile must be 1, 2 or 4");
  return tile == 0 ? 1 : tile;
}

// (tile as check_tile gave it: the ops check it on entry, never inside a parallel region, which cannot throw)
template <typename F>
inline void row_tiles(int64_t tile, int64_t M, const F& f) {
  tile == 4 ? row_tiles<4>(M, f) : tile == 2 ? row_tiles<2>(M, f) : row_tiles<1>(M, f);
}

void check(const at::Tensor& x, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be (M, ", K, ")");
  TORCH_CHECK(K % 64 == 0, "in_features must be a multiple of 64");
  TORCH_CHECK(w.is_contiguous(), "weight must be contiguous");
}

// Rounded x, per-block scales and per-group sums (when G > 0) for every row of x, in buffers that live as
// long as the calling thread: a decode step makes ~150 calls, and three allocations each cost ~1 us.
struct QuantizedInput {
  std::vector<int8_t> q;  // (M, K) int16 (Split::no) or (M, 2 K) bytes (Split::bytes)
  std::vector<float> d, s;  // (M, K / 32) block scales, (M, G) group sums
};

template <Split S>
const QuantizedInput& quantize_input(const at::Tensor& xf, int64_t G) {
  thread_local QuantizedInput buf;
  const int64_t M = xf.size(0), K = xf.size(1);
  buf.q.resize(2 * M * K);
  buf.d.resize(M * K / 32);
  buf.s.assign(M * std::max<int64_t>(G, 1), 0.f);
  for (int64_t m = 0; m < M; ++m)
    quantize_x<S>(xf.data_ptr<float>() + m * K, K, buf.q.data() + 2 * m * K, buf.d.data() + m * K / 32,
                  G > 0 ? buf.s.data() + m * G : nullptr, G > 0 ? K / G / 32 : 1);
  return buf;
}

void check_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  const int64_t N = w.size(0), K = w.size(1), G = scales.size(1);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && scales.is_contiguous() && N % 8 == 0 &&
              scales.dim() == 3 && scales.size(0) == N / 8 && scales.size(2) == 8 && K % G == 0 && (K / G) % 32 == 0,
              "int8_linear: bad weight or scales");
}

// ---- float32 and bf16 weights, as stored ------------------------------------------------------------------

// A weight type's 16 inputs of one row as two vectors of float32. x comes as float32 in the order prepare() gives.
struct Float32Weights {
  using T = float;
  static void prepare(const float* x, int64_t K, float* out) { std::copy(x, x + K, out); }
  static __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
  static void load16(const float* w, __m256& lo, __m256& hi) { lo = _mm256_loadu_ps(w), hi = _mm256_loadu_ps(w + 8); }
};
// A bf16 value is the high half of a float32: in each 32-bit lane of 16 loaded weights, a shift left by 16 gives the
// even input's weight and a mask the odd one's, with no shuffles; so x is reordered per 16: 8 even inputs, 8 odd ones.
struct BFloat16Weights {
  using T = uint16_t;
  template <typename X>
  static void prepare(const X* x, int64_t K, float* out) {
    for (int64_t j = 0; j < K; j += 16)
      for (int i = 0; i < 8; ++i) out[j + i] = float(x[j + 2 * i]), out[j + 8 + i] = float(x[j + 2 * i + 1]);
  }
  static __m256 load8(const uint16_t* w) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
  static void load16(const uint16_t* w, __m256& lo, __m256& hi) {  // the 8 even inputs' weights, the 8 odd ones'
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000))));
  }
};

// The dot products of S weight rows with R rows of x (row r at x + r K), read side by side: out[r S + s]. The weight
// rows come from S places far apart in the matrix: S long sequential streams per thread, which the hardware
// prefetcher follows at once; one row at a time (one stream per thread, as inductor's GEMM template reads) leaves
// memory bandwidth unused (docs/kernels.md). With R > 1 each weight vector is loaded and widened once for R rows of x.
// Each (weight row, x row) pair gets the same two accumulators and the same order of operations whatever S and R are.
template <typename W, int S, int R>
inline void dots(const float* x, int64_t K, const typename W::T* const* w, float* out) {
  __m256 a[R][S][2];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int s = 0; s < S; ++s) a[r][s][0] = a[r][s][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < K; j += 16)
    #pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      __m256 lo, hi;
      W::load16(w[s] + j, lo, hi);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        a[r][s][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + r * K + j), a[r][s][0]);
        a[r][s][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + r * K + j + 8), a[r][s][1]);
      }
    }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int s = 0; s < S; ++s) out[r * S + s] = hsum(_mm256_add_ps(a[r][s][0], a[r][s][1]));
}

// y's 8 floats from v, as float32 or bf16 (kernels_vec.h's store); silu(g) * u as a y of type T would get it (glu)
inline void store8(float* y, __m256 v) { store(y, v, 8); }
inline void store8(at::BFloat16* y, __m256 v) { store(reinterpret_cast<uint16_t*>(y), v, 8); }

template <typename T>
inline __m256 glu8(__m256 g, __m256 u) {
  return glu<std::conditional_t<std::is_same_v<T, at::BFloat16>, uint16_t, float>>(g, u);
}

void check_dense(const at::Tensor& x, const at::Tensor& w, const char* op) {
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || w.scalar_type() == at::kFloat) && w.dim() == 2 && w.is_contiguous() && w.size(0) % 8 == 0 &&
              w.size(1) % 32 == 0, op, ": weight must be contiguous float32 or bfloat16 (N, K), N % 8 == 0, K % 32 == 0");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1) &&
              (x.scalar_type() == at::kFloat || (bf16 && x.scalar_type() == at::kBFloat16)),
              op, ": x must be (M, K) float32, or bfloat16 with a bfloat16 weight");
}

// Decode rows (M <= 16): y (M, N) = x @ w.T for one or both of (w1, w3); with w3, y = glu8(x @ w1.T, x @ w3.T).
// T: x's and y's dtype. Work items: groups of 8 rows g, g + q, g + 2 q, g + 3 q (q = groups / 4), read side by side
// (dots); then the groups left over, one at a time. tile 1: each row of x alone (four streams side by side); tile 2
// or more: rows of x two at a time (each weight loaded once for both, two streams side by side), a last odd row alone.
template <typename W, typename T>
void dense_rows(const at::Tensor& x, const at::Tensor& w1, const at::Tensor* w3, int64_t tile, T* yp) {
  constexpr int S = 4;
  const int64_t M = x.size(0), N = w1.size(0), K = w1.size(1), q = N / 8 / S, items = q + N / 8 % S;
  thread_local std::vector<float> xs;  // lives as long as the thread (see QuantizedInput)
  xs.resize(M * K);
  for (int64_t m = 0; m < M; ++m) W::prepare(x.data_ptr<T>() + m * K, K, xs.data() + m * K);
  const float* xp = xs.data();  // xs itself is another vector on the other threads
  using WT = typename W::T;
  const WT* wp1 = reinterpret_cast<const WT*>(w1.data_ptr());
  const WT* wp3 = w3 ? reinterpret_cast<const WT*>(w3->data_ptr()) : nullptr;
  parallel_chunks(items, 2, [&](int64_t begin, int64_t end) {
    alignas(32) float g[2][S][8], u[2][S][8];  // [row of x][group][row in group]
    int64_t row[S];  // first rows of the item's groups
    // out[r][s][i] = x row r of the tile . weight row row[s] + i, for the tile's R (1 or 2) rows of x from xm
    const auto products = [&](const WT* wp, const float* xm, int R, int n, float (*out)[S][8]) {
      const WT* rows[S];
      float t[2 * S];
      for (int i = 0; i < 8; ++i) {
        for (int s = 0; s < n; ++s) rows[s] = wp + (row[s] + i) * K;
        if (R == 1) {
          n == S ? dots<W, S, 1>(xm, K, rows, t) : dots<W, 1, 1>(xm, K, rows, t);
          for (int s = 0; s < n; ++s) out[0][s][i] = t[s];
        } else {
          for (int s = 0; s < n; s += 2) {
            const int ns = std::min(2, n - s);
            ns == 2 ? dots<W, 2, 2>(xm, K, rows + s, t) : dots<W, 1, 2>(xm, K, rows + s, t);
            for (int r = 0; r < 2; ++r)
              for (int j = 0; j < ns; ++j) out[r][s + j][i] = t[r * ns + j];
          }
        }
      }
    };
    for (int64_t it = begin; it < end; ++it) {
      const int n = it < q ? S : 1;
      for (int s = 0; s < n; ++s) row[s] = 8 * (it < q ? it + s * q : S * q + it - q);
      for (int64_t m = 0; m < M;) {
        const int R = tile >= 2 && M - m >= 2 ? 2 : 1;
        products(wp1, xp + m * K, R, n, g);
        if (wp3) products(wp3, xp + m * K, R, n, u);
        for (int r = 0; r < R; ++r)
          for (int s = 0; s < n; ++s) {
            const __m256 gv = _mm256_load_ps(g[r][s]);
            store8(yp + (m + r) * N + row[s], wp3 ? glu8<T>(gv, _mm256_load_ps(u[r][s])) : gv);
          }
        m += R;
      }
    }
  });
}

// ---- the same for many rows (prefill): a GEMM on packed weight panels ----

inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20), r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20), r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31), r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31), r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// A panel: `rows` (<= W) rows of w as float32, transposed to p[k][W] (rows past `rows` zero), so that the tile
// (kernels_vec.h) loads each input's W weights with aligned loads. Made per 8 x 8 block: 8 loads of 8 inputs, one
// transpose. W: the tile's panel width, 16 (AVX2) or 32 (AVX-512).
template <typename W>
void pack(const typename W::T* w, int64_t K, int64_t rows, int64_t width, float* p) {
  for (int64_t k = 0; k < K; k += 8)
    for (int h = 0; h < width / 8; ++h) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = h * 8 + i < rows ? W::load8(w + (h * 8 + i) * K + k) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(p + (k + i) * width + h * 8, r[i]);
    }
}

// The GEMM's work item at a vector width: kernels_vec.h's block, from this file (AVX2, panels of 16) or from
// kernels_avx512.cpp (panels of 32)
struct Width {
  int64_t panel;  // columns of a panel
  void (*f32)(const float*, int64_t, int64_t, const float*, float*, int64_t, int64_t, bool);
  void (*bf16)(const float*, int64_t, int64_t, const float*, uint16_t*, int64_t, int64_t, bool);
};

Width width_of(int64_t width) {
  if (width == 16)
    return {fastllama_avx512::panel(), &fastllama_avx512::block, &fastllama_avx512::block};
  return {kPanel, &block<float>, &block<uint16_t>};
}

// The op's `width` argument: the vector width in floats (the GEMM's) or output rows (the int8-activation ops'), 8
// (AVX2) or 16 (kernels_avx512.cpp: AVX-512 F, BW, DQ and VL, and VNNI for the int8-activation ops, where the CPU has
// them); 0, the schema's default, is 8 (a default kernels.run never passes, as the tile's: kernels.OPS says why)
inline int64_t check_width(int64_t width, bool vnni = false) {
  TORCH_CHECK(width == 0 || width == 8 || width == 16, "width must be 8 or 16");
  TORCH_CHECK(width != 16 || (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                              (!vnni || __builtin_cpu_supports("avx512vnni"))),
              vnni ? "width 16 needs a CPU with AVX-512 F, BW, DQ, VL and VNNI"
                   : "width 16 needs a CPU with AVX-512 F, BW, DQ and VL");
  return width == 0 ? 8 : width;
}

// y (M, N) = x @ w1.T, or glu(x @ w1.T, x @ w3.T) when glu, for float32 x (M, K); T: y's type, float or bf16.
// pack(w, j, cols, p) writes the panel of rows j..j + cols of weight w (0: w1, 1: w3) to p, as pack() does with the
// width's panel columns: any weight format whose rows can be unpacked to float32 uses this one GEMM. Work items: a
// block of at most 384 rows of x (384 x K floats stay in L3) times one panel of each weight (K x 16 or 32 floats, in
// L2). Packing widens each weight once per block, against 2 x (block rows) FLOPs per weight (measured against MKL:
// docs/kernels.md). Every output is one chain of multiply-adds over k at either width: the same bits.
template <typename T, typename P>
void gemm(const float* x, int64_t M, int64_t N, int64_t K, bool glu, const P& pack_panel, T* y, int64_t width) {
  const Width wd = width_of(width);
  const int64_t panels = (N + wd.panel - 1) / wd.panel, blocks = (M + 383) / 384;
  const int64_t mc = (M + blocks - 1) / blocks;
  parallel_chunks(blocks * panels, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buf;  // the panels; lives as long as the thread
    buf.resize((glu ? 2 : 1) * K * wd.panel + 16);
    float* p = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    for (int64_t it = begin; it < end; ++it) {
      const int64_t m0 = it / panels * mc, rows = std::min(mc, M - m0), j = it % panels * wd.panel;
      const int64_t cols = std::min<int64_t>(wd.panel, N - j);
      pack_panel(0, j, cols, wd.panel, p);
      if (glu) pack_panel(1, j, cols, wd.panel, p + K * wd.panel);
      if constexpr (std::is_same_v<T, float>)
        wd.f32(x + m0 * K, K, rows, p, y + m0 * N + j, N, cols, glu);
      else
        wd.bf16(x + m0 * K, K, rows, p, reinterpret_cast<uint16_t*>(y + m0 * N + j), N, cols, glu);
    }
  });
}

template <typename W, typename T>
void dense_gemm(const float* x, int64_t M, const at::Tensor& w1, const at::Tensor* w3, T* y, int64_t width) {
  using WT = typename W::T;
  const int64_t K = w1.size(1);
  const WT* wp[2] = {reinterpret_cast<const WT*>(w1.data_ptr()), w3 ? reinterpret_cast<const WT*>(w3->data_ptr()) : nullptr};
  gemm(x, M, w1.size(0), K, w3 != nullptr, [&](int w, int64_t j, int64_t cols, int64_t panel, float* p) {
    pack<W>(wp[w] + j * K, K, cols, panel, p);
  }, y, width);
}

// Panels from the int8 layout (int8_rows8): rows j..j + cols (groups of 8 rows) as float(w) * s, what dequantize_int8
// gives. Per pair i of inputs, a group's 16 bytes (8 rows x 2 inputs) are shuffled to the 8 rows' even input, then their
// odd one, each widened to float32 and scaled.
void pack_int8(const int8_t* w, const float* s, int64_t K, int64_t G, int64_t cols, int64_t width, float* p) {
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const int64_t per = K / G;
  for (int h = 0; h < width / 8; ++h)
    for (int64_t i = 0; i < K / 2; ++i) {
      float* dst = p + 2 * i * width + h * 8;
      if (h * 8 >= cols) {
        _mm256_store_ps(dst, _mm256_setzero_ps()), _mm256_store_ps(dst + width, _mm256_setzero_ps());
        continue;
      }
      const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + h * 8 * K + 16 * i)), split);
      const __m256 sc = _mm256_loadu_ps(s + h * 8 * G + 8 * (2 * i / per));
      _mm256_store_ps(dst, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), sc));
      _mm256_store_ps(dst + width, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), sc));
    }
}

// Panels from the int4 layout (int4_rows8): q * d + m per group, what dequantize_int4_kernel gives. In each 32-byte
// vector p of a block, int32 lane r holds row r's inputs 4 p + j (low nibbles) and 4 p + 16 + j (high), j = 0..3.
void pack_int4(const uint8_t* w, const uint16_t* dm, int64_t K, int64_t G, int64_t cols, int64_t width, float* out) {
  const __m256i low = _mm256_set1_epi32(0x0F);
  const int64_t bpg = K / 32 / G;
  for (int h = 0; h < width / 8; ++h)
    for (int64_t b = 0; b < K / 32; ++b) {
      float* dst = out + 32 * b * width + h * 8;
      if (h * 8 >= cols) {
        for (int k = 0; k < 32; ++k) _mm256_store_ps(dst + width * k, _mm256_setzero_ps());
        continue;
      }
      const uint16_t* g = dm + h * 16 * G;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 8 * (b / bpg))));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 8 * (G + b / bpg))));
      for (int pp = 0; pp < 4; ++pp) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + h * 4 * K + 128 * b + 32 * pp));
        for (int j = 0; j < 4; ++j)
          for (int half = 0; half < 2; ++half) {
            const __m256i q = _mm256_and_si256(_mm256_srli_epi32(v, 8 * j + 4 * half), low);
            const __m256 wq = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
            _mm256_store_ps(dst + (4 * pp + 16 * half + j) * width, _mm256_add_ps(wq, m));
          }
      }
    }
}

#ifndef FASTLLAMA_GEMV_MAX_ROWS
#error "build with -DFASTLLAMA_GEMV_MAX_ROWS=N (kernels.py passes its GEMV_MAX_ROWS)"
#endif
constexpr int64_t kGemvMaxRows = FASTLLAMA_GEMV_MAX_ROWS;  // more rows than this are a prefill (kernels.py)

// ---- the quantized ops: GEMVs for decode rows, the GEMM on unpacked panels for prefill rows ----------------

// y = x @ w1.T, or with w3 silu(x @ w1.T) * (x @ w3.T) (a gated MLP's first half) in one call: both products of a row
// group side by side, so x is rounded once and the (M, N) result is written once, instead of two int8_linear calls
// and a pointwise op.
at::Tensor int8_call(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1, const at::Tensor* w3,
                     const at::Tensor* s3, int64_t tile, int64_t width) {
  const int64_t M = x.size(0), N = w1.size(0), K = w1.size(1), G = s1.size(1);
  tile = check_tile(tile), width = check_width(width);
  const at::Tensor xf = as_float(x);
  at::Tensor y = at::empty({M, N}, xf.options());
  const float* sp[2] = {s1.data_ptr<float>(), s3 ? s3->data_ptr<float>() : nullptr};
  const int8_t* wp[2] = {w1.data_ptr<int8_t>(), w3 ? w3->data_ptr<int8_t>() : nullptr};
  float* yp = y.data_ptr<float>();
  if (M > kGemvMaxRows) {
    gemm(xf.data_ptr<float>(), M, N, K, w3 != nullptr, [&](int w, int64_t j, int64_t cols, int64_t panel, float* p) {
      pack_int8(wp[w] + j * K, sp[w] + j * G, K, G, cols, panel, p);
    }, yp, width);
    return in_dtype(y, x.scalar_type());
  }
  const QuantizedInput& xin = quantize_input<Split::no>(xf, 0);
  const int16_t* qp = reinterpret_cast<const int16_t*>(xin.q.data());
  const float* dp = xin.d.data();
  // no software prefetch: one sequential stream per thread, which the hardware prefetcher follows
  parallel_chunks(N / 8, 4, [&](int64_t begin, int64_t end) {
    alignas(32) float a[kMaxTile][8], b[kMaxTile][8];
    for (int64_t r = begin; r < end; ++r)
      row_tiles(tile, M, [&](auto t, int64_t m) {
        constexpr int R = decltype(t)::value;
        const auto rows = [&](int w, float* out, int64_t ld) {
          int8_rows8<R>(qp + m * K, dp + m * K / 32, K, wp[w] + r * 8 * K, sp[w] + r * 8 * G, G, out, ld);
        };
        if (!w3) return rows(0, yp + m * N + 8 * r, N);
        rows(0, a[0], 8), rows(1, b[0], 8);
        for (int i = 0; i < R; ++i)
          _mm256_storeu_ps(yp + (m + i) * N + 8 * r, silu_mul(_mm256_load_ps(a[i]), _mm256_load_ps(b[i])));
      });
  });
  return in_dtype(y, x.scalar_type());
}

using Int8Call = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor*,
                                const at::Tensor*, int64_t, int64_t);

// int8_linear and int8_glu (and their _q8 twins) over one call: the arguments checked, then y = x @ w.T or the glu
template <Int8Call call>
at::Tensor int8_linear_op(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t tile,
                          int64_t width) {
  check_int8(x, w, scales);
  return call(x, w, scales, nullptr, nullptr, tile, width);
}

template <Int8Call call>
at::Tensor int8_glu_op(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1, const at::Tensor& w3,
                       const at::Tensor& s3, int64_t tile, int64_t width) {
  check_int8(x, w1, s1);
  check_int8(x, w3, s3);
  TORCH_CHECK(w3.sizes() == w1.sizes() && s3.sizes() == s1.sizes(), "int8_glu: w1 and w3 must have the same shapes");
  return call(x, w1, s1, &w3, &s3, tile, width);
}

void check_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dm) {
  const int64_t N = w.size(0), K = 2 * w.size(1), G = dm.size(2);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kByte && dm.scalar_type() == at::kHalf && dm.is_contiguous() && N % 8 == 0 &&
              dm.dim() == 4 && dm.size(0) == N / 8 && dm.size(1) == 2 && dm.size(3) == 8 && K % G == 0 &&
              (K / G) % 32 == 0, "int4_linear: bad weight or dm");
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dm, int64_t tile, int64_t width) {
  const int64_t M = x.size(0), N = w.size(0), K = 2 * w.size(1), G = dm.size(2);
  tile = check_tile(tile), width = check_width(width);
  check_int4(x, w, dm);
  const at::Tensor xf = as_float(x);
  at::Tensor y = at::empty({M, N}, xf.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  if (M > kGemvMaxRows) {
    gemm(xf.data_ptr<float>(), M, N, K, false, [&](int, int64_t j, int64_t cols, int64_t panel, float* p) {
      pack_int4(wp + j * K / 2, mp + 2 * j * G, K, G, cols, panel, p);
    }, yp, width);
    return in_dtype(y, x.scalar_type());
  }
  const QuantizedInput& xin = quantize_input<Split::bytes>(xf, G);  // s: sums of x per group, for the m terms
  const int8_t* qp = xin.q.data();
  const float *dp = xin.d.data(), *xsp = xin.s.data();
  // no software prefetch (as int8): prefetching 2 row groups ahead made the int4 calls slower (docs/kernels.md)
  parallel_chunks(N / 8, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      row_tiles(tile, M, [&](auto t, int64_t m) {
        int4_rows8<t>(qp + 2 * m * K, dp + m * K / 32, xsp + m * G, K, wp + r * 4 * K, mp + 16 * G * r, G,
                      yp + m * N + 8 * r, N);
      });
  });
  return in_dtype(y, x.scalar_type());
}

// x rounded to int8 per block (quantize_x8) for every row: (M, K) int8, (M, K / 32) scales, (M, G) group sums
struct Int8Input {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

const Int8Input& quantize_input8(const at::Tensor& xf, int64_t G) {  // G = 0: no group sums (int8 weights)
  thread_local Int8Input buf;  // as QuantizedInput's
  const int64_t M = xf.size(0), K = xf.size(1);
  buf.q.resize(M * K), buf.d.resize(M * K / 32), buf.s.assign(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    quantize_x8(xf.data_ptr<float>() + m * K, K, buf.q.data() + m * K, buf.d.data() + m * K / 32,
                G > 0 ? buf.s.data() + m * G : nullptr, G > 0 ? K / G / 32 : 1);
  return buf;
}

// f(wide, g, vectors) for each work item of an int8-activation op of N output rows, `cols` vectors of `width` (8 or 16)
// rows per item, on torch's threads: g the first row group of 8 of the vectors f computes, vectors how many (the
// item's last may hold fewer); wide false for a last group of 8 rows that has no pair at width 16, which the 8-lane
// instance computes (the same bits)
template <typename F>
void q8_items(int64_t N, int64_t width, int64_t cols, const F& f) {
  const int64_t item = cols * width;  // output rows per work item
  parallel_chunks((N + item - 1) / item, std::max<int64_t>(32 / item, 1), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = std::min(item, N - i * item), vectors = n / width, g = i * item / 8;
      if (vectors) f(true, g, vectors);
      if (n % width) f(false, g + vectors * width / 8, int64_t{1});
    }
  });
}

// int4_linear with x rounded to int8 per block (llama.cpp's Q4_1 x Q8_1): every row of x by kernels_q8.h's kernel, at
// any M, 8 or 16 output rows per vector as `width` says (q8_items: work items of `cols` vectors).
at::Tensor int4_linear_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dm, int64_t tile, int64_t width) {
  const int64_t M = x.size(0), N = w.size(0), K = 2 * w.size(1), G = dm.size(2);
  // One or two rows of x take width 8 whatever was asked: their weights come from memory, not cache, and one 8-row
  // group per work item streams them faster than two side by side (default model, Zen 5: int4 layers 2.04 against
  // 2.38 ms a step at one row, 2.65 against 2.82 at two, 3.69 against 3.19 at four). The same bits either way.
  tile = check_tile(tile), width = check_width(width, true);
  if (M <= 2) width = 8;
  // Prefill rows: a register tile of 4 rows of x by two vectors of output rows, each weight vector unpacked for 4 rows
  // and each quad of x used twice (default model, Zen 3, 64 rows: 144 GMAC/s against 71 for one vector by 8 rows)
  int64_t cols = 1;
  if (M > kGemvMaxRows) tile = 4, cols = 2;
  check_int4(x, w, dm);
  const at::Tensor xf = as_float(x);
  at::Tensor y = at::empty({M, N}, xf.options());
  const Int8Input& xin = quantize_input8(xf, G);
  const int8_t* qp = xin.q.data();
  const float *dp = xin.d.data(), *sp = xin.s.data();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  const auto wide = width == 16 ? &fastllama_avx512::int4_q8 : &int4_q8_block;
  q8_items(N, width, cols, [&](bool wide_item, int64_t g, int64_t vectors) {
    (wide_item ? wide : &int4_q8_block)(tile, vectors, M, qp, dp, sp, K, wp + g * 4 * K, mp + g * 16 * G, G,
                                        yp + g * 8, N);
  });
  return in_dtype(y, x.scalar_type());
}

// int8_linear / int8_glu with x rounded to int8 per block (llama.cpp's Q8_0 x Q8_0), as int4_linear_q8 does int4
at::Tensor int8_q8_call(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1, const at::Tensor* w3,
                        const at::Tensor* s3, int64_t tile, int64_t width) {
  const int64_t M = x.size(0), N = w1.size(0), K = w1.size(1), G = s1.size(1);
  tile = M > kGemvMaxRows ? 8 : check_tile(tile), width = check_width(width, true);
  const at::Tensor xf = as_float(x);
  at::Tensor y = at::empty({M, N}, xf.options());
  const Int8Input& xin = quantize_input8(xf, 0);
  thread_local std::vector<uint8_t> u;  // x's bytes ^ 0x80: x + 128, for vpdpbusd's unsigned operand
  u.resize(M * K);
  for (int64_t i = 0; i < M * K; ++i) u[i] = uint8_t(xin.q[i]) ^ 0x80;
  const int8_t* qp = xin.q.data();
  const uint8_t* up = u.data();
  const float* dp = xin.d.data();
  const float* sp[2] = {s1.data_ptr<float>(), s3 ? s3->data_ptr<float>() : nullptr};
  const int8_t* wp[2] = {w1.data_ptr<int8_t>(), w3 ? w3->data_ptr<int8_t>() : nullptr};
  float* yp = y.data_ptr<float>();
  const auto wide = width == 16 ? &fastllama_avx512::int8_q8 : &int8_q8_block;
  q8_items(N, width, 1, [&](bool paired, int64_t g, int64_t) {
    (paired ? wide : &int8_q8_block)(tile, M, qp, up, dp, K, wp[0] + g * 8 * K, sp[0] + g * 8 * G,
                                     w3 ? wp[1] + g * 8 * K : nullptr, w3 ? sp[1] + g * 8 * G : nullptr, G,
                                     yp + g * 8, N);
  });
  return in_dtype(y, x.scalar_type());
}

template <typename W, typename T>
void dense(const at::Tensor& x, const at::Tensor& w1, const at::Tensor* w3, int64_t tile, int64_t width, T* y) {
  if (x.size(0) <= kGemvMaxRows) return dense_rows<W>(x, w1, w3, tile, y);
  const at::Tensor xf = as_float(x);
  dense_gemm<W>(xf.data_ptr<float>(), x.size(0), w1, w3, y, width);
}

at::Tensor dense_call(const at::Tensor& xa, const at::Tensor& w1, const at::Tensor* w3, int64_t tile, int64_t width) {
  tile = check_tile(tile), width = check_width(width);
  const at::Tensor x = xa.is_contiguous() ? xa : xa.contiguous();
  at::Tensor y = at::empty({x.size(0), w1.size(0)}, x.options());
  if (w1.scalar_type() == at::kFloat)
    dense<Float32Weights>(x, w1, w3, tile, width, y.data_ptr<float>());
  else if (x.scalar_type() == at::kFloat)
    dense<BFloat16Weights>(x, w1, w3, tile, width, y.data_ptr<float>());
  else
    dense<BFloat16Weights>(x, w1, w3, tile, width, y.data_ptr<at::BFloat16>());
  return y;
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w, int64_t tile, int64_t width) {
  check_dense(x, w, "dense_linear");
  return dense_call(x, w, nullptr, tile, width);
}

at::Tensor dense_glu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, int64_t tile, int64_t width) {
  check_dense(x, w1, "dense_glu");
  check_dense(x, w3, "dense_glu");
  TORCH_CHECK(w1.sizes() == w3.sizes() && w1.scalar_type() == w3.scalar_type(),
              "dense_glu: w1 and w3 must have the same shape and dtype");
  return dense_call(x, w1, &w3, tile, width);
}

// ---- attention of one new token over the KV cache --------------------------------------------------------

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // bf16 is the high half of a float
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// One kv head's (S, D) keys or values as attention reads them: 8 values of position t from 8 * c on, in float32.
template <typename T>
struct FloatRows {
  const T* p;
  int64_t D;
  __m256 load(int64_t t, int64_t c) const { return load8(p + t * D + 8 * c); }
};

// model.KVCache's int8 form: int8 values q with a float32 scale s per block of 32 values (or one per position: a
// head of another size), read as q * s (the same product as model.dequantize_kv, so the sums are those of the float
// cache it dequantizes to).
struct Int8Rows {
  const int8_t* p;
  const float* s;
  int64_t D, blocks;  // scales per position: D / 32, or 1
  __m256 load(int64_t t, int64_t c) const {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + t * D + 8 * c));
    const float scale = s[t * blocks + (blocks == 1 ? 0 : c >> 2)];  // 4 vectors of 8 per block of 32
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(scale));
  }
};

// For each of G heads h: out_h[c0..c0+W) (vectors of 8) = sum_i p_h[i] v[pos[i]] (p_h = p + h * ps, out_h = out + h *
// os); each value vector is loaded (and converted) once for the G heads; G x W accumulators stay in registers.
template <int G, int W, typename Rows>
void weigh_values(const float* p, int64_t ps, const Rows& v, int64_t c0, const int64_t* pos, int64_t n, float* out,
                  int64_t os) {
  __m256 a[G][W];
  for (int h = 0; h < G; ++h)
    for (int j = 0; j < W; ++j) a[h][j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < W; ++j) {
      const __m256 vj = v.load(pos[i], c0 + j);
      for (int h = 0; h < G; ++h) a[h][j] = _mm256_fmadd_ps(_mm256_set1_ps(p[h * ps + i]), vj, a[h][j]);
    }
  for (int h = 0; h < G; ++h)
    for (int j = 0; j < W; ++j) _mm256_storeu_ps(out + h * os + 8 * j, a[h][j]);
}

// G query heads that share a kv head over its n cache positions t = pos[i], softmax left unnormalized so that chunks
// of positions merge exactly (flash-decoding): for head h, out_h = sum_i e^(s_i - mx) v[t], s_i = scale q_h . k[t],
// out_h[D] = mx, out_h[D + 1] = sum_i e^(s_i - mx). q (G, D) and out (G, D + 2) float32, k and v the (S, D) cache of
// the kv head, sc G x (n + 8) floats of scratch. Each key and value vector is loaded and converted once for the G
// heads; four positions (scores) or W output vectors (values) at a time, so that the multiply-adds form independent
// chains. Each head's sums run in the same order whatever G is.
template <int G, typename Rows>
void attend(const float* q, const Rows& k, const Rows& v, const int64_t* pos, int64_t n, int64_t D, float scale,
            float* sc, float* out) {
  const int64_t C = D / 8, ss = n + 8;  // ss: each head's scores
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m256 a[G][4];
    for (int h = 0; h < G; ++h)
      for (int j = 0; j < 4; ++j) a[h][j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c)
      for (int j = 0; j < 4; ++j) {
        const __m256 kj = k.load(pos[i + j], c);
        for (int h = 0; h < G; ++h) a[h][j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + 8 * c), kj, a[h][j]);
      }
    for (int h = 0; h < G; ++h) {
      const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a[h][3]));
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      _mm_storeu_ps(sc + h * ss + i, _mm_mul_ps(s4, _mm_set1_ps(scale)));
    }
  }
  for (; i < n; ++i) {
    __m256 a[G];
    for (int h = 0; h < G; ++h) a[h] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m256 kc = k.load(pos[i], c);
      for (int h = 0; h < G; ++h) a[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + 8 * c), kc, a[h]);
    }
    for (int h = 0; h < G; ++h) sc[h * ss + i] = hsum(a[h]) * scale;
  }
  const int64_t n8 = (n + 7) / 8 * 8;
  for (int h = 0; h < G; ++h) {
    float* sh = sc + h * ss;
    float mx = -std::numeric_limits<float>::infinity();
    for (i = 0; i < n; ++i) mx = std::max(mx, sh[i]);
    for (i = n; i < n8; ++i) sh[i] = mx;
    __m256 sum = _mm256_setzero_ps();
    for (i = 0; i < n8; i += 8) {
      const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(sh + i), _mm256_set1_ps(mx)));
      _mm256_storeu_ps(sh + i, e);
      sum = _mm256_add_ps(sum, e);
    }
    out[h * (D + 2) + D] = mx, out[h * (D + 2) + D + 1] = hsum(sum) - float(n8 - n);  // the padding added e^0 = 1 each
  }
  constexpr int W = G == 1 ? 8 : G == 2 ? 4 : 2;  // G x W accumulators: at most 8 of AVX2's 16 registers
  int64_t c = 0;
  for (; c + W <= C; c += W) weigh_values<G, W>(sc, ss, v, c, pos, n, out + 8 * c, D + 2);
  for (; c < C; ++c) weigh_values<G, 1>(sc, ss, v, c, pos, n, out + 8 * c, D + 2);
}

// The R query heads of one kv head, in groups of at most 3 (12 score accumulators in registers): attend's q, out.
template <typename Rows>
void attend_heads(const float* q, const Rows& k, const Rows& v, const int64_t* pos, int64_t n, int64_t D, int64_t R,
                  float scale, float* sc, float* out) {
  for (int64_t h = 0; h < R;) {
    const int64_t g = std::min<int64_t>(R - h, 3);
    if (g == 3) attend<3>(q + h * D, k, v, pos, n, D, scale, sc, out + h * (D + 2));
    else if (g == 2) attend<2>(q + h * D, k, v, pos, n, D, scale, sc, out + h * (D + 2));
    else attend<1>(q + h * D, k, v, pos, n, D, scale, sc, out + h * (D + 2));
    h += g;
  }
}

// q (B, H, D) over the cache rows rows[b] of a cache of R rows, KV heads and S positions: a server's running
// requests, wherever they sit. rows_of(at) gives the keys' and values' Rows of the kv head at = row * KV + g.
template <typename F>
at::Tensor attention_rows(const at::Tensor& q, int64_t R_, int64_t KV, int64_t S, const at::Tensor& mask,
                          const at::Tensor& rows_, const F& rows_of) {
  TORCH_CHECK(q.dim() == 3 && q.size(1) % KV == 0 && q.size(2) % 8 == 0, "decode_attention: q (B, H, D)");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kBool && mask.size(1) == S &&
              (mask.size(0) == 1 || mask.size(0) == q.size(0)), "decode_attention: mask (1 or B, S) bool");
  TORCH_CHECK(rows_.dim() == 1 && rows_.size(0) == q.size(0) && rows_.scalar_type() == at::kLong,
              "decode_attention: rows (B,) int64");
  const at::Tensor cache_rows = rows_.contiguous();
  const int64_t* rp = cache_rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) TORCH_CHECK(rp[b] >= 0 && rp[b] < R_, "decode_attention: row out of range");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), R = H / KV;
  const at::Tensor qc = q.contiguous(), m = mask.contiguous();
  at::Tensor out = at::empty({B, H, D}, q.options());
  // q to float32 and the result back to q's dtype here rather than by two more ATen ops (~4 us each per call)
  std::vector<float> qf(B * H * D), of(B * H * D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    std::copy_n(qc.data_ptr<scalar_t>(), B * H * D, qf.begin());
  });
  // the visible positions of each mask row, listed once for all the heads that share it
  const int64_t rows = m.size(0);
  std::vector<int64_t> pos(rows * S), count(rows, 0);
  const bool* mp = m.data_ptr<bool>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < S; ++t)
      if (mp[r * S + t]) pos[r * S + count[r]++] = t;
  // Work items: (batch row, kv head, chunk of kChunk of its visible positions); the R query heads of a kv head run one
  // after another on its chunk, so its K and V rows come from memory once. The chunks are cut at fixed counts, never
  // by the batch size or the thread count: a row's sums are the same whatever else is in the batch.
  constexpr int64_t kChunk = 64;
  std::vector<int64_t> first(B + 1, 0);  // row b's chunks are first[b]..first[b + 1] - 1
  for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + std::max<int64_t>(1, (count[rows == 1 ? 0 : b] + kChunk - 1) / kChunk);
  std::vector<int64_t> items;  // (chunk index into first[], kv head) as chunk * KV + g
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < KV; ++g)
      for (int64_t c = first[b]; c < first[b + 1]; ++c) items.push_back(c * KV + g);
  std::vector<int64_t> owner(first[B]);  // the batch row of each chunk
  for (int64_t b = 0; b < B; ++b) std::fill(owner.begin() + first[b], owner.begin() + first[b + 1], b);
  std::vector<float> part(first[B] * H * (D + 2));  // per (chunk, h): unnormalized output (D), max score, sum of weights
  const float scale = 1.f / std::sqrt(float(D));
  parallel_chunks(int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> sc;  // scores, then weights, of 3 heads: lives as long as the thread (QuantizedInput)
    sc.resize(3 * (kChunk + 8));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = items[item] / KV, g = items[item] % KV, b = owner[c], r = rows == 1 ? 0 : b;
      const int64_t lo = (c - first[b]) * kChunk, hi = std::min(count[r], lo + kChunk);
      const auto kv = rows_of(rp[b] * KV + g);
      attend_heads(qf.data() + (b * H + g * R) * D, kv.first, kv.second, pos.data() + r * S + lo, hi - lo, D, R, scale,
                   sc.data(), part.data() + (c * H + g * R) * (D + 2));
    }
  });
  for (int64_t b = 0; b < B; ++b)  // merge each row's chunks in order: rescale each to the largest score seen
    for (int64_t h = 0; h < H; ++h) {
      float mx = -std::numeric_limits<float>::infinity(), l = 0.f;
      for (int64_t c = first[b]; c < first[b + 1]; ++c) mx = std::max(mx, part[(c * H + h) * (D + 2) + D]);
      float* op = of.data() + (b * H + h) * D;
      std::fill(op, op + D, 0.f);
      for (int64_t c = first[b]; c < first[b + 1]; ++c) {
        const float* pc = part.data() + (c * H + h) * (D + 2);
        if (pc[D + 1] == 0.f) continue;  // a chunk with no visible position
        const float w = std::exp(pc[D] - mx);
        l += w * pc[D + 1];
        for (int64_t d = 0; d < D; ++d) op[d] += w * pc[d];
      }
      for (int64_t d = 0; d < D; ++d) op[d] /= l;
    }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    std::copy(of.begin(), of.end(), out.data_ptr<scalar_t>());
  });
  return out;
}

// k and v (R, KV, S, D) float32, bfloat16 or float16.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            const at::Tensor& rows) {
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(3) == q.size(-1) && k.is_contiguous() &&
              v.is_contiguous() && k.scalar_type() == v.scalar_type(), "decode_attention: k and v (R, KV, S, D)");
  const int64_t S = k.size(2), D = k.size(3);
  auto over = [&](auto* kp, auto* vp) {
    using Rows = FloatRows<std::remove_const_t<std::remove_pointer_t<decltype(kp)>>>;
    return attention_rows(q, k.size(0), k.size(1), S, mask, rows, [&](int64_t at) {
      return std::make_pair(Rows{kp + at * S * D, D}, Rows{vp + at * S * D, D});
    });
  };
  switch (k.scalar_type()) {
    case at::kFloat: return over(k.data_ptr<float>(), v.data_ptr<float>());
    case at::kBFloat16: return over(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
    case at::kHalf: return over(k.data_ptr<at::Half>(), v.data_ptr<at::Half>());
    default: TORCH_CHECK(false, "decode_attention: cache must be float32, bfloat16 or float16");
  }
}

// k and v (R, KV, S, D) int8 with float32 scales ks, vs (R, KV, S, D / 32 or 1): model.KVCache's int8 form.
at::Tensor decode_attention_q8(const at::Tensor& q, const at::Tensor& k, const at::Tensor& ks, const at::Tensor& v,
                               const at::Tensor& vs, const at::Tensor& mask, const at::Tensor& rows) {
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(3) == q.size(-1) && k.is_contiguous() &&
              v.is_contiguous() && k.scalar_type() == at::kChar && v.scalar_type() == at::kChar,
              "decode_attention_q8: k and v (R, KV, S, D) int8");
  TORCH_CHECK(ks.dim() == 4 && ks.sizes() == vs.sizes() && ks.sizes().slice(0, 3) == k.sizes().slice(0, 3) &&
              ks.is_contiguous() && vs.is_contiguous() && ks.scalar_type() == at::kFloat &&
              vs.scalar_type() == at::kFloat && k.size(3) % 8 == 0 &&
              (ks.size(3) == 1 || ks.size(3) * 32 == k.size(3)),
              "decode_attention_q8: scales (R, KV, S, D / 32 or 1) float32, D a multiple of 8");
  const int64_t S = k.size(2), D = k.size(3), blocks = ks.size(3);
  const int8_t *kp = k.data_ptr<int8_t>(), *vp = v.data_ptr<int8_t>();
  const float *ksp = ks.data_ptr<float>(), *vsp = vs.data_ptr<float>();
  return attention_rows(q, k.size(0), k.size(1), S, mask, rows, [&](int64_t at) {
    return std::make_pair(Int8Rows{kp + at * S * D, ksp + at * S * blocks, D, blocks},
                          Int8Rows{vp + at * S * D, vsp + at * S * blocks, D, blocks});
  });
}

}  // namespace

// The schemas are defined in kernels.py (OPS), which loads this file; here only the CPU implementations.
TORCH_LIBRARY_IMPL(fastllama, CPU, m) {
  m.impl("int8_linear", &int8_linear_op<int8_call>);
  m.impl("int8_glu", &int8_glu_op<int8_call>);
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_linear_q8", &int4_linear_q8);
  m.impl("int8_linear_q8", &int8_linear_op<int8_q8_call>);
  m.impl("int8_glu_q8", &int8_glu_op<int8_q8_call>);
  m.impl("dense_linear", &dense_linear);
  m.impl("dense_glu", &dense_glu);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_attention_q8", &decode_attention_q8);
}
