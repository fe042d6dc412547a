// GELU (the erf form, torch's approximate="none") of x + bias over contiguous rows, forward and backward, for the
// feed-forward block of BERT-family encoders: out = gelu(x + bias) where x is the product without its bias.
//
// t = x + bias and everything after it are fp32 (t is never rounded to x's dtype), rounded once on the way out.
// erf is a rational approximation and exp a polynomial one (bias_gelu.cpp), each within a few fp32 ulps.
// The backward recomputes t from the saved x and bias: grad_x = grad_out * gelu'(t), rounded to x's dtype, and
// grad_bias (fp32, n_cols) = the column sums of the unrounded grad_x. bias may be null (no bias: t = x, and
// grad_bias is not written). bf16 travels as uint16 bit patterns.
//
// pairs (null: none) also receives the output (the forward's out, the backward's grad_x) in bf16 in a layout of
// the weight gradient's product (linear_bf16.h), from the rows while they are in cache: pairs_layout 1, rows
// interleaved in pairs (what linear_interleave_row_pairs writes: grad_x as dW's A); 2, pair-packed 48-column
// panels (what linear_pack_pairs writes: out as dW's x; columns past n_cols in the last panel are not written).
#pragma once

#include <cstdint>

namespace fastcls {

void bias_gelu_forward_f32(const float* x, const float* bias, float* out, uint16_t* pairs, int pairs_layout,
                           int64_t n_rows, int64_t n_cols, int num_threads);
void bias_gelu_forward_bf16(const uint16_t* x, const float* bias, uint16_t* out, uint16_t* pairs, int pairs_layout,
                            int64_t n_rows, int64_t n_cols, int num_threads);
void bias_gelu_backward_f32(const float* grad_out, const float* x, const float* bias, float* grad_x,
                            float* grad_bias, uint16_t* pairs, int pairs_layout, int64_t n_rows, int64_t n_cols,
                            int num_threads);
void bias_gelu_backward_bf16(const uint16_t* grad_out, const uint16_t* x, const float* bias, uint16_t* grad_x,
                             float* grad_bias, uint16_t* pairs, int pairs_layout, int64_t n_rows, int64_t n_cols,
                             int num_threads);

}  // namespace fastcls
