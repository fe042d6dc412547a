// bf16 matrix products of a Linear layer, fp32 accumulation, on CPUs with AVX-512 BF16 (`vdpbf16ps`): the
// forward y = x W^T + b, the input gradient dx = dy W and the weight gradient dW = dy^T x.
//
// One register-blocked kernel (8 rows x 48 columns of fp32 accumulators) computes C[M, N] = A . B with B in
// "pair-packed" panels: Bp[p][kp][j][t] = B[2 kp + t][48 p + j] (bf16), so that one 64-byte load holds 16
// columns' pairs of reduction elements and one broadcast of A's pair (32 bits) feeds 16 multiply-add pairs.
// A's pair (i, kp) is the 32 bits at a32[i * row_stride + kp * pair_stride]: row_stride = K / 2 and pair_stride =
// 1 for a row-major A (x, dy), row_stride = 1 and pair_stride = rows for an A given as interleaved row pairs
// (interleave_row_pairs below: dy^T for the weight gradient, without a transpose).
//
// The packings are memory passes: a weight is packed once per optimizer step for the forward and once for the
// input gradient (fastcls/ops/linear.py caches them by the tensor's version), the weight gradient packs x and dy
// each call. Every reduction length is even; the last panel's columns past N are computed from whatever the
// padding holds and never stored. bf16 travels as uint16 bit patterns.
#pragma once

#include <cstdint>

namespace fastcls {

constexpr int64_t kLinearPanel = 48;

// C[M, N] = A . Bp (+ bias[n], fp32, may be null), written as bf16 (c_bf16) or fp32 (c_f32): exactly one non-null.
// With accumulate (c_f32 only), C rounded to bf16 is added to c_f32 instead: what adding a bf16 product to an
// fp32 tensor gives, without the product's own tensor.
void linear_bf16_gemm(const uint16_t* a, int64_t row_stride, int64_t pair_stride, const uint16_t* packed,
                      const float* bias, uint16_t* c_bf16, float* c_f32, bool accumulate, int64_t ldc, int64_t M,
                      int64_t N, int64_t K, int num_threads);
// Rows [row_offset, row_offset + rows) of a stacked weight W [N, K] (bf16 or fp32, rounded to nearest even) into
// the forward's B = W^T: packed[p][kp][j][t] = W[48 p + j][2 kp + t]. packed holds ceil(N / 48) * 48 * K. With
// pairs_out (else null), the same rows also go to the input gradient's pair-packed W, as linear_pack_pairs writes
// it for R = N rows and C = K columns, by cache-bypassing stores. row_offset is even.
void linear_pack_wt_bf16(const uint16_t* w, int64_t rows, int64_t row_offset, int64_t K, uint16_t* packed,
                         uint16_t* pairs_out, int64_t R, int num_threads);
void linear_pack_wt_f32(const float* w, int64_t rows, int64_t row_offset, int64_t K, uint16_t* packed,
                        uint16_t* pairs_out, int64_t R, int num_threads);
// Rows [row_offset, row_offset + rows) of B [R, C] (R even overall; bf16 or fp32) into the pair-packed panels
// with the reduction over B's rows: packed[p][rp][j][t] = B[2 rp + t][48 p + j]. packed holds
// ceil(C / 48) * 48 * R. The input gradient's W, and the weight gradient's x.
void linear_pack_pairs_bf16(const uint16_t* b, int64_t ld, int64_t rows, int64_t row_offset, int64_t R, int64_t C,
                            uint16_t* packed, int num_threads);
void linear_pack_pairs_f32(const float* b, int64_t ld, int64_t rows, int64_t row_offset, int64_t R, int64_t C,
                           uint16_t* packed, int num_threads);
// out[rp][c][t] = in[2 rp + t][c] (zero where 2 rp + t >= R), in [R, C] with row stride ld: dy as the weight
// gradient's A (pair_stride = C, row_stride = 1). out holds ceil(R / 2) * 2 * C. col_sums (fp32 [C], or null)
// gets in's column sums from the same read: the bias gradient.
void linear_interleave_row_pairs(const uint16_t* in, int64_t ld, int64_t R, int64_t C, uint16_t* out,
                                 float* col_sums, int num_threads);

}  // namespace fastcls
