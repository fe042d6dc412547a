#include "adamw.h"

#include "bf16.h"

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FASTCLS_ADAMW_AVX512 1
#endif

namespace fastcls {
namespace {

// The elements of all tensors form one range that is cut evenly between threads (a cut may fall inside a
// tensor), so a table of one huge embedding and many small vectors still balances. A thread gets at least this
// many elements: below that, waking it costs more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;

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
  bool maximize;
};

// What every element of one tensor shares: the bias corrections of its step, folded into two factors.
struct StepConstants {
  float step_size;                  // lr / (1 - beta1^t)
  float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t)
};

template <bool kScaled, bool kAmsgrad, typename Param>
void update_scalar(const Row<Param>& r, int64_t i, const Constants& c, const StepConstants& s) {
  float grad = to_f32(r.grad[i]);
  if (kScaled) {
    grad /= c.grad_scale;
    r.grad[i] = from_f32<Param>(grad);
  }
  if (c.maximize) grad = -grad;
  float weight = r.master != nullptr ? r.master[i] : to_f32(r.param[i]);
  weight *= c.decay;
  float exp_avg = r.exp_avg[i];
  exp_avg += c.one_minus_beta1 * (grad - exp_avg);
  float exp_avg_sq = r.exp_avg_sq[i] * c.beta2 + c.one_minus_beta2 * grad * grad;
  float second_moment = exp_avg_sq;
  if (kAmsgrad) {
    second_moment = std::max(r.max_exp_avg_sq[i], exp_avg_sq);
    r.max_exp_avg_sq[i] = second_moment;
  }
  const float denom = std::sqrt(second_moment) * s.inv_bias_correction2_sqrt + c.eps;
  weight -= s.step_size * (exp_avg / denom);
  r.exp_avg[i] = exp_avg;
  r.exp_avg_sq[i] = exp_avg_sq;
  if (r.master != nullptr) r.master[i] = weight;
  r.param[i] = from_f32<Param>(weight);
}

#if defined(FASTCLS_ADAMW_AVX512)
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const uint16_t* p, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline void store16(float* p, __m512 value, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, value); }
// Round to nearest even, NaN kept quiet, exactly as f32_to_bf16 (bf16.h) does one element at a time.
inline void store16(uint16_t* p, __m512 value, __mmask16 mask) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i high = _mm512_srli_epi32(bits, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(rounded));
}

template <bool kScaled, bool kAmsgrad, typename Param>
inline void update16(const Row<Param>& r, int64_t i, __mmask16 mask, const Constants& c, const StepConstants& s) {
  __m512 grad = load16(r.grad + i, mask);
  if (kScaled) {
    grad = _mm512_div_ps(grad, _mm512_set1_ps(c.grad_scale));
    store16(r.grad + i, grad, mask);
  }
  if (c.maximize) grad = _mm512_sub_ps(_mm512_setzero_ps(), grad);
  __m512 weight = r.master != nullptr ? load16(r.master + i, mask) : load16(r.param + i, mask);
  weight = _mm512_mul_ps(weight, _mm512_set1_ps(c.decay));
  __m512 exp_avg = load16(r.exp_avg + i, mask);
  exp_avg = _mm512_fmadd_ps(_mm512_set1_ps(c.one_minus_beta1), _mm512_sub_ps(grad, exp_avg), exp_avg);
  __m512 exp_avg_sq = load16(r.exp_avg_sq + i, mask);
  exp_avg_sq = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(c.one_minus_beta2), grad), grad,
                               _mm512_mul_ps(exp_avg_sq, _mm512_set1_ps(c.beta2)));
  __m512 second_moment = exp_avg_sq;
  if (kAmsgrad) {
    second_moment = _mm512_max_ps(load16(r.max_exp_avg_sq + i, mask), exp_avg_sq);
    store16(r.max_exp_avg_sq + i, second_moment, mask);
  }
  const __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(second_moment), _mm512_set1_ps(s.inv_bias_correction2_sqrt),
                                       _mm512_set1_ps(c.eps));
  weight = _mm512_fnmadd_ps(_mm512_set1_ps(s.step_size), _mm512_div_ps(exp_avg, denom), weight);
  store16(r.exp_avg + i, exp_avg, mask);
  store16(r.exp_avg_sq + i, exp_avg_sq, mask);
  if (r.master != nullptr) store16(r.master + i, weight, mask);
  store16(r.param + i, weight, mask);
}
#endif

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
  if (i < end) update16<kScaled, kAmsgrad>(r, i, __mmask16((1u << (end - i)) - 1), c, s);
#else
  for (; i < end; ++i) update_scalar<kScaled, kAmsgrad>(r, i, c, s);
#endif
}

template <bool kScaled, bool kAmsgrad, typename Param>
void update_all(const std::vector<Row<Param>>& rows, const std::vector<int64_t>& first, const Constants& c,
                const std::vector<StepConstants>& s, int num_threads) {
  const int64_t total = first.back();
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(num_threads, total / kMinElementsPerThread));
#pragma omp parallel for num_threads(int(n_tasks)) schedule(static) if (n_tasks > 1)
  for (int64_t task = 0; task < n_tasks; ++task) {
    // cut on multiples of 16 so that whole vectors stay within one thread
    const int64_t begin = std::min(total, task * (total / 16) / n_tasks * 16);
    const int64_t end = task + 1 == n_tasks ? total : std::min(total, (task + 1) * (total / 16) / n_tasks * 16);
    auto t = int64_t(std::upper_bound(first.begin(), first.end(), begin) - first.begin()) - 1;
    for (; t < int64_t(rows.size()) && first[t] < end; ++t) {
      const int64_t lo = std::max(begin, first[t]) - first[t];
      const int64_t hi = std::min(end, first[t + 1]) - first[t];
      if (lo < hi) update_range<kScaled, kAmsgrad>(rows[t], lo, hi, c, s[t]);
    }
  }
}

template <typename Param>
void adamw(const int64_t* table, int64_t n_tensors, const AdamWOptions& o, const float* lr_tensor,
           const float* grad_scale, const float* found_inf, int num_threads) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const double lr = lr_tensor != nullptr ? double(*lr_tensor) : o.lr;
  std::vector<Row<Param>> rows(n_tensors);
  std::vector<int64_t> first(n_tensors + 1, 0);
  std::vector<StepConstants> step_constants(n_tensors);
  std::vector<float> steps(n_tensors);
  for (int64_t t = 0; t < n_tensors; ++t) {
    rows[t] = read_row<Param>(table + t * kAdamWTableWidth);
    first[t + 1] = first[t] + rows[t].numel;
    steps[t] = *rows[t].step + 1.0f;
    // in double, as torch's single-tensor AdamW computes them from a host step count
    const double t_step = steps[t];
    const double bias_correction1 = o.bias_correction ? 1.0 - std::pow(o.beta1, t_step) : 1.0;
    const double bias_correction2 = o.bias_correction ? 1.0 - std::pow(o.beta2, t_step) : 1.0;
    step_constants[t] = {float(lr / bias_correction1), float(1.0 / std::sqrt(bias_correction2))};
  }
  const Constants c{float(1.0 - lr * o.weight_decay), float(1.0 - o.beta1), float(o.beta2), float(1.0 - o.beta2),
                    float(o.eps), grad_scale != nullptr ? *grad_scale : 1.0f, o.maximize};
  const bool scaled = grad_scale != nullptr;
  if (scaled && o.amsgrad) update_all<true, true>(rows, first, c, step_constants, num_threads);
  else if (scaled) update_all<true, false>(rows, first, c, step_constants, num_threads);
  else if (o.amsgrad) update_all<false, true>(rows, first, c, step_constants, num_threads);
  else update_all<false, false>(rows, first, c, step_constants, num_threads);
  for (int64_t t = 0; t < n_tensors; ++t) *rows[t].step = steps[t];
}

}  // namespace

void adamw_f32(const int64_t* table, int64_t n_tensors, const AdamWOptions& options, const float* lr,
               const float* grad_scale, const float* found_inf, int num_threads) {
  adamw<float>(table, n_tensors, options, lr, grad_scale, found_inf, num_threads);
}

void adamw_bf16_master(const int64_t* table, int64_t n_tensors, const AdamWOptions& options, const float* lr,
                       const float* grad_scale, const float* found_inf, int num_threads) {
  adamw<uint16_t>(table, n_tensors, options, lr, grad_scale, found_inf, num_threads);
}

}  // namespace fastcls
