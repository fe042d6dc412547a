// Softmax cross-entropy with class-index targets over the rows of logits[n_rows, n_classes].
//
// Logits have class stride 1 and rows `row_stride` elements apart; bf16 logits are passed as their uint16 bit
// patterns. Math is fp32 throughout. Rows whose target equals ignore_index are skipped: loss 0, lse 0, grad 0.
// A target that is neither ignore_index nor in [0, n_classes) throws std::out_of_range naming the first such row
// (pybind11 raises it as IndexError), after every other row has been processed.
#pragma once

#include <cstdint>

namespace fastcls {

// Writes loss[i] = logsumexp(x_i) - x_i[target_i] and lse[i] = logsumexp(x_i), both fp32, in one pass over x_i.
void cross_entropy_forward_f32(const float* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                               const int64_t* target, int64_t ignore_index, float* loss, float* lse,
                               int num_threads);
void cross_entropy_forward_bf16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                const int64_t* target, int64_t ignore_index, float* loss, float* lse,
                                int num_threads);

// Writes grad[i, k] = scale[i] * (exp(x_ik - lse[i]) - [k == target_i]) into a contiguous grad[n_rows, n_classes]
// of the logits' dtype. `lse` comes from the forward; `scale` is the per-row upstream gradient.
void cross_entropy_backward_f32(const float* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                const int64_t* target, int64_t ignore_index, const float* lse, const float* scale,
                                float* grad, int num_threads);
void cross_entropy_backward_bf16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                                 const int64_t* target, int64_t ignore_index, const float* lse,
                                 const float* scale, uint16_t* grad, int num_threads);

}  // namespace fastcls
