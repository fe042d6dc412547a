#include "dropout.h"

#include "bf16.h"
#include "philox.h"

#include <algorithm>
#include <cstring>

namespace fastcls {
namespace {

// One step draws the bits of kStep consecutive elements from kCounters consecutive counters (philox.h).
constexpr int64_t kCounters = kPhiloxCounters;
constexpr int64_t kStep = 4 * kCounters;

// Each thread takes one contiguous range, cut on step boundaries so that it starts on a counter boundary: every
// element costs the same, so an even static split balances the threads, and it measured faster than dynamic
// scheduling on small inputs. A thread gets at least this many elements (several microseconds of work); smaller
// inputs use fewer threads, since waking one would cost more than it saves.
constexpr int64_t kMinElementsPerThread = 16384;

constexpr uint64_t kDropAll = uint64_t(1) << 32;

template <typename Element>
void dropout_task(const Element* x, Element* out, int64_t begin, int64_t end, PhiloxKey key, uint64_t counter_offset,
                  uint64_t threshold, float scale) {
  if (threshold >= kDropAll) {
    std::fill(out + begin, out + end, from_f32<Element>(0.0f));
    return;
  }
  if (threshold == 0) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) out[i] = from_f32<Element>(to_f32(x[i]) * scale);
    return;
  }
  const uint32_t bound = uint32_t(threshold);
  alignas(64) uint32_t bits[kStep];
  for (int64_t start = begin; start < end; start += kStep) {
    philox_bits(counter_offset + uint64_t(start) / 4, key, bits);
    const Element* xs = x + start;
    Element* os = out + start;
    const int64_t len = std::min(kStep, end - start);
    // A select rather than a multiply by 0, so that a dropped NaN or infinity becomes 0.
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) os[k] = from_f32<Element>(bits[k] >= bound ? to_f32(xs[k]) * scale : 0.0f);
  }
}

template <typename Element>
void dropout(const Element* x, Element* out, int64_t n, uint64_t seed, uint64_t counter_offset, uint64_t threshold,
             float scale, int num_threads) {
  const PhiloxKey key{uint32_t(seed), uint32_t(seed >> 32)};
  const int64_t n_steps = (n + kStep - 1) / kStep;
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(num_threads, n / kMinElementsPerThread));
#pragma omp parallel for num_threads(int(n_tasks)) schedule(static) if (n_tasks > 1)
  for (int64_t task = 0; task < n_tasks; ++task) {
    const int64_t begin = std::min(n, task * n_steps / n_tasks * kStep);
    const int64_t end = std::min(n, (task + 1) * n_steps / n_tasks * kStep);
    dropout_task(x, out, begin, end, key, counter_offset, threshold, scale);
  }
}

}  // namespace

void dropout_f32(const float* x, float* out, int64_t n, uint64_t seed, uint64_t counter_offset, uint64_t threshold,
                 float scale, int num_threads) {
  dropout(x, out, n, seed, counter_offset, threshold, scale, num_threads);
}

void dropout_bf16(const uint16_t* x, uint16_t* out, int64_t n, uint64_t seed, uint64_t counter_offset,
                  uint64_t threshold, float scale, int num_threads) {
  dropout(x, out, n, seed, counter_offset, threshold, scale, num_threads);
}

}  // namespace fastcls
