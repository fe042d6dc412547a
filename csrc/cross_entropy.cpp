// The cross-entropy kernels' chunked, pipelined row loop; the softmax arithmetic it runs is in softmax.h.
#include "cross_entropy.h"

#include "bf16.h"
#include "softmax.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastcls {
namespace {

// A row is walked in chunks that stay in L1: each chunk is read from memory once, its max taken, and its
// exponentials (relative to the chunk's own max) summed and, when a gradient is wanted, kept in a per-thread row
// buffer in L2. The gradient pass then only rescales those exponentials per chunk: one exp per logit in all.
constexpr int64_t kChunk = 2048;

// Threads take rows in batches of about this many logits: dynamic scheduling keeps both cores busy when one is
// shared with another process or skips ignored rows, and batching keeps its overhead negligible for narrow rows.
constexpr int64_t kLogitsPerTask = 32768;

// Gradient rows at least this many bytes long, written to a buffer of their own, bypass the cache (non-temporal
// stores): nothing reads them before the backward, and a cached store would first read every destination line.
constexpr int64_t kStreamingRowBytes = 16384;


inline int64_t rows_per_task(int64_t n_classes) {
  return std::max<int64_t>(1, kLogitsPerTask / std::max<int64_t>(1, n_classes));
}


// memcpy whose 64-byte-aligned middle bypasses the cache.
void copy_streaming(void* dst, const void* src, int64_t bytes) {
#if defined(__AVX512F__)
  auto* out = static_cast<char*>(dst);
  const auto* in = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (64 - reinterpret_cast<uintptr_t>(out) % 64) % 64);
  std::memcpy(out, in, head);
  int64_t done = head;
  for (; done + 64 <= bytes; done += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out + done), _mm512_loadu_si512(in + done));
  std::memcpy(out + done, in + done, bytes - done);
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Orders this thread's non-temporal stores before whatever follows the parallel region.
inline void fence_streaming_stores() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// Rounds `len` fp32 values to the gradient's dtype and stores them at `dst`.
template <typename Logit>
void store_chunk(Logit* dst, const float* values, int64_t len, bool streaming, Logit* narrow_buffer) {
  const Logit* src;
  if constexpr (std::is_same_v<Logit, float>) {
    src = values;
  } else {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) narrow_buffer[k] = from_f32<Logit>(values[k]);
    src = narrow_buffer;
  }
  if (streaming)
    copy_streaming(dst, src, len * int64_t(sizeof(Logit)));
  else
    std::memcpy(dst, src, len * sizeof(Logit));
}

// The gradient of one chunk straight from its kept exponentials: dst_k = e_k * coef - offset, minus target_coef
// at k == target_pos (the -1 goes in before rounding, so a bf16/fp16 target gradient is the rounded exact
// value), stored in the gradient's dtype, streaming past the cache when asked. Returns false where this build
// has no vector path for the dtype; the caller then goes through store_chunk.
#if defined(__AVX512F__)
inline __m256i narrow16(__m512 v, uint16_t*) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  return _mm256_setzero_si256();  // unused: grad_chunk_direct declines bf16 without AVX512-BF16
#endif
}
inline __m256i narrow16(__m512 v, Half*) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline void store_vector(float* dst, __m512 v, bool stream) {
  if (stream)
    _mm512_stream_ps(dst, v);
  else
    _mm512_storeu_ps(dst, v);
}
template <typename Logit>
inline void store_vector(Logit* dst, __m512 v, bool stream) {
  const __m256i narrowed = narrow16(v, dst);
  if (stream)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), narrowed);
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), narrowed);
}
inline void store_masked(float* dst, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(dst, mask, v); }
template <typename Logit>
inline void store_masked(Logit* dst, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(dst, mask, narrow16(v, dst));
}
#endif

template <typename Logit>
bool grad_chunk_direct(const float* e, float coef, float offset, int64_t target_pos, float target_coef, Logit* dst,
                       int64_t len, bool streaming) {
#if defined(__AVX512F__)
#if !defined(__AVX512BF16__)
  if constexpr (std::is_same_v<Logit, uint16_t>) return false;
#endif
  const __m512 c = _mm512_set1_ps(coef), o = _mm512_set1_ps(offset), tc = _mm512_set1_ps(target_coef);
  auto value = [&](int64_t k, __mmask16 mask) {
    __m512 v = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, e + k), c, o);
    const uint64_t lane = uint64_t(target_pos - k);
    if (lane < 16) v = _mm512_mask_sub_ps(v, __mmask16(1u << lane), v, tc);
    return v;
  };
  int64_t k = 0;
  if (streaming) {
    constexpr int64_t kAlign = 16 * int64_t(sizeof(Logit));
    const int64_t head = std::min<int64_t>(
        len, int64_t((kAlign - reinterpret_cast<uintptr_t>(dst) % kAlign) % kAlign) / int64_t(sizeof(Logit)));
    if (head > 0) store_masked(dst, tail_mask(head), value(0, tail_mask(head)));
    for (k = head; k + 16 <= len; k += 16) store_vector(dst + k, value(k, 0xffff), true);
  } else {
    for (; k + 16 <= len; k += 16) store_vector(dst + k, value(k, 0xffff), false);
  }
  if (k < len) store_masked(dst + k, tail_mask(len - k), value(k, tail_mask(len - k)));
  return true;
#else
  (void)e, (void)coef, (void)offset, (void)target_pos, (void)target_coef, (void)dst, (void)len, (void)streaming;
  return false;
#endif
}

struct Options {
  int64_t n_classes;
  int64_t ignore_index;
  const float* class_weight;  // null: every weight 1
  float class_weight_total;   // sum of the class weights (n_classes without them)
  float label_smoothing;
  float grad_scale;
};

float class_weight_total(const float* class_weight, int64_t n_classes) {
  if (class_weight == nullptr) return float(n_classes);
  double total = 0.0;
  for (int64_t k = 0; k < n_classes; ++k) total += class_weight[k];
  return float(total);
}

// Per-thread scratch. A thread takes rows in blocks and pipelines them: while it reads row i+1 (first pass) it
// writes row i's gradient chunk by chunk, so the memory system always has a read and a write stream in flight
// instead of alternating between a row's read phase and its write phase. Two sets of exponentials alternate.
template <typename Logit>
struct RowScratch {
  struct AlignedDelete {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  using Buffer = std::unique_ptr<float[], AlignedDelete>;
  static Buffer allocate(int64_t n) { return Buffer(n > 0 ? new (std::align_val_t(64)) float[n] : nullptr); }

  RowScratch(int64_t n_classes, bool with_grad)
      : exps{allocate(with_grad ? n_classes : 0), allocate(with_grad ? n_classes : 0)},
        chunk_max{allocate((n_classes + kChunk - 1) / kChunk), allocate((n_classes + kChunk - 1) / kChunk)} {}
  Buffer exps[2];
  Buffer chunk_max[2];
  alignas(64) float widened[kChunk];
  alignas(64) float out[kChunk];
  alignas(64) Logit narrowed[kChunk];
};

// A row whose first pass is done and whose gradient is still to be written.
template <typename Logit>
struct PendingGrad {
  Logit* grad_row = nullptr;  // null: nothing pending
  bool zero = false;          // an ignored row: its gradient is 0
  int64_t target = 0;
  float lse = 0.0f, prob_coef = 0.0f, target_coef = 0.0f, class_coef = 0.0f;
  const float* exps = nullptr;
  const float* chunk_max = nullptr;
};

// Writes chunk [start, start + len) of a pending row's gradient.
template <typename Logit>
void write_grad_chunk(const PendingGrad<Logit>& p, int64_t c, int64_t start, int64_t len, const Options& o,
                      RowScratch<Logit>& s, bool streaming) {
  float* out = s.out;
  if (p.zero) {
    std::fill(out, out + len, 0.0f);
    store_chunk(p.grad_row + start, out, len, streaming, s.narrowed);
    return;
  }
  const float* e = p.exps + start;
  const float chunk_coef = p.prob_coef * exp_nonpositive(p.chunk_max[c] - p.lse);
  const bool per_class_offset = o.class_weight != nullptr && o.label_smoothing > 0.0f;
  if (!per_class_offset && grad_chunk_direct(e, chunk_coef, p.class_coef, p.target - start, p.target_coef,
                                             p.grad_row + start, len, streaming))
    return;
  if (per_class_offset) {
    const float* w = o.class_weight + start;
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) out[k] = e[k] * chunk_coef - p.class_coef * w[k];
  } else {
    scale_shift(e, chunk_coef, p.class_coef, out, len);
  }
  if (p.target >= start && p.target < start + len) out[p.target - start] -= p.target_coef;
  store_chunk(p.grad_row + start, out, len, streaming, s.narrowed);
}

template <typename Logit>
void flush(PendingGrad<Logit>& p, const Options& o, RowScratch<Logit>& s, bool streaming) {
  if (p.grad_row == nullptr) return;
  for (int64_t start = 0, c = 0; start < o.n_classes; start += kChunk, ++c)
    write_grad_chunk(p, c, start, std::min(kChunk, o.n_classes - start), o, s, streaming);
  p.grad_row = nullptr;
}

// One kept row's first pass: returns its loss and, when `next` is given, makes it the pending gradient (its
// exponentials kept in `exps` / `chunk_max`). Writes `previous` (if any) chunk by chunk along the way.
template <typename Logit>
float first_pass(const Logit* row, int64_t t, const Options& o, RowScratch<Logit>& s, float* exps,
                 float* chunk_maxes, PendingGrad<Logit>* next, PendingGrad<Logit>& previous, bool streaming) {
  const int64_t n_classes = o.n_classes;
  const bool smoothing = o.label_smoothing > 0.0f;
  float row_max = kNegInf;
  float row_sum = 0.0f;  // sum_k exp(x_k - row_max)
  double weighted_logit_sum = 0.0;  // sum_k w_k x_k, for label smoothing
  for (int64_t start = 0, c = 0; start < n_classes; start += kChunk, ++c) {
    const int64_t len = std::min(kChunk, n_classes - start);
    const float* x = chunk_as_f32(row + start, len, s.widened);
    const float chunk_max = max_of(x, len);
    // A chunk of -inf logits (masked classes) has exponentials 0, not exp(-inf - -inf).
    const float shift = chunk_max == kNegInf ? 0.0f : chunk_max;
    float chunk_sum;
    if (next != nullptr) {
      chunk_sum = sum_exp<true>(x, shift, exps + start, len);
      chunk_maxes[c] = chunk_max;
    } else {
      chunk_sum = sum_exp<false>(x, shift, nullptr, len);
    }
    if (smoothing) {
      float chunk_weighted = 0.0f;
      if (o.class_weight != nullptr) {
        const float* w = o.class_weight + start;
#pragma omp simd reduction(+ : chunk_weighted)
        for (int64_t k = 0; k < len; ++k) chunk_weighted += w[k] * x[k];
      } else {
#pragma omp simd reduction(+ : chunk_weighted)
        for (int64_t k = 0; k < len; ++k) chunk_weighted += x[k];
      }
      weighted_logit_sum += chunk_weighted;
    }
    if (chunk_max > row_max) {
      row_sum = row_sum * exp_nonpositive(row_max - chunk_max) + chunk_sum;
      row_max = chunk_max;
    } else if (chunk_max != kNegInf) {
      row_sum += chunk_sum * exp_nonpositive(chunk_max - row_max);
    }
    if (previous.grad_row != nullptr) write_grad_chunk(previous, c, start, len, o, s, streaming);
  }
  previous.grad_row = nullptr;
  const float log_sum = std::log(row_sum);
  const float lse = row_max + log_sum;
  const float w_t = o.class_weight != nullptr ? o.class_weight[t] : 1.0f;
  const float eps = o.label_smoothing;
  const float smooth_per_class = eps / float(n_classes);
  // Summed in this order, a confident row's small loss does not cancel away as lse - x_t would. (Read before
  // the row's gradient is written, which may be over the row itself.)
  const float nll = (row_max - to_f32(row[t])) + log_sum;
  float loss = (1.0f - eps) * w_t * nll;
  if (smoothing) loss += smooth_per_class * float(double(o.class_weight_total) * lse - weighted_logit_sum);
  if (next != nullptr) {
    next->zero = false;
    next->target = t;
    next->lse = lse;
    next->prob_coef = o.grad_scale * ((1.0f - eps) * w_t + smooth_per_class * o.class_weight_total);
    next->target_coef = o.grad_scale * (1.0f - eps) * w_t;
    next->class_coef = o.grad_scale * smooth_per_class;
    next->exps = exps;
    next->chunk_max = chunk_maxes;
  }
  return loss;
}

template <typename Logit>
void rows(const Logit* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride, const int64_t* target,
          int64_t ignore_index, const float* class_weight, float label_smoothing, float* loss, Logit* grad,
          int64_t grad_row_stride, float grad_scale, int num_threads) {
  const Options options{n_classes,     ignore_index, class_weight, class_weight_total(class_weight, n_classes),
                        label_smoothing, grad_scale};
  // Written over the logits, the gradient lands in lines the row's first pass has just brought into the cache.
  const bool streaming = static_cast<const void*>(grad) != static_cast<const void*>(logits) &&
                         n_classes * int64_t(sizeof(Logit)) >= kStreamingRowBytes;
  // Blocks of at least 8 rows give the pipeline something to overlap.
  const int64_t block_rows = std::max<int64_t>(rows_per_task(n_classes), grad != nullptr ? 8 : 1);
  const int64_t n_blocks = (n_rows + block_rows - 1) / block_rows;
#pragma omp parallel num_threads(num_threads)
  {
    RowScratch<Logit> scratch(n_classes, grad != nullptr);
    PendingGrad<Logit> pending[2];
#pragma omp for schedule(dynamic, 1)
    for (int64_t block = 0; block < n_blocks; ++block) {
      PendingGrad<Logit>* previous = nullptr;
      const int64_t end = std::min(n_rows, (block + 1) * block_rows);
      for (int64_t i = block * block_rows; i < end; ++i) {
        const int64_t t = target[i];
        const int slot = int(i & 1);
        PendingGrad<Logit>* next = grad != nullptr ? &pending[slot] : nullptr;
        if (t == ignore_index || t < 0 || t >= n_classes) {
          loss[i] = 0.0f;
          if (next != nullptr) {
            next->zero = true;
            next->grad_row = grad + i * grad_row_stride;
            if (previous != nullptr) flush(*previous, options, scratch, streaming);
            previous = next;
          }
          continue;
        }
        PendingGrad<Logit> none;
        loss[i] = first_pass(logits + i * row_stride, t, options, scratch, scratch.exps[slot].get(),
                             scratch.chunk_max[slot].get(), next, previous != nullptr ? *previous : none, streaming);
        if (next != nullptr) next->grad_row = grad + i * grad_row_stride;
        previous = next;
      }
      if (previous != nullptr) flush(*previous, options, scratch, streaming);
    }
    fence_streaming_stores();
  }
}

}  // namespace

void cross_entropy_target_summary(const int64_t* target, int64_t n_rows, int64_t n_classes, int64_t ignore_index,
                                  const float* class_weight, double* weight_sum, int64_t* kept_rows) {
  double sum = 0.0;
  int64_t kept = 0;
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t t = target[i];
    if (t == ignore_index) continue;
    if (t < 0 || t >= n_classes)
      throw std::out_of_range("cross_entropy: target " + std::to_string(t) + " in row " + std::to_string(i) +
                              " is outside [0, " + std::to_string(n_classes) + ") and is not ignore_index (" +
                              std::to_string(ignore_index) + ")");
    sum += class_weight != nullptr ? class_weight[t] : 1.0;
    ++kept;
  }
  *weight_sum = sum;
  *kept_rows = kept;
}

void cross_entropy_rows_f32(const float* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                            const int64_t* target, int64_t ignore_index, const float* class_weight,
                            float label_smoothing, float* loss, float* grad, int64_t grad_row_stride,
                            float grad_scale, int num_threads) {
  rows(logits, n_rows, n_classes, row_stride, target, ignore_index, class_weight, label_smoothing, loss, grad,
       grad_row_stride, grad_scale, num_threads);
}

void cross_entropy_rows_bf16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                             const int64_t* target, int64_t ignore_index, const float* class_weight,
                             float label_smoothing, float* loss, uint16_t* grad, int64_t grad_row_stride,
                             float grad_scale, int num_threads) {
  rows(logits, n_rows, n_classes, row_stride, target, ignore_index, class_weight, label_smoothing, loss, grad,
       grad_row_stride, grad_scale, num_threads);
}

void cross_entropy_rows_f16(const uint16_t* logits, int64_t n_rows, int64_t n_classes, int64_t row_stride,
                            const int64_t* target, int64_t ignore_index, const float* class_weight,
                            float label_smoothing, float* loss, uint16_t* grad, int64_t grad_row_stride,
                            float grad_scale, int num_threads) {
  static_assert(sizeof(Half) == sizeof(uint16_t), "fp16 logits are passed as uint16 bit patterns");
  rows(reinterpret_cast<const Half*>(logits), n_rows, n_classes, row_stride, target, ignore_index, class_weight,
       label_smoothing, loss, reinterpret_cast<Half*>(grad), grad_row_stride, grad_scale, num_threads);
}

}  // namespace fastcls
