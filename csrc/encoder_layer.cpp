#include "encoder_layer.h"

#if defined(__AVX512BF16__)

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "bf16.h"
#include "bias_gelu.h"
#include "layer_norm.h"
#include "linear_bf16.h"
#include "varlen_attention.h"

namespace fastcls {
namespace {

constexpr int kBf16 = 1, kF32 = 0;  // layer_norm.h's dtype codes
constexpr int kRowPairs = 1, kPairPanels = 2;  // bias_gelu.h's pair layouts

// the small gradients: the biases' (3d, d, F, d), then the LayerNorms' (4 d)
int64_t small_count(int64_t d, int64_t ffn) { return 9 * d + ffn; }

int64_t pair_rows(int64_t tokens) { return (tokens + 1) / 2; }
int64_t panel_columns(int64_t columns) { return (columns + kLinearPanel - 1) / kLinearPanel * kLinearPanel; }

// Hands out 64-byte-aligned pieces of the workspace in a fixed order: the same walk sizes it and carves it. Pieces
// taken after a rewind to a mark overlay those taken since that mark (a later phase reuses an earlier one's).
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  T* take(int64_t count) {
    T* piece = reinterpret_cast<T*>(base_ + at_);
    at_ += (count * int64_t(sizeof(T)) + 63) / 64 * 64;
    used_ = std::max(used_, at_);
    return piece;
  }
  int64_t mark() const { return at_; }
  void rewind(int64_t mark) { at_ = mark; }
  int64_t used() const { return used_; }

 private:
  char* base_;
  int64_t at_ = 0, used_ = 0;
};

struct Scratch {
  uint16_t *grad_o, *grad_o_pairs, *grad_g, *grad_f, *grad_f_pairs, *h1b_packed;
  uint16_t *grad_a, *grad_a_pairs, *context_packed, *grad_context, *grad_qkv, *grad_qkv_pairs, *hb_packed;
  float *grad_h1, *partials;
  // fp32: the GELU's bias (rounded to bf16 as the product's bias is), the LayerNorms' parameters, and the
  // biases' and LayerNorms' gradients (bias_grads' order, then norm_grads') before their rounding
  float *ffn_in_bias, *norms, *sums;
  // with cls_index: the [CLS] rows' residual gradient, q's, k's and v's gradients (grad_qkv holds k's and v's side
  // by side, grad_qkv_pairs their row pairs), q's row pairs, the queries' input pair-packed, the keys' and values'
  // product's bf16 input gradient, and a query a row
  float* grad_residual;
  uint16_t *grad_q, *grad_k, *grad_v, *grad_q_pairs, *query_packed, *grad_h_bf16;
  int64_t* cu_q;
};

// Q: the query tokens (T, or the rows with cls_index)
Scratch carve(Carver& carver, int64_t tokens, int64_t Q, int64_t d, int64_t ffn, int64_t rows, bool cls_only,
              int num_threads) {
  const int64_t rows2 = 2 * pair_rows(Q);
  Scratch s{};
  s.grad_h1 = carver.take<float>(Q * d);
  s.partials = carver.take<float>(2 * int64_t(num_threads) * d);
  s.ffn_in_bias = carver.take<float>(ffn);
  s.norms = carver.take<float>(4 * d);
  s.sums = carver.take<float>(small_count(d, ffn));
  if (cls_only) s.grad_residual = carver.take<float>(Q * d);
  // the feed-forward block's, then (over them) the attention block's: LN1's backward starts the second phase
  const int64_t phase = carver.mark();
  s.grad_o = carver.take<uint16_t>(Q * d);
  s.grad_o_pairs = carver.take<uint16_t>(rows2 * d);
  s.grad_g = carver.take<uint16_t>(Q * ffn);
  s.grad_f = carver.take<uint16_t>(Q * ffn);
  s.grad_f_pairs = carver.take<uint16_t>(rows2 * ffn);
  s.h1b_packed = carver.take<uint16_t>(rows2 * panel_columns(d));
  carver.rewind(phase);
  const int64_t token_rows2 = 2 * pair_rows(tokens);
  s.grad_a = carver.take<uint16_t>(Q * d);
  s.grad_a_pairs = carver.take<uint16_t>(rows2 * d);
  s.context_packed = carver.take<uint16_t>(rows2 * panel_columns(d));
  s.grad_context = carver.take<uint16_t>(Q * d);
  s.grad_qkv = carver.take<uint16_t>(tokens * 3 * d);
  s.grad_qkv_pairs = carver.take<uint16_t>(token_rows2 * 3 * d);
  s.hb_packed = carver.take<uint16_t>(token_rows2 * panel_columns(d));
  if (cls_only) {
    s.grad_q = carver.take<uint16_t>(Q * d);
    s.grad_k = carver.take<uint16_t>(tokens * d);
    s.grad_v = carver.take<uint16_t>(tokens * d);
    s.grad_q_pairs = carver.take<uint16_t>(rows2 * d);
    s.query_packed = carver.take<uint16_t>(rows2 * panel_columns(d));
    s.grad_h_bf16 = carver.take<uint16_t>(tokens * d);
    s.cu_q = carver.take<int64_t>(rows + 1);
  }
  return s;
}

// n values of dtype code `dtype` (0 fp32, 1 bf16) as fp32, rounded to bf16 first where round_bf16.
void widen(const void* in, int dtype, bool round_bf16, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float value =
        dtype == kF32 ? static_cast<const float*>(in)[i] : bf16_to_f32(static_cast<const uint16_t*>(in)[i]);
    out[i] = round_bf16 ? bf16_to_f32(f32_to_bf16(value)) : value;
  }
}

// element i of an fp32 or bf16 (dtype code) array: value, rounded to nearest even in bf16
void store(float value, void* out, int dtype, int64_t i) {
  if (dtype == kF32)
    static_cast<float*>(out)[i] = value;
  else
    static_cast<uint16_t*>(out)[i] = f32_to_bf16(value);
}

// C[M, N] = A[M, K] . packed B (+ fp32 bias), A row-major: what fastcls.ops.cpp.linear_gemm runs (into fp32 c_add:
// added to it).
void product(const uint16_t* a, const uint16_t* packed, uint16_t* c, float* c_add, int64_t M, int64_t N, int64_t K,
             int num_threads, const float* bias = nullptr) {
  linear_bf16_gemm(a, K / 2, 1, packed, bias, c, c_add, c_add != nullptr, N, M, N, K, num_threads);
}

// x [T, C] pair-packed for a weight gradient, the last panel's columns past C (which the packing never writes)
// zeroed: cpp._pack_pairs's.
void pack_pairs(const uint16_t* x, int64_t tokens, int64_t columns, uint16_t* packed, int num_threads) {
  linear_pack_pairs_bf16(x, columns, tokens, 0, tokens, columns, packed, num_threads);
  const int64_t tail = columns % kLinearPanel, rows = pair_rows(tokens);
  if (tail == 0) return;
  uint16_t* last = packed + (panel_columns(columns) / kLinearPanel - 1) * rows * kLinearPanel * 2;
  for (int64_t r = 0; r < rows; ++r)
    std::memset(last + (r * kLinearPanel + tail) * 2, 0, (kLinearPanel - tail) * 2 * sizeof(uint16_t));
}

// dW [N, C] = grad_y^T x from grad_y's row pairs [T/2, N, 2] and x pair-packed: cpp.linear_weight_grad's product.
void weight_grad(const uint16_t* grad_y_pairs, const uint16_t* x_packed, uint16_t* out, int64_t tokens, int64_t N,
                 int64_t C, int num_threads) {
  linear_bf16_gemm(grad_y_pairs, 1, N, x_packed, nullptr, out, nullptr, false, C, N, C, 2 * pair_rows(tokens),
                   num_threads);
}

// grad_y's row pairs and its fp32 column sums, then dW: cpp.linear_weight_grad with its bias's sums.
void weight_and_bias_grad(const uint16_t* grad_y, uint16_t* grad_y_pairs, const uint16_t* x_packed, uint16_t* out,
                          float* sums, int64_t tokens, int64_t N, int64_t C, int num_threads) {
  linear_interleave_row_pairs(grad_y, N, tokens, N, grad_y_pairs, sums, num_threads);
  weight_grad(grad_y_pairs, x_packed, out, tokens, N, C, num_threads);
}

// The LayerNorm backward with the per-thread partial sums added in thread order, as torch's sum over them does.
void layer_norm_grads(const float* grad_out, const float* saved, bool saved_is_output, const float* weight,
                      const float* bias, const float* mean, const float* rstd, uint16_t* grad_x, float* grad_residual,
                      float* partials, float* weight_grad_out, float* bias_grad_out, int64_t tokens, int64_t d,
                      const EncoderLayerDropout& dropout, int num_threads) {
  float* weight_partials = partials;
  float* bias_partials = partials + int64_t(num_threads) * d;
  layer_norm_backward(grad_out, saved, kF32, saved_is_output, weight, bias, mean, rstd, nullptr, grad_x, kBf16,
                      grad_residual, kF32, weight_partials, bias_partials, tokens, d, dropout.seed,
                      dropout.counter_offset, dropout.threshold, dropout.scale, false, num_threads);
  for (int64_t c = 0; c < d; ++c) {
    float w = 0.0f, b = 0.0f;
    for (int t = 0; t < num_threads; ++t) {
      w += weight_partials[t * d + c];
      b += bias_partials[t * d + c];
    }
    weight_grad_out[c] = w;
    bias_grad_out[c] = b;
  }
}

struct ForwardScratch {
  uint16_t *a, *g, *o;
  float *biases, *norms;  // fp32: the biases rounded to bf16 (q, k, v, attention output, feed-forward), the norms
  float* residual;        // with cls_index: the [CLS] rows of h
  int64_t* cu_q;          // with cls_index: 0, 1, ..., rows (a query a row)
};

// Q: the query tokens (T, or the rows with cls_index)
ForwardScratch carve_forward(Carver& carver, int64_t Q, int64_t d, int64_t ffn, int64_t rows, bool cls_only) {
  ForwardScratch s;
  s.a = carver.take<uint16_t>(Q * d);
  s.g = carver.take<uint16_t>(Q * ffn);
  s.o = carver.take<uint16_t>(Q * d);
  s.biases = carver.take<float>(6 * d + ffn);
  s.norms = carver.take<float>(4 * d);
  s.residual = cls_only ? carver.take<float>(rows * d) : nullptr;
  s.cu_q = cls_only ? carver.take<int64_t>(rows + 1) : nullptr;
  return s;
}

void queries_per_row(int64_t* cu_q, int64_t rows) {
  for (int64_t r = 0; r <= rows; ++r) cu_q[r] = r;
}

// rows[r] = table[index[r]], rows of width d
template <typename T>
void gather_rows(const T* table, const int64_t* index, int64_t rows, int64_t d, T* out) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * d, table + index[r] * d, d * sizeof(T));
}

}  // namespace

int64_t encoder_layer_forward_workspace(int64_t tokens, int64_t rows, int64_t width, int64_t ffn, bool cls_only) {
  Carver carver(nullptr);
  carve_forward(carver, cls_only ? rows : tokens, width, ffn, rows, cls_only);
  return carver.used();
}

void encoder_layer_forward(const EncoderLayerForward& a, int num_threads) {
  const int64_t T = a.tokens, d = a.width, F = a.ffn, head_dim = a.width / a.heads;
  const bool cls_only = a.cls_index != nullptr;
  const int64_t Q = cls_only ? a.rows : T;
  if (a.workspace_bytes < encoder_layer_forward_workspace(T, a.rows, d, F, cls_only))
    throw std::invalid_argument("encoder_layer_forward: workspace too small");
  Carver carver(static_cast<char*>(a.workspace));
  const ForwardScratch s = carve_forward(carver, Q, d, F, a.rows, cls_only);
  // the products' biases as fastcls.ops.linear.product_bias gives them: rounded to bf16, in fp32
  const void* biases[6] = {a.query_bias, a.key_bias, a.value_bias, a.attn_out_bias, a.ffn_in_bias, a.ffn_out_bias};
  const int64_t sizes[6] = {d, d, d, d, F, d};
  float* at = s.biases;
  float* bias32[6];
  for (int i = 0; i < 6; ++i) {
    widen(biases[i], a.bias_dtype, true, at, sizes[i]);
    bias32[i] = at;
    at += sizes[i];
  }
  const void* norms[4] = {a.ln1_weight, a.ln1_bias, a.ln2_weight, a.ln2_bias};
  for (int i = 0; i < 4; ++i) widen(norms[i], a.norm_dtype, false, s.norms + i * d, d);

  const VarlenAttentionDropout dropout{a.attn_dropout.seed, a.attn_dropout.counter_offset, a.attn_dropout.threshold,
                                       a.attn_dropout.scale};
  const float* residual = a.h;
  if (!cls_only) {
    // the stacked query/key/value product (its biases side by side), attention over its strided q, k and v
    const int64_t stride = 3 * d;
    product(a.hb, a.qkv_packed, a.qkv, nullptr, T, stride, d, num_threads, bias32[0]);
    const VarlenAttentionShape shape{a.cu, a.cu, a.rows, a.heads, head_dim, stride, head_dim, stride, head_dim,
                                     stride, head_dim};
    varlen_attention_forward(a.qkv, a.qkv + d, a.qkv + 2 * d, kBf16, shape, a.attn_scale, dropout, a.context, a.lse,
                             num_threads);
  } else {
    // every token's keys and values (a.qkv holds them, [T, 2d]); the [CLS] rows' queries, one a row
    product(a.hb, a.kv_packed, a.qkv, nullptr, T, 2 * d, d, num_threads, bias32[1]);
    gather_rows(a.hb, a.cls_index, Q, d, a.query_in);
    gather_rows(a.h, a.cls_index, Q, d, s.residual);
    product(a.query_in, a.qkv_packed, a.q, nullptr, Q, d, d, num_threads, bias32[0]);
    queries_per_row(s.cu_q, a.rows);
    const VarlenAttentionShape shape{s.cu_q, a.cu, a.rows, a.heads, head_dim, d, head_dim, 2 * d, head_dim, 2 * d,
                                     head_dim};
    varlen_attention_forward(a.q, a.qkv, a.qkv + d, kBf16, shape, a.attn_scale, dropout, a.context, a.lse,
                             num_threads);
    residual = s.residual;
  }
  // the output product, then dropout + residual + LN1, which writes the bf16 copy the next product reads
  product(a.context, a.attn_out_packed, s.a, nullptr, Q, d, d, num_threads, bias32[3]);
  layer_norm_forward(s.a, kBf16, residual, kF32, s.norms, s.norms + d, a.h1, a.sum1, kF32, a.h1b, a.mean1, a.rstd1, Q,
                     d, a.ln1_eps, a.ln1_dropout.seed, a.ln1_dropout.counter_offset, a.ln1_dropout.threshold,
                     a.ln1_dropout.scale, false, num_threads);
  // the feed-forward block: GELU writing its output pair-packed too (the second product's weight gradient reads it)
  product(a.h1b, a.ffn_in_packed, a.f, nullptr, Q, F, d, num_threads);
  bias_gelu_forward_bf16(a.f, bias32[4], s.g, a.g_pairs, kPairPanels, Q, F, num_threads);
  product(s.g, a.ffn_out_packed, s.o, nullptr, Q, d, F, num_threads, bias32[5]);
  layer_norm_forward(s.o, kBf16, a.h1, kF32, s.norms + 2 * d, s.norms + 3 * d, a.h2, a.sum2, kF32, a.h2b, a.mean2,
                     a.rstd2, Q, d, a.ln2_eps, a.ln2_dropout.seed, a.ln2_dropout.counter_offset,
                     a.ln2_dropout.threshold, a.ln2_dropout.scale, false, num_threads);
}

int64_t encoder_layer_backward_workspace(int64_t tokens, int64_t rows, int64_t width, int64_t ffn, bool cls_only,
                                         int num_threads) {
  Carver carver(nullptr);
  carve(carver, tokens, cls_only ? rows : tokens, width, ffn, rows, cls_only, num_threads);
  return carver.used();
}

void encoder_layer_backward(const EncoderLayerBackward& a, int num_threads) {
  const int64_t T = a.tokens, d = a.width, F = a.ffn, head_dim = a.width / a.heads;
  const bool cls_only = a.cls_index != nullptr;
  const int64_t Q = cls_only ? a.rows : T;
  if (a.workspace_bytes < encoder_layer_backward_workspace(T, a.rows, d, F, cls_only, num_threads))
    throw std::invalid_argument("encoder_layer_backward: workspace too small");
  Carver carver(static_cast<char*>(a.workspace));
  const Scratch s = carve(carver, T, Q, d, F, a.rows, cls_only, num_threads);

  widen(a.ffn_in_bias, a.bias_dtype, true, s.ffn_in_bias, F);
  const void* norms[4] = {a.ln1_weight, a.ln1_bias, a.ln2_weight, a.ln2_bias};
  for (int i = 0; i < 4; ++i) widen(norms[i], a.norm_dtype, false, s.norms + i * d, d);
  const float *ln1_weight = s.norms, *ln1_bias = s.norms + d, *ln2_weight = s.norms + 2 * d,
              *ln2_bias = s.norms + 3 * d;
  float *qkv_bias_sums = s.sums, *attn_out_bias_sums = s.sums + 3 * d, *ffn_in_bias_sums = s.sums + 4 * d,
        *ffn_out_bias_sums = s.sums + 4 * d + F, *norm_grads = s.sums + 5 * d + F;

  // LN2, then the second feed-forward product: its input gradient and its weight's (g pair-packed, saved so)
  layer_norm_grads(a.grad_h2, a.saved2, a.saved2_is_output, ln2_weight, ln2_bias, a.mean2, a.rstd2, s.grad_o,
                   s.grad_h1, s.partials, norm_grads + 2 * d, norm_grads + 3 * d, Q, d, a.ln2_dropout, num_threads);
  product(s.grad_o, a.ffn_out_packed, s.grad_g, nullptr, Q, F, d, num_threads);
  weight_and_bias_grad(s.grad_o, s.grad_o_pairs, a.g_pairs, a.ffn_out_grad, ffn_out_bias_sums, Q, d, F, num_threads);
  // the GELU (its output's row pairs for the first product's weight gradient), then that product
  bias_gelu_backward_bf16(s.grad_g, a.f, s.ffn_in_bias, s.grad_f, ffn_in_bias_sums, s.grad_f_pairs, kRowPairs, Q, F,
                          num_threads);
  product(s.grad_f, a.ffn_in_packed, nullptr, s.grad_h1, Q, d, F, num_threads);
  pack_pairs(a.h1b, Q, d, s.h1b_packed, num_threads);
  weight_grad(s.grad_f_pairs, s.h1b_packed, a.ffn_in_grad, Q, F, d, num_threads);
  // LN1 (its residual's gradient is the input's, or the [CLS] rows'), then the attention's output product
  float* grad_residual = cls_only ? s.grad_residual : a.grad_h;
  layer_norm_grads(s.grad_h1, a.saved1, a.saved1_is_output, ln1_weight, ln1_bias, a.mean1, a.rstd1, s.grad_a,
                   grad_residual, s.partials, norm_grads, norm_grads + d, Q, d, a.ln1_dropout, num_threads);
  product(s.grad_a, a.attn_out_packed, s.grad_context, nullptr, Q, d, d, num_threads);
  pack_pairs(a.context, Q, d, s.context_packed, num_threads);
  weight_and_bias_grad(s.grad_a, s.grad_a_pairs, s.context_packed, a.attn_out_grad, attn_out_bias_sums, Q, d, d,
                       num_threads);
  const VarlenAttentionDropout dropout{a.attn_dropout.seed, a.attn_dropout.counter_offset, a.attn_dropout.threshold,
                                       a.attn_dropout.scale};
  if (!cls_only) {
    // attention, into q's, k's and v's gradients stacked per token as the stacked product's output is
    const int64_t stride = 3 * d;
    const VarlenAttentionShape shape{a.cu, a.cu, a.rows, a.heads, head_dim, stride, head_dim, stride, head_dim,
                                     stride, head_dim};
    varlen_attention_backward(a.qkv, a.qkv + d, a.qkv + 2 * d, kBf16, shape, a.attn_scale, dropout, s.grad_context,
                              a.lse, s.grad_qkv, s.grad_qkv + d, s.grad_qkv + 2 * d, stride, num_threads);
    // the stacked product's weight gradient, then its input gradient added to the residual's
    pack_pairs(a.hb, T, d, s.hb_packed, num_threads);
    weight_and_bias_grad(s.grad_qkv, s.grad_qkv_pairs, s.hb_packed, a.qkv_grad, qkv_bias_sums, T, stride, d,
                         num_threads);
    product(s.grad_qkv, a.qkv_packed, nullptr, a.grad_h, T, d, stride, num_threads);
  } else {
    // attention from the [CLS] rows' queries (a.q) to every token's keys and values (a.qkv: [T, 2d])
    queries_per_row(s.cu_q, a.rows);
    const VarlenAttentionShape shape{s.cu_q, a.cu, a.rows, a.heads, head_dim, d, head_dim, 2 * d, head_dim, 2 * d,
                                     head_dim};
    varlen_attention_backward(a.q, a.qkv, a.qkv + d, kBf16, shape, a.attn_scale, dropout, s.grad_context, a.lse,
                              s.grad_q, s.grad_k, s.grad_v, 0, num_threads);
    uint16_t* grad_kv = s.grad_qkv;  // k's and v's gradients side by side, as the keys' and values' product's
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(grad_kv + t * 2 * d, s.grad_k + t * d, d * sizeof(uint16_t));
      std::memcpy(grad_kv + t * 2 * d + d, s.grad_v + t * d, d * sizeof(uint16_t));
    }
    // the query's weight gradient (the first d rows of qkv_grad), then the keys' and values'
    pack_pairs(a.query_in, Q, d, s.query_packed, num_threads);
    weight_and_bias_grad(s.grad_q, s.grad_q_pairs, s.query_packed, a.qkv_grad, qkv_bias_sums, Q, d, d, num_threads);
    pack_pairs(a.hb, T, d, s.hb_packed, num_threads);
    weight_and_bias_grad(grad_kv, s.grad_qkv_pairs, s.hb_packed, a.qkv_grad + d * d, qkv_bias_sums + d, T, 2 * d, d,
                         num_threads);
    // the input's gradient: every token's through the keys and values (rounded to bf16 as that product's output
    // is), the [CLS] rows' through their queries and residual added (torch's index_add_)
    product(s.grad_q, a.qkv_packed, nullptr, s.grad_residual, Q, d, d, num_threads);
    product(grad_kv, a.kv_packed, s.grad_h_bf16, nullptr, T, d, 2 * d, num_threads);
    for (int64_t i = 0; i < T * d; ++i) a.grad_h[i] = bf16_to_f32(s.grad_h_bf16[i]);
    for (int64_t r = 0; r < Q; ++r)
      for (int64_t c = 0; c < d; ++c) a.grad_h[a.cls_index[r] * d + c] += s.grad_residual[r * d + c];
  }

  // the biases' gradients rounded to bf16 first (fastcls.ops.linear.grad_bias_of), then the LayerNorms'
  const int64_t biases = 5 * d + F;
  for (int64_t i = 0; i < biases; ++i) store(bf16_to_f32(f32_to_bf16(s.sums[i])), a.bias_grads, a.bias_dtype, i);
  for (int64_t i = 0; i < 4 * d; ++i) store(s.sums[biases + i], a.norm_grads, a.norm_dtype, i);
}

}  // namespace fastcls

#endif
