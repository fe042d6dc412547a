// 16 fp32 lanes loaded from and stored to fp32 or bf16 (uint16_t bit patterns) memory, the lanes past the mask
// untouched: the AVX-512 loops of adamw.cpp, bias_gelu.cpp and linear_bf16.cpp share them.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

#include <cstdint>

namespace fastcls {

inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const uint16_t* p, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline void store16(float* p, __m512 value, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, value); }
// Round to nearest even, NaN kept quiet, exactly as f32_to_bf16 (bf16.h) does one element at a time (denormals kept,
// unlike vcvtneps2bf16).
inline __m256i bf16_bits16(__m512 value) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i high = _mm512_srli_epi32(bits, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(rounded);
}
inline void store16(uint16_t* p, __m512 value, __mmask16 mask) { _mm256_mask_storeu_epi16(p, mask, bf16_bits16(value)); }

}  // namespace fastcls
#endif
