// Dropout that stores no mask: out[i] = keep(i) ? x[i] * scale : 0 over n contiguous elements.
//
// keep(i) is a pure function of (seed, threshold, i), so the backward pass is this same kernel applied to the
// upstream gradient with the same arguments. The bits are Philox4x32-10 exactly as Triton's
// tl.randint4x(seed, counter) draws them for an int64 counter: key words (low, high 32 bits of seed), counter words
// (low, high 32 bits of counter, 0, 0). Element i reads word i % 4 of counter counter_offset + i / 4 (the offset
// places the call in a generator's stream; 0 for a plain seed) and is kept iff that word is
// >= threshold, so a threshold of round(p * 2^32) drops a fraction within 2^-33 of p. threshold 0 keeps every
// element without drawing bits; 2^32 or more drops every element. bf16 is passed as its uint16 bit patterns; the
// product is formed in fp32 and rounded to nearest even. A dropped NaN or infinity becomes 0.
#pragma once

#include <cstdint>

namespace fastcls {

void dropout_f32(const float* x, float* out, int64_t n, uint64_t seed, uint64_t counter_offset, uint64_t threshold,
                 float scale, int num_threads);
void dropout_bf16(const uint16_t* x, uint16_t* out, int64_t n, uint64_t seed, uint64_t counter_offset,
                  uint64_t threshold, float scale, int num_threads);

}  // namespace fastcls
