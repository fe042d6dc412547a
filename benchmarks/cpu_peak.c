// The floor for the products of a bf16 CPU step: how many GFLOP/s one core's AVX512-BF16 dot products
// (vdpbf16ps, 64 flops each) and fp32 FMAs (32 flops each) run, from loops of independent accumulator chains
// (enough to hide their latency). Run one copy per core for the machine's figure:
//
//     gcc -O2 -mavx512f -mavx512bf16 -mavx512bw -o /tmp/cpu_peak benchmarks/cpu_peak.c
//     /tmp/cpu_peak & /tmp/cpu_peak; wait
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 24
#define ITERATIONS 200000000L

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  __m512 acc[CHAINS];
  for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_setzero_ps();
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f00);  // 1.0, 0.5
  double start = now();
  for (long i = 0; i < ITERATIONS; i++) {
#pragma GCC unroll 24
    for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
    __asm__ volatile("" : "+v"(a));  // keeps the compiler from folding the loop
  }
  double seconds = now() - start;
  float checksum = 0;
  for (int j = 0; j < CHAINS; j++) checksum += _mm512_reduce_add_ps(acc[j]);
  printf("vdpbf16ps: %.1f GFLOP/s one core (checksum %g)\n", ITERATIONS * CHAINS * 64.0 / seconds / 1e9, checksum);

  __m512 x = _mm512_set1_ps(0.5f), y = _mm512_set1_ps(0.25f);
  for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_setzero_ps();
  start = now();
  for (long i = 0; i < ITERATIONS; i++) {
#pragma GCC unroll 24
    for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_fmadd_ps(acc[j], x, y);  // converges to 0.5: no overflow
    __asm__ volatile("" : "+v"(x));
  }
  seconds = now() - start;
  checksum = 0;
  for (int j = 0; j < CHAINS; j++) checksum += _mm512_reduce_add_ps(acc[j]);
  printf("fp32 fma: %.1f GFLOP/s one core (checksum %g)\n", ITERATIONS * CHAINS * 32.0 / seconds / 1e9, checksum);
  return 0;
}
