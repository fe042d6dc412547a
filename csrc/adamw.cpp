#include "adamw.h"

#include "adamw_deferred_rows.h"
#include "adamw_update.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastcls {
namespace {

using namespace adamw_detail;

// The elements of all tensors form one range that is cut evenly between threads (a cut may fall inside a
// tensor), so a table of one huge embedding and many small vectors still balances. A thread gets at least this
// many elements: below that, waking it costs more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;

// A tensor's row mask (live_table's row: the mask's address, 0 for a dense tensor, and the row width).
struct LiveRows {
  const bool* live;
  int64_t width;
};

std::vector<LiveRows> read_live_table(const int64_t* live_table, int64_t n_tensors) {
  std::vector<LiveRows> masks(n_tensors, LiveRows{nullptr, 1});
  for (int64_t t = 0; live_table != nullptr && t < n_tensors; ++t) {
    masks[t] = {reinterpret_cast<const bool*>(live_table[t * kAdamWLiveTableWidth]),
                live_table[t * kAdamWLiveTableWidth + 1]};
  }
  return masks;
}

#if defined(FASTCLS_ADAMW_AVX512)
// Adds the squares of 16 gradient elements, widened to fp64 where they are exact, to two 8-lane sums.
template <typename Param>
inline void add_squares16(const Param* grad, __mmask16 mask, __m512d& low, __m512d& high) {
  const __m512 g = load16(grad, mask);
  const __m512d g_low = _mm512_cvtps_pd(_mm512_castps512_ps256(g));
  const __m512d g_high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(g), 1)));
  low = _mm512_fmadd_pd(g_low, g_low, low);
  high = _mm512_fmadd_pd(g_high, g_high, high);
}
#endif

template <typename Param>
double sum_of_squares(const Param* grad, int64_t begin, int64_t end) {
  int64_t i = begin;
#if defined(FASTCLS_ADAMW_AVX512)
  __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();
  for (; i + 16 <= end; i += 16) add_squares16(grad + i, __mmask16(0xFFFF), low, high);
  if (i < end) add_squares16(grad + i, __mmask16((1u << (end - i)) - 1), low, high);
  return _mm512_reduce_add_pd(_mm512_add_pd(low, high));
#else
  double sum = 0.0;
  for (; i < end; ++i) {
    const double g = to_f32(grad[i]);
    sum += g * g;
  }
  return sum;
#endif
}

// The sum of squares of [begin, end) as sum_of_squares computes it, reading only the 16-element vectors (counted
// from begin) that hold part of a live row: the others hold zeros, whose squares leave every partial sum as it was.
template <typename Param>
double sum_of_squares_live(const Param* grad, int64_t begin, int64_t end, const bool* live, int64_t width) {
#if defined(FASTCLS_ADAMW_AVX512)
  __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();
  int64_t next = begin;  // the first vector not summed yet
  for (int64_t row = begin / width; row * width < end; ++row) {
    if (!live[row]) continue;
    const int64_t row_end = std::min(end, (row + 1) * width);
    int64_t i = std::max(next, begin + (std::max(begin, row * width) - begin) / 16 * 16);
    for (; i < row_end; i += 16) {
      const int64_t n = std::min<int64_t>(16, end - i);
      add_squares16(grad + i, __mmask16((1u << n) - 1), low, high);
    }
    next = i;
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(low, high));
#else
  double sum = 0.0;
  for (int64_t row = begin / width; row * width < end; ++row) {
    if (!live[row]) continue;
    for (int64_t i = std::max(begin, row * width); i < std::min(end, (row + 1) * width); ++i) {
      const double g = to_f32(grad[i]);
      sum += g * g;
    }
  }
  return sum;
#endif
}

int64_t task_count(const std::vector<int64_t>& first, int num_threads) {
  return std::max<int64_t>(1, std::min<int64_t>(num_threads, first.back() / kMinElementsPerThread));
}

// n_tasks equal shares of all elements: task k's is [cuts[k], cuts[k + 1]), cut on multiples of 16 so that whole
// vectors stay within one thread.
std::vector<int64_t> even_cuts(int64_t total, int64_t n_tasks) {
  std::vector<int64_t> cuts(n_tasks + 1, total);
  for (int64_t task = 0; task < n_tasks; ++task) cuts[task] = std::min(total, task * (total / 16) / n_tasks * 16);
  return cuts;
}

// Calls visit(task, tensor, lo, hi) for each piece [lo, hi) of a tensor that falls in a task's share of all
// elements (first[t]: the element where tensor t begins in the whole range), the tasks run in parallel.
template <typename Visit>
void for_each_piece(const std::vector<int64_t>& first, const std::vector<int64_t>& cuts, const Visit& visit) {
  const int64_t n_tasks = int64_t(cuts.size()) - 1;
  const int64_t n_tensors = int64_t(first.size()) - 1;
#pragma omp parallel for num_threads(int(n_tasks)) schedule(static) if (n_tasks > 1)
  for (int64_t task = 0; task < n_tasks; ++task) {
    const int64_t begin = cuts[task], end = cuts[task + 1];
    auto t = int64_t(std::upper_bound(first.begin(), first.end(), begin) - first.begin()) - 1;
    for (; t < n_tensors && first[t] < end; ++t) {
      const int64_t lo = std::max(begin, first[t]) - first[t];
      const int64_t hi = std::min(end, first[t + 1]) - first[t];
      if (lo < hi) visit(task, t, lo, hi);
    }
  }
}

// Shares of about equal memory traffic, cut on row boundaries inside masked tensors: an element of a full update
// moves 28 bytes (7 units of 4), one of a dead row 8 (the decay's read and write) or nothing. Even shares of the
// elements would leave one thread the table's few live rows and the other all of the layers.
std::vector<int64_t> work_cuts(const std::vector<int64_t>& first, const std::vector<LiveRows>& masks, bool decays,
                               int64_t n_tasks) {
  const int64_t n_tensors = int64_t(first.size()) - 1;
  const auto row_work = [&](const LiveRows& m, int64_t row) { return m.live[row] ? 7 : decays ? 2 : 0; };
  std::vector<int64_t> work(n_tensors + 1, 0);  // work[t]: the units before tensor t
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t numel = first[t + 1] - first[t];
    int64_t units = 7 * numel;
    if (masks[t].live != nullptr) {
      units = 0;
      for (int64_t row = 0; row * masks[t].width < numel; ++row) units += row_work(masks[t], row) * masks[t].width;
    }
    work[t + 1] = work[t] + units;
  }
  std::vector<int64_t> cuts(n_tasks + 1, first.back());
  cuts[0] = 0;
  for (int64_t task = 1; task < n_tasks; ++task) {
    const int64_t target = work.back() / n_tasks * task;
    const int64_t t = int64_t(std::upper_bound(work.begin(), work.end(), target) - work.begin()) - 1;
    int64_t cut = first.back();
    if (t < n_tensors && masks[t].live == nullptr) {
      cut = first[t] + (target - work[t]) / 7 / 16 * 16;
    } else if (t < n_tensors) {
      const LiveRows m = masks[t];
      int64_t row = 0;
      for (int64_t units = work[t]; units < target && (row + 1) * m.width <= first[t + 1] - first[t]; ++row) {
        units += row_work(m, row) * m.width;
      }
      cut = first[t] + row * m.width;
    }
    cuts[task] = std::max(cuts[task - 1], cut);
  }
  return cuts;
}

template <bool kScaled, bool kAmsgrad, typename Param>
void update_all(const std::vector<Row<Param>>& rows, const std::vector<int64_t>& first, const Constants& c,
                const std::vector<StepConstants>& s, const std::vector<LiveRows>& masks, int num_threads) {
  const int64_t n_tasks = task_count(first, num_threads);
  const bool masked = std::any_of(masks.begin(), masks.end(), [](const LiveRows& m) { return m.live != nullptr; });
  const std::vector<int64_t> cuts =
      masked ? work_cuts(first, masks, c.decay != 1.0f, n_tasks) : even_cuts(first.back(), n_tasks);
  for_each_piece(first, cuts, [&](int64_t, int64_t t, int64_t lo, int64_t hi) {
    const LiveRows m = masks[t];
    if (m.live == nullptr) return update_range<kScaled, kAmsgrad>(rows[t], lo, hi, c, s[t]);
    // each run of live rows, and of dead ones, in one streaming pass
    for (int64_t row = lo / m.width, next = row; row * m.width < hi; row = next) {
      while (next * m.width < hi && m.live[next] == m.live[row]) ++next;
      const int64_t begin = std::max(lo, row * m.width), end = std::min(hi, next * m.width);
      if (m.live[row]) update_range<kScaled, kAmsgrad>(rows[t], begin, end, c, s[t]);
      else if (c.decay != 1.0f) decay_range(rows[t], begin, end, c.decay);
    }
  });
}

template <typename Param>
void read_table(const int64_t* table, int64_t n_tensors, std::vector<Row<Param>>& rows,
                std::vector<int64_t>& first) {
  rows.resize(n_tensors);
  first.assign(n_tensors + 1, 0);
  for (int64_t t = 0; t < n_tensors; ++t) {
    rows[t] = read_row<Param>(table + t * kAdamWTableWidth);
    first[t + 1] = first[t] + rows[t].numel;
  }
}

template <typename Param>
void grad_sum_of_squares(const int64_t* table, const int64_t* live_table, int64_t n_tensors,
                         const float* grad_scale, double* out, int num_threads) {
  std::vector<Row<Param>> rows;
  std::vector<int64_t> first;
  read_table(table, n_tensors, rows, first);
  const std::vector<LiveRows> masks = read_live_table(live_table, n_tensors);
  const int64_t n_tasks = task_count(first, num_threads);
  std::vector<double> sums(n_tasks, 0.0);
  // the dense sum's shares whatever the masks: each share's sum, and the order they are added in, stay the same
  for_each_piece(first, even_cuts(first.back(), n_tasks), [&](int64_t task, int64_t t, int64_t lo, int64_t hi) {
    const LiveRows m = masks[t];
    sums[task] += m.live == nullptr ? sum_of_squares(rows[t].grad, lo, hi)
                                    : sum_of_squares_live(rows[t].grad, lo, hi, m.live, m.width);
  });
  double sum = 0.0;
  for (const double part : sums) sum += part;
  if (grad_scale != nullptr) sum /= double(*grad_scale) * double(*grad_scale);
  *out = sum;
}

template <typename Param>
void adamw(const int64_t* table, const int64_t* live_table, int64_t n_tensors, const AdamWOptions& o,
           const float* lr_tensor, const float* grad_scale, const float* found_inf, const float* clip_coef,
           int num_threads) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const double lr = lr_tensor != nullptr ? double(*lr_tensor) : o.lr;
  std::vector<Row<Param>> rows;
  std::vector<int64_t> first;
  read_table(table, n_tensors, rows, first);
  std::vector<StepConstants> step_constants(n_tensors);
  std::vector<float> steps(n_tensors);
  // Whether a zero gradient on zero moments moves a weight by exactly nothing beyond the decay: the update is then
  // step_size * (0 / (0 * k + eps)) and every gradient stays the zero it was; else every row takes the full update.
  bool exact_dead_rows = float(o.eps) > 0.0f && (grad_scale == nullptr || *grad_scale > 0.0f) &&
                         (clip_coef == nullptr || std::isfinite(*clip_coef));
  for (int64_t t = 0; t < n_tensors; ++t) {
    steps[t] = *rows[t].step + 1.0f;
    // in double, as torch's single-tensor AdamW computes them from a host step count
    const double t_step = steps[t];
    const double bias_correction1 = o.bias_correction ? 1.0 - std::pow(o.beta1, t_step) : 1.0;
    const double bias_correction2 = o.bias_correction ? 1.0 - std::pow(o.beta2, t_step) : 1.0;
    step_constants[t] = {float(lr / bias_correction1), float(1.0 / std::sqrt(bias_correction2))};
    exact_dead_rows = exact_dead_rows && std::isfinite(step_constants[t].step_size) &&
                      std::isfinite(step_constants[t].inv_bias_correction2_sqrt);
  }
  const Constants c{float(1.0 - lr * o.weight_decay), float(1.0 - o.beta1), float(o.beta2), float(1.0 - o.beta2),
                    float(o.eps), grad_scale != nullptr ? *grad_scale : 1.0f,
                    clip_coef != nullptr ? *clip_coef : 1.0f, o.maximize};
  const bool scaled = grad_scale != nullptr;
  const std::vector<LiveRows> masks = read_live_table(exact_dead_rows ? live_table : nullptr, n_tensors);
  // deferred tensors (adamw.h) step apart: the others keep the whole-table passes and their thread shares
  std::vector<Row<Param>> whole;
  std::vector<StepConstants> whole_constants;
  std::vector<LiveRows> whole_masks;
  std::vector<int64_t> whole_first{0}, deferred;
  for (int64_t t = 0; t < n_tensors; ++t) {
    if (live_table != nullptr && read_deferred(live_table + t * kAdamWLiveTableWidth).synced != nullptr) {
      deferred.push_back(t);
      continue;
    }
    whole.push_back(rows[t]);
    whole_constants.push_back(step_constants[t]);
    whole_masks.push_back(masks[t]);
    whole_first.push_back(whole_first.back() + rows[t].numel);
  }
  if (o.amsgrad && !deferred.empty()) throw std::invalid_argument("adamw: deferred rows need amsgrad off");
  if (scaled && o.amsgrad) update_all<true, true>(whole, whole_first, c, whole_constants, whole_masks, num_threads);
  else if (scaled) update_all<true, false>(whole, whole_first, c, whole_constants, whole_masks, num_threads);
  else if (o.amsgrad) update_all<false, true>(whole, whole_first, c, whole_constants, whole_masks, num_threads);
  else update_all<false, false>(whole, whole_first, c, whole_constants, whole_masks, num_threads);
  // an untouched row's gradient stays the zero it was where grad_scale is positive and finite; else (where the
  // step would write a NaN or an infinity there) every row takes this step
  const bool every_row = scaled && !(*grad_scale > 0.0f && std::isfinite(*grad_scale));
  for (const int64_t t : deferred) {
    const DeferredRows d = read_deferred(live_table + t * kAdamWLiveTableWidth);
    const int64_t step = int64_t(steps[t]);
    if (scaled) step_deferred<true>(rows[t], d, c, step_constants[t], step, every_row, num_threads);
    else step_deferred<false>(rows[t], d, c, step_constants[t], step, every_row, num_threads);
  }
  for (int64_t t = 0; t < n_tensors; ++t) *rows[t].step = steps[t];
}

}  // namespace

void adamw_f32(const int64_t* table, int64_t n_tensors, const AdamWOptions& options, const float* lr,
               const float* grad_scale, const float* found_inf, const float* clip_coef, int num_threads) {
  adamw<float>(table, nullptr, n_tensors, options, lr, grad_scale, found_inf, clip_coef, num_threads);
}

void adamw_bf16_master(const int64_t* table, int64_t n_tensors, const AdamWOptions& options, const float* lr,
                       const float* grad_scale, const float* found_inf, const float* clip_coef,
                       int num_threads) {
  adamw<uint16_t>(table, nullptr, n_tensors, options, lr, grad_scale, found_inf, clip_coef, num_threads);
}

void adamw_live_rows_f32(const int64_t* table, const int64_t* live_table, int64_t n_tensors,
                         const AdamWOptions& options, const float* lr, const float* grad_scale,
                         const float* found_inf, const float* clip_coef, int num_threads) {
  adamw<float>(table, live_table, n_tensors, options, lr, grad_scale, found_inf, clip_coef, num_threads);
}

void adamw_live_rows_bf16_master(const int64_t* table, const int64_t* live_table, int64_t n_tensors,
                                 const AdamWOptions& options, const float* lr, const float* grad_scale,
                                 const float* found_inf, const float* clip_coef, int num_threads) {
  adamw<uint16_t>(table, live_table, n_tensors, options, lr, grad_scale, found_inf, clip_coef, num_threads);
}

void adamw_grad_sum_of_squares_f32(const int64_t* table, int64_t n_tensors, const float* grad_scale, double* out,
                                   int num_threads) {
  grad_sum_of_squares<float>(table, nullptr, n_tensors, grad_scale, out, num_threads);
}

void adamw_grad_sum_of_squares_bf16(const int64_t* table, int64_t n_tensors, const float* grad_scale,
                                    double* out, int num_threads) {
  grad_sum_of_squares<uint16_t>(table, nullptr, n_tensors, grad_scale, out, num_threads);
}

void adamw_live_rows_grad_sum_of_squares_f32(const int64_t* table, const int64_t* live_table, int64_t n_tensors,
                                             const float* grad_scale, double* out, int num_threads) {
  grad_sum_of_squares<float>(table, live_table, n_tensors, grad_scale, out, num_threads);
}

void adamw_live_rows_grad_sum_of_squares_bf16(const int64_t* table, const int64_t* live_table, int64_t n_tensors,
                                              const float* grad_scale, double* out, int num_threads) {
  grad_sum_of_squares<uint16_t>(table, live_table, n_tensors, grad_scale, out, num_threads);
}

int64_t adamw_catch_up_rows_f32(const int64_t* table_row, const int64_t* live_row, bool write_param,
                                int num_threads) {
  return catch_up(read_row<float>(table_row), read_deferred(live_row), write_param, num_threads);
}

int64_t adamw_catch_up_rows_bf16_master(const int64_t* table_row, const int64_t* live_row, bool write_param,
                                        int num_threads) {
  return catch_up(read_row<uint16_t>(table_row), read_deferred(live_row), write_param, num_threads);
}

}  // namespace fastcls
