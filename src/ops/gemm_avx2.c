// AVX2 GEMM micro-kernel: a 6 x 16 tile of C in 12 ymm accumulators (the classic Haswell
// shape: 12 accumulators + 2 B vectors + 1 broadcast fit the 16 ymm registers).
#include "ops/gemm.h"
#include <immintrin.h>

#define MR GEMM_AVX2_MR
#define NR GEMM_AVX2_NR
#define TARGET __attribute__((target("avx2,fma")))

// Lane mask for columns 0..n-1 of one 8-float vector.
static inline __attribute__((always_inline)) TARGET __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline __attribute__((always_inline)) TARGET void
tile(const int NV, int kc, const float *a, const float *b, float *c, ptrdiff_t ldc, int mr,
     int nr, const gemm_epilogue *e) {
    __m256 acc[MR][2];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++) acc[i][v] = _mm256_setzero_ps();

    for (int k = 0; k < kc; k++) {
        // separate variables, not an array: clang keeps an array of them on the stack
        __m256 b0 = _mm256_loadu_ps(b + k * NR);
        __m256 b1 = NV > 1 ? _mm256_loadu_ps(b + k * NR + 8) : b0;
#pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            __m256 ai = _mm256_broadcast_ss(a + k * MR + i);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            if (NV > 1) acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
    }

    __m256i mask[2];
    __m256 bcol[2];
#pragma GCC unroll 2
    for (int v = 0; v < NV; v++) {
        mask[v] = lanes_below(nr - v * 8);
        bcol[v] = e->bias_col ? _mm256_maskload_ps(e->bias_col + v * 8, mask[v])
                              : _mm256_setzero_ps();
    }
    const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        if (i >= mr) break;
        float *ci = c + i * ldc;
        __m256 brow = _mm256_set1_ps(e->bias_row ? e->bias_row[i] : 0.0f);
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++) {
            __m256 x = acc[i][v];
            if (e->load_c) x = _mm256_add_ps(_mm256_maskload_ps(ci + v * 8, mask[v]), x);
            if (e->bias_row) x = _mm256_add_ps(x, brow);
            if (e->bias_col) x = _mm256_add_ps(x, bcol[v]);
            if (e->relu) x = _mm256_max_ps(zero, x);  // NaN stays NaN (second operand)
            _mm256_maskstore_ps(ci + v * 8, mask[v], x);
        }
    }
}

TARGET void gemm_kernel_avx2(int kc, const float *a, const float *b, float *c, ptrdiff_t ldc,
                             int mr, int nr, const gemm_epilogue *e) {
    if (nr > 8)
        tile(2, kc, a, b, c, ldc, mr, nr, e);
    else
        tile(1, kc, a, b, c, ldc, mr, nr, e);
}
