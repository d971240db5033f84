// AVX-512 GEMM micro-kernel: an 8 x 48 tile of C in 24 zmm accumulators. Per k step it loads
// three vectors of the B sliver and broadcasts the 8 values of the A panel, 24 FMAs in all:
// enough independent chains to cover FMA latency on two pipes, few enough loads per FMA.
// Narrow tiles (nr <= 32 or <= 16) use the same code with fewer vectors.
#include "ops/gemm.h"
#include <immintrin.h>

#define MR GEMM_AVX512_MR
#define NR GEMM_AVX512_NR
#define TARGET __attribute__((target("avx512f,fma")))

// NV = number of 16-float vectors computed (1..3); a constant after inlining, so acc[][] lives
// in registers.
static inline __attribute__((always_inline)) TARGET void
tile(const int NV, int kc, const float *a, const float *b, float *c, ptrdiff_t ldc, int mr,
     int nr, const gemm_epilogue *e) {
    __m512 acc[MR][3];
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 3
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();

    for (int k = 0; k < kc; k++) {
        __m512 bv[3];
#pragma GCC unroll 3
        for (int v = 0; v < NV; v++) bv[v] = _mm512_loadu_ps(b + k * NR + v * 16);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            __m512 ai = _mm512_set1_ps(a[k * MR + i]);
#pragma GCC unroll 3
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
        }
    }

    // Epilogue. The last vector is masked to the nr columns that exist.
    __mmask16 mask[3];
#pragma GCC unroll 3
    for (int v = 0; v < NV; v++) {
        int n = nr - v * 16;
        mask[v] = n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
    }
    __m512 bcol[3];
#pragma GCC unroll 3
    for (int v = 0; v < NV; v++)
        bcol[v] = e->bias_col ? _mm512_maskz_loadu_ps(mask[v], e->bias_col + v * 16)
                              : _mm512_setzero_ps();
    const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
        if (i >= mr) break;
        float *ci = c + i * ldc;
        __m512 brow = _mm512_set1_ps(e->bias_row ? e->bias_row[i] : 0.0f);
#pragma GCC unroll 3
        for (int v = 0; v < NV; v++) {
            __m512 x = acc[i][v];
            if (e->load_c) x = _mm512_add_ps(_mm512_maskz_loadu_ps(mask[v], ci + v * 16), x);
            if (e->bias_row) x = _mm512_add_ps(x, brow);
            if (e->bias_col) x = _mm512_add_ps(x, bcol[v]);
            // max(0, x) returns x when x is NaN (vmaxps returns its second operand then)
            if (e->relu) x = _mm512_max_ps(zero, x);
            _mm512_mask_storeu_ps(ci + v * 16, mask[v], x);
        }
    }
}

TARGET void gemm_kernel_avx512(int kc, const float *a, const float *b, float *c, ptrdiff_t ldc,
                               int mr, int nr, const gemm_epilogue *e) {
    if (nr > 32)
        tile(3, kc, a, b, c, ldc, mr, nr, e);
    else if (nr > 16)
        tile(2, kc, a, b, c, ldc, mr, nr, e);
    else
        tile(1, kc, a, b, c, ldc, mr, nr, e);
}
