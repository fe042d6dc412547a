// AdamW steps over a table of tensors (see fastcls/optim/adamw.py for the math and the Python side).
//
// Row r of `table` (int64, kAdamWTableWidth columns) describes tensor r by address: param, grad, exp_avg,
// exp_avg_sq, max_exp_avg_sq (0 unless amsgrad), master (fp32 copy; 0 unless master weights), step (an fp32
// scalar), numel. The tensors of a row share one dense memory layout and are updated element by element in memory
// order. Each tensor's bias corrections come from its own step count, which the call increments. lr (nullable)
// points to an fp32 learning rate that replaces options.lr, so that a schedule can keep the rate in a tensor and
// the caller never reads it. grad_scale (nullable) divides the gradients, which are stored back unscaled; a
// nonzero *found_inf (nullable) makes the call change nothing at all. clip_coef (nullable) multiplies the
// (unscaled) gradients in registers, as gradient clipping would, without writing them: the gradients stored
// back under grad_scale are unscaled but not clipped.
#pragma once

#include <cstdint>

namespace fastcls {

constexpr int kAdamWTableWidth = 8;
constexpr int kAdamWLiveTableWidth = 8;
constexpr int kAdamWHistoryWidth = 8;

struct AdamWOptions {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool amsgrad;
  bool maximize;
  bool bias_correction;
};

// fp32 parameters, gradients and moments.
void adamw_f32(const int64_t* table, int64_t n_tensors, const AdamWOptions& options, const float* lr,
               const float* grad_scale, const float* found_inf, const float* clip_coef, int num_threads);
// bf16 parameters and gradients (uint16 bit patterns), fp32 master weights and moments; the parameter receives
// the updated master rounded to nearest even.
void adamw_bf16_master(const int64_t* table, int64_t n_tensors, const AdamWOptions& options, const float* lr,
                       const float* grad_scale, const float* found_inf, const float* clip_coef,
                       int num_threads);

// The sum of the squares of every gradient element of the table (the grad and numel columns), divided by
// *grad_scale squared when grad_scale is not null, written to *out: the squares of the gradients that a step
// would update with grad_scale, for a norm over all of a step's buckets (FusedAdamW's max_grad_norm). Summed in
// fp64, where an fp32 square is exact; each thread sums its part in memory order and the parts are added in
// thread order, so the result is the same from call to call at one thread count.
void adamw_grad_sum_of_squares_f32(const int64_t* table, int64_t n_tensors, const float* grad_scale, double* out,
                                   int num_threads);
void adamw_grad_sum_of_squares_bf16(const int64_t* table, int64_t n_tensors, const float* grad_scale,
                                    double* out, int num_threads);

// The same steps and sums, bitwise, for tables whose 2-D tensors (an embedding table) are mostly rows that no
// step has touched. Row t of `live_table` (int64, kAdamWLiveTableWidth columns) gives tensor t's row mask: the
// address of one bool per row (0: a dense tensor, all rows live) and the row width in elements (then columns 2-7
// as below, zero where the tensor is not deferred) (the tensors of a
// masked row are row-major). A row outside the mask must have a zero gradient and zero moments: its update is then
// the weight times 1 - lr * weight_decay (a master's rounded into the parameter; nothing when that is 1), which
// is all that is done to it, and the sum of squares reads only the vectors that hold part of a live row. Where a
// zero gradient would not give exactly that (eps 0, a non-finite step size, grad_scale or clip_coef that turns a
// zero into something else), every row takes the full update. The update walks each run of live rows, and of dead
// ones, as one stream, and the threads share it by bytes moved (a dead row's decay moves 8 per element, a full
// update 28); the sum keeps the dense sum's shares, which its bits depend on. The sum needs only the zero
// gradients outside its mask, so its live table may be narrower than the update's (fastcls passes the rows that
// the step's batch touched).
//
// Deferred rows. Where live_table's column 2 is nonzero, tensor t (an embedding table, amsgrad off) is deferred:
// the step touches only the rows its gradient may hold, and every other row skips it, to be brought up to date
// when next read by replaying the steps it skipped. Columns: 2, the address of an int32 per row, the step count
// the row is up to date at; 3 and 4, the address and row count of the history, kAdamWHistoryWidth fp32 per step,
// its row s - f holding step s's constants (what it did to an element whose gradient is zero), f in column 7 (no
// row is up to date before step f: the history starts there); 5 and 6, the address and count of the int64 ids of
// the rows the step touches (repeats allowed, each row taken once). A step records itself in the history at t
// (the tensor's step count after it; the history must have that row),
// brings each touched row up to step t - 1 and updates it, then marks it up to date at t; its mask column is not
// read. The replay uses the step's arithmetic (adamw_update.h), so a deferred row, once brought up to date, holds
// the bits the step over the whole table would have given it. Where grad_scale is not positive and finite every
// row takes the step (its zero gradient would not stay zero).
void adamw_live_rows_f32(const int64_t* table, const int64_t* live_table, int64_t n_tensors,
                         const AdamWOptions& options, const float* lr, const float* grad_scale,
                         const float* found_inf, const float* clip_coef, int num_threads);
void adamw_live_rows_bf16_master(const int64_t* table, const int64_t* live_table, int64_t n_tensors,
                                 const AdamWOptions& options, const float* lr, const float* grad_scale,
                                 const float* found_inf, const float* clip_coef, int num_threads);
void adamw_live_rows_grad_sum_of_squares_f32(const int64_t* table, const int64_t* live_table, int64_t n_tensors,
                                             const float* grad_scale, double* out, int num_threads);
void adamw_live_rows_grad_sum_of_squares_bf16(const int64_t* table, const int64_t* live_table, int64_t n_tensors,
                                              const float* grad_scale, double* out, int num_threads);

// Brings the rows of one deferred tensor (live_table's ids; every row where the ids' address is 0) up to date at
// its step count by replaying the steps they skipped; without write_param, all but the parameter itself (which
// torch wrote after those steps). table_row and live_row: its rows of the two tables. Returns 0, or -1 (nothing
// done) where an id lies outside the table.
int64_t adamw_catch_up_rows_f32(const int64_t* table_row, const int64_t* live_row, bool write_param,
                                int num_threads);
int64_t adamw_catch_up_rows_bf16_master(const int64_t* table_row, const int64_t* live_row, bool write_param,
                                        int num_threads);

}  // namespace fastcls
