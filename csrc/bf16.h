#pragma once
// bf16 travels as its uint16_t bit pattern: the kernels widen it to fp32 for all arithmetic and round once on
// the way out, so one templated loop serves fp32 (float) and bf16 (uint16_t) tensors.

#include <cstdint>
#include <cstring>

namespace fastcls {

inline float bf16_to_f32(uint16_t bits) {
  const uint32_t widened = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof value);
  return value;
}

// Round to nearest even. The rounding carry would turn a NaN with low payload bits into infinity, so NaN keeps
// its top bits and is made quiet instead.
inline uint16_t f32_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return uint16_t((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float to_f32(float value) { return value; }
inline float to_f32(uint16_t bits) { return bf16_to_f32(bits); }

template <typename Element>
Element from_f32(float value);
template <>
inline float from_f32<float>(float value) { return value; }
template <>
inline uint16_t from_f32<uint16_t>(float value) { return f32_to_bf16(value); }

}  // namespace fastcls
