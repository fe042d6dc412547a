// The forward and the backward of a BERT-family encoder layer over packed rows (fastcls/ops/encoder_layer.py), each
// as one call: the kernels the layer's Python calls one by one (products, attention, LayerNorm, GELU, weight
// gradients) with the same arguments, so the bits are those of the Python. One call rather than some twenty
// because each call from Python costs tens of microseconds around the kernel on a CPU whose caches the kernels
// have just swept. The products are linear_bf16.h's: the avx512_bf16 variant only.
//
// The case it covers is a training step's: every parameter takes a gradient, the residual stream (the layer's
// input, its LayerNorms' outputs and their saved tensors) is fp32, the products' operands and the weights bf16, the
// biases and LayerNorm parameters fp32 or bf16. Shapes: T tokens, width d, feed-forward width F.
#pragma once

#include <cstdint>

namespace fastcls {

struct EncoderLayerDropout {
  uint64_t seed, counter_offset, threshold;  // threshold 0: no dropout
  float scale;
};

struct EncoderLayerForward {
  int64_t tokens, width, ffn, rows, heads;
  // the input: fp32 h [T, d] (the residual) and its bf16 copy hb; int64 cu [rows + 1]
  const float* h;
  const uint16_t* hb;
  const int64_t* cu;
  // the forward's packed weights (linear_pack_wt's layout); the biases (query, key, value, attention output,
  // feed-forward in and out) in bias_dtype, the LayerNorms' weights and biases in norm_dtype (0 fp32, 1 bf16)
  const uint16_t *qkv_packed, *attn_out_packed, *ffn_in_packed, *ffn_out_packed;
  const void *query_bias, *key_bias, *value_bias, *attn_out_bias, *ffn_in_bias, *ffn_out_bias;
  const void *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;
  int bias_dtype, norm_dtype;
  float attn_scale, ln1_eps, ln2_eps;
  EncoderLayerDropout attn_dropout, ln1_dropout, ln2_dropout;
  // outputs: bf16 qkv [T, 3d], context [T, d], f [T, F], g_pairs (g pair-packed, its last panel's columns past F
  // zeroed); fp32 lse [T, heads]; fp32 h1 and h2 [T, d], their pre-norm sums sum1 and sum2 (each null: not kept),
  // means and rstds [T], and their bf16 copies h1b and h2b [T, d]
  uint16_t *qkv, *context, *f, *g_pairs, *h1b, *h2b;
  float *lse, *h1, *sum1, *mean1, *rstd1, *h2, *sum2, *mean2, *rstd2;
  // scratch of at least encoder_layer_forward_workspace bytes, 64-byte aligned
  void* workspace;
  int64_t workspace_bytes;
};

// The scratch bytes encoder_layer_forward needs for T tokens, width d and feed-forward width F.
int64_t encoder_layer_forward_workspace(int64_t tokens, int64_t width, int64_t ffn);

void encoder_layer_forward(const EncoderLayerForward& args, int num_threads);

struct EncoderLayerBackward {
  int64_t tokens, width, ffn, rows, heads;
  // saved by the forward: bf16 hb [T, d] (the input), qkv [T, 3d], context [T, d], h1b [T, d] (LN1's output),
  // f [T, F] (the GELU's input) and g_pairs (its output pair-packed); fp32 lse [T, heads], LayerNorm saves [T, d]
  // (output or pre-norm sum), means and rstds [T]; int64 cu [rows + 1]
  const uint16_t *hb, *qkv, *context, *h1b, *f, *g_pairs;
  const float *lse, *saved1, *mean1, *rstd1, *saved2, *mean2, *rstd2;
  const int64_t* cu;
  bool saved1_is_output, saved2_is_output;
  // the input gradients' packed weights (linear_pack_pairs's layout); the GELU's bias [F] in bias_dtype and the
  // LayerNorms' weights and biases [d] in norm_dtype (dtype codes 0 fp32, 1 bf16)
  const uint16_t *qkv_packed, *attn_out_packed, *ffn_in_packed, *ffn_out_packed;
  const void *ffn_in_bias, *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;
  int bias_dtype, norm_dtype;
  float attn_scale;
  EncoderLayerDropout attn_dropout, ln1_dropout, ln2_dropout;
  const float* grad_h2;  // the upstream gradient [T, d]
  // outputs: the input's gradient [T, d]; the weights' (bf16: [3d, d], [d, d], [F, d], [d, F]); one after the
  // other the biases' in bias_dtype (the stacked product's [3d], the attention output's [d], the feed-forward
  // products' [F] and [d]: the column sums rounded to bf16 first, as autocast's are) and the LayerNorms' in
  // norm_dtype (LN1's weight and bias, LN2's, [d] each)
  float* grad_h;
  uint16_t *qkv_grad, *attn_out_grad, *ffn_in_grad, *ffn_out_grad;
  void *bias_grads, *norm_grads;
  // scratch of at least encoder_layer_backward_workspace bytes, 64-byte aligned
  void* workspace;
  int64_t workspace_bytes;
};

// The scratch bytes encoder_layer_backward needs for T tokens, width d, feed-forward width F and num_threads.
int64_t encoder_layer_backward_workspace(int64_t tokens, int64_t width, int64_t ffn, int num_threads);

void encoder_layer_backward(const EncoderLayerBackward& args, int num_threads);

}  // namespace fastcls
