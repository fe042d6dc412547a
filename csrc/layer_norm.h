// LayerNorm over the last dimension of contiguous [n_rows, n_cols] tensors, fused with a mask-free dropout either
// before a residual add (out = LayerNorm(dropout(x) + residual)) or after the norm (out = dropout(LayerNorm(x))).
//
// Element i = row * n_cols + col is kept iff word i % 4 of Philox4x32-10 at counter counter_offset + i / 4
// (philox.h; counter_offset places the call in a generator's stream, 0 for a plain seed) is
// >= threshold (1 <= threshold < 2^32; 0 means no dropout); kept elements are multiplied by scale. The backward
// redraws the same bits. Dtype codes: 0 fp32, 1 bf16 (bf16 as uint16 bit patterns); all math is fp32, and
// weight and bias are fp32. residual, sum and grad_sum may be null (0). mean and rstd are fp32 per row. out_bf16
// (null: none) receives out rounded to bf16 (round to nearest even; with AVX512-BF16, fp32 subnormals flush to 0),
// the copy a bf16 product reads, written in the pass that writes out.
//
// The backward reads xhat either from the saved output y ((y - bias) / weight; every weight nonzero) or from the
// saved pre-norm sum s ((s - mean) * rstd); grad_out, saved and grad_sum share saved_dtype. Thread t (of
// num_threads) writes its column sums of grad_out * xhat and grad_out into row t of grad_weight_partial and
// grad_bias_partial ([num_threads, n_cols] fp32 each, rows of idle threads zeroed); the caller sums the rows.
#pragma once

#include <cstdint>

namespace fastcls {

void layer_norm_forward(const void* x, int x_dtype, const void* residual, int residual_dtype, const float* weight,
                        const float* bias, void* out, void* sum, int out_dtype, void* out_bf16, float* mean,
                        float* rstd, int64_t n_rows, int64_t n_cols, float eps, uint64_t seed, uint64_t counter_offset,
                        uint64_t threshold, float scale, bool dropout_after, int num_threads);

void layer_norm_backward(const void* grad_out, const void* saved, int saved_dtype, bool saved_is_output,
                         const float* weight, const float* bias, const float* mean, const float* rstd,
                         const void* grad_sum, void* grad_x, int x_dtype, void* grad_residual, int residual_dtype,
                         float* grad_weight_partial, float* grad_bias_partial, int64_t n_rows, int64_t n_cols,
                         uint64_t seed, uint64_t counter_offset, uint64_t threshold, float scale,
                         bool dropout_after, int num_threads);

// Whether every column has weight != 0, |bias| <= max_bias_over_weight * |weight| (in fp32) and a finite weight:
// where the backward may recover xhat from the output (fastcls.ops.layer_norm_recovery). weight and bias share
// dtype (0 fp32, 1 bf16) and hold n contiguous elements.
bool layer_norm_output_recovers(const void* weight, const void* bias, int dtype, int64_t n,
                                float max_bias_over_weight);

}  // namespace fastcls
