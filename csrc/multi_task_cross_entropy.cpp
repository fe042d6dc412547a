// The multi-task cross-entropy kernel: one pass over the rows, each row's task segments in turn.
#include "multi_task_cross_entropy.h"

#include "bf16.h"
#include "softmax.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastcls {
namespace {

// Below this many logits one thread does it all: a multi-task head's rows are a few dozen logits wide, and
// waking a second thread costs more than a small batch's whole pass.
constexpr int64_t kLogitsPerThread = 32768;

// The segments must follow each other from class 0 to the row's end: anything else would read past a row.
void check_segments(const int64_t* offsets, const int64_t* sizes, int64_t n_tasks, int64_t n_classes) {
  int64_t end = 0;
  for (int64_t t = 0; t < n_tasks; ++t) {
    if (offsets[t] != end || sizes[t] < 1)
      throw std::invalid_argument("multi_task_cross_entropy: segment " + std::to_string(t) + " (offset " +
                                  std::to_string(offsets[t]) + ", " + std::to_string(sizes[t]) +
                                  " classes) does not follow the previous one");
    end += sizes[t];
  }
  if (end != n_classes)
    throw std::invalid_argument("multi_task_cross_entropy: the segments cover " + std::to_string(end) +
                                " classes, the logits have " + std::to_string(n_classes));
}

void check_targets(const int64_t* targets, int64_t n_rows, int64_t n_tasks, const int64_t* sizes,
                   int64_t ignore_index) {
  for (int64_t i = 0; i < n_rows; ++i) {
    for (int64_t t = 0; t < n_tasks; ++t) {
      const int64_t y = targets[i * n_tasks + t];
      if (y != ignore_index && (y < 0 || y >= sizes[t]))
        throw std::out_of_range("multi_task_cross_entropy: target " + std::to_string(y) + " in row " +
                                std::to_string(i) + " of task " + std::to_string(t) + " is outside [0, " +
                                std::to_string(sizes[t]) + ") and is not ignore_index (" +
                                std::to_string(ignore_index) + ")");
    }
  }
}

// One kept segment's loss; unless `grad` is null, writes scale * (softmax - onehot) there. `widened` and `exps`
// hold at least `len` floats.
template <typename Logit>
float segment(const Logit* x_in, int64_t len, int64_t y, float scale, Logit* grad, float* widened, float* exps) {
  const float* x = chunk_as_f32(x_in, len, widened);
  const float max = max_of(x, len);
  const float shift = max == kNegInf ? 0.0f : max;  // a segment of -inf logits: exponentials 0, not NaN
  // Summed in this order, a confident row's small loss does not cancel away as lse - x_y would.
  if (grad == nullptr) return (max - x[y]) + std::log(sum_exp<false>(x, shift, nullptr, len));
  const float sum = sum_exp<true>(x, shift, exps, len);
  const float loss = (max - x[y]) + std::log(sum);
  scale_shift(exps, scale / sum, 0.0f, exps, len);
  exps[y] -= scale;  // before rounding, so a bf16/fp16 target gradient is the rounded exact value
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) grad[k] = from_f32<Logit>(exps[k]);
  return loss;
}

template <typename Logit>
void run(const Logit* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride, const int64_t* targets,
         int64_t n_tasks, const int64_t* segments, int64_t ignore_index, const float* task_scale,
         float* task_loss_sums, float* loss, Logit* grad, int64_t grad_row_stride, int num_threads) {
  const int64_t* offsets = segments;
  const int64_t* sizes = segments + n_tasks;
  check_segments(offsets, sizes, n_tasks, n_classes);
  check_targets(targets, n_rows, n_tasks, sizes, ignore_index);
  const int64_t widest = *std::max_element(sizes, sizes + n_tasks);
  // One loss per (row, task), summed per task afterwards in a fixed order: the result does not depend on the
  // thread count.
  std::vector<float> losses(size_t(n_rows * n_tasks));
  const int threads = n_rows * n_classes >= kLogitsPerThread ? num_threads : 1;
#pragma omp parallel num_threads(threads)
  {
    std::unique_ptr<float[]> widened(new float[widest]), exps(new float[widest]);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n_rows; ++i) {
      const Logit* row = logits + i * row_stride;
      Logit* grad_row = grad != nullptr ? grad + i * grad_row_stride : nullptr;
      for (int64_t t = 0; t < n_tasks; ++t) {
        const int64_t y = targets[i * n_tasks + t];
        Logit* grad_segment = grad_row != nullptr ? grad_row + offsets[t] : nullptr;
        if (y == ignore_index) {
          losses[i * n_tasks + t] = 0.0f;
          if (grad_segment != nullptr) std::fill(grad_segment, grad_segment + sizes[t], from_f32<Logit>(0.0f));
          continue;
        }
        losses[i * n_tasks + t] = segment(row + offsets[t], sizes[t], y, task_scale[t], grad_segment,
                                          widened.get(), exps.get());
      }
    }
  }
  double total = 0.0;
  for (int64_t t = 0; t < n_tasks; ++t) {
    double sum = 0.0;
    for (int64_t i = 0; i < n_rows; ++i) sum += losses[i * n_tasks + t];
    task_loss_sums[t] = float(sum);
    total += double(task_scale[t]) * sum;
  }
  *loss = float(total);
}

}  // namespace

void multi_task_cross_entropy_f32(const float* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                  const int64_t* targets, int64_t n_tasks, const int64_t* segments,
                                  int64_t ignore_index, const float* task_scale, float* task_loss_sums, float* loss,
                                  float* grad, int64_t grad_row_stride, int num_threads) {
  run(logits, n_rows, n_classes, row_stride, targets, n_tasks, segments, ignore_index, task_scale, task_loss_sums,
      loss, grad, grad_row_stride, num_threads);
}

void multi_task_cross_entropy_bf16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                   const int64_t* targets, int64_t n_tasks, const int64_t* segments,
                                   int64_t ignore_index, const float* task_scale, float* task_loss_sums,
                                   float* loss, uint16_t* grad, int64_t grad_row_stride, int num_threads) {
  run(logits, n_rows, n_classes, row_stride, targets, n_tasks, segments, ignore_index, task_scale, task_loss_sums,
      loss, grad, grad_row_stride, num_threads);
}

void multi_task_cross_entropy_f16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                  const int64_t* targets, int64_t n_tasks, const int64_t* segments,
                                  int64_t ignore_index, const float* task_scale, float* task_loss_sums,
                                  float* loss, uint16_t* grad, int64_t grad_row_stride, int num_threads) {
  static_assert(sizeof(Half) == sizeof(uint16_t), "fp16 logits are passed as uint16 bit patterns");
  run(reinterpret_cast<const Half*>(logits), n_rows, n_classes, row_stride, targets, n_tasks, segments, ignore_index,
      task_scale, task_loss_sums, loss, reinterpret_cast<Half*>(grad), grad_row_stride, num_threads);
}

}  // namespace fastcls
