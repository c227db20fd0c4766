// Weight-only int8 / int4 matrix-vector products for x86 CPUs with AVX2 + FMA (fastllama).
//
// Decoding reads every weight once per token, so a quantized linear layer is a GEMV whose speed is
// set by how fast weights stream in and turn into floats. These kernels keep activations in float32
// (the result equals x @ dequantize(w).T up to summation order, no activation quantization) and
// work on two output rows at a time so each activation load feeds two weight rows.
//
//   int8_linear(x (M, K) float/bf16, w (N, K) int8, scales (N, G) float32) -> (M, N) in x's dtype
//       y = x @ (w * scales[:, k // (K / G)]).T          G = 1: per channel; G = K / 32: Q8_0-like
//   int4_linear(x (M, K), w (N, K / 2) uint8, dm (N, G, 2) float16) -> (M, N)
//       w[n, 16 b + j] holds q[n, 32 b + j] (low nibble) and q[n, 32 b + 16 + j] (high nibble),
//       y = x @ (q * d + m).T with (d, m) = dm[n, k // (K / G)]   (llama.cpp's Q4_1 arithmetic)
//
// Registered as torch.ops.fastllama.*; kernels.py builds this file and holds the PyTorch reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Activations as int16 per block of 32: x[k] ~= q[k] * d[k / 32], d = max |x| / 32767 over the block.
// The rounding error (at most 1/65534 of the block's largest value) is far below bf16's, so results
// match x @ w.T in float to ~1e-5; in exchange every product is an integer multiply-add (vpmaddwd).
// sums, when given (int4's m terms), gets the float sum of x over each group of bpg blocks (zeroed by the caller).
void quantize_x(const float* x, int64_t K, int16_t* q, float* d, float* sums, int64_t bpg) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float mx = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    d[b] = mx / 32767.f;
    if (sums) sums[b / bpg] += hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    const __m256 inv = _mm256_set1_ps(mx > 0.f ? 32767.f / mx : 0.f);
    for (int i = 0; i < 4; i += 2) {  // packs interleaves 128-bit halves; the permute restores the order
      const __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)),
                                           _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], inv)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b + 8 * i), _mm256_permute4x64_epi64(p, 0xD8));
    }
  }
}

inline __m256i load16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(static_cast<const char*>(p) + i, _MM_HINT_T0);
}

// y[j] = sum_k x[k] * w[j * K + k] * s[j * G + k / g] for the NT rows starting at w.
template <int NT>
void int8_rows(const int16_t* xq, const float* xd, int64_t K, const int8_t* w, const float* s, int64_t G, float* y) {
  const int64_t bpg = K / G / 32;  // blocks of 32 per scale group
  __m256 acc[NT], gacc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = gacc[j] = _mm256_setzero_ps();
  for (int64_t gi = 0, b = 0; gi < G; ++gi) {
    for (const int64_t end = b + bpg; b < end; ++b) {
      const __m256i x0 = load16(xq + 32 * b), x1 = load16(xq + 32 * b + 16);
      const __m256 dx = _mm256_set1_ps(xd[b]);
      for (int j = 0; j < NT; ++j) {
        const int8_t* p = w + j * K + 32 * b;
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
        const __m256i t = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
        gacc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), dx, gacc[j]);
      }
    }
    for (int j = 0; j < NT; ++j) {
      acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(s[j * G + gi]), gacc[j], acc[j]);
      gacc[j] = _mm256_setzero_ps();
    }
  }
  for (int j = 0; j < NT; ++j) y[j] = hsum(acc[j]);
}

// y[j] = sum_k x[k] * (q[j, k] * d + m), (d, m) per group; xs[gi] = sum of the float x over group gi.
// Kernel layout: 32 bytes per 64 weights; 16-bit lane l holds q[l], q[16 + l], q[32 + l], q[48 + l].
constexpr int64_t kMaxGroups = 512;

void int4_rows(const int16_t* xq, const float* xd, const float* xs, int64_t K, const uint8_t* w,
               const uint16_t* dm, int64_t G, float* y) {
  const int64_t bpg = K / G / 32;
  const __m256i low = _mm256_set1_epi16(0x0F);
  float dmf[2 * kMaxGroups];  // this row's (d, m) as float32: per-block broadcasts become plain loads
  int64_t i = 0;
  for (; i + 8 <= 2 * G; i += 8)
    _mm256_storeu_ps(dmf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + i))));
  for (; i < 2 * G; ++i) dmf[i] = _cvtsh_ss(dm[i]);
  // integer dots of 64 inputs, scaled by the activations' block scales: ta over the first 32, tb the second
  __m256 ta, tb;
  auto dot64 = [&](int64_t sb) __attribute__((always_inline)) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * sb));
    const __m256i q0 = _mm256_and_si256(v, low), q1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), low), q3 = _mm256_srli_epi16(v, 12);
    const int16_t* x = xq + 64 * sb;
    const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(q0, load16(x)), _mm256_madd_epi16(q1, load16(x + 16)));
    const __m256i b = _mm256_add_epi32(_mm256_madd_epi16(q2, load16(x + 32)), _mm256_madd_epi16(q3, load16(x + 48)));
    ta = _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_broadcast_ss(xd + 2 * sb));
    tb = _mm256_mul_ps(_mm256_cvtepi32_ps(b), _mm256_broadcast_ss(xd + 2 * sb + 1));
  };
  // two accumulators, so the two halves don't wait on each other's FMA latency
  __m256 acc_a = _mm256_setzero_ps(), acc_b = _mm256_setzero_ps();
  if (bpg == 1) {  // groups of 32: each half has its own d
    for (int64_t sb = 0; sb < K / 64; ++sb) {
      dot64(sb);
      acc_a = _mm256_fmadd_ps(ta, _mm256_broadcast_ss(dmf + 4 * sb), acc_a);
      acc_b = _mm256_fmadd_ps(tb, _mm256_broadcast_ss(dmf + 4 * sb + 2), acc_b);
    }
  } else {  // groups of 64 or more: sum the group, then scale once
    for (int64_t gi = 0, sb = 0; gi < G; ++gi) {
      __m256 ga = _mm256_setzero_ps(), gb = _mm256_setzero_ps();
      for (const int64_t end = sb + bpg / 2; sb < end; ++sb) {
        dot64(sb);
        ga = _mm256_add_ps(ga, ta), gb = _mm256_add_ps(gb, tb);
      }
      acc_a = _mm256_fmadd_ps(_mm256_broadcast_ss(dmf + 2 * gi), _mm256_add_ps(ga, gb), acc_a);
    }
  }
  float mins[4] = {0.f, 0.f, 0.f, 0.f};  // four chains: a single running sum waits on every FMA (1.3x slower)
  int64_t g = 0;
  for (; g + 4 <= G; g += 4)
    for (int u = 0; u < 4; ++u) mins[u] += dmf[2 * (g + u) + 1] * xs[g + u];
  for (; g < G; ++g) mins[0] += dmf[2 * g + 1] * xs[g];
  *y = hsum(_mm256_add_ps(acc_a, acc_b)) + ((mins[0] + mins[1]) + (mins[2] + mins[3]));
}

// Runs row(n, nt, m) over all outputs n (two at a time, nt = 2 or 1) and rows m of x, split across threads.
template <typename F>
void for_rows(int64_t M, int64_t N, F row) {
  at::parallel_for(0, (N + 1) / 2, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = 2 * p;
      for (int64_t m = 0; m < M; ++m) row(n, n + 1 < N ? 2 : 1, m);
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be (M, ", K, ")");
  TORCH_CHECK(K % 64 == 0, "in_features must be a multiple of 64");
  TORCH_CHECK(w.is_contiguous(), "weight must be contiguous");
}

// (int16 x, per-block scales, per-group sums (M, G) when G > 0, else undefined) for every row of x
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_input(const at::Tensor& xf, int64_t G) {
  const int64_t M = xf.size(0), K = xf.size(1);
  at::Tensor q = at::empty({M, K}, xf.options().dtype(at::kShort)), d = at::empty({M, K / 32}, xf.options());
  at::Tensor s = G > 0 ? at::zeros({M, G}, xf.options()) : at::Tensor();
  for (int64_t m = 0; m < M; ++m)
    quantize_x(xf.data_ptr<float>() + m * K, K, q.data_ptr<int16_t>() + m * K, d.data_ptr<float>() + m * K / 32,
               G > 0 ? s.data_ptr<float>() + m * G : nullptr, G > 0 ? K / G / 32 : 1);
  return {q, d, s};
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1), G = scales.size(1);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
              scales.size(0) == N && K % G == 0 && (K / G) % 32 == 0, "int8_linear: bad weight or scales");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const auto [xq, xd, no_sums] = quantize_input(xf, 0);
  at::Tensor y = at::empty({M, N}, xf.options());
  const int16_t* qp = xq.data_ptr<int16_t>();
  const float *dp = xd.data_ptr<float>(), *sp = scales.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  for_rows(M, N, [&](int64_t n, int nt, int64_t m) {
    if (m == 0) prefetch(wp + (n + 8) * K, 2 * K);
    float out[2];
    if (nt == 2) int8_rows<2>(qp + m * K, dp + m * K / 32, K, wp + n * K, sp + n * G, G, out);
    else int8_rows<1>(qp + m * K, dp + m * K / 32, K, wp + n * K, sp + n * G, G, out);
    for (int j = 0; j < nt; ++j) yp[m * N + n + j] = out[j];
  });
  return y.to(x.scalar_type());
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dm) {
  const int64_t M = x.size(0), N = w.size(0), K = 2 * w.size(1), G = dm.size(1);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == at::kByte && dm.scalar_type() == at::kHalf && dm.is_contiguous() &&
              dm.size(0) == N && dm.size(2) == 2 && K % G == 0 && (K / G) % 32 == 0 && G <= kMaxGroups,
              "int4_linear: bad weight or dm");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const auto [xq, xd, xs] = quantize_input(xf, G);  // xs: sums of x per group, for the m terms
  at::Tensor y = at::empty({M, N}, xf.options());
  const int16_t* qp = xq.data_ptr<int16_t>();
  const float *dp = xd.data_ptr<float>(), *xsp = xs.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  for_rows(M, N, [&](int64_t n, int nt, int64_t m) {
    if (m == 0) prefetch(wp + (n + 16) * K / 2, K);
    float out[2];
    for (int j = 0; j < nt; ++j)  // one row at a time: two need more than AVX2's 16 registers (measured slower)
      int4_rows(qp + m * K, dp + m * K / 32, xsp + m * G, K, wp + (n + j) * K / 2, mp + 2 * (n + j) * G, G, out + j);
    for (int j = 0; j < nt; ++j) yp[m * N + n + j] = out[j];
  });
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(fastllama, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor weight, Tensor dm) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastllama, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}
