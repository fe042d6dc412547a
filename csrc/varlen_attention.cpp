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
// grad_out, k times scale, v), [H, D, padded L] transposed ones (k, v), and one head's [Lq, padded Lk] scores and
// their gradient, [Lq, Lk] dropout multipliers and [max(Lq, Lk), D] results.
struct Scratch {
  std::vector<float> q, grad_out, k, kt, vt, v, probs, grad_scores, multipliers, out;

  Scratch(int64_t max_q, int64_t max_k, int64_t heads, int64_t d, bool backward, bool dropout) {
    const int64_t cols = padded(max_k);
    q.resize(heads * max_q * d);
    kt.resize(heads * d * cols);
    probs.resize(max_q * cols);
    out.resize(std::max<int64_t>({max_q, max_k, 1}) * d);
    if (dropout) multipliers.resize(max_q * max_k);
    if (backward) {
      grad_out.resize(heads * max_q * d);
      k.resize(heads * max_k * d);
      vt.resize(heads * d * cols);
      grad_scores.resize(max_q * cols);
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

// The two products of a head: rows times a transposed block (the scores, and the gradient of the probabilities),
// and weighted sums of a block's rows (the output and the three gradients), for `count` rows (or sums) at a time:
// out[r, j] = sum_c x[r * x_stride + c] * mt[c * cols + j] for j < cols (a multiple of kColumns), and
// out[r * out_stride + c] = sum_{n < len} w[r * w_step + n * w_stride] * rows[n * d + c] for c < d.
// AVX-512 holds a block of outputs in registers (each load of mt or rows serves several rows, and no update goes
// through memory, which would chain every one on a store-to-load round trip).
#if defined(__AVX512F__)
template <int kRows, int kVectors>
void times_block(const float* x, int64_t x_stride, const float* mt, int64_t d, int64_t cols, int64_t j, float* out,
                 int64_t out_stride) {
  __m512 acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < kVectors; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; ++c) {
    __m512 m[kVectors];
    for (int u = 0; u < kVectors; ++u) m[u] = _mm512_loadu_ps(mt + c * cols + j + 16 * u);
    for (int r = 0; r < kRows; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * x_stride + c]);
      for (int u = 0; u < kVectors; ++u) acc[r][u] = _mm512_fmadd_ps(a, m[u], acc[r][u]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < kVectors; ++u) _mm512_storeu_ps(out + r * out_stride + j + 16 * u, acc[r][u]);
}

template <int kRows>
void times_rows(const float* x, int64_t x_stride, const float* mt, int64_t d, int64_t cols, float* out,
                int64_t out_stride) {
  int64_t j = 0;
  for (; j + 4 * kColumns <= cols; j += 4 * kColumns) times_block<kRows, 4>(x, x_stride, mt, d, cols, j, out, out_stride);
  for (; j < cols; j += kColumns) times_block<kRows, 1>(x, x_stride, mt, d, cols, j, out, out_stride);
}

void rows_times(const float* x, int64_t x_stride, const float* mt, int64_t d, int64_t cols, float* out,
                int64_t out_stride, int64_t count) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) times_rows<4>(x + r * x_stride, x_stride, mt, d, cols, out + r * out_stride, out_stride);
  for (; r < count; ++r) times_rows<1>(x + r * x_stride, x_stride, mt, d, cols, out + r * out_stride, out_stride);
}

template <int kSums, int kVectors>
void sums_block(const float* w, int64_t w_step, int64_t w_stride, const float* rows, int64_t len, int64_t d,
                float* out, int64_t out_stride) {
  const __mmask16 last = tail_mask(d - 16 * (kVectors - 1));
  // the loops over the block unrolled in full, so that the accumulators live in registers (GCC otherwise keeps
  // them on the stack, storing each one every iteration)
  __m512 acc[kSums][kVectors];
#pragma GCC unroll 16
  for (int r = 0; r < kSums; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < kVectors; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t n = 0; n < len; ++n) {
    const float* row = rows + n * d;
    __m512 x[kVectors];
#pragma GCC unroll 8
    for (int u = 0; u < kVectors - 1; ++u) x[u] = _mm512_loadu_ps(row + 16 * u);
    x[kVectors - 1] = _mm512_maskz_loadu_ps(last, row + 16 * (kVectors - 1));
#pragma GCC unroll 16
    for (int r = 0; r < kSums; ++r) {
      const __m512 a = _mm512_set1_ps(w[r * w_step + n * w_stride]);
#pragma GCC unroll 8
      for (int u = 0; u < kVectors; ++u) acc[r][u] = _mm512_fmadd_ps(a, x[u], acc[r][u]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kSums; ++r) {
#pragma GCC unroll 8
    for (int u = 0; u < kVectors - 1; ++u) _mm512_storeu_ps(out + r * out_stride + 16 * u, acc[r][u]);
    _mm512_mask_storeu_ps(out + r * out_stride + 16 * (kVectors - 1), last, acc[r][kVectors - 1]);
  }
}

template <int kVectors>
void sums_of(const float* w, int64_t w_step, int64_t w_stride, const float* rows, int64_t len, int64_t d, float* out,
             int64_t out_stride, int64_t count) {
  // at most 16 accumulators; each load of a row then serves kSums sums
  constexpr int kSums = kVectors <= 2 ? 8 : kVectors <= 4 ? 4 : 2;
  int64_t r = 0;
  for (; r + kSums <= count; r += kSums)
    sums_block<kSums, kVectors>(w + r * w_step, w_step, w_stride, rows, len, d, out + r * out_stride, out_stride);
  if constexpr (kSums > 4)
    for (; r + 4 <= count; r += 4)
      sums_block<4, kVectors>(w + r * w_step, w_step, w_stride, rows, len, d, out + r * out_stride, out_stride);
  for (; r < count; ++r)
    sums_block<1, kVectors>(w + r * w_step, w_step, w_stride, rows, len, d, out + r * out_stride, out_stride);
}

void weighted_sums(const float* w, int64_t w_step, int64_t w_stride, const float* rows, int64_t len, int64_t d,
                   float* out, int64_t out_stride, int64_t count) {
  switch ((d + 15) / 16) {
    case 1: return sums_of<1>(w, w_step, w_stride, rows, len, d, out, out_stride, count);
    case 2: return sums_of<2>(w, w_step, w_stride, rows, len, d, out, out_stride, count);
    case 3: return sums_of<3>(w, w_step, w_stride, rows, len, d, out, out_stride, count);
    case 4: return sums_of<4>(w, w_step, w_stride, rows, len, d, out, out_stride, count);
    case 5: return sums_of<5>(w, w_step, w_stride, rows, len, d, out, out_stride, count);
    case 6: return sums_of<6>(w, w_step, w_stride, rows, len, d, out, out_stride, count);
    case 7: return sums_of<7>(w, w_step, w_stride, rows, len, d, out, out_stride, count);
    default: return sums_of<8>(w, w_step, w_stride, rows, len, d, out, out_stride, count);
  }
}
#else
void rows_times(const float* x, int64_t x_stride, const float* mt, int64_t d, int64_t cols, float* out,
                int64_t out_stride, int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    for (int64_t j = 0; j < cols; j += kColumns) {
      float acc[kColumns] = {};
      for (int64_t c = 0; c < d; ++c) {
        const float a = x[r * x_stride + c];
        const float* m = mt + c * cols + j;
#pragma omp simd
        for (int64_t u = 0; u < kColumns; ++u) acc[u] += a * m[u];
      }
      std::copy(acc, acc + kColumns, out + r * out_stride + j);
    }
  }
}

void weighted_sums(const float* w, int64_t w_step, int64_t w_stride, const float* rows, int64_t len, int64_t d,
                   float* out, int64_t out_stride, int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    float acc[kMaxHeadDim] = {};
    for (int64_t n = 0; n < len; ++n) {
      const float a = w[r * w_step + n * w_stride];
      const float* row = rows + n * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) acc[c] += a * row[c];
    }
    std::copy(acc, acc + d, out + r * out_stride);
  }
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
    int64_t e = lo;
#if defined(__AVX512F__)
    // 16 keep decisions per compare: a row-head's mask is ~L^2 elements, drawn again in the backward
    const __m512i threshold = _mm512_set1_epi32(int(bound));
    const __m512 scale = _mm512_set1_ps(dropout.scale);
    for (; e < hi; e += 16) {
      const __mmask16 lanes = hi - e >= 16 ? __mmask16(0xffff) : tail_mask(hi - e);
      const __m512i words = _mm512_maskz_loadu_epi32(lanes, bits + (e - start));
      const __mmask16 keep = _mm512_mask_cmpge_epu32_mask(lanes, words, threshold);
      _mm512_mask_storeu_ps(multipliers + (e - first), lanes, _mm512_maskz_mov_ps(keep, scale));
    }
#endif
    for (; e < hi; ++e) multipliers[e - first] = bits[e - start] >= bound ? dropout.scale : 0.0f;
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
  float* probs = w.probs.data();
  for (int64_t h = 0; h < heads; ++h) {
    if (drops) fill_multipliers(w.multipliers.data(), layout.row_start[r] + h * lq * lk, lq * lk, dropout);
    rows_times(&w.q[h * lq * d], d, &w.kt[h * d * cols], d, cols, probs, cols, lq);
    for (int64_t i = 0; i < lq; ++i) {
      float* p = probs + i * cols;
      const float shift = max_of(p, lk);
      const float sum = sum_exp<true>(p, shift, p, lk);
      lse[(q0 + i) * heads + h] = shift + std::log(sum);
      const float inv = 1.0f / sum;
      if (drops) {
        const float* m = &w.multipliers[i * lk];
#pragma omp simd
        for (int64_t j = 0; j < lk; ++j) p[j] *= inv * m[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < lk; ++j) p[j] *= inv;
      }
    }
    weighted_sums(probs, cols, 1, &w.v[h * lk * d], lk, d, row_out, d, lq);
    for (int64_t i = 0; i < lq; ++i) store_row(row_out + i * d, out + ((q0 + i) * heads + h) * d, d);
  }
}

template <typename Element>
void backward_row(const Element* q, const Element* k, const Element* v, const VarlenAttentionShape& s, float scale,
                  const VarlenAttentionDropout& dropout, const Layout& layout, int64_t r, Scratch& w,
                  const Element* grad_out, const float* lse, Element* grad_q, Element* grad_k, Element* grad_v,
                  int64_t gs) {
  const int64_t d = s.head_dim, heads = s.heads;
  const int64_t q0 = s.cu_q[r], lq = s.cu_q[r + 1] - q0, k0 = s.cu_k[r], lk = s.cu_k[r + 1] - k0;
  const int64_t cols = padded(lk);
  float* row_out = w.out.data();
  if (lk == 0) {  // a zero output, whatever the queries
    std::fill(row_out, row_out + d, 0.0f);
    for (int64_t i = q0; i < q0 + lq; ++i)
      for (int64_t h = 0; h < heads; ++h) store_row(row_out, grad_q + i * gs + h * d, d);
    return;
  }
  pack_rows(q + q0 * s.q_token_stride, s.q_token_stride, s.q_head_stride, lq, heads, d, scale, w.q.data());
  pack_rows(grad_out + q0 * heads * d, heads * d, d, lq, heads, d, 1.0f, w.grad_out.data());
  pack_rows(k + k0 * s.k_token_stride, s.k_token_stride, s.k_head_stride, lk, heads, d, scale, w.k.data());
  pack_transposed(k + k0 * s.k_token_stride, s.k_token_stride, s.k_head_stride, lk, heads, d, w.kt.data());
  pack_transposed(v + k0 * s.v_token_stride, s.v_token_stride, s.v_head_stride, lk, heads, d, w.vt.data());
  const bool drops = dropout.threshold != 0;
  float* probs = w.probs.data();
  float* grad_scores = w.grad_scores.data();
  for (int64_t h = 0; h < heads; ++h) {
    if (drops) fill_multipliers(w.multipliers.data(), layout.row_start[r] + h * lq * lk, lq * lk, dropout);
    const float* qh = &w.q[h * lq * d];  // times scale
    const float* grad_oh = &w.grad_out[h * lq * d];
    rows_times(qh, d, &w.kt[h * d * cols], d, cols, probs, cols, lq);
    // the gradient of the dropped-out probabilities, then of the probabilities, then of the scores
    rows_times(grad_oh, d, &w.vt[h * d * cols], d, cols, grad_scores, cols, lq);
    for (int64_t i = 0; i < lq; ++i) {
      float* p = probs + i * cols;
      float* g = grad_scores + i * cols;
      sum_exp<true>(p, lse[(q0 + i) * heads + h], p, lk);
      if (drops) {
        const float* m = &w.multipliers[i * lk];
#pragma omp simd
        for (int64_t j = 0; j < lk; ++j) g[j] *= m[j];
      }
      // sum_j P_ij dL/dP_ij in fp32 from the same terms
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < lk; ++j) dot += p[j] * g[j];
#pragma omp simd
      for (int64_t j = 0; j < lk; ++j) g[j] = p[j] * (g[j] - dot);
      if (drops) {  // p becomes the dropped-out probabilities, the weights of dV
        const float* m = &w.multipliers[i * lk];
#pragma omp simd
        for (int64_t j = 0; j < lk; ++j) p[j] *= m[j];
      }
    }
    weighted_sums(grad_scores, cols, 1, &w.k[h * lk * d], lk, d, row_out, d, lq);  // k carries the scale
    for (int64_t i = 0; i < lq; ++i) store_row(row_out + i * d, grad_q + (q0 + i) * gs + h * d, d);
    // dV = dropped^T dO and dK = dS^T (q * scale): sums over the queries, one per key
    weighted_sums(probs, 1, cols, grad_oh, lq, d, row_out, d, lk);
    for (int64_t j = 0; j < lk; ++j) store_row(row_out + j * d, grad_v + (k0 + j) * gs + h * d, d);
    weighted_sums(grad_scores, 1, cols, qh, lq, d, row_out, d, lk);
    for (int64_t j = 0; j < lk; ++j) store_row(row_out + j * d, grad_k + (k0 + j) * gs + h * d, d);
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
              Element* grad_k, Element* grad_v, int64_t grad_token_stride, int num_threads) {
  const Layout layout(s);
  const int64_t gs = grad_token_stride ? grad_token_stride : s.heads * s.head_dim;
  for_each_row(s, layout, true, dropout.threshold != 0, num_threads, [&](int64_t r, Scratch& w) {
    backward_row(q, k, v, s, scale, dropout, layout, r, w, grad_out, lse, grad_q, grad_k, grad_v, gs);
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
                               int64_t grad_token_stride, int num_threads) {
  if (dtype == 0) {
    backward(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v), shape, scale,
             dropout, static_cast<const float*>(grad_out), lse, static_cast<float*>(grad_q),
             static_cast<float*>(grad_k), static_cast<float*>(grad_v), grad_token_stride, num_threads);
  } else {
    backward(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), shape,
             scale, dropout, static_cast<const uint16_t*>(grad_out), lse, static_cast<uint16_t*>(grad_q),
             static_cast<uint16_t*>(grad_k), static_cast<uint16_t*>(grad_v), grad_token_stride, num_threads);
  }
}

}  // namespace fastcls
