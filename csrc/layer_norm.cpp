// Over ~400 lines: the portable and the AVX-512 row loops of both orders, forward and backward, share their
// helpers here; split, each file would repeat them.
#include "layer_norm.h"

#include "bf16.h"
#include "philox.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastcls {
namespace {

// Rows are split evenly between threads (every row costs the same); a thread gets at least this many elements,
// since waking one for less would cost more than it saves.
constexpr int64_t kMinElementsPerThread = 16384;

int threads_for(int64_t n_rows, int64_t n_cols, int num_threads) {
  const int64_t by_size = n_rows * n_cols / kMinElementsPerThread;
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), by_size, n_rows})));
}

// The Philox words of one row, drawn counter by counter into a 64-byte aligned buffer.
class RowBits {
 public:
  explicit RowBits(int64_t n_cols) : storage_(size_t(n_cols + 8 + 4 * kPhiloxCounters + 16)) {
    const auto address = reinterpret_cast<std::uintptr_t>(storage_.data());
    words_ = storage_.data() + ((64 - address % 64) % 64) / sizeof(uint32_t);
  }

  // Returns words with words[col] the word of element row * n_cols + col.
  const uint32_t* draw(int64_t row, int64_t n_cols, PhiloxKey key, uint64_t counter_offset) {
    const uint64_t first = uint64_t(row) * uint64_t(n_cols);
    const int64_t lead = int64_t(first % 4);
    const int64_t n_counters = (lead + n_cols + 3) / 4;
    uint32_t* words = words_;
    for (int64_t c = 0; c < n_counters; c += kPhiloxCounters) philox_bits(counter_offset + first / 4 + uint64_t(c), key, words + 4 * c);
    return words + lead;
  }

 private:
  std::vector<uint32_t> storage_;
  uint32_t* words_;
};

struct Dropout {
  bool on;
  bool after;
  uint32_t bound;
  float scale;
  PhiloxKey key;
  uint64_t counter_offset;  // added to every element's counter (a stream's offset, see layer_norm.h)
};

// The per-row loops, specialised on what applies so that each is one branch-free vectorised pass over the row.

// s = dropout(x) + residual for one row; returns the sum of s.
template <bool kDropX, bool kResidual, typename X, typename R>
float load_row(const X* xr, const R* rr, const uint32_t* bits, uint32_t bound, float scale, float* s, int64_t n) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    float v = to_f32(xr[j]);
    if constexpr (kDropX) {
      // a select rather than a multiply by 0, so that a dropped NaN or infinity becomes 0
      const float scaled = v * scale;
      v = bits[j] >= bound ? scaled : 0.0f;
    }
    if constexpr (kResidual) v += to_f32(rr[j]);
    s[j] = v;
    total += v;
  }
  return total;
}

// dy (the upstream gradient, through the dropout when it follows the norm) and xhat for one row, with the row's
// weight and bias gradient terms accumulated; returns (sum of dy * weight * xhat, sum of dy * weight).
template <bool kDropY, bool kFromOutput, typename O>
std::pair<float, float> gradient_terms(const O* gr, const O* sr, const uint32_t* bits, uint32_t bound, float scale,
                                       const float* weight, const float* bias, const float* inverse_weight,
                                       float row_mean, float row_rstd, float* dy, float* xhat, float* grad_weight,
                                       float* grad_bias, int64_t n) {
  float sum_g_xhat = 0.0f, sum_g = 0.0f;
#pragma omp simd reduction(+ : sum_g_xhat, sum_g)
  for (int64_t j = 0; j < n; ++j) {
    float d = to_f32(gr[j]);
    if constexpr (kDropY) {
      const float scaled = d * scale;
      d = bits[j] >= bound ? scaled : 0.0f;
    }
    float h;
    if constexpr (kFromOutput) {
      h = (to_f32(sr[j]) - bias[j]) * inverse_weight[j];
    } else {
      h = (to_f32(sr[j]) - row_mean) * row_rstd;
    }
    dy[j] = d;
    xhat[j] = h;
    grad_weight[j] += d * h;
    grad_bias[j] += d;
    const float g = d * weight[j];
    sum_g_xhat += g * h;
    sum_g += g;
  }
  return {sum_g_xhat, sum_g};
}

// grad_residual = d(sum), grad_x = dropout'(d(sum)) for one row.
template <bool kDropX, bool kGradSum, bool kResidual, typename X, typename R, typename O>
void store_gradients(const float* dy, const float* xhat, const float* weight, float mean_g, float mean_g_xhat,
                     float row_rstd, const O* gsr, const uint32_t* bits, uint32_t bound, float scale, X* gxr, R* grr,
                     int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float ds = (dy[j] * weight[j] - mean_g - xhat[j] * mean_g_xhat) * row_rstd;
    if constexpr (kGradSum) ds += to_f32(gsr[j]);
    if constexpr (kResidual) grr[j] = from_f32<R>(ds);
    if constexpr (kDropX) {
      const float scaled = ds * scale;
      ds = bits[j] >= bound ? scaled : 0.0f;
    }
    gxr[j] = from_f32<X>(ds);
  }
}

// Calls f(std::integral_constant<bool, flag>{}): turns a runtime flag into a template argument.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename X, typename R, typename O>
void forward_rows(const X* x, const R* residual, const float* weight, const float* bias, O* out, O* sum,
                  uint16_t* out_bf16, float* mean, float* rstd, int64_t row_begin, int64_t row_end, int64_t n_cols,
                  float eps, const Dropout& drop) {
  const uint32_t bound = drop.bound;  // locals: a member read through a reference is reloaded every iteration
  const float scale = drop.scale;
  std::vector<float> summed(static_cast<size_t>(n_cols));
  float* s = summed.data();
  RowBits row_bits(n_cols);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t offset = row * n_cols;
    const uint32_t* bits = drop.on ? row_bits.draw(row, n_cols, drop.key, drop.counter_offset) : nullptr;
    float total = 0.0f;
    with_flag(drop.on && !drop.after, [&](auto drop_x) {
      with_flag(residual != nullptr, [&](auto has_residual) {
        total = load_row<decltype(drop_x)::value, decltype(has_residual)::value>(
            x + offset, has_residual ? residual + offset : nullptr, bits, bound, scale, s, n_cols);
      });
    });
    const float row_mean = total / float(n_cols);
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < n_cols; ++j) squares += (s[j] - row_mean) * (s[j] - row_mean);
    const float row_rstd = 1.0f / std::sqrt(squares / float(n_cols) + eps);
    if (sum != nullptr) {
      O* sr = sum + offset;
#pragma omp simd
      for (int64_t j = 0; j < n_cols; ++j) sr[j] = from_f32<O>(s[j]);
    }
    O* yr = out + offset;
    if (drop.on && drop.after) {
#pragma omp simd
      for (int64_t j = 0; j < n_cols; ++j) {
        const float scaled = ((s[j] - row_mean) * row_rstd * weight[j] + bias[j]) * scale;
        yr[j] = from_f32<O>(bits[j] >= bound ? scaled : 0.0f);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n_cols; ++j) yr[j] = from_f32<O>((s[j] - row_mean) * row_rstd * weight[j] + bias[j]);
    }
    if (out_bf16 != nullptr) {
      uint16_t* cr = out_bf16 + offset;
#pragma omp simd
      for (int64_t j = 0; j < n_cols; ++j) cr[j] = f32_to_bf16(to_f32(yr[j]));
    }
    mean[row] = row_mean;
    rstd[row] = row_rstd;
  }
}

template <typename X, typename R, typename O>
void backward_rows(const O* grad_out, const O* saved, bool saved_is_output, const float* weight, const float* bias,
                   const float* mean, const float* rstd, const O* grad_sum, X* grad_x, R* grad_residual,
                   float* grad_weight, float* grad_bias, int64_t row_begin, int64_t row_end, int64_t n_cols,
                   const Dropout& drop) {
  const uint32_t bound = drop.bound;
  const float scale = drop.scale;
  std::vector<float> buffers(size_t(3 * n_cols));
  float* dy = buffers.data();
  float* xhat = dy + n_cols;
  float* inverse_weight = xhat + n_cols;
  for (int64_t j = 0; j < n_cols; ++j) inverse_weight[j] = 1.0f / weight[j];
  RowBits row_bits(n_cols);
  const float inverse_n = 1.0f / float(n_cols);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t offset = row * n_cols;
    const uint32_t* bits = drop.on ? row_bits.draw(row, n_cols, drop.key, drop.counter_offset) : nullptr;
    const float row_rstd = rstd[row];
    std::pair<float, float> sums;
    with_flag(drop.on && drop.after, [&](auto drop_y) {
      with_flag(saved_is_output, [&](auto from_output) {
        sums = gradient_terms<decltype(drop_y)::value, decltype(from_output)::value>(
            grad_out + offset, saved + offset, bits, bound, scale, weight, bias, inverse_weight, mean[row], row_rstd,
            dy, xhat, grad_weight, grad_bias, n_cols);
      });
    });
    const float mean_g_xhat = sums.first * inverse_n, mean_g = sums.second * inverse_n;
    with_flag(drop.on && !drop.after, [&](auto drop_x) {
      with_flag(grad_sum != nullptr, [&](auto has_grad_sum) {
        with_flag(grad_residual != nullptr, [&](auto has_residual) {
          store_gradients<decltype(drop_x)::value, decltype(has_grad_sum)::value, decltype(has_residual)::value>(
              dy, xhat, weight, mean_g, mean_g_xhat, row_rstd, has_grad_sum ? grad_sum + offset : nullptr, bits,
              bound, scale, grad_x + offset, has_residual ? grad_residual + offset : nullptr, n_cols);
        });
      });
    });
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(FASTCLS_PHILOX_KEEP_BITS)
// The AVX-512 rows: 16 columns a step, the keep decisions one bit per element (philox_keep_bits) used as the
// lane mask of the scaling multiply, bf16 widened and rounded in registers. Same arithmetic as the portable rows.
// Philox4x32-10 costs about as much as the rest of the kernel (some 0.35 ns per element and core on a Zen 4, bound
// by the vector pipes: ~1.9 zmm instructions per element, 8 of its 32-bit products per vpmuludq), so the rows hide
// memory behind it: each row's bits are drawn before its passes, the rows ahead are prefetched, and outputs too
// large to stay cached are stored non-temporally (streams()).
#define FASTCLS_LAYER_NORM_AVX512 1

// One step of 16 columns; the last step of a row masks its lanes (loads give 0 there, stores skip them).
template <bool kTail>
struct Step {
  __mmask16 lanes;

  __m512 load(const float* p) const {
    if constexpr (kTail) return _mm512_maskz_loadu_ps(lanes, p);
    return _mm512_loadu_ps(p);
  }
  __m512 load(const uint16_t* p) const {
    __m256i half;
    if constexpr (kTail) {
      half = _mm256_maskz_loadu_epi16(lanes, p);
    } else {
      half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    }
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
  void store(float* p, __m512 v) const {
    if constexpr (kTail) {
      _mm512_mask_storeu_ps(p, lanes, v);
    } else {
      _mm512_storeu_ps(p, v);
    }
  }
  // f32_to_bf16 on 16 lanes: round to nearest even, NaN kept quiet. The AVX512-BF16 instruction also flushes
  // fp32 subnormals (below 1.2e-38) to zero, where f32_to_bf16 rounds them.
  static __m256i to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    rounded = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(rounded);
#endif
  }
  void store(uint16_t* p, __m512 v) const {
    if constexpr (kTail) {
      _mm256_mask_storeu_epi16(p, lanes, to_bf16(v));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v));
    }
  }
  // A store to an output tensor; kStream: non-temporal, bypassing the caches (p 32- or 64-byte aligned, which
  // the caller checked for whole rows; a masked tail step never streams).
  template <bool kStream>
  void put(float* p, __m512 v) const {
    if constexpr (kStream && !kTail) {
      _mm512_stream_ps(p, v);
    } else {
      store(p, v);
    }
  }
  template <bool kStream>
  void put(uint16_t* p, __m512 v) const {
    if constexpr (kStream && !kTail) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(v));
    } else {
      store(p, v);
    }
  }
  // v with the lanes past the row's end zeroed.
  __m512 within(__m512 v) const {
    if constexpr (kTail) return _mm512_maskz_mov_ps(lanes, v);
    return v;
  }
};

// The input rows this many rows ahead are fetched while a row is worked on: the hardware prefetcher alone leaves
// the memory idle during each row's Philox draw and its passes over the cached row.
constexpr int64_t kPrefetchRows = 2;

template <typename T>
inline void prefetch(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// body(j, step) for the steps j = 0, 16, ... of a row of n columns.
template <typename F>
inline void for_each_step(int64_t n, F&& body) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) body(j, Step<false>{0xffff});
  if (j < n) body(j, Step<true>{__mmask16((1u << (n - j)) - 1)});
}

// The keep bits of one row: bit j of the row's mask is element row * n_cols + j's decision, all drawn by start().
// (Drawing them a block ahead inside the first pass measured no faster, and with two rows at once slower.)
class RowKeep {
 public:
  static constexpr int64_t kBlockColumns = 4 * kPhiloxCounters;

  explicit RowKeep(int64_t n_cols)
      : words_(size_t((n_cols + 3 + kBlockColumns) / kBlockColumns * kPhiloxRegisters + 2)) {}

  void start(int64_t row, int64_t n_cols, PhiloxKey key, uint32_t bound, uint64_t counter_offset) {
    const uint64_t first = uint64_t(row) * uint64_t(n_cols);
    lead_ = unsigned(first % 4);
    first_counter_ = counter_offset + first / 4;
    n_blocks_ = ((int64_t(lead_) + n_cols + 3) / 4 + kPhiloxCounters - 1) / kPhiloxCounters;
    key_ = key;
    bound_ = bound;
    for (int64_t block = 0; block < n_blocks_; ++block) draw_block(block);
  }

  // The 16 decisions of columns j..j+15 (j a multiple of 16).
  __mmask16 at(int64_t j) const {
    uint64_t bits;
    std::memcpy(&bits, reinterpret_cast<const unsigned char*>(words_.data()) + j / 8, sizeof bits);
    return __mmask16(bits >> lead_);
  }

 private:
  void draw_block(int64_t block) {
    philox_keep_bits(first_counter_ + uint64_t(block * kPhiloxCounters), key_, bound_,
                     words_.data() + block * kPhiloxRegisters);
  }

  std::vector<uint32_t> words_;
  unsigned lead_ = 0;
  uint64_t first_counter_ = 0;
  int64_t n_blocks_ = 0;
  PhiloxKey key_{0, 0};
  uint32_t bound_ = 0;
};

// Rows are worked on kRows at a time, their steps interleaved: a row's sums are chains of dependent adds (each
// lane adds the row's steps in order), and the chains of independent rows overlap where one row's would stall.
// Each row's arithmetic, and so its result, is the same as alone.
template <int kRows, typename F>
inline void for_rows(F&& f) {
  for (int r = 0; r < kRows; ++r) f(r);
}

// Rows row_begin .. row_begin + kRows - 1 (pointers at the first; row r is n elements further per row).
template <int kRows, bool kDropX, bool kDropY, bool kResidual, bool kSum, bool kStream, typename X, typename R,
          typename O>
void forward_row_avx512(const X* xr, const R* rr, const float* weight, const float* bias, O* yr, O* sr,
                        uint16_t* cr, RowKeep* keep, float scale, float eps, float* s, int64_t n, int64_t ahead,
                        float* row_mean, float* row_rstd) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  __m512 total[kRows];
  for_rows<kRows>([&](int r) { total[r] = _mm512_setzero_ps(); });
  for_each_step(n, [&](int64_t j, auto step) {
    for_rows<kRows>([&](int r) {
      const int64_t at = r * n + j;
      if (ahead != 0) {
        prefetch(xr + at + ahead);
        if constexpr (kResidual) prefetch(rr + at + ahead);
      }
      __m512 v = step.load(xr + at);
      // a masked multiply rather than a multiply by 0, so that a dropped NaN or infinity becomes 0
      if constexpr (kDropX) v = _mm512_maskz_mul_ps(keep[r].at(j), v, scale_v);
      if constexpr (kResidual) v = _mm512_add_ps(v, step.load(rr + at));
      step.store(s + at, v);
      if constexpr (kSum) step.template put<kStream>(sr + at, v);
      total[r] = _mm512_add_ps(total[r], v);
    });
  });
  const float inverse_n = 1.0f / float(n);
  __m512 mean_v[kRows], squares[kRows];
  for_rows<kRows>([&](int r) {
    row_mean[r] = _mm512_reduce_add_ps(total[r]) * inverse_n;
    mean_v[r] = _mm512_set1_ps(row_mean[r]);
    squares[r] = _mm512_setzero_ps();
  });
  for_each_step(n, [&](int64_t j, auto step) {
    for_rows<kRows>([&](int r) {
      const __m512 centred = step.within(_mm512_sub_ps(step.load(s + r * n + j), mean_v[r]));
      squares[r] = _mm512_fmadd_ps(centred, centred, squares[r]);
    });
  });
  __m512 rstd_v[kRows];
  for_rows<kRows>([&](int r) {
    row_rstd[r] = 1.0f / std::sqrt(_mm512_reduce_add_ps(squares[r]) * inverse_n + eps);
    rstd_v[r] = _mm512_set1_ps(row_rstd[r]);
  });
  for_each_step(n, [&](int64_t j, auto step) {
    const __m512 w = step.load(weight + j), b = step.load(bias + j);
    for_rows<kRows>([&](int r) {
      const int64_t at = r * n + j;
      const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(step.load(s + at), mean_v[r]), rstd_v[r]);
      __m512 y = _mm512_fmadd_ps(xhat, w, b);
      if constexpr (kDropY) y = _mm512_maskz_mul_ps(keep[r].at(j), y, scale_v);
      step.template put<kStream>(yr + at, y);
      if (cr != nullptr) step.template put<kStream>(cr + at, y);  // a branch, not a template flag: half the builds
    });
  });
}

// Rows row .. row + kRows - 1, interleaved as in forward_row_avx512; the weight and bias gradient columns take the
// rows' terms in row order, as one row at a time would.
template <int kRows, bool kDropY, bool kFromOutput, bool kDropX, bool kGradSum, bool kResidual, bool kStream,
          typename O, typename X, typename R>
void backward_row_avx512(const O* gr, const O* sr, const O* gsr, X* gxr, R* grr, RowKeep* keep, float scale,
                         const float* weight, const float* bias, const float* inverse_weight, const float* row_mean,
                         const float* row_rstd, float* g, float* xhat, float* grad_weight, float* grad_bias,
                         int64_t n, int64_t ahead) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  __m512 mean_v[kRows], rstd_v[kRows], sum_g_xhat[kRows], sum_g[kRows];
  for_rows<kRows>([&](int r) {
    mean_v[r] = _mm512_set1_ps(row_mean[r]);
    rstd_v[r] = _mm512_set1_ps(row_rstd[r]);
    sum_g_xhat[r] = _mm512_setzero_ps();
    sum_g[r] = _mm512_setzero_ps();
  });
  for_each_step(n, [&](int64_t j, auto step) {
    __m512 grad_w = step.load(grad_weight + j), grad_b = step.load(grad_bias + j);
    const __m512 w = step.load(weight + j);
    for_rows<kRows>([&](int r) {
      const int64_t at = r * n + j;
      if (ahead != 0) {
        prefetch(gr + at + ahead);
        prefetch(sr + at + ahead);
        if constexpr (kGradSum) prefetch(gsr + at + ahead);
      }
      __m512 d = step.load(gr + at);
      if constexpr (kDropY) d = _mm512_maskz_mul_ps(keep[r].at(j), d, scale_v);
      __m512 h;
      if constexpr (kFromOutput) {
        h = _mm512_mul_ps(_mm512_sub_ps(step.load(sr + at), step.load(bias + j)), step.load(inverse_weight + j));
      } else {
        h = _mm512_mul_ps(_mm512_sub_ps(step.load(sr + at), mean_v[r]), rstd_v[r]);
      }
      grad_w = _mm512_fmadd_ps(d, h, grad_w);
      grad_b = _mm512_add_ps(d, grad_b);
      const __m512 gw = _mm512_mul_ps(d, w);  // 0 past the row's end, as d is
      step.store(g + at, gw);
      step.store(xhat + at, h);
      sum_g_xhat[r] = _mm512_fmadd_ps(gw, h, sum_g_xhat[r]);
      sum_g[r] = _mm512_add_ps(sum_g[r], gw);
    });
    step.store(grad_weight + j, grad_w);
    step.store(grad_bias + j, grad_b);
  });
  const float inverse_n = 1.0f / float(n);
  __m512 mean_g[kRows], mean_g_xhat[kRows];
  for_rows<kRows>([&](int r) {
    mean_g[r] = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g[r]) * inverse_n);
    mean_g_xhat[r] = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g_xhat[r]) * inverse_n);
  });
  for_each_step(n, [&](int64_t j, auto step) {
    for_rows<kRows>([&](int r) {
      const int64_t at = r * n + j;
      const __m512 centred = _mm512_sub_ps(step.load(g + at), mean_g[r]);
      __m512 ds = _mm512_mul_ps(_mm512_fnmadd_ps(step.load(xhat + at), mean_g_xhat[r], centred), rstd_v[r]);
      if constexpr (kGradSum) ds = _mm512_add_ps(ds, step.load(gsr + at));
      if constexpr (kResidual) step.template put<kStream>(grr + at, ds);
      if constexpr (kDropX) ds = _mm512_maskz_mul_ps(keep[r].at(j), ds, scale_v);
      step.template put<kStream>(gxr + at, ds);
    });
  });
}

// Rows worked on at once (see forward_row_avx512): two where every tensor is bf16. Pairs of fp32 rows measured
// slower at 2000 x 384 (their six streams per pass conflict in the caches).
template <typename... T>
constexpr int kRowsAtOnce = ((sizeof(T) == 2) && ...) ? 2 : 1;

template <typename X, typename R, typename O>
void forward_rows_avx512(const X* x, const R* residual, const float* weight, const float* bias, O* out, O* sum,
                         uint16_t* out_bf16, float* mean, float* rstd, int64_t row_begin, int64_t row_end,
                         int64_t n_cols, float eps, const Dropout& drop, bool stream) {
  constexpr int kPair = kRowsAtOnce<X, R, O>;
  std::vector<float> summed(static_cast<size_t>(kPair * n_cols));
  std::vector<RowKeep> keep(kPair, RowKeep(n_cols));
  with_flag(stream, [&](auto streamed) {
  with_flag(drop.on && !drop.after, [&](auto drop_x) {
    with_flag(drop.on && drop.after, [&](auto drop_y) {
      with_flag(residual != nullptr, [&](auto has_residual) {
        with_flag(sum != nullptr, [&](auto has_sum) {
          // rows row .. row + kRows - 1
          auto block = [&](auto rows, int64_t row) {
            constexpr int kRows = decltype(rows)::value;
            const int64_t offset = row * n_cols;
            if (drop.on) {
              for (int r = 0; r < kRows; ++r) {
                keep[r].start(row + r, n_cols, drop.key, drop.bound, drop.counter_offset);
              }
            }
            forward_row_avx512<kRows, decltype(drop_x)::value, decltype(drop_y)::value,
                               decltype(has_residual)::value, decltype(has_sum)::value, decltype(streamed)::value>(
                x + offset, has_residual ? residual + offset : nullptr, weight, bias, out + offset,
                has_sum ? sum + offset : nullptr, out_bf16 != nullptr ? out_bf16 + offset : nullptr, keep.data(),
                drop.scale, eps, summed.data(), n_cols,
                row + kRows * (kPrefetchRows + 1) <= row_end ? kRows * kPrefetchRows * n_cols : 0, mean + row, rstd + row);
          };
          int64_t row = row_begin;
          for (; row + kPair <= row_end; row += kPair) block(std::integral_constant<int, kPair>{}, row);
          for (; row < row_end; ++row) block(std::integral_constant<int, 1>{}, row);
        });
      });
    });
  });
  });
  if (stream) _mm_sfence();  // the streamed stores reach memory before the caller reads them
}

template <typename X, typename R, typename O>
void backward_rows_avx512(const O* grad_out, const O* saved, bool saved_is_output, const float* weight,
                          const float* bias, const float* mean, const float* rstd, const O* grad_sum, X* grad_x,
                          R* grad_residual, float* grad_weight, float* grad_bias, int64_t row_begin,
                          int64_t row_end, int64_t n_cols, const Dropout& drop, bool stream) {
  constexpr int kPair = kRowsAtOnce<O, X, R>;
  std::vector<float> buffers(size_t((2 * kPair + 1) * n_cols));
  float* g = buffers.data();
  float* xhat = g + kPair * n_cols;
  float* inverse_weight = xhat + kPair * n_cols;
  for (int64_t j = 0; j < n_cols; ++j) inverse_weight[j] = 1.0f / weight[j];
  std::vector<RowKeep> keep(kPair, RowKeep(n_cols));
  with_flag(stream, [&](auto streamed) {
  with_flag(drop.on && drop.after, [&](auto drop_y) {
    with_flag(saved_is_output, [&](auto from_output) {
      with_flag(drop.on && !drop.after, [&](auto drop_x) {
        with_flag(grad_sum != nullptr, [&](auto has_grad_sum) {
          with_flag(grad_residual != nullptr, [&](auto has_residual) {
            // rows row .. row + kRows - 1
            auto block = [&](auto rows, int64_t row) {
              constexpr int kRows = decltype(rows)::value;
              const int64_t offset = row * n_cols;
              if (drop.on) {
                for (int r = 0; r < kRows; ++r) {
                  keep[r].start(row + r, n_cols, drop.key, drop.bound, drop.counter_offset);
                }
              }
              backward_row_avx512<kRows, decltype(drop_y)::value, decltype(from_output)::value,
                                  decltype(drop_x)::value, decltype(has_grad_sum)::value,
                                  decltype(has_residual)::value, decltype(streamed)::value>(
                  grad_out + offset, saved + offset, has_grad_sum ? grad_sum + offset : nullptr, grad_x + offset,
                  has_residual ? grad_residual + offset : nullptr, keep.data(), drop.scale, weight, bias,
                  inverse_weight, mean + row, rstd + row, g, xhat, grad_weight, grad_bias, n_cols,
                  row + kRows * (kPrefetchRows + 1) <= row_end ? kRows * kPrefetchRows * n_cols : 0);
            };
            int64_t row = row_begin;
            for (; row + kPair <= row_end; row += kPair) block(std::integral_constant<int, kPair>{}, row);
            for (; row < row_end; ++row) block(std::integral_constant<int, 1>{}, row);
          });
        });
      });
    });
  });
  });
  if (stream) _mm_sfence();
}
#endif

Dropout make_dropout(uint64_t seed, uint64_t counter_offset, uint64_t threshold, float scale, bool dropout_after) {
  return Dropout{threshold != 0, dropout_after, uint32_t(threshold), scale,
                 PhiloxKey{uint32_t(seed), uint32_t(seed >> 32)}, counter_offset};
}

// Calls f with a value of the element type of a dtype code.
template <typename F>
void with_element(int dtype, F&& f) {
  if (dtype == 1) {
    f(uint16_t{});
  } else {
    f(float{});
  }
}

#if defined(FASTCLS_LAYER_NORM_AVX512)
int64_t element_bytes(int dtype) { return dtype == 1 ? 2 : 4; }

// A call that touches more bytes than a last-level cache holds has its outputs evicted before anyone reads them:
// storing them non-temporally saves the read of each line a normal store makes first (a third of the forward's
// traffic, and of the backward's). Needs every output row to start on a 64-byte boundary.
constexpr int64_t kStreamBytes = int64_t(32) << 20;

bool streams(int64_t touched_bytes, std::initializer_list<std::pair<const void*, int64_t>> outputs) {
  if (touched_bytes < kStreamBytes) return false;
  for (const auto& [address, row_bytes] : outputs) {
    if (address != nullptr && (reinterpret_cast<std::uintptr_t>(address) % 64 != 0 || row_bytes % 64 != 0)) {
      return false;
    }
  }
  return true;
}
#endif

}  // namespace

void layer_norm_forward(const void* x, int x_dtype, const void* residual, int residual_dtype, const float* weight,
                        const float* bias, void* out, void* sum, int out_dtype, void* out_bf16, float* mean,
                        float* rstd, int64_t n_rows, int64_t n_cols, float eps, uint64_t seed, uint64_t counter_offset,
                        uint64_t threshold, float scale, bool dropout_after, int num_threads) {
  const Dropout drop = make_dropout(seed, counter_offset, threshold, scale, dropout_after);
  const int n_tasks = threads_for(n_rows, n_cols, num_threads);
#if defined(FASTCLS_LAYER_NORM_AVX512)
  const int64_t out_row_bytes = n_cols * element_bytes(out_dtype);
  const int64_t residual_row_bytes = residual ? n_cols * element_bytes(residual_dtype) : 0;
  const int64_t touched =
      n_rows * (n_cols * element_bytes(x_dtype) + residual_row_bytes + (sum ? 2 : 1) * out_row_bytes +
                (out_bf16 ? 2 * n_cols : 0));
  const bool stream = streams(touched, {{out, out_row_bytes}, {sum, out_row_bytes}, {out_bf16, 2 * n_cols}});
#endif
  with_element(x_dtype, [&](auto x_element) {
    with_element(residual_dtype, [&](auto residual_element) {
      with_element(out_dtype, [&](auto out_element) {
        using X = decltype(x_element);
        using R = decltype(residual_element);
        using O = decltype(out_element);
#pragma omp parallel for num_threads(n_tasks) schedule(static) if (n_tasks > 1)
        for (int task = 0; task < n_tasks; ++task) {
#if defined(FASTCLS_LAYER_NORM_AVX512)
          forward_rows_avx512(static_cast<const X*>(x), static_cast<const R*>(residual), weight, bias,
                              static_cast<O*>(out), static_cast<O*>(sum), static_cast<uint16_t*>(out_bf16), mean,
                              rstd, task * n_rows / n_tasks,
                              (task + 1) * n_rows / n_tasks, n_cols, eps, drop, stream);
#else
          forward_rows(static_cast<const X*>(x), static_cast<const R*>(residual), weight, bias, static_cast<O*>(out),
                       static_cast<O*>(sum), static_cast<uint16_t*>(out_bf16), mean, rstd, task * n_rows / n_tasks,
                       (task + 1) * n_rows / n_tasks, n_cols, eps, drop);
#endif
        }
      });
    });
  });
}

void layer_norm_backward(const void* grad_out, const void* saved, int saved_dtype, bool saved_is_output,
                         const float* weight, const float* bias, const float* mean, const float* rstd,
                         const void* grad_sum, void* grad_x, int x_dtype, void* grad_residual, int residual_dtype,
                         float* grad_weight_partial, float* grad_bias_partial, int64_t n_rows, int64_t n_cols,
                         uint64_t seed, uint64_t counter_offset, uint64_t threshold, float scale,
                         bool dropout_after, int num_threads) {
  const Dropout drop = make_dropout(seed, counter_offset, threshold, scale, dropout_after);
  const int n_tasks = threads_for(n_rows, n_cols, num_threads);
  std::fill(grad_weight_partial, grad_weight_partial + int64_t(num_threads) * n_cols, 0.0f);
  std::fill(grad_bias_partial, grad_bias_partial + int64_t(num_threads) * n_cols, 0.0f);
#if defined(FASTCLS_LAYER_NORM_AVX512)
  const int64_t saved_row_bytes = n_cols * element_bytes(saved_dtype);
  const int64_t x_row_bytes = n_cols * element_bytes(x_dtype);
  const int64_t residual_row_bytes = grad_residual ? n_cols * element_bytes(residual_dtype) : 0;
  const int64_t touched = n_rows * ((grad_sum ? 3 : 2) * saved_row_bytes + x_row_bytes + residual_row_bytes);
  const bool stream = streams(touched, {{grad_x, x_row_bytes}, {grad_residual, residual_row_bytes}});
#endif
  with_element(saved_dtype, [&](auto saved_element) {
    with_element(x_dtype, [&](auto x_element) {
      with_element(residual_dtype, [&](auto residual_element) {
        using O = decltype(saved_element);
        using X = decltype(x_element);
        using R = decltype(residual_element);
#pragma omp parallel for num_threads(n_tasks) schedule(static) if (n_tasks > 1)
        for (int task = 0; task < n_tasks; ++task) {
#if defined(FASTCLS_LAYER_NORM_AVX512)
          backward_rows_avx512(static_cast<const O*>(grad_out), static_cast<const O*>(saved), saved_is_output,
                               weight, bias, mean, rstd, static_cast<const O*>(grad_sum), static_cast<X*>(grad_x),
                               static_cast<R*>(grad_residual), grad_weight_partial + int64_t(task) * n_cols,
                               grad_bias_partial + int64_t(task) * n_cols, task * n_rows / n_tasks,
                               (task + 1) * n_rows / n_tasks, n_cols, drop, stream);
#else
          backward_rows(static_cast<const O*>(grad_out), static_cast<const O*>(saved), saved_is_output, weight, bias,
                        mean, rstd, static_cast<const O*>(grad_sum), static_cast<X*>(grad_x),
                        static_cast<R*>(grad_residual), grad_weight_partial + int64_t(task) * n_cols,
                        grad_bias_partial + int64_t(task) * n_cols, task * n_rows / n_tasks,
                        (task + 1) * n_rows / n_tasks, n_cols, drop);
#endif
        }
      });
    });
  });
}

bool layer_norm_output_recovers(const void* weight, const void* bias, int dtype, int64_t n,
                                float max_bias_over_weight) {
  for (int64_t j = 0; j < n; ++j) {
    const float w = std::fabs(dtype == 1 ? bf16_to_f32(static_cast<const uint16_t*>(weight)[j])
                                         : static_cast<const float*>(weight)[j]);
    const float b = std::fabs(dtype == 1 ? bf16_to_f32(static_cast<const uint16_t*>(bias)[j])
                                         : static_cast<const float*>(bias)[j]);
    if (!(w > 0.0f && b <= max_bias_over_weight * w && std::isfinite(w))) return false;
  }
  return true;
}

}  // namespace fastcls
