// Philox4x32-10 bits for the mask-free dropout kernels (dropout.cpp, layer_norm.cpp): every C++ kernel draws
// exactly the words Triton's tl.randint4x(seed, counter) draws for an int64 counter (key words: the seed's low and
// high 32 bits; counter words: the counter's low and high 32 bits, 0, 0).
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastcls {

// One call draws the words of this many consecutive counters (4 words each). With AVX-512 that is four registers
// per Philox word: enough independent chains to keep the multipliers busy.
constexpr int64_t kPhiloxCounters = 32;

// Philox4x32-10 as triton/language/random.py runs it: each round multiplies counter words 0 and 2, then the key
// words take their Weyl increments.
constexpr uint32_t kRoundA = 0xD2511F53u;  // multiplies word 0
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // multiplies word 2
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;

struct PhiloxKey {
  uint32_t lo;
  uint32_t hi;
};

// philox_bits writes bits[4 * c + w] = word w of Philox at counter first_counter + c for c < kPhiloxCounters,
// which are the bits of the 4 * kPhiloxCounters elements from 4 * first_counter on; bits is 64-byte aligned.
#if defined(__AVX512F__)
// Each 64-bit lane carries one 32-bit Philox word in its low half. _mm512_mul_epu32 reads only low halves and
// returns the full 64-bit product, so the high half of a product is one shift away, its low half needs no
// masking, and the garbage the XORs leave in the upper halves never reaches a result.
constexpr int kPhiloxRegisters = kPhiloxCounters / 8;

// The 10 rounds over counters first_counter + 8 * r + lane; word w of the counter in lane l of register r ends in
// the low half of lane l of words[w][r].
inline void philox_rounds(uint64_t first_counter, PhiloxKey key, __m512i (&c0)[kPhiloxRegisters],
                          __m512i (&c1)[kPhiloxRegisters], __m512i (&c2)[kPhiloxRegisters],
                          __m512i (&c3)[kPhiloxRegisters]) {
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int r = 0; r < kPhiloxRegisters; ++r) {
    const __m512i counter = _mm512_add_epi64(_mm512_set1_epi64(int64_t(first_counter + 8 * r)), lane);
    c0[r] = counter;
    c1[r] = _mm512_srli_epi64(counter, 32);
    c2[r] = _mm512_setzero_si512();
    c3[r] = _mm512_setzero_si512();
  }
  const __m512i round_a = _mm512_set1_epi64(kRoundA);
  const __m512i round_b = _mm512_set1_epi64(kRoundB);
  uint32_t k0 = key.lo, k1 = key.hi;
  for (int round = 0; round < kRounds; ++round) {
    const __m512i key0 = _mm512_set1_epi64(k0);
    const __m512i key1 = _mm512_set1_epi64(k1);
    for (int r = 0; r < kPhiloxRegisters; ++r) {
      const __m512i product0 = _mm512_mul_epu32(c0[r], round_a);
      const __m512i product2 = _mm512_mul_epu32(c2[r], round_b);
      // 0x96 is the three-way XOR.
      c0[r] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(product2, 32), c1[r], key0, 0x96);
      c2[r] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(product0, 32), c3[r], key1, 0x96);
      c1[r] = product2;
      c3[r] = product0;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
  // Words 0 and 1 of a counter into one 64-bit lane (word 0 low), words 2 and 3 into another.
  for (int r = 0; r < kPhiloxRegisters; ++r) {
    c0[r] = _mm512_mask_shuffle_epi32(c0[r], 0xAAAA, c1[r], _MM_PERM_CCAA);
    c2[r] = _mm512_mask_shuffle_epi32(c2[r], 0xAAAA, c3[r], _MM_PERM_CCAA);
  }
}

inline void philox_bits(uint64_t first_counter, PhiloxKey key, uint32_t* bits) {
  __m512i words01[kPhiloxRegisters], words23[kPhiloxRegisters], unused1[kPhiloxRegisters],
      unused3[kPhiloxRegisters];
  philox_rounds(first_counter, key, words01, unused1, words23, unused3);
  // The lanes of 4 counters side by side: element order.
  const __m512i first_half = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i second_half = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  for (int r = 0; r < kPhiloxRegisters; ++r) {
    _mm512_store_si512(bits + 32 * r, _mm512_permutex2var_epi64(words01[r], first_half, words23[r]));
    _mm512_store_si512(bits + 32 * r + 16, _mm512_permutex2var_epi64(words01[r], second_half, words23[r]));
  }
}

#if defined(__BMI2__)
#define FASTCLS_PHILOX_KEEP_BITS 1
// The keep decisions of the same 4 * kPhiloxCounters elements as philox_bits, one bit each: bit b of keep[k] is
// (word of element 32 * k + b) >= bound, for k < kPhiloxRegisters. No words reach memory, and the comparison
// needs no reordering: a 32-bit compare of words01 gives elements 4c and 4c + 1 of counter c in bits 2c and
// 2c + 1, which pdep spreads to bits 4c and 4c + 1 (words23 likewise to 4c + 2 and 4c + 3).
inline void philox_keep_bits(uint64_t first_counter, PhiloxKey key, uint32_t bound, uint32_t* keep) {
  __m512i words01[kPhiloxRegisters], words23[kPhiloxRegisters], unused1[kPhiloxRegisters],
      unused3[kPhiloxRegisters];
  philox_rounds(first_counter, key, words01, unused1, words23, unused3);
  const __m512i threshold = _mm512_set1_epi32(int(bound));
  for (int r = 0; r < kPhiloxRegisters; ++r) {
    const uint32_t keep01 = _mm512_cmpge_epu32_mask(words01[r], threshold);
    const uint32_t keep23 = _mm512_cmpge_epu32_mask(words23[r], threshold);
    keep[r] = _pdep_u32(keep01, 0x33333333u) | _pdep_u32(keep23, 0xCCCCCCCCu);
  }
}
#endif
#else
inline void philox_bits(uint64_t first_counter, PhiloxKey key, uint32_t* bits) {
  for (int64_t c = 0; c < kPhiloxCounters; ++c) {
    const uint64_t counter = first_counter + uint64_t(c);
    uint32_t w0 = uint32_t(counter), w1 = uint32_t(counter >> 32), w2 = 0, w3 = 0;
    uint32_t k0 = key.lo, k1 = key.hi;
    for (int round = 0; round < kRounds; ++round) {
      const uint64_t product0 = uint64_t(kRoundA) * w0;
      const uint64_t product2 = uint64_t(kRoundB) * w2;
      w0 = uint32_t(product2 >> 32) ^ w1 ^ k0;
      w1 = uint32_t(product2);
      w2 = uint32_t(product0 >> 32) ^ w3 ^ k1;
      w3 = uint32_t(product0);
      k0 += kKeyA;
      k1 += kKeyB;
    }
    bits[4 * c] = w0;
    bits[4 * c + 1] = w1;
    bits[4 * c + 2] = w2;
    bits[4 * c + 3] = w3;
  }
}
#endif

}  // namespace fastcls
