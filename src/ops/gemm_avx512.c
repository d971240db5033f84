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
        // separate variables, not an array: clang keeps an array of them on the stack
        __m512 b0 = _mm512_loadu_ps(b + k * NR);
        __m512 b1 = NV > 1 ? _mm512_loadu_ps(b + k * NR + 16) : b0;
        __m512 b2 = NV > 2 ? _mm512_loadu_ps(b + k * NR + 32) : b0;
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            __m512 ai = _mm512_set1_ps(a[k * MR + i]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            if (NV > 1) acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
            if (NV > 2) acc[i][2] = _mm512_fmadd_ps(ai, b2, acc[i][2]);
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

// The last sliver of a block, when narrow (nr <= 16): one vector of columns, so an 8-row tile
// would do 8 FMAs per B load; here up to 3 panels (24 rows, panel p at a + p*pstride) share
// each B load instead. The same sums in the same order as tile(): the same bits.
static inline __attribute__((always_inline)) TARGET void
tall(const int NP, int kc, const float *a, ptrdiff_t pstride, const float *b, float *c,
     ptrdiff_t ldc, int mr, int nr, const gemm_epilogue *e) {
    __m512 acc[3 * MR];
#pragma GCC unroll 24
    for (int i = 0; i < NP * MR; i++) acc[i] = _mm512_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(b + k * NR);
#pragma GCC unroll 3
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++)
                acc[p * MR + i] = _mm512_fmadd_ps(_mm512_set1_ps(a[p * pstride + k * MR + i]), b0,
                                                  acc[p * MR + i]);
    }
    const __mmask16 mask = nr >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nr) - 1);
    const __m512 bcol = e->bias_col ? _mm512_maskz_loadu_ps(mask, e->bias_col) : _mm512_setzero_ps();
    const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 24
    for (int i = 0; i < NP * MR; i++) {
        if (i >= mr) break;
        float *ci = c + i * ldc;
        __m512 x = acc[i];
        if (e->load_c) x = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, ci), x);
        if (e->bias_row) x = _mm512_add_ps(x, _mm512_set1_ps(e->bias_row[i]));
        if (e->bias_col) x = _mm512_add_ps(x, bcol);
        if (e->relu) x = _mm512_max_ps(zero, x);
        _mm512_mask_storeu_ps(ci, mask, x);
    }
}

TARGET void gemm_kernel_avx512_tall(int kc, const float *a, ptrdiff_t pstride, const float *b,
                                    float *c, ptrdiff_t ldc, int mr, int nr,
                                    const gemm_epilogue *e) {
    if (mr > 2 * MR) tall(3, kc, a, pstride, b, c, ldc, mr, nr, e);
    else if (mr > MR) tall(2, kc, a, pstride, b, c, ldc, mr, nr, e);
    else tall(1, kc, a, pstride, b, c, ldc, mr, nr, e);
}

// Packs a full 8-row A panel: d[t*8 + i] = s[i*rs + t] for t < n. Sixteen columns at a time
// with an 8 x 16 -> 16 x 8 register transpose (in-lane unpacks and shuffles, then 128-bit lane
// shuffles); the tail column by column.
TARGET void gemm_pack_a8_avx512(float *d, const float *s, ptrdiff_t rs, int n) {
    int t = 0;
    for (; t + 16 <= n; t += 16, d += 128) {
        __m512 r0 = _mm512_loadu_ps(s + 0 * rs + t), r1 = _mm512_loadu_ps(s + 1 * rs + t);
        __m512 r2 = _mm512_loadu_ps(s + 2 * rs + t), r3 = _mm512_loadu_ps(s + 3 * rs + t);
        __m512 r4 = _mm512_loadu_ps(s + 4 * rs + t), r5 = _mm512_loadu_ps(s + 5 * rs + t);
        __m512 r6 = _mm512_loadu_ps(s + 6 * rs + t), r7 = _mm512_loadu_ps(s + 7 * rs + t);
        // per 128-bit lane l (columns 4l..4l+3): pairs of rows interleaved
        __m512 t0 = _mm512_unpacklo_ps(r0, r1), t1 = _mm512_unpackhi_ps(r0, r1);
        __m512 t2 = _mm512_unpacklo_ps(r2, r3), t3 = _mm512_unpackhi_ps(r2, r3);
        __m512 t4 = _mm512_unpacklo_ps(r4, r5), t5 = _mm512_unpackhi_ps(r4, r5);
        __m512 t6 = _mm512_unpacklo_ps(r6, r7), t7 = _mm512_unpackhi_ps(r6, r7);
        // u0: rows 0-3 of column 4l; u1: column 4l+1; u2, u3: 4l+2, 4l+3; u4..u7 rows 4-7
        __m512 u0 = _mm512_shuffle_ps(t0, t2, 0x44), u1 = _mm512_shuffle_ps(t0, t2, 0xee);
        __m512 u2 = _mm512_shuffle_ps(t1, t3, 0x44), u3 = _mm512_shuffle_ps(t1, t3, 0xee);
        __m512 u4 = _mm512_shuffle_ps(t4, t6, 0x44), u5 = _mm512_shuffle_ps(t4, t6, 0xee);
        __m512 u6 = _mm512_shuffle_ps(t5, t7, 0x44), u7 = _mm512_shuffle_ps(t5, t7, 0xee);
        // output vector for columns (4l, 4l+1) = lanes [u0.l, u4.l, u1.l, u5.l], and for
        // (4l+2, 4l+3) = [u2.l, u6.l, u3.l, u7.l]
        __m512 p04lo = _mm512_shuffle_f32x4(u0, u4, 0x44), p04hi = _mm512_shuffle_f32x4(u0, u4, 0xee);
        __m512 p15lo = _mm512_shuffle_f32x4(u1, u5, 0x44), p15hi = _mm512_shuffle_f32x4(u1, u5, 0xee);
        __m512 p26lo = _mm512_shuffle_f32x4(u2, u6, 0x44), p26hi = _mm512_shuffle_f32x4(u2, u6, 0xee);
        __m512 p37lo = _mm512_shuffle_f32x4(u3, u7, 0x44), p37hi = _mm512_shuffle_f32x4(u3, u7, 0xee);
        // p04lo = [u0.0, u0.1, u4.0, u4.1]: picking lanes (0,2) of it and of p15lo gives l = 0
        _mm512_storeu_ps(d + 0, _mm512_shuffle_f32x4(p04lo, p15lo, 0x88));    // columns 0, 1
        _mm512_storeu_ps(d + 16, _mm512_shuffle_f32x4(p26lo, p37lo, 0x88));   // 2, 3
        _mm512_storeu_ps(d + 32, _mm512_shuffle_f32x4(p04lo, p15lo, 0xdd));   // 4, 5
        _mm512_storeu_ps(d + 48, _mm512_shuffle_f32x4(p26lo, p37lo, 0xdd));   // 6, 7
        _mm512_storeu_ps(d + 64, _mm512_shuffle_f32x4(p04hi, p15hi, 0x88));   // 8, 9
        _mm512_storeu_ps(d + 80, _mm512_shuffle_f32x4(p26hi, p37hi, 0x88));   // 10, 11
        _mm512_storeu_ps(d + 96, _mm512_shuffle_f32x4(p04hi, p15hi, 0xdd));   // 12, 13
        _mm512_storeu_ps(d + 112, _mm512_shuffle_f32x4(p26hi, p37hi, 0xdd));  // 14, 15
    }
    for (; t < n; t++, d += 8)
        for (int i = 0; i < 8; i++) d[i] = s[i * rs + t];
}

// 16 x 16 transpose: unpacks and in-lane shuffles gather, per 128-bit lane l, four rows of
// element 4l+m into u[4g+m] (rows 4g..4g+3); two rounds of 128-bit lane shuffles then put
// lanes l of u[m], u[4+m], u[8+m], u[12+m] side by side as output row 4l+m.
TARGET void gemm_transpose16_avx512(float *d, ptrdiff_t ld, const float *s, ptrdiff_t ls,
                                    int rows) {
    __m512 a[16], t[16], u[16], out[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) a[i] = _mm512_loadu_ps(s + i * ls);
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++) {
        u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0xee);
        u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xee);
    }
#pragma GCC unroll 4
    for (int m = 0; m < 4; m++) {
        __m512 v = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);
        __m512 v2 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xee);
        __m512 w = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
        __m512 w2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xee);
        out[0 + m] = _mm512_shuffle_f32x4(v, w, 0x88);
        out[4 + m] = _mm512_shuffle_f32x4(v, w, 0xdd);
        out[8 + m] = _mm512_shuffle_f32x4(v2, w2, 0x88);
        out[12 + m] = _mm512_shuffle_f32x4(v2, w2, 0xdd);
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(d + r * ld, out[r]);
}
