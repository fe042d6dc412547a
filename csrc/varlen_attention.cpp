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

// The longest head the kernels take (cpp.VARLEN_ATTENTION_MAX_HEAD_DIM): the widest accumulator held in registers.
constexpr int64_t kMaxHeadDim = 128;

// Per-thread fp32 blocks of one row, every head's, sized for the longest row: [H, L, D] blocks (q times scale,
// grad_out, k times scale, v) and [H, D, padded L] transposed ones (k, v).
struct Scratch {
  std::vector<float> q, grad_out, k, kt, vt, v, out, scores, probs, grad_probs, multipliers, dropped, grad_scores;

  Scratch(int64_t max_q, int64_t max_k, int64_t heads, int64_t d, bool backward, bool dropout) {
    const int64_t cols = padded(max_k);
    q.resize(heads * max_q * d);
    kt.resize(heads * d * cols);
    scores.resize(cols);
    probs.resize(cols);
    out.resize(d);
    if (dropout) multipliers.resize(max_q * max_k);
    if (backward) {
      grad_out.resize(heads * max_q * d);
      k.resize(heads * max_k * d);
      vt.resize(heads * d * cols);
      grad_probs.resize(cols);
      dropped.resize(max_q * max_k);
      grad_scores.resize(max_q * max_k);
    } else {
      v.resize(heads * max_k * d);
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

// A row's n tokens are read token by token, every head at once: the memory in order, whatever the token stride
// (the q, k and v views of a stacked projection are 3 * H * D apart), rather than one head's slice of each.

// dst[h, j, :] = src[j, h, :] * factor for j < n.
template <typename Element>
void pack_rows(const Element* src, int64_t token_stride, int64_t head_stride, int64_t n, int64_t heads, int64_t d,
               float factor, float* dst) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t h = 0; h < heads; ++h) load_row(src + j * token_stride + h * head_stride, factor, dst + (h * n + j) * d, d);
  }
}

// dst[h, c, j] = src[j, h, c] for j < n, zero for n <= j < padded(n).
template <typename Element>
void pack_transposed(const Element* src, int64_t token_stride, int64_t head_stride, int64_t n, int64_t heads, int64_t d,
                     float* dst) {
  const int64_t cols = padded(n);
  for (int64_t row = 0; row < heads * d; ++row) std::fill(dst + row * cols + n, dst + (row + 1) * cols, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t h = 0; h < heads; ++h) {
      const Element* from = src + j * token_stride + h * head_stride;
      float* to = dst + h * d * cols + j;
      for (int64_t c = 0; c < d; ++c) to[c * cols] = to_f32(from[c]);
    }
  }
}

// The two products of every query: a row times a transposed block (scores, and the gradient of the
// probabilities), and a weighted sum of block rows (the output, and each gradient). Their accumulators stay in
// registers: accumulating through memory would chain every update on a store-to-load round trip, which measured
// several times slower.
#if defined(__AVX512F__)
// out[j] = sum_c x[c] * mt[c * cols + j] for j < cols (a multiple of kColumns), four vectors of keys at a time.
void row_times(const float* x, const float* mt, int64_t d, int64_t cols, float* out) {
  int64_t j = 0;
  for (; j + 4 * kColumns <= cols; j += 4 * kColumns) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t c = 0; c < d; ++c) {
      const __m512 a = _mm512_set1_ps(x[c]);
      const float* m = mt + c * cols + j;
      acc0 = _mm512_fmadd_ps(a, _mm512_loadu_ps(m), acc0);
      acc1 = _mm512_fmadd_ps(a, _mm512_loadu_ps(m + 16), acc1);
      acc2 = _mm512_fmadd_ps(a, _mm512_loadu_ps(m + 32), acc2);
      acc3 = _mm512_fmadd_ps(a, _mm512_loadu_ps(m + 48), acc3);
    }
    _mm512_storeu_ps(out + j, acc0);
    _mm512_storeu_ps(out + j + 16, acc1);
    _mm512_storeu_ps(out + j + 32, acc2);
    _mm512_storeu_ps(out + j + 48, acc3);
  }
  for (; j < cols; j += kColumns) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; ++c) acc = _mm512_fmadd_ps(_mm512_set1_ps(x[c]), _mm512_loadu_ps(mt + c * cols + j), acc);
    _mm512_storeu_ps(out + j, acc);
  }
}

// out[0:d] = sum_{j < n} w[j * w_stride] * rows[j * d : (j + 1) * d], in kVectors registers (d <= 16 * kVectors).
template <int kVectors>
void weighted_sum_in_registers(const float* w, int64_t w_stride, const float* rows, int64_t n, int64_t d, float* out) {
  const __mmask16 last = tail_mask(d - 16 * (kVectors - 1));
  __m512 acc[kVectors];
  for (int v = 0; v < kVectors; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m512 a = _mm512_set1_ps(w[j * w_stride]);
    const float* row = rows + j * d;
    for (int v = 0; v < kVectors - 1; ++v) acc[v] = _mm512_fmadd_ps(a, _mm512_loadu_ps(row + 16 * v), acc[v]);
    acc[kVectors - 1] = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(last, row + 16 * (kVectors - 1)), acc[kVectors - 1]);
  }
  for (int v = 0; v < kVectors - 1; ++v) _mm512_storeu_ps(out + 16 * v, acc[v]);
  _mm512_mask_storeu_ps(out + 16 * (kVectors - 1), last, acc[kVectors - 1]);
}

void weighted_sum(const float* w, int64_t w_stride, const float* rows, int64_t n, int64_t d, float* out) {
  switch ((d + 15) / 16) {
    case 1: return weighted_sum_in_registers<1>(w, w_stride, rows, n, d, out);
    case 2: return weighted_sum_in_registers<2>(w, w_stride, rows, n, d, out);
    case 3: return weighted_sum_in_registers<3>(w, w_stride, rows, n, d, out);
    case 4: return weighted_sum_in_registers<4>(w, w_stride, rows, n, d, out);
    case 5: return weighted_sum_in_registers<5>(w, w_stride, rows, n, d, out);
    case 6: return weighted_sum_in_registers<6>(w, w_stride, rows, n, d, out);
    case 7: return weighted_sum_in_registers<7>(w, w_stride, rows, n, d, out);
    default: return weighted_sum_in_registers<8>(w, w_stride, rows, n, d, out);
  }
}
#else
void row_times(const float* x, const float* mt, int64_t d, int64_t cols, float* out) {
  for (int64_t j = 0; j < cols; j += kColumns) {
    float acc[kColumns] = {};
    for (int64_t c = 0; c < d; ++c) {
      const float a = x[c];
      const float* m = mt + c * cols + j;
#pragma omp simd
      for (int64_t u = 0; u < kColumns; ++u) acc[u] += a * m[u];
    }
    std::copy(acc, acc + kColumns, out + j);
  }
}

void weighted_sum(const float* w, int64_t w_stride, const float* rows, int64_t n, int64_t d, float* out) {
  float acc[kMaxHeadDim] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float a = w[j * w_stride];
    const float* row = rows + j * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) acc[c] += a * row[c];
  }
  std::copy(acc, acc + d, out);
}
#endif

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

// The canonical index of each row's first probability (see the header), the longest query and key spans, and the
// order in which the threads take the rows.
struct Layout {
  std::vector<int64_t> row_start;
  int64_t max_q = 0, max_k = 0;

  std::vector<int64_t> by_work;  // the rows, most work (Lq * Lk) first

  explicit Layout(const VarlenAttentionShape& shape) : row_start(shape.rows + 1, 0), by_work(shape.rows) {
    for (int64_t r = 0; r < shape.rows; ++r) {
      const int64_t lq = shape.cu_q[r + 1] - shape.cu_q[r], lk = shape.cu_k[r + 1] - shape.cu_k[r];
      row_start[r + 1] = row_start[r] + shape.heads * lq * lk;
      max_q = std::max(max_q, lq);
      max_k = std::max(max_k, lk);
      by_work[r] = r;
    }
    std::stable_sort(by_work.begin(), by_work.end(), [&](int64_t a, int64_t b) {
      return row_start[a + 1] - row_start[a] > row_start[b + 1] - row_start[b];
    });
  }
};

template <typename Element>
void forward_row(const Element* q, const Element* k, const Element* v, const VarlenAttentionShape& s, float scale,
                 const VarlenAttentionDropout& dropout, const Layout& layout, int64_t r, Scratch& w, Element* out,
                 float* lse) {
  const int64_t d = s.head_dim, heads = s.heads;
  const int64_t q0 = s.cu_q[r], lq = s.cu_q[r + 1] - q0, k0 = s.cu_k[r], lk = s.cu_k[r + 1] - k0;
  const int64_t cols = padded(lk);
  float* row_out = w.out.data();
  if (lk == 0) {  // nothing to attend to: a zero output
    std::fill(row_out, row_out + d, 0.0f);
    for (int64_t t = q0 * heads; t < (q0 + lq) * heads; ++t) {
      store_row(row_out, out + t * d, d);
      lse[t] = kNegInf;
    }
    return;
  }
  pack_rows(q + q0 * s.q_token_stride, s.q_token_stride, s.q_head_stride, lq, heads, d, scale, w.q.data());
  pack_transposed(k + k0 * s.k_token_stride, s.k_token_stride, s.k_head_stride, lk, heads, d, w.kt.data());
  pack_rows(v + k0 * s.v_token_stride, s.v_token_stride, s.v_head_stride, lk, heads, d, 1.0f, w.v.data());
  const bool drops = dropout.threshold != 0;
  float* scores = w.scores.data();
  float* probs = w.probs.data();
  for (int64_t h = 0; h < heads; ++h) {
    if (drops) fill_multipliers(w.multipliers.data(), layout.row_start[r] + h * lq * lk, lq * lk, dropout);
    const float* kt = &w.kt[h * d * cols];
    const float* vh = &w.v[h * lk * d];
    for (int64_t i = 0; i < lq; ++i) {
      const int64_t token = q0 + i;
      row_times(&w.q[(h * lq + i) * d], kt, d, cols, scores);
      const float shift = max_of(scores, lk);
      const float sum = sum_exp<true>(scores, shift, probs, lk);
      lse[token * heads + h] = shift + std::log(sum);
      const float inv = 1.0f / sum;
      if (drops) {
        const float* m = &w.multipliers[i * lk];
#pragma omp simd
        for (int64_t j = 0; j < lk; ++j) probs[j] *= inv * m[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < lk; ++j) probs[j] *= inv;
      }
      weighted_sum(probs, 1, vh, lk, d, row_out);
      store_row(row_out, out + (token * heads + h) * d, d);
    }
  }
}

template <typename Element>
void backward_row(const Element* q, const Element* k, const Element* v, const VarlenAttentionShape& s, float scale,
                  const VarlenAttentionDropout& dropout, const Layout& layout, int64_t r, Scratch& w,
                  const Element* grad_out, const float* lse, Element* grad_q, Element* grad_k, Element* grad_v) {
  const int64_t d = s.head_dim, heads = s.heads;
  const int64_t q0 = s.cu_q[r], lq = s.cu_q[r + 1] - q0, k0 = s.cu_k[r], lk = s.cu_k[r + 1] - k0;
  const int64_t cols = padded(lk);
  float* row_out = w.out.data();
  if (lk == 0) {  // a zero output, whatever the queries
    std::fill(row_out, row_out + d, 0.0f);
    for (int64_t t = q0 * heads; t < (q0 + lq) * heads; ++t) store_row(row_out, grad_q + t * d, d);
    return;
  }
  pack_rows(q + q0 * s.q_token_stride, s.q_token_stride, s.q_head_stride, lq, heads, d, scale, w.q.data());
  pack_rows(grad_out + q0 * heads * d, heads * d, d, lq, heads, d, 1.0f, w.grad_out.data());
  pack_rows(k + k0 * s.k_token_stride, s.k_token_stride, s.k_head_stride, lk, heads, d, scale, w.k.data());
  pack_transposed(k + k0 * s.k_token_stride, s.k_token_stride, s.k_head_stride, lk, heads, d, w.kt.data());
  pack_transposed(v + k0 * s.v_token_stride, s.v_token_stride, s.v_head_stride, lk, heads, d, w.vt.data());
  const bool drops = dropout.threshold != 0;
  float* scores = w.scores.data();
  float* grad_probs = w.grad_probs.data();
  for (int64_t h = 0; h < heads; ++h) {
    if (drops) fill_multipliers(w.multipliers.data(), layout.row_start[r] + h * lq * lk, lq * lk, dropout);
    const float* qh = &w.q[h * lq * d];  // times scale
    const float* grad_oh = &w.grad_out[h * lq * d];
    const float* kh = &w.k[h * lk * d];  // times scale
    for (int64_t i = 0; i < lq; ++i) {
      const int64_t token = q0 + i;
      float* probs = &w.dropped[i * lk];  // the probabilities, then their dropped-out values
      float* grad_scores = &w.grad_scores[i * lk];
      row_times(qh + i * d, &w.kt[h * d * cols], d, cols, scores);
      sum_exp<true>(scores, lse[token * heads + h], probs, lk);
      // the gradient of the dropped-out probabilities, then of the probabilities
      row_times(grad_oh + i * d, &w.vt[h * d * cols], d, cols, grad_probs);
      if (drops) {
        const float* m = &w.multipliers[i * lk];
#pragma omp simd
        for (int64_t j = 0; j < lk; ++j) grad_probs[j] *= m[j];
      }
      // sum_j P_ij dL/dP_ij in fp32 from the same terms
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < lk; ++j) dot += probs[j] * grad_probs[j];
#pragma omp simd
      for (int64_t j = 0; j < lk; ++j) grad_scores[j] = probs[j] * (grad_probs[j] - dot);
      if (drops) {
        const float* m = &w.multipliers[i * lk];
#pragma omp simd
        for (int64_t j = 0; j < lk; ++j) probs[j] *= m[j];
      }
      weighted_sum(grad_scores, 1, kh, lk, d, row_out);  // k carries the scale
      store_row(row_out, grad_q + (token * heads + h) * d, d);
    }
    // dV = dropped^T dO and dK = dS^T (q * scale), a key at a time
    for (int64_t j = 0; j < lk; ++j) {
      weighted_sum(&w.dropped[j], lk, grad_oh, lq, d, row_out);
      store_row(row_out, grad_v + ((k0 + j) * heads + h) * d, d);
      weighted_sum(&w.grad_scores[j], lk, qh, lq, d, row_out);
      store_row(row_out, grad_k + ((k0 + j) * heads + h) * d, d);
    }
  }
}

// Runs row(r, scratch) over every row, all heads of a row in one task (their memory is interleaved); rows differ
// in length, so they are handed out dynamically, longest first.
template <typename Row>
void for_each_row(const VarlenAttentionShape& s, const Layout& layout, bool backward, bool dropout, int num_threads,
                  Row row) {
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, s.rows)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    Scratch scratch(layout.max_q, layout.max_k, s.heads, s.head_dim, backward, dropout);
#pragma omp for schedule(dynamic)
    for (int64_t index = 0; index < s.rows; ++index) row(layout.by_work[index], scratch);
  }
}

template <typename Element>
void forward(const Element* q, const Element* k, const Element* v, const VarlenAttentionShape& s, float scale,
             const VarlenAttentionDropout& dropout, Element* out, float* lse, int num_threads) {
  const Layout layout(s);
  for_each_row(s, layout, false, dropout.threshold != 0, num_threads, [&](int64_t r, Scratch& w) {
    forward_row(q, k, v, s, scale, dropout, layout, r, w, out, lse);
  });
}

template <typename Element>
void backward(const Element* q, const Element* k, const Element* v, const VarlenAttentionShape& s, float scale,
              const VarlenAttentionDropout& dropout, const Element* grad_out, const float* lse, Element* grad_q,
              Element* grad_k, Element* grad_v, int num_threads) {
  const Layout layout(s);
  for_each_row(s, layout, true, dropout.threshold != 0, num_threads, [&](int64_t r, Scratch& w) {
    backward_row(q, k, v, s, scale, dropout, layout, r, w, grad_out, lse, grad_q, grad_k, grad_v);
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
