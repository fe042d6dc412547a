#include "cross_entropy.h"

#include "bf16.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace fastcls {
namespace {

// A row is walked in chunks small enough to stay in L1: each chunk is read from memory once, its max taken, and
// its exponentials summed against the updated running max. That is online softmax at chunk granularity, with
// one exp per element instead of the two that a per-element running max needs.
constexpr int64_t kChunk = 1024;

// Threads take rows in batches of about this many logits: dynamic scheduling keeps both cores busy when one is
// shared with another process or skips ignored rows, and batching keeps its overhead negligible for narrow rows.
constexpr int64_t kLogitsPerTask = 32768;

inline int64_t rows_per_task(int64_t n_classes) {
  return std::max<int64_t>(1, kLogitsPerTask / std::max<int64_t>(1, n_classes));
}

// exp(x) for x <= 0 (every exponent in softmax is relative to a max or to the logsumexp), within about 1 ulp:
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

// fp32 logits are read in place; bf16 ones are widened into `buffer` once per chunk.
inline const float* chunk_as_f32(const float* chunk, int64_t, float*) { return chunk; }
inline const float* chunk_as_f32(const uint16_t* chunk, int64_t len, float* buffer) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) buffer[k] = bf16_to_f32(chunk[k]);
  return buffer;
}

struct SoftmaxStats {
  float max;
  float sum;  // sum_k exp(x_k - max), at least 1 for a finite row
};

template <typename Logit>
SoftmaxStats softmax_stats(const Logit* row, int64_t n_classes) {
  alignas(64) float buffer[kChunk];
  SoftmaxStats stats{-std::numeric_limits<float>::infinity(), 0.0f};
  for (int64_t start = 0; start < n_classes; start += kChunk) {
    const int64_t len = std::min(kChunk, n_classes - start);
    const float* x = chunk_as_f32(row + start, len, buffer);
    float chunk_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : chunk_max)
    for (int64_t k = 0; k < len; ++k) chunk_max = x[k] > chunk_max ? x[k] : chunk_max;
    const float new_max = std::max(stats.max, chunk_max);
    float chunk_sum = 0.0f;
#pragma omp simd reduction(+ : chunk_sum)
    for (int64_t k = 0; k < len; ++k) chunk_sum += exp_nonpositive(x[k] - new_max);
    stats.sum = stats.sum * exp_nonpositive(stats.max - new_max) + chunk_sum;
    stats.max = new_max;
  }
  return stats;
}

inline bool target_in_range(int64_t target, int64_t n_classes) { return target >= 0 && target < n_classes; }

void throw_if_bad_row(const char* op, int64_t bad_row, int64_t n_rows, const int64_t* target, int64_t n_classes,
                      int64_t ignore_index) {
  if (bad_row == n_rows) return;
  throw std::out_of_range(std::string(op) + ": target " + std::to_string(target[bad_row]) + " in row " +
                          std::to_string(bad_row) + " is outside [0, " + std::to_string(n_classes) +
                          ") and is not ignore_index (" + std::to_string(ignore_index) + ")");
}

template <typename Logit>
void forward(const Logit* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride, const int64_t* target,
             int64_t ignore_index, float* loss, float* lse, int num_threads) {
  // Throwing inside the parallel region would terminate the process, so the first bad row is only recorded.
  int64_t first_bad_row = n_rows;
  const int64_t task_rows = rows_per_task(n_classes);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, task_rows) reduction(min : first_bad_row)
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t t = target[i];
    if (t == ignore_index || !target_in_range(t, n_classes)) {
      if (t != ignore_index) first_bad_row = std::min(first_bad_row, i);
      loss[i] = 0.0f;
      lse[i] = 0.0f;
      continue;
    }
    const Logit* row = logits + i * row_stride;
    const SoftmaxStats stats = softmax_stats(row, n_classes);
    const float log_sum = std::log(stats.sum);
    lse[i] = stats.max + log_sum;
    // Summed in this order, a confident row's small loss does not cancel away as lse - x_t would.
    loss[i] = (stats.max - to_f32(row[t])) + log_sum;
  }
  throw_if_bad_row("cross_entropy", first_bad_row, n_rows, target, n_classes, ignore_index);
}

template <typename Logit>
void backward(const Logit* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride, const int64_t* target,
              int64_t ignore_index, const float* lse, const float* scale, Logit* grad, int num_threads) {
  // The forward has already rejected bad targets; checking again keeps this entry point from writing out of bounds.
  int64_t first_bad_row = n_rows;
  const int64_t task_rows = rows_per_task(n_classes);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, task_rows) reduction(min : first_bad_row)
  for (int64_t i = 0; i < n_rows; ++i) {
    Logit* grad_row = grad + i * n_classes;
    const int64_t t = target[i];
    if (t == ignore_index || !target_in_range(t, n_classes)) {
      if (t != ignore_index) first_bad_row = std::min(first_bad_row, i);
      std::fill(grad_row, grad_row + n_classes, from_f32<Logit>(0.0f));
      continue;
    }
    const Logit* row = logits + i * row_stride;
    const float row_lse = lse[i];
    const float row_scale = scale[i];
#pragma omp simd
    for (int64_t k = 0; k < n_classes; ++k)
      grad_row[k] = from_f32<Logit>(row_scale * exp_nonpositive(to_f32(row[k]) - row_lse));
    // The -1 goes in before rounding, so a bf16 target gradient is the rounded exact value.
    grad_row[t] = from_f32<Logit>(row_scale * (exp_nonpositive(to_f32(row[t]) - row_lse) - 1.0f));
  }
  throw_if_bad_row("cross_entropy backward", first_bad_row, n_rows, target, n_classes, ignore_index);
}

}  // namespace

void cross_entropy_forward_f32(const float* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                               const int64_t* target, int64_t ignore_index, float* loss, float* lse,
                               int num_threads) {
  forward(logits, n_rows, n_classes, row_stride, target, ignore_index, loss, lse, num_threads);
}

void cross_entropy_forward_bf16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                const int64_t* target, int64_t ignore_index, float* loss, float* lse,
                                int num_threads) {
  forward(logits, n_rows, n_classes, row_stride, target, ignore_index, loss, lse, num_threads);
}

void cross_entropy_backward_f32(const float* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                const int64_t* target, int64_t ignore_index, const float* lse, const float* scale,
                                float* grad, int num_threads) {
  backward(logits, n_rows, n_classes, row_stride, target, ignore_index, lse, scale, grad, num_threads);
}

void cross_entropy_backward_bf16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                 const int64_t* target, int64_t ignore_index, const float* lse,
                                 const float* scale, uint16_t* grad, int num_threads) {
  backward(logits, n_rows, n_classes, row_stride, target, ignore_index, lse, scale, grad, num_threads);
}

}  // namespace fastcls
