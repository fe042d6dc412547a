// The Linear layer's bf16 products (linear_bf16.h). Built in the avx512_bf16 variant only: elsewhere torch's
// products run (fastcls/ops/linear.py asks the module for the kernels).
#include "linear_bf16.h"

#if defined(__AVX512BF16__)
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "lanes16.h"

namespace fastcls {
namespace {

constexpr int kRows = 8;           // rows of a register tile: 8 x 3 accumulators, 3 B vectors, 1 broadcast
constexpr int64_t kRowBlock = 64;  // rows of A kept in L1/L2 while a thread sweeps its panels

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// C[0:R, 0:n_valid] of one panel = A(rows) . Bp(panel), over kp pairs of the reduction.
template <int R>
void tile(const int32_t* a, int64_t row_stride, int64_t pair_stride, const uint16_t* bp, int64_t pairs,
          const float* bias, uint16_t* c_bf16, float* c_f32, bool accumulate, int64_t ldc, int64_t n_valid) {
  __m512 acc[R][3];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 3; ++j) acc[i][j] = _mm512_setzero_ps();
  const int32_t* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = a + i * row_stride;
  for (int64_t kp = 0, at = 0; kp < pairs; ++kp, at += pair_stride, bp += 2 * kLinearPanel) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 32);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(bp + 64);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512bh pair = (__m512bh)_mm512_set1_epi32(rows[i][at]);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], pair, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], pair, b1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], pair, b2);
    }
  }
  for (int j = 0; j < 3 && 16 * j < n_valid; ++j) {
    const __mmask16 mask = lanes(n_valid - 16 * j);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();
    for (int i = 0; i < R; ++i) {
      const __m512 value = _mm512_add_ps(acc[i][j], b);
      if (c_bf16) {
        store16(c_bf16 + i * ldc + 16 * j, value, mask);
      } else if (accumulate) {  // the product rounded to bf16, then added in fp32: a bf16 product's add_
        float* c = c_f32 + i * ldc + 16 * j;
        const __m512 rounded = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits16(value)), 16));
        store16(c, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), rounded), mask);
      } else {
        store16(c_f32 + i * ldc + 16 * j, value, mask);
      }
    }
  }
}

using Tile = void (*)(const int32_t*, int64_t, int64_t, const uint16_t*, int64_t, const float*, uint16_t*, float*,
                      bool, int64_t, int64_t);
constexpr Tile kTiles[kRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

// 16 columns of a row as bf16 bits widened to 32-bit lanes (zeros past the mask)
inline __m512i widened16(const uint16_t* p, __mmask16 mask) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
}
inline __m512i widened16(const float* p, __mmask16 mask) {
  return _mm512_cvtepu16_epi32(bf16_bits16(_mm512_maskz_loadu_ps(mask, p)));
}

// 16 rows' pairs at pair kp of (a row block of) W, as 32-bit lanes: a gather down the rows (lanes past the mask 0)
inline __m512i row_pairs16(const uint16_t* w, __m512i rows, int64_t kp, __mmask16 mask) {
  return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, rows, w + 2 * kp, 4);
}
inline __m512i row_pairs16(const float* w, __m512i rows, int64_t kp, __mmask16 mask) {
  const __m512 lo = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, rows, w + 2 * kp, 4);
  const __m512 hi = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, rows, w + 2 * kp + 1, 4);
  return _mm512_or_si512(_mm512_cvtepu16_epi32(bf16_bits16(lo)),
                         _mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits16(hi)), 16));
}

// Row pair rp of B (lo, and hi unless null) into the pair-packed panels, 16 columns per 64-byte store. stream:
// stores that bypass the cache, for a pack read much later (the input gradient's, built in the forward).
// Columns [c, c + 16) of two rows as 32-bit pairs (lo's bits low, hi's high; hi null: zeros), zeros past the mask.
template <typename T>
inline __m512i row_pair16(const T* lo, const T* hi, int64_t c, __mmask16 mask) {
  const __m512i low = widened16(lo + c, mask);
  return hi ? _mm512_or_si512(low, _mm512_slli_epi32(widened16(hi + c, mask), 16)) : low;
}

inline void store_pair16(uint32_t* out, int64_t pair_rows, int64_t rp, int64_t c, __m512i pair, bool whole,
                         bool stream) {
  uint32_t* dst = out + ((c / kLinearPanel) * pair_rows + rp) * kLinearPanel + c % kLinearPanel;
  if (stream && whole)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), pair);  // 64-byte aligned: torch's allocations are
  else
    _mm512_storeu_si512(dst, pair);  // whole 16 lanes: the columns past C are the panel's zero padding
}

template <typename T>
void store_row_pair(const T* lo, const T* hi, int64_t C, int64_t pair_rows, int64_t rp, uint32_t* out, bool stream) {
  if constexpr (std::is_same<T, uint16_t>::value) {
    // 32 columns of both rows per pair of loads, interleaved by two word permutes
    const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                           6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
    for (int64_t c = 0; c < C; c += 32) {
      const __mmask32 mask = C - c >= 32 ? __mmask32(0xffffffff) : __mmask32((1u << (C - c)) - 1);
      const __m512i low = _mm512_maskz_loadu_epi16(mask, lo + c);
      const __m512i high = hi ? _mm512_maskz_loadu_epi16(mask, hi + c) : _mm512_setzero_si512();
      store_pair16(out, pair_rows, rp, c, _mm512_permutex2var_epi16(low, first, high), C - c >= 16, stream);
      if (c + 16 < C)
        store_pair16(out, pair_rows, rp, c + 16, _mm512_permutex2var_epi16(low, second, high), C - c >= 32, stream);
    }
  } else {
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 mask = lanes(C - c);
      store_pair16(out, pair_rows, rp, c, row_pair16(lo, hi, c, mask), mask == 0xffff, stream);
    }
  }
}

// In place: r[i] row i of a 16 x 16 block of 32-bit elements becomes its column i (in-lane unpacks, then a 4 x 4
// transpose of 128-bit lanes).
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // lane L of r[4 i + c]: column 4 L + c, rows 4 i .. 4 i + 3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xee);
    t[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Blocks of up to 16 rows within one panel: each pair kp of the block is one 64-byte store into the panel (a
// transpose with whole-line writes), its 16 rows' pairs taken from a 16 x 16 register transpose (bf16) or a gather
// down the rows (fp32, rounded). With `pairs_out`, the same rows, still in cache, also go to the input gradient's
// pair-packed panels (R rows in all).
template <typename T>
void pack_wt(const T* w, int64_t rows, int64_t row_offset, int64_t K, uint16_t* packed, uint16_t* pairs_out,
             int64_t R, int num_threads) {
  const int64_t pairs = K / 2;
  uint32_t* out = reinterpret_cast<uint32_t*>(packed);
  // block b covers rows [starts[b], starts[b + 1]) of this weight, never crossing a panel or 16 rows
  std::vector<int64_t> starts;
  for (int64_t r = 0; r < rows;) {
    starts.push_back(r);
    const int64_t g = row_offset + r;
    r += std::min<int64_t>({16, kLinearPanel - g % kLinearPanel, rows - r});
  }
  starts.push_back(rows);
  // the rows' starts: in pairs of bf16 (32-bit units) or in fp32 elements, each gather's scale being 4 bytes
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i rows_idx = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int(std::is_same<T, float>::value ? K : pairs)));
  const int64_t n_blocks = int64_t(starts.size()) - 1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t r = starts[b], count = starts[b + 1] - r, g = row_offset + r;
    const __mmask16 mask = lanes(count);
    const T* base = w + r * K;
    uint32_t* dst = out + (g / kLinearPanel) * pairs * kLinearPanel + g % kLinearPanel;
    if constexpr (std::is_same<T, uint16_t>::value) {
      // bf16 rows are rows of pairs already: 16 x 16 pairs at a time, transposed in registers
      const uint32_t* base32 = reinterpret_cast<const uint32_t*>(base);
      for (int64_t kp = 0; kp < pairs; kp += 16) {
        const __mmask16 along = lanes(pairs - kp);
        __m512i block[16];
        for (int i = 0; i < 16; ++i)
          block[i] = i < count ? _mm512_maskz_loadu_epi32(along, base32 + i * pairs + kp) : _mm512_setzero_si512();
        transpose16x16(block);
        for (int j = 0; j < 16 && kp + j < pairs; ++j)
          _mm512_mask_storeu_epi32(dst + (kp + j) * kLinearPanel, mask, block[j]);
      }
    } else {
      for (int64_t kp = 0; kp < pairs; ++kp)
        _mm512_mask_storeu_epi32(dst + kp * kLinearPanel, mask, row_pairs16(base, rows_idx, kp, mask));
    }
    if (pairs_out)  // g and count are even (row_offset is, and so are 16 and 48)
      for (int64_t i = 0; i < count; i += 2)
        store_row_pair(base + i * K, i + 1 < count ? base + (i + 1) * K : nullptr, K, (R + 1) / 2, (g + i) / 2,
                       reinterpret_cast<uint32_t*>(pairs_out), true);
  }
  _mm_sfence();
}

template <typename T>
void pack_pairs(const T* b, int64_t ld, int64_t rows, int64_t row_offset, int64_t R, int64_t C, uint16_t* packed,
                int num_threads) {
  const int64_t pair_rows = (R + 1) / 2, first = row_offset / 2, last = (row_offset + rows + 1) / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t rp = first; rp < last; ++rp) {
    const int64_t r0 = 2 * rp - row_offset;  // local index of the pair's first row (row_offset is even)
    store_row_pair(b + r0 * ld, r0 + 1 < rows ? b + (r0 + 1) * ld : nullptr, C, pair_rows, rp,
                   reinterpret_cast<uint32_t*>(packed), false);
  }
}

}  // namespace

void linear_bf16_gemm(const uint16_t* a, int64_t row_stride, int64_t pair_stride, const uint16_t* packed,
                      const float* bias, uint16_t* c_bf16, float* c_f32, bool accumulate, int64_t ldc, int64_t M,
                      int64_t N, int64_t K, int num_threads) {
  const int64_t pairs = K / 2, panels = (N + kLinearPanel - 1) / kLinearPanel;
  const int32_t* a32 = reinterpret_cast<const int32_t*>(a);
  const int n_threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, panels)));
#pragma omp parallel num_threads(n_threads)
  {
    // each thread sweeps its own panels (its share of B stays in its L2) over row blocks of A
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t p0 = panels * t / nt, p1 = panels * (t + 1) / nt;
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t m1 = std::min(M, m0 + kRowBlock);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kLinearPanel, n_valid = std::min(kLinearPanel, N - n0);
        const uint16_t* bp = packed + p * pairs * 2 * kLinearPanel;
        for (int64_t m = m0; m < m1; m += kRows) {
          const int64_t offset = m * ldc + n0;
          kTiles[std::min<int64_t>(kRows, m1 - m)](a32 + m * row_stride, row_stride, pair_stride, bp, pairs,
                                                    bias ? bias + n0 : nullptr, c_bf16 ? c_bf16 + offset : nullptr,
                                                    c_f32 ? c_f32 + offset : nullptr, accumulate, ldc, n_valid);
        }
      }
    }
  }
}

void linear_pack_wt_bf16(const uint16_t* w, int64_t rows, int64_t row_offset, int64_t K, uint16_t* packed,
                         uint16_t* pairs_out, int64_t R, int num_threads) {
  pack_wt(w, rows, row_offset, K, packed, pairs_out, R, num_threads);
}
void linear_pack_wt_f32(const float* w, int64_t rows, int64_t row_offset, int64_t K, uint16_t* packed,
                        uint16_t* pairs_out, int64_t R, int num_threads) {
  pack_wt(w, rows, row_offset, K, packed, pairs_out, R, num_threads);
}
void linear_pack_pairs_bf16(const uint16_t* b, int64_t ld, int64_t rows, int64_t row_offset, int64_t R, int64_t C,
                            uint16_t* packed, int num_threads) {
  pack_pairs(b, ld, rows, row_offset, R, C, packed, num_threads);
}
void linear_pack_pairs_f32(const float* b, int64_t ld, int64_t rows, int64_t row_offset, int64_t R, int64_t C,
                           uint16_t* packed, int num_threads) {
  pack_pairs(b, ld, rows, row_offset, R, C, packed, num_threads);
}

void linear_interleave_row_pairs(const uint16_t* in, int64_t ld, int64_t R, int64_t C, uint16_t* out,
                                 float* col_sums, int num_threads) {
  const int64_t pair_rows = (R + 1) / 2, chunks = (C + 15) / 16, width = chunks * 16;
  // the column sums of each block of kSumBlock row pairs, added in block order afterwards: the same sums whatever
  // the thread count or timing (a resumed run with other threads gets the same bias gradients)
  constexpr int64_t kSumBlock = 32;
  const int64_t blocks = (pair_rows + kSumBlock - 1) / kSumBlock;
  std::vector<float> partial(col_sums ? size_t(blocks * width) : 0, 0.0f);
  uint32_t* out32 = reinterpret_cast<uint32_t*>(out);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t block = 0; block < blocks; ++block) {
    float* sums = col_sums ? partial.data() + block * width : nullptr;
    for (int64_t rp = block * kSumBlock; rp < std::min(pair_rows, (block + 1) * kSumBlock); ++rp) {
      const uint16_t* lo = in + 2 * rp * ld;
      const uint16_t* hi = 2 * rp + 1 < R ? lo + ld : nullptr;
      for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 mask = lanes(C - c);
        const __m512i pair = row_pair16(lo, hi, c, mask);
        _mm512_mask_storeu_epi32(out32 + rp * C + c, mask, pair);
        if (sums) {  // the two rows as fp32: the low bf16 shifted up, the high one with the low half cleared
          const __m512 pair_sum = _mm512_add_ps(
              _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)),
              _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(int(0xffff0000u)))));
          _mm512_storeu_ps(sums + c, _mm512_add_ps(_mm512_loadu_ps(sums + c), pair_sum));
        }
      }
    }
  }
  if (col_sums)
    for (int64_t c = 0; c < C; ++c) {
      float sum = 0.0f;
      for (int64_t block = 0; block < blocks; ++block) sum += partial[size_t(block * width + c)];
      col_sums[c] = sum;
    }
}

}  // namespace fastcls
#endif
