// Deferred rows (adamw.h): an embedding table's rows that a step's batch did not touch skip the step, and are
// brought up to date later by replaying the skipped steps' zero-gradient updates from a record of each step's
// constants, with adamw_update.h's arithmetic: the bits the step over the whole table would have given them.
// Internal to csrc/.
#pragma once

#include "adamw.h"
#include "adamw_update.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace fastcls {
namespace adamw_detail {

// A deferred tensor (the live table's columns 2-6, adamw.h).
struct DeferredRows {
  int32_t* synced;     // per row: the step count it is up to date at; null: the tensor is not deferred
  float* history;      // kAdamWHistoryWidth floats per step count, from step history_first on
  int64_t history_rows;
  const int64_t* ids;  // the rows a call brings up to date (repeats allowed); null: every row
  int64_t n_ids;
  int64_t width;       // elements per row
  int64_t history_first;

  // Step s's record.
  float* record(int64_t s) const { return history + (s - history_first) * kAdamWHistoryWidth; }
};

inline DeferredRows read_deferred(const int64_t* live_row) {
  return {reinterpret_cast<int32_t*>(live_row[2]), reinterpret_cast<float*>(live_row[3]), live_row[4],
          reinterpret_cast<const int64_t*>(live_row[5]), live_row[6], live_row[1], live_row[7]};
}

// Step s's record: what its update did to an element whose stored gradient is zero.
inline void record_step(const DeferredRows& d, int64_t step, const Constants& c, const StepConstants& s,
                        float zero_gradient) {
  if (step < d.history_first || step - d.history_first >= d.history_rows) {
    throw std::invalid_argument("adamw: the deferred rows' history has no row for this step");
  }
  float* h = d.record(step);
  const float record[kAdamWHistoryWidth] = {c.decay, c.one_minus_beta1, c.beta2, c.one_minus_beta2,
                                       c.eps,   s.step_size,       s.inv_bias_correction2_sqrt, zero_gradient};
  std::copy(record, record + kAdamWHistoryWidth, h);
}

inline Constants recorded_constants(const float* h) { return {h[0], h[1], h[2], h[3], h[4], 1.0f, 1.0f, false}; }
inline StepConstants recorded_step(const float* h) { return {h[5], h[6]}; }

// Whether the recorded step leaves an element whose moments are +0 at +0 and its weight times the decay, as it
// does whenever the zero gradient stays a zero and eps keeps the denominator positive: the replay then multiplies.
inline bool keeps_moments_zero(const float* h) {
  return h[7] == 0.0f && h[4] > 0.0f && h[5] >= 0.0f && std::isfinite(h[5]) && std::isfinite(h[6]);
}

// Elements [begin, end) of a row, up to date at step `from`, brought to step `to` by the zero-gradient updates of
// the steps between, four vectors at a time in registers. Without write_param the parameter keeps what it holds
// (torch wrote it after those steps); a master and the moments take them all the same.
template <typename Param>
void replay(const Row<Param>& r, int64_t begin, int64_t end, const DeferredRows& d, int64_t from, int64_t to,
            bool write_param = true) {
  if (from >= to) return;
#if defined(FASTCLS_ADAMW_AVX512)
  constexpr int kVectors = 4;
  for (int64_t i = begin; i < end; i += 16 * kVectors) {
    __m512 w[kVectors], m[kVectors], v[kVectors], unused = _mm512_setzero_ps();
    __mmask16 mask[kVectors];
    __m512i bits = _mm512_setzero_si512();
    for (int k = 0; k < kVectors; ++k) {
      const int64_t at = i + 16 * k;
      mask[k] = at < end ? tail_mask(end - at) : __mmask16(0);
      w[k] = r.master != nullptr ? load16(r.master + at, mask[k]) : load16(r.param + at, mask[k]);
      m[k] = load16(r.exp_avg + at, mask[k]);
      v[k] = load16(r.exp_avg_sq + at, mask[k]);
      bits = _mm512_or_si512(bits, _mm512_or_si512(_mm512_castps_si512(m[k]), _mm512_castps_si512(v[k])));
    }
    bool zero_moments = _mm512_test_epi32_mask(bits, bits) == 0;  // every bit: a −0 takes the full update
    for (int64_t s = from + 1; s <= to; ++s) {
      const float* h = d.record(s);
      if (zero_moments && keeps_moments_zero(h)) {
        for (int k = 0; k < kVectors; ++k) w[k] = _mm512_mul_ps(w[k], _mm512_set1_ps(h[0]));
        continue;
      }
      zero_moments = false;
      const Constants c = recorded_constants(h);
      const StepConstants st = recorded_step(h);
      const __m512 grad = _mm512_set1_ps(h[7]);
      for (int k = 0; k < kVectors; ++k) adamw_math16<false>(grad, w[k], m[k], v[k], unused, c, st);
    }
    for (int k = 0; k < kVectors; ++k) {
      const int64_t at = i + 16 * k;
      if (r.master != nullptr) store16(r.master + at, w[k], mask[k]);
      if (write_param) store16(r.param + at, w[k], mask[k]);
      store16(r.exp_avg + at, m[k], mask[k]);
      store16(r.exp_avg_sq + at, v[k], mask[k]);
    }
  }
#else
  for (int64_t i = begin; i < end; ++i) {
    float w = r.master != nullptr ? r.master[i] : to_f32(r.param[i]), m = r.exp_avg[i], v = r.exp_avg_sq[i];
    float unused = 0.0f;
    for (int64_t s = from + 1; s <= to; ++s) {
      const float* h = d.record(s);
      adamw_math<false>(h[7], w, m, v, unused, recorded_constants(h), recorded_step(h));
    }
    if (r.master != nullptr) r.master[i] = w;
    if (write_param) r.param[i] = from_f32<Param>(w);
    r.exp_avg[i] = m;
    r.exp_avg_sq[i] = v;
  }
#endif
}

// The rows a call works on: the ids once each, in order; every row behind `now` without ids. -1 where an id is
// outside the table.
inline int64_t rows_to_visit(const DeferredRows& d, int64_t n_rows, int64_t now, std::vector<int64_t>& rows) {
  rows.clear();
  if (d.ids == nullptr) {
    for (int64_t x = 0; x < n_rows; ++x) {
      if (d.synced[x] < now) rows.push_back(x);
    }
  } else {
    rows.assign(d.ids, d.ids + d.n_ids);
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    if (!rows.empty() && (rows.front() < 0 || rows.back() >= n_rows)) return -1;
  }
  // the steps a row skipped must be on record (the history starts where every row was last up to date)
  for (const int64_t x : rows) {
    if (d.synced[x] < d.history_first) throw std::invalid_argument("adamw: a deferred row's steps are off the record");
  }
  return 0;
}

// Runs visit(row) for each row, the threads taking rows as they come (a row's replay may be long or empty).
template <typename Visit>
void for_each_row(const std::vector<int64_t>& rows, int64_t width, int num_threads, const Visit& visit) {
  const int64_t n = int64_t(rows.size());
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, n * width / 8192)));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (threads > 1)
  for (int64_t k = 0; k < n; ++k) visit(rows[k]);
}

// Brings the rows (d.ids, or every row) up to date at the tensor's step count, the parameter's too where
// write_param. -1 (nothing done) where an id is outside the table.
template <typename Param>
int64_t catch_up(const Row<Param>& r, const DeferredRows& d, bool write_param, int num_threads) {
  const int64_t now = int64_t(*r.step), n_rows = r.numel / d.width;
  std::vector<int64_t> rows;
  if (rows_to_visit(d, n_rows, now, rows) < 0) return -1;
  for_each_row(rows, d.width, num_threads, [&](int64_t x) {
    replay(r, x * d.width, (x + 1) * d.width, d, d.synced[x], now, write_param);
    d.synced[x] = int32_t(now);
  });
  return 0;
}

// Step `step` of a deferred tensor: recorded, then taken by the touched rows (every row where `every_row`), each
// first brought up to the step before.
template <bool kScaled, typename Param>
void step_deferred(const Row<Param>& r, DeferredRows d, const Constants& c, const StepConstants& s, int64_t step,
                   bool every_row, int num_threads) {
  record_step(d, step, c, s, used_zero_gradient<kScaled>(c));
  if (every_row) d.ids = nullptr;
  std::vector<int64_t> rows;
  if (rows_to_visit(d, r.numel / d.width, step, rows) < 0) {
    throw std::invalid_argument("adamw: a deferred tensor's touched row is outside it");
  }
  for_each_row(rows, d.width, num_threads, [&](int64_t x) {
    replay(r, x * d.width, (x + 1) * d.width, d, d.synced[x], step - 1);
    update_range<kScaled, false>(r, x * d.width, (x + 1) * d.width, c, s);
    d.synced[x] = int32_t(step);
  });
}

}  // namespace adamw_detail
}  // namespace fastcls
