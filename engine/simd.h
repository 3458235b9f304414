// SIMD helpers of the engine's C++ kernels (streamed_linear.cpp, decode_layer.cpp): one vector of
// LANES floats, loads (a masked load for a tail), fused multiply-add and a horizontal sum in a fixed
// order, so a dot product computed with them is bitwise reproducible.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace decodebench {

#if defined(__AVX512F__)
constexpr int LANES = 16;
constexpr int MAX_ROWS = 16;  // 32 vector registers: M x R accumulators + R weight vectors + 1 input vector
using Vec = __m512;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load_tail(const float* p, int count) { return _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec broadcast(float a) { return _mm512_set1_ps(a); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline float hmax(Vec v) { return _mm512_reduce_max_ps(v); }
inline Vec fma_if(bool take, Vec a, Vec b, Vec c) { return _mm512_mask3_fmadd_ps(a, b, c, take ? 0xFFFF : 0); }  // c unless take
constexpr int REGISTERS = 32;
inline Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec fnma(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a·b
inline Vec clamp(Vec x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, broadcast(lo)), broadcast(hi)); }
inline Vec floor(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline Vec times_pow2(Vec y, Vec n) { return _mm512_scalef_ps(y, n); }  // y · 2ⁿ, n integral
inline Vec zero_where_neg_inf(Vec x, Vec y) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, broadcast(-INFINITY), _CMP_EQ_OQ), y, zero());
}
inline float hsum(Vec v) {  // fixed order: halves, then quarters, ...
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_movehdup_ps(e)));
}
// lane i = hsum(acc[i]) for LANES accumulators, with hsum's tree (halves, quarters, pairs, the last
// pair) as a butterfly: ~2 shuffles per sum instead of 4. The butterfly leaves acc[4g + r]'s sum in
// lane 4r + g, so the accumulators go in transposed.
inline Vec hsum_lanes(const Vec* acc) {
  Vec halves[8], quarters[4], pairs[2];
  for (int p = 0; p < 8; ++p) {
    const Vec a = acc[((2 * p) % 4) * 4 + (2 * p) / 4], b = acc[((2 * p + 1) % 4) * 4 + (2 * p + 1) / 4];
    halves[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int p = 0; p < 4; ++p) {
    const Vec c = halves[2 * p], d = halves[2 * p + 1];
    quarters[p] = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int p = 0; p < 2; ++p) {
    const Vec u = quarters[2 * p], w = quarters[2 * p + 1];
    pairs[p] = _mm512_add_ps(_mm512_shuffle_ps(u, w, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(u, w, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int LANES = 8;
constexpr int MAX_ROWS = 8;  // 16 vector registers
using Vec = __m256;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load_tail(const float* p, int count) {
  alignas(32) static const int ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ones + 8 - count)));
}
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec broadcast(float a) { return _mm256_set1_ps(a); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline float hmax(Vec v) {
  const __m128 q = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 e = _mm_max_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_max_ss(e, _mm_movehdup_ps(e)));
}
inline Vec fma_if(bool take, Vec a, Vec b, Vec c) { return take ? fma(a, b, c) : c; }  // c unless take
constexpr int REGISTERS = 16;
inline Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec fnma(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a·b
inline Vec clamp(Vec x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, broadcast(lo)), broadcast(hi)); }
inline Vec floor(Vec x) { return _mm256_floor_ps(x); }
inline Vec times_pow2(Vec y, Vec n) {  // y · 2ⁿ, n integral and in the normal exponent range
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}
inline Vec zero_where_neg_inf(Vec x, Vec y) {
  return _mm256_blendv_ps(y, zero(), _mm256_cmp_ps(x, broadcast(-INFINITY), _CMP_EQ_OQ));
}
inline float hsum(Vec v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_movehdup_ps(e)));
}
// lane i = hsum(acc[i]) for LANES accumulators with hsum's tree (see the AVX-512 version); the
// butterfly leaves acc[2r + g]'s sum in lane 4g + r, so the accumulators go in transposed.
inline Vec hsum_lanes(const Vec* acc) {
  Vec quarters[4], pairs[2];
  for (int p = 0; p < 4; ++p) {
    const int i = 2 * p, k = 2 * p + 1;  // slots 2r + g hold acc[4g + r]
    const Vec a = acc[(i % 2) * 4 + i / 2], b = acc[(k % 2) * 4 + k / 2];
    quarters[p] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  for (int p = 0; p < 2; ++p) {
    const Vec u = quarters[2 * p], w = quarters[2 * p + 1];
    pairs[p] = _mm256_add_ps(_mm256_shuffle_ps(u, w, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(u, w, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  return _mm256_add_ps(_mm256_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm256_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#else
#error "the streamed kernel needs AVX-512F or AVX2 with FMA (engine/streamed.py reports this as the reason it is unavailable)"
#endif

// e^x lane by lane (Cephes' expf: x = n·ln 2 + r with |r| <= ln 2 / 2, a degree-6 polynomial in r,
// times 2ⁿ; within 2 ulp of the exact value over the clamped range), exactly 0 where x = −inf (a masked
// attention score). The same operations in the same order for every lane: deterministic.
inline Vec exp_lanes(Vec x) {
  const Vec clamped = clamp(x, -87.3365447505531f, 88.3762626647949f);
  const Vec n = floor(fma(clamped, broadcast(1.44269504088896341f), broadcast(0.5f)));
  Vec r = fnma(n, broadcast(0.693359375f), clamped);
  r = fnma(n, broadcast(-2.12194440e-4f), r);
  Vec poly = broadcast(1.9875691500e-4f);
  poly = fma(poly, r, broadcast(1.3981999507e-3f));
  poly = fma(poly, r, broadcast(8.3334519073e-3f));
  poly = fma(poly, r, broadcast(4.1665795894e-2f));
  poly = fma(poly, r, broadcast(1.6666665459e-1f));
  poly = fma(poly, r, broadcast(5.0000001201e-1f));
  const Vec y = add(fma(poly, mul(r, r), r), broadcast(1.0f));
  return zero_where_neg_inf(x, times_pow2(y, n));
}

// y[m, n] = sum_k x[m, k] * w[n, k] for `rows` rows of x (row-major, K features) against the N rows of
// w, with the streamed kernel (streamed_linear.cpp); parallel over weight rows (at::parallel_for).
void streamed_rows(const float* x, int64_t rows, const float* w, int64_t K, int64_t N, float* y);

}  // namespace decodebench
