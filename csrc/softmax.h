// Softmax arithmetic over fp32 spans that the cross-entropy kernels share: an exp for nonpositive arguments, the
// loops over a span (max, sum of exponentials, rescaling; AVX-512 where built, portable otherwise), and the
// widening of bf16/fp16 logit chunks to fp32 (the element conversions are bf16.h's).
#pragma once

#include "bf16.h"

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastcls {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (every exponent here is relative to a max or to the logsumexp), within about 1 ulp:
// Cody-Waite reduction to r in [-ln2/2, ln2/2], the Cephes expf polynomial for exp(r), and 2^n assembled in the
// exponent bits. Branch-free so that loops calling it vectorise; std::exp does not. Results below 2^-125 flush to
// 0, which is invisible next to a softmax denominator of at least 1. NaN propagates.
inline float exp_nonpositive(float x) {
  constexpr float kLowest = -87.0f;
  // Adding 1.5 * 2^23 rounds to an integer n, which then sits in the low mantissa bits.
  constexpr float kRoundingShift = 12582912.0f;
  constexpr int32_t kRoundingShiftBits = 0x4b400000;
  const float clamped = x < kLowest ? kLowest : x;
  const float shifted = clamped * 1.44269504088896341f + kRoundingShift;
  const float n = shifted - kRoundingShift;
  // ln2 split in two so that n * 0.693359375 is exact.
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * (r * r) + r + 1.0f;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  const int32_t pow2_bits = (shifted_bits - kRoundingShiftBits + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &pow2_bits, sizeof pow2);
  return x < kLowest ? 0.0f : exp_r * pow2;
}

// The three loops that touch every logit: a chunk's max, its exponentials (summed, optionally kept), and the
// gradient from kept exponentials. Written with AVX-512 intrinsics where available (GCC's vectorisation of the
// scalar exp above runs at about half the speed), with the portable loops as the fallback.
#if defined(__AVX512F__)
// exp(x) for x <= 0 as 2^y, y = x * log2(e) = n + f with n an integer and |f| <= 1/2: a degree-5 polynomial for
// 2^f (fitted for relative error, 2.3e-7 in fp32 arithmetic) and vscalefps for 2^n: 10 vector operations, two
// thirds of the Cephes form above. Clamping y at -150 makes exp(-inf) 0; NaN passes the clamp.
inline __m512 exp512_nonpositive(__m512 x) {
  const __m512 y = _mm512_max_ps(_mm512_set1_ps(-150.0f), _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 poly = _mm512_set1_ps(1.3276353711262345e-3f);
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(9.675508365035057e-3f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.550713464617729e-2f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.4022120237350464e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.931469440460205e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(poly, n);
}

inline __mmask16 tail_mask(int64_t remaining) { return __mmask16((1u << remaining) - 1u); }

inline float max_of(const float* x, int64_t len) {
  __m512 m0 = _mm512_set1_ps(kNegInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t k = 0;
  for (; k + 64 <= len; k += 64) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + k));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + k + 16));
    m2 = _mm512_max_ps(m2, _mm512_loadu_ps(x + k + 32));
    m3 = _mm512_max_ps(m3, _mm512_loadu_ps(x + k + 48));
  }
  for (; k + 16 <= len; k += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + k));
  if (k < len) {
    const __mmask16 mask = tail_mask(len - k);
    m1 = _mm512_mask_max_ps(m1, mask, m1, _mm512_maskz_loadu_ps(mask, x + k));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

// sum_k exp(x_k - shift), storing each exponential into e unless it is null.
template <bool kStore>
inline float sum_exp(const float* x, float shift, float* e, int64_t len) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
  int64_t k = 0;
  for (; k + 32 <= len; k += 32) {
    const __m512 e0 = exp512_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + k), s));
    const __m512 e1 = exp512_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + k + 16), s));
    if constexpr (kStore) {
      _mm512_storeu_ps(e + k, e0);
      _mm512_storeu_ps(e + k + 16, e1);
    }
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
  }
  for (; k < len; k += 16) {
    const __mmask16 mask = len - k >= 16 ? __mmask16(0xffff) : tail_mask(len - k);
    const __m512 e0 = _mm512_maskz_mov_ps(mask, exp512_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + k), s)));
    if constexpr (kStore) _mm512_mask_storeu_ps(e + k, mask, e0);
    acc0 = _mm512_add_ps(acc0, e0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// out_k = e_k * coef - offset
inline void scale_shift(const float* e, float coef, float offset, float* out, int64_t len) {
  const __m512 c = _mm512_set1_ps(coef), o = _mm512_set1_ps(offset);
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) _mm512_storeu_ps(out + k, _mm512_fmsub_ps(_mm512_loadu_ps(e + k), c, o));
  if (k < len) {
    const __mmask16 mask = tail_mask(len - k);
    _mm512_mask_storeu_ps(out + k, mask, _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, e + k), c, o));
  }
}
#else
inline float max_of(const float* x, int64_t len) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < len; ++k) m = x[k] > m ? x[k] : m;
  return m;
}

template <bool kStore>
inline float sum_exp(const float* x, float shift, float* e, int64_t len) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < len; ++k) {
    const float value = exp_nonpositive(x[k] - shift);
    if constexpr (kStore) e[k] = value;
    sum += value;
  }
  return sum;
}

inline void scale_shift(const float* e, float coef, float offset, float* out, int64_t len) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) out[k] = e[k] * coef - offset;
}
#endif

// fp32 logits are read in place; narrower ones are widened into `buffer` once per chunk.
inline const float* chunk_as_f32(const float* chunk, int64_t, float*) { return chunk; }
template <typename Logit>
inline const float* chunk_as_f32(const Logit* chunk, int64_t len, float* buffer) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) buffer[k] = to_f32(chunk[k]);
  return buffer;
}

}  // namespace fastcls
