#pragma once
// The 16-bit floats travel as their uint16_t bit patterns: the kernels widen them to fp32 for all arithmetic and
// round once on the way out, so one templated loop serves fp32 (float) and bf16 (uint16_t) tensors; fp16 takes
// the Half tag where a kernel serves it too.

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastcls {

inline float bits_to_f32(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
inline uint32_t f32_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bf16_to_f32(uint16_t bits) { return bits_to_f32(uint32_t(bits) << 16); }

// Round to nearest even. The rounding carry would turn a NaN with low payload bits into infinity, so NaN keeps
// its top bits and is made quiet instead.
inline uint16_t f32_to_bf16(float value) {
  const uint32_t bits = f32_to_bits(value);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return uint16_t((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// fp16 travels as uint16 bit patterns like bf16; this tag keeps the two apart in the templates.
struct Half {
  uint16_t bits;
};

// IEEE half <-> float without _Float16 (which older compilers lack): F16C where the build has it, else the bit
// manipulations of Maratyszcza's FP16 library (round to nearest even, NaN kept quiet).
inline float half_to_f32(uint16_t half) {
#if defined(__F16C__)
  return _cvtsh_ss(half);
#else
  const uint32_t sign = uint32_t(half & 0x8000u) << 16;
  const uint32_t two_w = uint32_t(half) << 17;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_to_f32(sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized)));
#endif
}

inline uint16_t f32_to_half(float value) {
#if defined(__F16C__)
  return _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  float base = (std::fabs(value) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(value);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

inline float to_f32(float value) { return value; }
inline float to_f32(uint16_t bits) { return bf16_to_f32(bits); }
inline float to_f32(Half half) { return half_to_f32(half.bits); }

template <typename Element>
Element from_f32(float value);
template <>
inline float from_f32<float>(float value) { return value; }
template <>
inline uint16_t from_f32<uint16_t>(float value) { return f32_to_bf16(value); }
template <>
inline Half from_f32<Half>(float value) { return Half{f32_to_half(value)}; }

}  // namespace fastcls
