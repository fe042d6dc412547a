// The forward and the backward of a BERT-family encoder layer over packed rows (fastcls/ops/encoder_layer.py), each
// as one call: the kernels the layer's Python calls one by one (products, attention, LayerNorm, GELU, weight
// gradients) with the same arguments, so the bits are those of the Python. One call rather than some twenty
// because each call from Python costs tens of microseconds around the kernel on a CPU whose caches the kernels
// have just swept. The products are linear_bf16.h's: the avx512_bf16 variant only.
//
// The case it covers is a training step's: every parameter takes a gradient, the residual stream (the layer's
// input, its LayerNorms' outputs and their saved tensors) is fp32, the products' operands bf16, the biases and
// LayerNorm parameters fp32 or bf16. Shapes: T tokens, width d, feed-forward width F. With cls_index (each row's
// first token, [rows]; the [CLS]-only last layer) the keys and values come from every token and the queries, and
// all that follows attention, from those tokens alone: Q = rows query tokens, else Q = T.
#pragma once

#include <cstdint>

namespace fastcls {

struct EncoderLayerDropout {
  uint64_t seed, counter_offset, threshold;  // threshold 0: no dropout
  float scale;
};

struct EncoderLayerForward {
  int64_t tokens, width, ffn, rows, heads;
  // the input: fp32 h [T, d] (the residual) and its bf16 copy hb; int64 cu [rows + 1]; cls_index or null
  const float* h;
  const uint16_t* hb;
  const int64_t *cu, *cls_index;
  // the forward's packed weights (linear_pack_wt's layout: the stacked query/key/value product's, or with cls_index
  // the query's and in kv_packed the keys' and values'); the biases (query, key, value, attention output,
  // feed-forward in and out) in bias_dtype, the LayerNorms' weights and biases in norm_dtype (0 fp32, 1 bf16)
  const uint16_t *qkv_packed, *kv_packed, *attn_out_packed, *ffn_in_packed, *ffn_out_packed;
  const void *query_bias, *key_bias, *value_bias, *attn_out_bias, *ffn_in_bias, *ffn_out_bias;
  const void *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;
  int bias_dtype, norm_dtype;
  float attn_scale, ln1_eps, ln2_eps;
  EncoderLayerDropout attn_dropout, ln1_dropout, ln2_dropout;
  // outputs: bf16 qkv [T, 3d] (with cls_index: the keys and values [T, 2d], and the queries' input query_in and
  // the queries q [Q, d]), context [Q, d], f [Q, F], g_pairs (g pair-packed; from cpp.pairs_empty, its last
  // panel's columns past F zeroed already); fp32 lse [Q, heads]; fp32 h1 and h2 [Q, d], their pre-norm sums sum1
  // and sum2 (each null: not kept), means and rstds [Q], and their bf16 copies h1b and h2b [Q, d] (h2b null: not
  // written)
  uint16_t *qkv, *q, *query_in, *context, *f, *g_pairs, *h1b, *h2b;
  float *lse, *h1, *sum1, *mean1, *rstd1, *h2, *sum2, *mean2, *rstd2;
  // scratch of at least encoder_layer_forward_workspace bytes, 64-byte aligned
  void* workspace;
  int64_t workspace_bytes;
};

// The scratch bytes encoder_layer_forward needs for T tokens of `rows` rows, width d and feed-forward width F.
int64_t encoder_layer_forward_workspace(int64_t tokens, int64_t rows, int64_t width, int64_t ffn, bool cls_only);

void encoder_layer_forward(const EncoderLayerForward& args, int num_threads);

struct EncoderLayerBackward {
  int64_t tokens, width, ffn, rows, heads;
  // saved by the forward: bf16 hb [T, d] (the input), qkv [T, 3d] (with cls_index kv [T, 2d], and q and
  // query_in [Q, d]), context [Q, d], h1b [Q, d] (LN1's output), f [Q, F] (the GELU's input) and g_pairs (its output
  // pair-packed); fp32 lse [Q, heads], LayerNorm saves [Q, d] (output or pre-norm sum), means and rstds [Q]; int64
  // cu [rows + 1] and cls_index (or null)
  const uint16_t *hb, *qkv, *q, *query_in, *context, *h1b, *f, *g_pairs;
  const float *lse, *saved1, *mean1, *rstd1, *saved2, *mean2, *rstd2;
  const int64_t *cu, *cls_index;
  bool saved1_is_output, saved2_is_output;
  // the input gradients' packed weights (linear_pack_pairs's layout; with cls_index the query's, and in kv_packed
  // the keys' and values'); the GELU's bias [F] in bias_dtype and the LayerNorms' weights and biases [d] in
  // norm_dtype (dtype codes 0 fp32, 1 bf16)
  const uint16_t *qkv_packed, *kv_packed, *attn_out_packed, *ffn_in_packed, *ffn_out_packed;
  const void *ffn_in_bias, *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;
  int bias_dtype, norm_dtype;
  float attn_scale;
  EncoderLayerDropout attn_dropout, ln1_dropout, ln2_dropout;
  const float* grad_h2;  // the upstream gradient [T, d]
  // outputs: the input's gradient [T, d]; the weights' (bf16: [3d, d] (query, key, value), [d, d], [F, d],
  // [d, F]); one after the other the biases' in bias_dtype (the query's, key's and value's [3d], the attention
  // output's [d], the feed-forward products' [F] and [d]: the column sums rounded to bf16 first, as autocast's
  // are) and the LayerNorms' in norm_dtype (LN1's weight and bias, LN2's, [d] each)
  float* grad_h;
  uint16_t *qkv_grad, *attn_out_grad, *ffn_in_grad, *ffn_out_grad;
  void *bias_grads, *norm_grads;
  // scratch of at least encoder_layer_backward_workspace bytes, 64-byte aligned
  void* workspace;
  int64_t workspace_bytes;
};

// The scratch bytes encoder_layer_backward needs for T tokens of `rows` rows, width d, feed-forward width F and
// num_threads.
int64_t encoder_layer_backward_workspace(int64_t tokens, int64_t rows, int64_t width, int64_t ffn, bool cls_only,
                                         int num_threads);

void encoder_layer_backward(const EncoderLayerBackward& args, int num_threads);

}  // namespace fastcls
