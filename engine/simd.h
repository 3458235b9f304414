// SIMD helpers of the engine's C++ kernels (streamed_linear.cpp, decode_layer.cpp): one vector of
// LANES floats, loads (a masked load for a tail), fused multiply-add and a horizontal sum in a fixed
// order, so a dot product computed with them is bitwise reproducible.
#pragma once
#include <immintrin.h>

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
inline float hsum(Vec v) {  // fixed order: halves, then quarters, ...
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_movehdup_ps(e)));
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
inline float hsum(Vec v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_movehdup_ps(e)));
}
#else
#error "the streamed kernel needs AVX-512F or AVX2 with FMA (engine/streamed.py reports this as the reason it is unavailable)"
#endif

// y[m, n] = sum_k x[m, k] * w[n, k] for `rows` rows of x (row-major, K features) against the N rows of
// w, with the streamed kernel (streamed_linear.cpp); parallel over weight rows (at::parallel_for).
void streamed_rows(const float* x, int64_t rows, const float* w, int64_t K, int64_t N, float* y);

}  // namespace decodebench
