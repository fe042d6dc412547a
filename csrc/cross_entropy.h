// Softmax cross-entropy with class-index targets over the rows of logits[n_rows, n_classes], with the options of
// torch.nn.functional.cross_entropy: class weights, ignore_index, label smoothing.
//
// Logits have class stride 1 and rows `row_stride` elements apart; bf16 and fp16 logits are passed as their
// uint16 bit patterns. Math is fp32 throughout. With w the class weights (all 1 without them), eps the label
// smoothing, t the row's target and lse its logsumexp, a kept row's loss is
//     (1 - eps) * w[t] * (lse - x[t]) + (eps / K) * sum_k w[k] * (lse - x[k])
// and its gradient with respect to x[k]
//     grad_scale * (((1 - eps) * w[t] + (eps / K) * sum(w)) * softmax(x)[k] - (1 - eps) * w[t] * [k == t] - (eps / K) * w[k]).
// A row whose target is ignore_index has loss 0 and gradient 0.
#pragma once

#include <cstdint>

namespace fastcls {

// Checks every target: one that is neither ignore_index nor in [0, n_classes) throws std::out_of_range naming
// its row (pybind11 raises IndexError). Writes the sum of w[target] over the kept rows (the divisor of a "mean"
// reduction) and the number of kept rows. `class_weight` may be null (every weight 1).
void cross_entropy_target_summary(const int64_t* target, int64_t n_rows, int64_t n_classes, int64_t ignore_index,
                                  const float* class_weight, double* weight_sum, int64_t* kept_rows);

// Writes the per-row loss into loss[n_rows] (fp32) and, unless `grad` is null, the gradient scaled by
// `grad_scale` into grad (rows `grad_row_stride` elements apart, the logits' dtype) in the same pass over the
// logits: each row is read from memory once and its gradient written once. `grad` may be the logits themselves
// (a row is read in full before its gradient is written). Rows with an out-of-range target are treated as
// ignored here; cross_entropy_target_summary is where they are reported.
void cross_entropy_rows_f32(const float* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                            const int64_t* target, int64_t ignore_index, const float* class_weight,
                            float label_smoothing, float* loss, float* grad, int64_t grad_row_stride,
                            float grad_scale, int num_threads);
void cross_entropy_rows_bf16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                             const int64_t* target, int64_t ignore_index, const float* class_weight,
                             float label_smoothing, float* loss, uint16_t* grad, int64_t grad_row_stride,
                             float grad_scale, int num_threads);
void cross_entropy_rows_f16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                            const int64_t* target, int64_t ignore_index, const float* class_weight,
                            float label_smoothing, float* loss, uint16_t* grad, int64_t grad_row_stride,
                            float grad_scale, int num_threads);

}  // namespace fastcls
