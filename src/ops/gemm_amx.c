// bfloat16 GEMM pieces (see cpu_bf16_set() in cpu.h): the AMX micro-kernel, the conversions
// that lay operands out for it, and rounding to bfloat16 for the float32 fallback.
//
// AMX tiles: TDPBF16PS C[16 x 16 f32] += A[16 rows x 32 bf16] * B[16 pair-rows x 16 cols x 2]:
// A tiles hold 32 consecutive k of each row, B tiles the pairs (k, k+1) of each column side by
// side ("VNNI" layout). The kernel computes a 32 x 32 tile of C with 4 accumulator tiles, 2 A
// tiles and 2 B tiles per 32-deep step.
#include "ops/gemm.h"
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include "ops/cpu.h"

#define AVX512 __attribute__((target("avx512f")))
#define AMX __attribute__((target("avx512f,amx-tile,amx-bf16")))
// VCVTNE(2)PS2BF16: every AMX-BF16 CPU has AVX512_BF16 (cpu_amx() checks it)
#define BF16CVT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// ---- rounding to bfloat16 (to nearest, ties to even; NaN stays a quiet NaN; denormals
// become zero of their sign), exactly what VCVTNEPS2BF16 does, so that the AMX path and the
// float32 fallback round alike ----
static uint32_t bf16_bits_c(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u | 0x00400000u) & 0xffff0000u;
    if (!(u & 0x7f800000u)) return u & 0x80000000u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

// The float32 bit patterns of x rounded to bfloat16 (low 16 bits zero).
static inline AVX512 __m512i bf16_bits(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
    __mmask16 tiny = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_and_epi32(r, tiny, u, _mm512_set1_epi32((int)0x80000000u));
    return _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
}

static void round_c(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t b = bf16_bits_c(x[i]);
        memcpy(x + i, &b, sizeof b);
    }
}

static AVX512 void round_avx512(float *x, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(x + i, _mm512_castsi512_ps(bf16_bits(_mm512_loadu_ps(x + i))));
    round_c(x + i, n - i);
}

void gemm_bf16_round(float *x, size_t n, int avx512) {
    if (avx512) round_avx512(x, n);
    else round_c(x, n);
}

unsigned short gemm_bf16_of(float x) { return (uint16_t)(bf16_bits_c(x) >> 16); }

// d[t] = bf16(s[t]), t < n.
BF16CVT void gemm_amx_cvt(unsigned short *d, const float *s, int n) {
    int t = 0;
    for (; t + 16 <= n; t += 16)
        _mm256_storeu_si256((__m256i *)(d + t), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + t)));
    if (t < n) {
        __mmask16 m = (__mmask16)((1u << (n - t)) - 1);
        __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s + t));
        _mm256_mask_storeu_epi16(d + t, m, v);
    }
}

BF16CVT void gemm_amx_pack_b_rows(unsigned short *d, const float *b, ptrdiff_t rs, int kc,
                                  int kcp, int n) {
    // (k, k+1) word pairs: cvtne2ps gives row k in words 0-15 and row k+1 in 16-31
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                           16, 0);
    __mmask16 m = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
    for (int k = 0; k < kcp; k += 2) {
        __m512 x = k < kc ? _mm512_maskz_loadu_ps(m, b + (ptrdiff_t)k * rs) : _mm512_setzero_ps();
        __m512 y = k + 1 < kc ? _mm512_maskz_loadu_ps(m, b + (ptrdiff_t)(k + 1) * rs)
                              : _mm512_setzero_ps();
        __m512i v = _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(y, x));
        _mm512_mask_storeu_epi32(d + (size_t)(k / 32) * 1024 + (k % 32 / 2) * 32, m, v);
    }
}

// ---- tiles ----
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

// A static constant: gcc 12 treats the tile config written just before _tile_loadconfig as
// dead stores and drops them.
static const tile_config all_16x64 = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

AMX void gemm_amx_begin(void) { _tile_loadconfig(&all_16x64); }

AMX void gemm_amx_end(void) { _tile_release(); }

// a: 32-row panel, kcp/32 steps of [2 halves][16 rows][32 k] bf16; b: the B tiles above.
// C's 16 x 16 quarters (rows 16h.., columns 16v..) at q[2h + v], rows ldc apart in each.
AMX void gemm_kernel_amx_quads(int kcp, const float *af, const float *bf, float *const *q,
                               ptrdiff_t ldc, int mr, int nr, const gemm_epilogue *e) {
    const uint16_t *a = (const uint16_t *)(const void *)af, *b = (const uint16_t *)(const void *)bf;
    // A full tile with nothing but C (+)= A*B to do accumulates in C itself, through the tiles.
    const int direct = mr == 32 && nr == 32 && !e->bias_row && !e->bias_col && !e->relu;
    const size_t ld = (size_t)ldc * sizeof(float);
    if (direct && e->load_c) {
        _tile_loadd(0, q[0], ld);   // (tile numbers must be constants)
        _tile_loadd(1, q[1], ld);
        _tile_loadd(2, q[2], ld);
        _tile_loadd(3, q[3], ld);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int s = 0; s < kcp; s += 32, a += 1024, b += 1024) {
        _tile_loadd(4, a, 64);
        _tile_loadd(5, a + 512, 64);
        _tile_loadd(6, b, 64);
        _tile_loadd(7, b + 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    if (direct) {
        _tile_stored(0, q[0], ld);
        _tile_stored(1, q[1], ld);
        _tile_stored(2, q[2], ld);
        _tile_stored(3, q[3], ld);
        return;
    }
    float acc[32 * 32] __attribute__((aligned(64)));
    _tile_stored(0, acc, 128);
    _tile_stored(1, acc + 16, 128);
    _tile_stored(2, acc + 512, 128);
    _tile_stored(3, acc + 528, 128);
    // the same epilogue as the float32 kernels: C (+ old C) + bias, then ReLU keeping NaN
    const __m512 zero = _mm512_setzero_ps();
    __mmask16 mask[2];
    __m512 bcol[2];
    for (int v = 0; v < 2; v++) {
        int n = nr - 16 * v;
        mask[v] = n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
        bcol[v] = e->bias_col ? _mm512_maskz_loadu_ps(mask[v], e->bias_col + 16 * v) : zero;
    }
    for (int i = 0; i < mr; i++) {
        __m512 brow = _mm512_set1_ps(e->bias_row ? e->bias_row[i] : 0.0f);
        for (int v = 0; v < 2 && mask[v]; v++) {
            float *ci = q[i / 16 * 2 + v] + (ptrdiff_t)(i % 16) * ldc;
            __m512 x = _mm512_load_ps(acc + i * 32 + 16 * v);
            if (e->load_c) x = _mm512_add_ps(_mm512_maskz_loadu_ps(mask[v], ci), x);
            if (e->bias_row) x = _mm512_add_ps(x, brow);
            if (e->bias_col) x = _mm512_add_ps(x, bcol[v]);
            if (e->relu) x = _mm512_max_ps(zero, x);
            _mm512_mask_storeu_ps(ci, mask[v], x);
        }
    }
}

AMX void gemm_kernel_amx(int kcp, const float *af, const float *bf, float *c, ptrdiff_t ldc,
                         int mr, int nr, const gemm_epilogue *e) {
    float *q[4] = {c, c + 16, c + 16 * ldc, c + 16 * ldc + 16};
    gemm_kernel_amx_quads(kcp, af, bf, q, ldc, mr, nr, e);
}

// ---- the AMX unit's rate, for benchmarks ----
// TDPBF16PS back to back into the 4 accumulator tiles (independent chains, as the kernel's),
// on non-zero operands like real data's. Returns a value to sink.
AMX static float amx_peak_loop(long iters) {
    static const uint16_t ops[512] __attribute__((aligned(64))) = {[0 ... 511] = 0x3c00};  // 2^-7
    _tile_loadd(4, ops, 64);
    _tile_loadd(5, ops, 64);
    _tile_loadd(6, ops, 64);
    _tile_loadd(7, ops, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (long i = 0; i < iters; i++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    float out[256] __attribute__((aligned(64)));
    _tile_stored(0, out, 64);
    return out[0];
}

// As cpu_fma_peak_gflops(), single core. On a shared VM this rate moves with the host's load
// (seen: 5.9 to 17.5 ns per TDPBF16PS within minutes), likely a hyperthread neighbour on the
// core's one AMX unit: the bench prints it beside the step's time.
double gemm_amx_peak_gflops(void) {
    gemm_amx_begin();
    double g = cpu_loop_peak_gflops(amx_peak_loop, 4.0 * GEMM_AMX_TDP_FLOPS);
    gemm_amx_end();
    return g;
}
