#include "bias_gelu.h"

#include "bf16.h"
#include "lanes16.h"
#include "linear_bf16.h"
#include "softmax.h"

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FASTCLS_GELU_AVX512 1
#endif

namespace fastcls {
namespace {

// Rows are split evenly between threads; a thread gets at least this many elements, since waking one for less
// would cost more than it saves.
constexpr int64_t kMinElementsPerThread = 16384;

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// erf(x) = x P(x^2) / Q(x^2) on [-4, 4] and +-1 beyond (where fp32's erf is +-1): the rational approximation of
// Eigen's and XLA's fast erf, within a few ulps. One division and 11 multiply-adds, against torch's exp-based
// form, which costs an exp and a division.
constexpr float kErfP[7] = {-2.72614225801306e-10f, 2.77068142495902e-08f,  -2.10102402082508e-06f,
                            -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                            -1.60960333262415e-02f};
constexpr float kErfQ[5] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                            -7.37332916720468e-03f, -1.42647390514189e-02f};

inline float erf_rational(float x) {
  x = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
  const float x2 = x * x;
  float p = kErfP[0];
  for (int i = 1; i < 7; ++i) p = p * x2 + kErfP[i];
  float q = kErfQ[0];
  for (int i = 1; i < 5; ++i) q = q * x2 + kErfQ[i];
  return x * p / q;
}

inline float gelu(float t) { return 0.5f * t * (1.0f + erf_rational(t * kSqrtHalf)); }

// d gelu / dt = Phi(t) + t phi(t)
inline float gelu_slope(float t) {
  return 0.5f * (1.0f + erf_rational(t * kSqrtHalf)) + t * (kInvSqrt2Pi * exp_nonpositive(-0.5f * t * t));
}

#if defined(FASTCLS_GELU_AVX512)
inline __m512 erf_rational(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(kErfP[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(kErfP[i]));
  __m512 q = _mm512_set1_ps(kErfQ[0]);
  for (int i = 1; i < 5; ++i) q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(kErfQ[i]));
  return _mm512_div_ps(_mm512_mul_ps(x, p), q);
}

inline __m512 gelu(__m512 t) {
  const __m512 half_t = _mm512_mul_ps(t, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(half_t, erf_rational(_mm512_mul_ps(t, _mm512_set1_ps(kSqrtHalf))), half_t);
}

inline __m512 gelu_slope(__m512 t) {
  const __m512 cdf = _mm512_fmadd_ps(_mm512_set1_ps(0.5f), erf_rational(_mm512_mul_ps(t, _mm512_set1_ps(kSqrtHalf))),
                                     _mm512_set1_ps(0.5f));
  const __m512 pdf = _mm512_mul_ps(_mm512_set1_ps(kInvSqrt2Pi),
                                   exp512_nonpositive(_mm512_mul_ps(_mm512_mul_ps(t, t), _mm512_set1_ps(-0.5f))));
  return _mm512_fmadd_ps(t, pdf, cdf);
}

inline __mmask16 lanes(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1u);
}

template <typename Element>
void forward_row(const Element* x, const float* bias, Element* out, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = lanes(n - j);
    __m512 t = load16(x + j, mask);
    if (bias != nullptr) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(mask, bias + j));
    store16(out + j, gelu(t), mask);
  }
}

template <typename Element>
void backward_row(const Element* grad_out, const Element* x, const float* bias, Element* grad_x, float* grad_bias,
                  int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = lanes(n - j);
    __m512 t = load16(x + j, mask);
    if (bias != nullptr) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(mask, bias + j));
    const __m512 g = _mm512_mul_ps(load16(grad_out + j, mask), gelu_slope(t));
    store16(grad_x + j, g, mask);
    _mm512_mask_storeu_ps(grad_bias + j, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, grad_bias + j), g));
  }
}
#else
template <typename Element>
void forward_row(const Element* x, const float* bias, Element* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = from_f32<Element>(gelu(to_f32(x[j]) + (bias != nullptr ? bias[j] : 0.0f)));
}

template <typename Element>
void backward_row(const Element* grad_out, const Element* x, const float* bias, Element* grad_x, float* grad_bias,
                  int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float g = to_f32(grad_out[j]) * gelu_slope(to_f32(x[j]) + (bias != nullptr ? bias[j] : 0.0f));
    grad_x[j] = from_f32<Element>(g);
    grad_bias[j] += g;
  }
}
#endif

// Rows r0 and r1 (r1 null: a row of zeros) of n columns, row pair rp of R rows, into `pairs` in the weight
// gradient's layouts (linear_bf16.h): layout 1 interleaves the two rows ([rp][c][t], as
// linear_interleave_row_pairs), layout 2 packs them into 48-column panels ([p][rp][j][t], as linear_pack_pairs).
// The values are the rows' own bf16 bits (float rows rounded).
template <typename Element>
void put_row_pair(const Element* r0, const Element* r1, int64_t n, int64_t rp, int64_t R, uint16_t* pairs,
                  int layout) {
  const int64_t pair_rows = (R + 1) / 2;
  const auto at = [&](int64_t c) {
    return layout == 1 ? pairs + (rp * n + c) * 2
                       : pairs + ((c / kLinearPanel * pair_rows + rp) * kLinearPanel + c % kLinearPanel) * 2;
  };
#if defined(FASTCLS_GELU_AVX512)
  if constexpr (sizeof(Element) == 2) {
    for (int64_t c = 0; c < n; c += 16) {  // 16 columns never cross a 48-column panel
      const __mmask16 mask = lanes(n - c);
      const __m512i low = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, r0 + c));
      const __m512i high = r1 == nullptr ? _mm512_setzero_si512()
                                         : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, r1 + c));
      _mm512_mask_storeu_epi32(at(c), mask, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
    }
    return;
  }
#endif
  for (int64_t c = 0; c < n; ++c) {
    uint16_t* out = at(c);
    out[0] = f32_to_bf16(to_f32(r0[c]));
    out[1] = r1 == nullptr ? uint16_t(0) : f32_to_bf16(to_f32(r1[c]));
  }
}

// After a pass over rows [lo, hi) of R has written them: the row pairs that lie whole inside, each once its second
// row is done (still in the core's cache). The pairs cut by a task boundary, and an odd R's last row, are left to
// put_boundary_pairs once every task is done.
template <typename Element>
void put_row_pairs_inside(const Element* rows, int64_t n, int64_t row, int64_t lo, int64_t R, uint16_t* pairs,
                          int layout) {
  if (pairs != nullptr && row % 2 == 1 && row - 1 >= lo) {
    put_row_pair(rows + (row - 1) * n, rows + row * n, n, row / 2, R, pairs, layout);
  }
}

template <typename Element>
void put_boundary_pairs(const Element* rows, int64_t n, int64_t R, int n_tasks, uint16_t* pairs, int layout) {
  if (pairs == nullptr) return;
  for (int task = 1; task < n_tasks; ++task) {
    const int64_t cut = task * R / n_tasks;
    if (cut % 2 == 1) put_row_pair(rows + (cut - 1) * n, rows + cut * n, n, cut / 2, R, pairs, layout);
  }
  if (R % 2 == 1) put_row_pair(rows + (R - 1) * n, static_cast<const Element*>(nullptr), n, R / 2, R, pairs, layout);
}

int threads_for(int64_t n_rows, int64_t n_cols, int num_threads) {
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), n_rows * n_cols / kMinElementsPerThread,
                                                     n_rows})));
}

template <typename Element>
void bias_gelu_forward(const Element* x, const float* bias, Element* out, uint16_t* pairs, int pairs_layout,
                       int64_t n_rows, int64_t n_cols, int num_threads) {
  const int n_tasks = threads_for(n_rows, n_cols, num_threads);
#pragma omp parallel for num_threads(n_tasks) schedule(static) if (n_tasks > 1)
  for (int task = 0; task < n_tasks; ++task) {
    const int64_t lo = task * n_rows / n_tasks;
    for (int64_t row = lo; row < (task + 1) * n_rows / n_tasks; ++row) {
      forward_row(x + row * n_cols, bias, out + row * n_cols, n_cols);
      put_row_pairs_inside(out, n_cols, row, lo, n_rows, pairs, pairs_layout);
    }
  }
  put_boundary_pairs(out, n_cols, n_rows, n_tasks, pairs, pairs_layout);
}

// Each thread sums its rows' bias gradient into its own fp32 row; the rows are then added in thread order.
template <typename Element>
void bias_gelu_backward(const Element* grad_out, const Element* x, const float* bias, Element* grad_x,
                        float* grad_bias, uint16_t* pairs, int pairs_layout, int64_t n_rows, int64_t n_cols,
                        int num_threads) {
  const int n_tasks = threads_for(n_rows, n_cols, num_threads);
  std::vector<float> partial(size_t(n_tasks * n_cols), 0.0f);
#pragma omp parallel for num_threads(n_tasks) schedule(static) if (n_tasks > 1)
  for (int task = 0; task < n_tasks; ++task) {
    float* sums = partial.data() + task * n_cols;
    const int64_t lo = task * n_rows / n_tasks;
    for (int64_t row = lo; row < (task + 1) * n_rows / n_tasks; ++row) {
      const int64_t at = row * n_cols;
      backward_row(grad_out + at, x + at, bias, grad_x + at, sums, n_cols);
      put_row_pairs_inside(grad_x, n_cols, row, lo, n_rows, pairs, pairs_layout);
    }
  }
  put_boundary_pairs(grad_x, n_cols, n_rows, n_tasks, pairs, pairs_layout);
  if (grad_bias == nullptr) return;
  std::fill(grad_bias, grad_bias + n_cols, 0.0f);
  for (int task = 0; task < n_tasks; ++task) {
    for (int64_t j = 0; j < n_cols; ++j) grad_bias[j] += partial[size_t(task * n_cols + j)];
  }
}

}  // namespace

void bias_gelu_forward_f32(const float* x, const float* bias, float* out, uint16_t* pairs, int pairs_layout,
                           int64_t n_rows, int64_t n_cols, int num_threads) {
  bias_gelu_forward(x, bias, out, pairs, pairs_layout, n_rows, n_cols, num_threads);
}

void bias_gelu_forward_bf16(const uint16_t* x, const float* bias, uint16_t* out, uint16_t* pairs, int pairs_layout,
                            int64_t n_rows, int64_t n_cols, int num_threads) {
  bias_gelu_forward(x, bias, out, pairs, pairs_layout, n_rows, n_cols, num_threads);
}

void bias_gelu_backward_f32(const float* grad_out, const float* x, const float* bias, float* grad_x,
                            float* grad_bias, uint16_t* pairs, int pairs_layout, int64_t n_rows, int64_t n_cols,
                            int num_threads) {
  bias_gelu_backward(grad_out, x, bias, grad_x, grad_bias, pairs, pairs_layout, n_rows, n_cols, num_threads);
}

void bias_gelu_backward_bf16(const uint16_t* grad_out, const uint16_t* x, const float* bias, uint16_t* grad_x,
                             float* grad_bias, uint16_t* pairs, int pairs_layout, int64_t n_rows, int64_t n_cols,
                             int num_threads) {
  bias_gelu_backward(grad_out, x, bias, grad_x, grad_bias, pairs, pairs_layout, n_rows, n_cols, num_threads);
}

}  // namespace fastcls
