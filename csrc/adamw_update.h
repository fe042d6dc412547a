// The AdamW update of one element, or of 16, shared by the step over whole tensors (adamw.cpp) and the replay of
// the steps that deferred rows skipped (adamw_deferred_rows.cpp): one definition of the arithmetic, so that a
// replayed row gets the bits the step over the whole tensor would have given it. Internal to csrc/.
#pragma once

#include "bf16.h"
#include "lanes16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FASTCLS_ADAMW_AVX512 1
#endif

namespace fastcls {
namespace adamw_detail {

// A row of adamw.h's table: one tensor's addresses.
template <typename Param>
struct Row {
  Param* param;
  Param* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;
  float* master;
  float* step;
  int64_t numel;
};

template <typename Param>
Row<Param> read_row(const int64_t* row) {
  return {reinterpret_cast<Param*>(row[0]),  reinterpret_cast<Param*>(row[1]), reinterpret_cast<float*>(row[2]),
          reinterpret_cast<float*>(row[3]),  reinterpret_cast<float*>(row[4]), reinterpret_cast<float*>(row[5]),
          reinterpret_cast<float*>(row[6]), row[7]};
}

// What every element of the call shares, in fp32.
struct Constants {
  float decay;  // 1 - lr * weight_decay
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float grad_scale;
  float clip_coef;  // 1 without clipping: multiplying by it changes no gradient
  bool maximize;
};

// What every element of one tensor shares: the bias corrections of its step, folded into two factors.
struct StepConstants {
  float step_size;                  // lr / (1 - beta1^t)
  float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t)
};

// The update from the gradient as the step uses it (unscaled, clipped, negated under maximize): the weight
// decayed, the moments moved, the weight stepped. Without amsgrad, max_exp_avg_sq is neither read nor written.
template <bool kAmsgrad>
inline void adamw_math(float grad, float& weight, float& exp_avg, float& exp_avg_sq, float& max_exp_avg_sq,
                       const Constants& c, const StepConstants& s) {
  weight *= c.decay;
  exp_avg += c.one_minus_beta1 * (grad - exp_avg);
  exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * grad * grad;
  float second_moment = exp_avg_sq;
  if (kAmsgrad) {
    second_moment = std::max(max_exp_avg_sq, exp_avg_sq);
    max_exp_avg_sq = second_moment;
  }
  const float denom = std::sqrt(second_moment) * s.inv_bias_correction2_sqrt + c.eps;
  weight -= s.step_size * (exp_avg / denom);
}

// A stored gradient element as the update uses it.
template <bool kScaled>
inline float used_gradient(float grad, const Constants& c) {
  if (kScaled) grad /= c.grad_scale;
  grad *= c.clip_coef;
  return c.maximize ? -grad : grad;
}

template <bool kScaled, bool kAmsgrad, typename Param>
void update_scalar(const Row<Param>& r, int64_t i, const Constants& c, const StepConstants& s) {
  float grad = to_f32(r.grad[i]);
  if (kScaled) r.grad[i] = from_f32<Param>(grad / c.grad_scale);
  grad = used_gradient<kScaled>(grad, c);
  float weight = r.master != nullptr ? r.master[i] : to_f32(r.param[i]);
  float exp_avg = r.exp_avg[i], exp_avg_sq = r.exp_avg_sq[i];
  float max_exp_avg_sq = kAmsgrad ? r.max_exp_avg_sq[i] : 0.0f;
  adamw_math<kAmsgrad>(grad, weight, exp_avg, exp_avg_sq, max_exp_avg_sq, c, s);
  if (kAmsgrad) r.max_exp_avg_sq[i] = max_exp_avg_sq;
  r.exp_avg[i] = exp_avg;
  r.exp_avg_sq[i] = exp_avg_sq;
  if (r.master != nullptr) r.master[i] = weight;
  r.param[i] = from_f32<Param>(weight);
}

#if defined(FASTCLS_ADAMW_AVX512)
// adamw_math on 16 lanes.
template <bool kAmsgrad>
inline void adamw_math16(__m512 grad, __m512& weight, __m512& exp_avg, __m512& exp_avg_sq, __m512& max_exp_avg_sq,
                         const Constants& c, const StepConstants& s) {
  weight = _mm512_mul_ps(weight, _mm512_set1_ps(c.decay));
  exp_avg = _mm512_fmadd_ps(_mm512_set1_ps(c.one_minus_beta1), _mm512_sub_ps(grad, exp_avg), exp_avg);
  exp_avg_sq = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(c.one_minus_beta2), grad), grad,
                               _mm512_mul_ps(exp_avg_sq, _mm512_set1_ps(c.beta2)));
  __m512 second_moment = exp_avg_sq;
  if (kAmsgrad) {
    second_moment = _mm512_max_ps(max_exp_avg_sq, exp_avg_sq);
    max_exp_avg_sq = second_moment;
  }
  const __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(second_moment), _mm512_set1_ps(s.inv_bias_correction2_sqrt),
                                       _mm512_set1_ps(c.eps));
  weight = _mm512_fnmadd_ps(_mm512_set1_ps(s.step_size), _mm512_div_ps(exp_avg, denom), weight);
}

template <bool kScaled>
inline __m512 used_gradient16(__m512 grad, const Constants& c) {
  if (kScaled) grad = _mm512_div_ps(grad, _mm512_set1_ps(c.grad_scale));
  grad = _mm512_mul_ps(grad, _mm512_set1_ps(c.clip_coef));
  return c.maximize ? _mm512_sub_ps(_mm512_setzero_ps(), grad) : grad;
}

template <bool kScaled, bool kAmsgrad, typename Param>
inline void update16(const Row<Param>& r, int64_t i, __mmask16 mask, const Constants& c, const StepConstants& s) {
  __m512 grad = load16(r.grad + i, mask);
  if (kScaled) store16(r.grad + i, _mm512_div_ps(grad, _mm512_set1_ps(c.grad_scale)), mask);
  grad = used_gradient16<kScaled>(grad, c);
  __m512 weight = r.master != nullptr ? load16(r.master + i, mask) : load16(r.param + i, mask);
  __m512 exp_avg = load16(r.exp_avg + i, mask), exp_avg_sq = load16(r.exp_avg_sq + i, mask);
  __m512 max_exp_avg_sq = kAmsgrad ? load16(r.max_exp_avg_sq + i, mask) : _mm512_setzero_ps();
  adamw_math16<kAmsgrad>(grad, weight, exp_avg, exp_avg_sq, max_exp_avg_sq, c, s);
  if (kAmsgrad) store16(r.max_exp_avg_sq + i, max_exp_avg_sq, mask);
  store16(r.exp_avg + i, exp_avg, mask);
  store16(r.exp_avg_sq + i, exp_avg_sq, mask);
  if (r.master != nullptr) store16(r.master + i, weight, mask);
  store16(r.param + i, weight, mask);
}

// A dead row's whole update (see adamw.h): the weight times decay, rounded into a bf16 parameter from its master.
template <typename Param>
inline void decay16(const Row<Param>& r, int64_t i, __mmask16 mask, float decay) {
  __m512 weight = r.master != nullptr ? load16(r.master + i, mask) : load16(r.param + i, mask);
  weight = _mm512_mul_ps(weight, _mm512_set1_ps(decay));
  if (r.master != nullptr) store16(r.master + i, weight, mask);
  store16(r.param + i, weight, mask);
}

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
#endif

// What a stored zero gradient becomes in the update (0, −0, or NaN where clip_coef is not finite).
template <bool kScaled>
inline float used_zero_gradient(const Constants& c) {
#if defined(FASTCLS_ADAMW_AVX512)
  return _mm512_cvtss_f32(used_gradient16<kScaled>(_mm512_setzero_ps(), c));
#else
  return used_gradient<kScaled>(0.0f, c);
#endif
}

template <typename Param>
void decay_range(const Row<Param>& row, int64_t begin, int64_t end, float decay) {
  const Row<Param> r = row;
  int64_t i = begin;
#if defined(FASTCLS_ADAMW_AVX512)
  for (; i + 16 <= end; i += 16) decay16(r, i, __mmask16(0xFFFF), decay);
  if (i < end) decay16(r, i, tail_mask(end - i), decay);
#else
  for (; i < end; ++i) {
    const float weight = (r.master != nullptr ? r.master[i] : to_f32(r.param[i])) * decay;
    if (r.master != nullptr) r.master[i] = weight;
    r.param[i] = from_f32<Param>(weight);
  }
#endif
}

template <bool kScaled, bool kAmsgrad, typename Param>
void update_range(const Row<Param>& row, int64_t begin, int64_t end, const Constants& constants,
                  const StepConstants& step_constants) {
  // copies the stores cannot alias, so the loop keeps pointers and constants in registers instead of reloading
  const Row<Param> r = row;
  const Constants c = constants;
  const StepConstants s = step_constants;
  int64_t i = begin;
#if defined(FASTCLS_ADAMW_AVX512)
  for (; i + 16 <= end; i += 16) update16<kScaled, kAmsgrad>(r, i, __mmask16(0xFFFF), c, s);
  if (i < end) update16<kScaled, kAmsgrad>(r, i, tail_mask(end - i), c, s);
#else
  for (; i < end; ++i) update_scalar<kScaled, kAmsgrad>(r, i, c, s);
#endif
}

}  // namespace adamw_detail
}  // namespace fastcls
