#include "varlen_attention.h"

#include "bf16.h"
#include "philox.h"
#include "softmax.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastcls {
namespace {

constexpr int64_t kStep = 4 * kPhiloxCounters;  // elements whose bits one philox_bits call draws
constexpr uint64_t kDropAll = uint64_t(1) << 32;

// The transposed key and value blocks [D, Lk] are padded to a multiple of this many columns, so that the loops over
// keys run on whole vectors.
constexpr int64_t kColumns = 16;

int64_t padded(int64_t n) { return (n + kColumns - 1) / kColumns * kColumns; }

// Per-thread fp32 blocks of one (row, head) pair, sized for the longest row.
struct Scratch {
  std::vector<float> q, grad_out, k, kt, vt, v, grad_k, grad_v, scores, probs, grad_probs, grad_row, multipliers;

  Scratch(int64_t max_q, int64_t max_k, int64_t d, bool backward, bool dropout) {
    const int64_t cols = padded(max_k);
    q.resize(d);
    kt.resize(d * cols);
    scores.resize(cols);
    probs.resize(cols);
    grad_row.resize(d);
    if (dropout) multipliers.resize(max_q * max_k);
    if (backward) {
      grad_out.resize(d);
      k.resize(max_k * d);
      vt.resize(d * cols);
      grad_k.resize(max_k * d);
      grad_v.resize(max_k * d);
      grad_probs.resize(cols);
    } else {
      v.resize(max_k * d);
    }
  }
};

template <typename Element>
void load_row(const Element* src, float factor, float* dst, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) dst[c] = to_f32(src[c]) * factor;
}

template <typename Element>
void store_row(const float* src, Element* dst, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) dst[c] = from_f32<Element>(src[c]);
}

// dst [D, cols] = the transpose of the [n, D] block at src (token stride `stride`), zero past n.
template <typename Element>
void load_transposed(const Element* src, int64_t stride, int64_t n, int64_t d, float* dst) {
  const int64_t cols = padded(n);
  for (int64_t c = 0; c < d; ++c) std::fill(dst + c * cols + n, dst + (c + 1) * cols, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const Element* row = src + j * stride;
    for (int64_t c = 0; c < d; ++c) dst[c * cols + j] = to_f32(row[c]);
  }
}

// out[j] = sum_c x[c] * mt[c, j] for j < cols (mt [D, cols]).
void row_times(const float* x, const float* mt, int64_t d, int64_t cols, float* out) {
  std::fill(out, out + cols, 0.0f);
  for (int64_t c = 0; c < d; ++c) {
    const float a = x[c];
    const float* m = mt + c * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) out[j] += a * m[j];
  }
}

// acc[c] += a * x[c]
inline void axpy(float a, const float* x, float* acc, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) acc[c] += a * x[c];
}

// multipliers[e] = drop_scale if element first + e (of the canonical index) is kept, else 0, for e < n.
void fill_multipliers(float* multipliers, int64_t first, int64_t n, const VarlenAttentionDropout& dropout) {
  if (dropout.threshold >= kDropAll) {
    std::fill(multipliers, multipliers + n, 0.0f);
    return;
  }
  const PhiloxKey key{uint32_t(dropout.seed), uint32_t(dropout.seed >> 32)};
  const uint32_t bound = uint32_t(dropout.threshold);
  alignas(64) uint32_t bits[kStep];
  for (int64_t start = first / 4 * 4; start < first + n; start += kStep) {
    philox_bits(dropout.counter_offset + uint64_t(start) / 4, key, bits);
    const int64_t lo = std::max(start, first), hi = std::min(start + kStep, first + n);
    for (int64_t e = lo; e < hi; ++e) multipliers[e - first] = bits[e - start] >= bound ? dropout.scale : 0.0f;
  }
}

// The canonical index of each row's first probability (see the header), and the longest query and key spans.
struct Layout {
  std::vector<int64_t> row_start;
  int64_t max_q = 0, max_k = 0;

  explicit Layout(const VarlenAttentionShape& shape) : row_start(shape.rows + 1, 0) {
    for (int64_t r = 0; r < shape.rows; ++r) {
      const int64_t lq = shape.cu_q[r + 1] - shape.cu_q[r], lk = shape.cu_k[r + 1] - shape.cu_k[r];
      row_start[r + 1] = row_start[r] + shape.heads * lq * lk;
      max_q = std::max(max_q, lq);
      max_k = std::max(max_k, lk);
    }
  }
};

template <typename Element>
void forward_pair(const Element* q, const Element* k, const Element* v, const VarlenAttentionShape& s, float scale,
                  const VarlenAttentionDropout& dropout, const Layout& layout, int64_t r, int64_t h, Scratch& w,
                  Element* out, float* lse) {
  const int64_t d = s.head_dim, heads = s.heads;
  const int64_t q0 = s.cu_q[r], lq = s.cu_q[r + 1] - q0, k0 = s.cu_k[r], lk = s.cu_k[r + 1] - k0;
  const int64_t cols = padded(lk);
  if (lq == 0) return;
  if (lk == 0) {  // nothing to attend to: a zero output
    for (int64_t i = 0; i < lq; ++i) {
      std::fill(w.grad_row.begin(), w.grad_row.end(), 0.0f);
      store_row(w.grad_row.data(), out + ((q0 + i) * heads + h) * d, d);
      lse[(q0 + i) * heads + h] = kNegInf;
    }
    return;
  }
  load_transposed(k + k0 * s.k_token_stride + h * s.k_head_stride, s.k_token_stride, lk, d, w.kt.data());
  for (int64_t j = 0; j < lk; ++j) load_row(v + (k0 + j) * s.v_token_stride + h * s.v_head_stride, 1.0f, &w.v[j * d], d);
  const bool drops = dropout.threshold != 0;
  if (drops) fill_multipliers(w.multipliers.data(), layout.row_start[r] + h * lq * lk, lq * lk, dropout);
  float* scores = w.scores.data();
  float* probs = w.probs.data();
  float* acc = w.grad_row.data();
  for (int64_t i = 0; i < lq; ++i) {
    load_row(q + (q0 + i) * s.q_token_stride + h * s.q_head_stride, scale, w.q.data(), d);
    row_times(w.q.data(), w.kt.data(), d, cols, scores);
    const float shift = max_of(scores, lk);
    const float sum = sum_exp<true>(scores, shift, probs, lk);
    lse[(q0 + i) * heads + h] = shift + std::log(sum);
    const float inv = 1.0f / sum;
    const float* m = drops ? &w.multipliers[i * lk] : nullptr;
    std::fill(acc, acc + d, 0.0f);
    for (int64_t j = 0; j < lk; ++j) {
      const float p = probs[j] * inv * (drops ? m[j] : 1.0f);
      axpy(p, &w.v[j * d], acc, d);
    }
    store_row(acc, out + ((q0 + i) * heads + h) * d, d);
  }
}

template <typename Element>
void backward_pair(const Element* q, const Element* k, const Element* v, const VarlenAttentionShape& s, float scale,
                   const VarlenAttentionDropout& dropout, const Layout& layout, int64_t r, int64_t h, Scratch& w,
                   const Element* grad_out, const float* lse, Element* grad_q, Element* grad_k, Element* grad_v) {
  const int64_t d = s.head_dim, heads = s.heads;
  const int64_t q0 = s.cu_q[r], lq = s.cu_q[r + 1] - q0, k0 = s.cu_k[r], lk = s.cu_k[r + 1] - k0;
  const int64_t cols = padded(lk);
  std::fill(w.grad_k.begin(), w.grad_k.begin() + lk * d, 0.0f);
  std::fill(w.grad_v.begin(), w.grad_v.begin() + lk * d, 0.0f);
  if (lk > 0) {
    load_transposed(k + k0 * s.k_token_stride + h * s.k_head_stride, s.k_token_stride, lk, d, w.kt.data());
    load_transposed(v + k0 * s.v_token_stride + h * s.v_head_stride, s.v_token_stride, lk, d, w.vt.data());
    for (int64_t j = 0; j < lk; ++j) load_row(k + (k0 + j) * s.k_token_stride + h * s.k_head_stride, scale, &w.k[j * d], d);
  }
  const bool drops = dropout.threshold != 0;
  if (drops) fill_multipliers(w.multipliers.data(), layout.row_start[r] + h * lq * lk, lq * lk, dropout);
  float* qi = w.q.data();  // this query, times scale
  float* grad_oi = w.grad_out.data();
  float* scores = w.scores.data();
  float* probs = w.probs.data();
  float* grad_probs = w.grad_probs.data();
  float* grad_qi = w.grad_row.data();
  for (int64_t i = 0; i < lq; ++i) {
    const int64_t token = q0 + i;
    load_row(q + token * s.q_token_stride + h * s.q_head_stride, scale, qi, d);
    load_row(grad_out + (token * heads + h) * d, 1.0f, grad_oi, d);
    row_times(qi, w.kt.data(), d, cols, scores);
    sum_exp<true>(scores, lse[token * heads + h], probs, lk);
    row_times(grad_oi, w.vt.data(), d, cols, grad_probs);  // the gradient of the dropped-out probabilities
    const float* m = drops ? &w.multipliers[i * lk] : nullptr;
    // sum_j P_ij dP_ij = sum_j (P_ij m_ij) (the gradient of P_ij m_ij), in fp32 from the same terms
    float dot = 0.0f;
    for (int64_t j = 0; j < lk; ++j) {
      if (drops) grad_probs[j] *= m[j];
      dot += probs[j] * grad_probs[j];
    }
    std::fill(grad_qi, grad_qi + d, 0.0f);
    for (int64_t j = 0; j < lk; ++j) {
      const float p = probs[j];
      const float grad_score = p * (grad_probs[j] - dot);
      axpy(grad_score, &w.k[j * d], grad_qi, d);  // k rows carry the scale
      axpy(grad_score, qi, &w.grad_k[j * d], d);  // so does qi
      axpy(drops ? p * m[j] : p, grad_oi, &w.grad_v[j * d], d);
    }
    store_row(grad_qi, grad_q + (token * heads + h) * d, d);
  }
  for (int64_t j = 0; j < lk; ++j) {
    store_row(&w.grad_k[j * d], grad_k + ((k0 + j) * heads + h) * d, d);
    store_row(&w.grad_v[j * d], grad_v + ((k0 + j) * heads + h) * d, d);
  }
}

// Runs pair(r, h, scratch) over every (row, head) pair; rows differ in length, so the pairs are handed out
// dynamically.
template <typename Pair>
void for_each_pair(const VarlenAttentionShape& s, const Layout& layout, bool backward, bool dropout, int num_threads,
                   Pair pair) {
  const int64_t n_pairs = s.rows * s.heads;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_pairs)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    Scratch scratch(layout.max_q, layout.max_k, s.head_dim, backward, dropout);
#pragma omp for schedule(dynamic)
    for (int64_t index = 0; index < n_pairs; ++index) pair(index / s.heads, index % s.heads, scratch);
  }
}

template <typename Element>
void forward(const Element* q, const Element* k, const Element* v, const VarlenAttentionShape& s, float scale,
             const VarlenAttentionDropout& dropout, Element* out, float* lse, int num_threads) {
  const Layout layout(s);
  for_each_pair(s, layout, false, dropout.threshold != 0, num_threads, [&](int64_t r, int64_t h, Scratch& w) {
    forward_pair(q, k, v, s, scale, dropout, layout, r, h, w, out, lse);
  });
}

template <typename Element>
void backward(const Element* q, const Element* k, const Element* v, const VarlenAttentionShape& s, float scale,
              const VarlenAttentionDropout& dropout, const Element* grad_out, const float* lse, Element* grad_q,
              Element* grad_k, Element* grad_v, int num_threads) {
  const Layout layout(s);
  for_each_pair(s, layout, true, dropout.threshold != 0, num_threads, [&](int64_t r, int64_t h, Scratch& w) {
    backward_pair(q, k, v, s, scale, dropout, layout, r, h, w, grad_out, lse, grad_q, grad_k, grad_v);
  });
}

}  // namespace

void varlen_attention_forward(const void* q, const void* k, const void* v, int dtype, const VarlenAttentionShape& shape,
                              float scale, const VarlenAttentionDropout& dropout, void* out, float* lse,
                              int num_threads) {
  if (dtype == 0) {
    forward(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v), shape, scale,
            dropout, static_cast<float*>(out), lse, num_threads);
  } else {
    forward(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), shape,
            scale, dropout, static_cast<uint16_t*>(out), lse, num_threads);
  }
}

void varlen_attention_backward(const void* q, const void* k, const void* v, int dtype,
                               const VarlenAttentionShape& shape, float scale, const VarlenAttentionDropout& dropout,
                               const void* grad_out, const float* lse, void* grad_q, void* grad_k, void* grad_v,
                               int num_threads) {
  if (dtype == 0) {
    backward(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v), shape, scale,
             dropout, static_cast<const float*>(grad_out), lse, static_cast<float*>(grad_q),
             static_cast<float*>(grad_k), static_cast<float*>(grad_v), num_threads);
  } else {
    backward(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), shape,
             scale, dropout, static_cast<const uint16_t*>(grad_out), lse, static_cast<uint16_t*>(grad_q),
             static_cast<uint16_t*>(grad_k), static_cast<uint16_t*>(grad_v), num_threads);
  }
}

}  // namespace fastcls
