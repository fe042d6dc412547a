// Attention over packed (unpadded) sequences, with a mask-free dropout on the probabilities.
//
// Row r's queries are tokens cu_q[r]:cu_q[r + 1] of q [Tq, H, D] and its keys and values tokens cu_k[r]:cu_k[r + 1]
// of k and v [Tk, H, D]; each query attends to its own row's keys only: out = dropout(softmax(q k^T * scale)) v.
// q, k and v are read through their token and head strides (element stride 1), so the views of a stacked
// projection need no copy; out and grad_out are contiguous [T, H, D], and so are the gradients unless
// grad_token_stride (0: H * D) sets their token stride (a stacked [T, 3, H, D] gradient: 3 H D). lse [Tq, H]
// (fp32) is the log-sum-exp of each query's scaled scores: the backward recomputes the probabilities from it (no
// [L, L] tensor is kept).
//
// Dropout: the probability of (row r, head h, query i, key j) has the canonical index
// H * sum_{r' < r} Lq_r' * Lk_r' + (h * Lq_r + i) * Lk_r + j, and is kept iff word index % 4 of Philox4x32-10 at
// counter counter_offset + index / 4 (philox.h) is >= threshold (0: no dropout; 2^32 or more: all dropped); kept
// probabilities are multiplied by drop_scale. The backward redraws the same bits. Dtype code: 0 fp32, 1 bf16 (as
// uint16 bit patterns) for every tensor but lse; all arithmetic is fp32. Work is split over (row, head) pairs, so
// the key and value gradients need no atomics.
#pragma once

#include <cstdint>

namespace fastcls {

struct VarlenAttentionShape {
  const int64_t* cu_q;  // [rows + 1]
  const int64_t* cu_k;  // [rows + 1]
  int64_t rows, heads, head_dim;
  // token and head strides of q, k and v, in elements
  int64_t q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, v_head_stride;
};

struct VarlenAttentionDropout {
  uint64_t seed, counter_offset, threshold;
  float scale;
};

void varlen_attention_forward(const void* q, const void* k, const void* v, int dtype, const VarlenAttentionShape& shape,
                              float scale, const VarlenAttentionDropout& dropout, void* out, float* lse,
                              int num_threads);

void varlen_attention_backward(const void* q, const void* k, const void* v, int dtype,
                               const VarlenAttentionShape& shape, float scale, const VarlenAttentionDropout& dropout,
                               const void* grad_out, const float* lse, void* grad_q, void* grad_k, void* grad_v,
                               int64_t grad_token_stride, int num_threads);

}  // namespace fastcls
