// Softmax cross-entropy of several classification tasks at once over logits[n_rows, sum_t K_t]: task t owns the
// class segment [offset_t, offset_t + K_t) of every row and the target column t of targets[n_rows, n_tasks]. With
// ignore_index marking a missing label,
//     task_loss_sums[t] = sum over rows r whose target y = targets[r, t] is kept of  lse(x_rt) - x_rt[y],
//     loss              = sum_t task_scale[t] * task_loss_sums[t],
// and the gradient of the loss with respect to a kept segment is task_scale[t] * (softmax(x_rt) - onehot(y)), 0 on
// a missing label's segment. Logits have class stride 1 and rows `row_stride` elements apart; bf16 and fp16 logits
// are passed as their uint16 bit patterns. Math is fp32, the sums are accumulated in fp64.
#pragma once

#include <cstdint>

namespace fastcls {

// Checks first, before anything is written, that `segments` tiles a row of n_classes logits (else
// std::invalid_argument, which pybind11 raises as ValueError) and that every target is ignore_index or in [0, K_t)
// (else std::out_of_range naming its row and task, which pybind11 raises as IndexError). Then writes
// task_loss_sums[n_tasks] and loss[1] (fp32) and, unless `grad` is null, the gradient into grad (rows
// `grad_row_stride` elements apart, the logits' dtype) in the same pass over the logits. `segments` holds the
// tasks' offsets, then their K_t (int64 [2, n_tasks]); `task_scale` is fp32 [n_tasks].
void multi_task_cross_entropy_f32(const float* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                  const int64_t* targets, int64_t n_tasks, const int64_t* segments,
                                  int64_t ignore_index, const float* task_scale, float* task_loss_sums, float* loss,
                                  float* grad, int64_t grad_row_stride, int num_threads);
void multi_task_cross_entropy_bf16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                   const int64_t* targets, int64_t n_tasks, const int64_t* segments,
                                   int64_t ignore_index, const float* task_scale, float* task_loss_sums,
                                   float* loss, uint16_t* grad, int64_t grad_row_stride, int num_threads);
void multi_task_cross_entropy_f16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                  const int64_t* targets, int64_t n_tasks, const int64_t* segments,
                                  int64_t ignore_index, const float* task_scale, float* task_loss_sums,
                                  float* loss, uint16_t* grad, int64_t grad_row_stride, int num_threads);

}  // namespace fastcls
