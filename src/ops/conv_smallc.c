// Weight gradient of convolutions with few input channels: see conv_smallc.h.
#include "ops/conv_smallc.h"
#include "ops/cpu.h"
#include <immintrin.h>
#include <string.h>

#define TARGET __attribute__((target("avx512f,fma")))
#define AI static inline __attribute__((always_inline))

enum {
    OB = 4,      // output channels per register tile
    TB = 5,      // taps per register tile
    CHUNK = 8,   // images per partial sum (fixed: the thread count must not change the sums)
    MAX_C = 4,   // more input channels: the GEMM's columns are wide enough
};

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

typedef struct {
    float *ws;
    const float *in, *dout;
    int N, C, H, W, K, k, s, p, OH, OW;
    int Hp, Wd;           // padded rows; row length of the laid-out image (D)
    int T, nchunks;       // taps C*k*k; chunks of CHUNK images
    size_t ohwp;          // OH*OW rounded up to whole vectors: the row length of R
    size_t rp;            // R's row pitch: ohwp + 16, off 4 KiB multiples, so that the rows a
                          // tile reads together do not all fall in one L1 set
    size_t d_floats, r_floats, lane_floats, partial_floats;
    size_t thread_floats; // one thread's D, R and lanes, after the partial sums
} sc_job;

static int osize(int H, int k, int s, int p) {
    return H + 2 * p < k ? 0 : (H + 2 * p - k) / s + 1;
}

// R (one image's im2col rows, T x ohwp) stays within L2 (1 MiB): the 64x64 grayscale conv1 needs
// 49 x 1024 floats; a 224x224 RGB one (147 x 12544) keeps the GEMM.
static int shape_fits(int C, int H, int W, int k, int s, int p) {
    const size_t ohw = (size_t)osize(H, k, s, p) * osize(W, k, s, p);
    return C >= 1 && C <= MAX_C && k >= 3 && ohw > 0 &&
           (size_t)C * k * k * round16(ohw) <= (size_t)1 << 18;
}

int conv2d_smallc_use(int C, int H, int W, int k, int stride, int pad) {
    return shape_fits(C, H, W, k, stride, pad) && cpu_isa() == CPU_ISA_AVX512 && !cpu_bf16();
}

static sc_job job_make(int N, int C, int H, int W, int K, int k, int stride, int pad) {
    sc_job j = {.N = N, .C = C, .H = H, .W = W, .K = K, .k = k, .s = stride, .p = pad};
    j.Hp = H + 2 * pad;
    const int Wp = W + 2 * pad;
    j.OH = osize(H, k, stride, pad);
    j.OW = osize(W, k, stride, pad);
    // 16 zero floats past the longest residue row: a vector load never leaves the row
    j.Wd = (int)round16((size_t)(Wp + stride - 1) / stride + 16);
    j.T = C * k * k;
    j.nchunks = (N + CHUNK - 1) / CHUNK;
    j.ohwp = round16((size_t)j.OH * j.OW);
    j.rp = j.ohwp + 16;
    j.d_floats = round16((size_t)C * stride * j.Hp * j.Wd);
    j.r_floats = (size_t)j.T * j.rp;
    j.lane_floats = (size_t)K * j.T * 16;
    j.partial_floats = round16((size_t)j.nchunks * K * j.T);
    j.thread_floats = j.d_floats + j.r_floats + j.lane_floats;
    return j;
}

size_t conv2d_smallc_workspace_size(int N, int C, int H, int W, int K, int k, int stride,
                                    int pad) {
    if (!shape_fits(C, H, W, k, stride, pad) || N <= 0 || K <= 0) return 0;
    sc_job j = job_make(N, C, H, W, K, k, stride, pad);
    return j.partial_floats + (size_t)cpu_threads() * j.thread_floats;
}

// Image [C,H,W] -> D: channel c, residue r of the padded column, padded row y, then column
// index x / s: D[((c*s + r)*Hp + y)*Wd + x/s] = padded(c, y, x). Tap (c, dy, dx) at output
// row oy, column ox is then D[((c*s + dx%s)*Hp + oy*s + dy)*Wd + ox + dx/s]: along ox, a run.
static void layout(float *D, const float *img, const sc_job *j) {
    memset(D, 0, j->d_floats * sizeof(float));
    for (int c = 0; c < j->C; c++)
        for (int r = 0; r < j->s; r++) {
            const int x0 = (r - j->p % j->s + j->s) % j->s;   // first x with (x + p) % s == r
            for (int y = 0; y < j->H; y++) {
                const float *row = img + ((size_t)c * j->H + y) * j->W;
                float *d = D + ((size_t)(c * j->s + r) * j->Hp + y + j->p) * j->Wd;
                for (int x = x0, X = (x0 + j->p) / j->s; x < j->W; x += j->s, X++) d[X] = row[x];
            }
        }
}

// D -> R, the image's im2col rows: R[t*rp + oy*OW + ox] = tap t at (oy, ox); zeros past
// OH*OW. Whole runs of OW values, masked at their ends.
static TARGET void im2col_rows(float *R, const float *D, const sc_job *j) {
    const int kk = j->k * j->k;
    const size_t ohw = (size_t)j->OH * j->OW;
    for (int t = 0; t < j->T; t++) {
        const int c = t / kk, dy = t / j->k % j->k, dx = t % j->k;
        const float *src = D + ((size_t)(c * j->s + dx % j->s) * j->Hp + dy) * j->Wd + dx / j->s;
        float *dst = R + t * j->rp;
        for (int oy = 0; oy < j->OH; oy++, src += (size_t)j->s * j->Wd, dst += j->OW)
            for (int x0 = 0; x0 < j->OW; x0 += 16) {
                const __mmask16 m =
                    j->OW - x0 >= 16 ? 0xFFFF : (__mmask16)((1u << (j->OW - x0)) - 1);
                _mm512_mask_storeu_ps(dst + x0, m, _mm512_maskz_loadu_ps(m, src + x0));
            }
        for (size_t q = ohw; q < j->ohwp; q++) R[t * j->rp + q] = 0.0f;
    }
}

// lanes[(i*T + t)*16 + l] += lane l of the dot products of output channel i's gradient
// (dn + i*ohw) with tap t's im2col row (r + t*rp, ohwp long), i < NO, t < NT, over one image.
AI TARGET void tile(const int NO, const int NT, float *lanes, int T, const float *r, size_t rp,
                    size_t ohwp, const float *dn, size_t ohw) {
    __m512 acc[OB][TB];   // (fully unrolled below, so that it lives in registers)
#pragma GCC unroll 4
    for (int i = 0; i < NO; i++)
#pragma GCC unroll 6
        for (int t = 0; t < NT; t++) acc[i][t] = _mm512_loadu_ps(lanes + ((size_t)i * T + t) * 16);
    for (size_t q = 0; q < ohwp; q += 16) {
        // the gradient's last vector masked (R is zero there; the gradient may not be finite)
        __m512 d[OB];
        if (ohw - q >= 16) {
#pragma GCC unroll 4
            for (int i = 0; i < NO; i++) d[i] = _mm512_loadu_ps(dn + i * ohw + q);
        } else {
            const __mmask16 m = (__mmask16)((1u << (ohw - q)) - 1);
#pragma GCC unroll 4
            for (int i = 0; i < NO; i++) d[i] = _mm512_maskz_loadu_ps(m, dn + i * ohw + q);
        }
#pragma GCC unroll 6
        for (int t = 0; t < NT; t++) {
            const __m512 v = _mm512_loadu_ps(r + t * rp + q);
#pragma GCC unroll 4
            for (int i = 0; i < NO; i++) acc[i][t] = _mm512_fmadd_ps(d[i], v, acc[i][t]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NO; i++)
#pragma GCC unroll 6
        for (int t = 0; t < NT; t++) _mm512_storeu_ps(lanes + ((size_t)i * T + t) * 16, acc[i][t]);
}

typedef void tile_fn(float *, int, const float *, size_t, size_t, const float *, size_t);
#define TILE(NO, NT)                                                                          \
    static TARGET void tile_##NO##_##NT(float *l, int T, const float *r, size_t rp,           \
                                        size_t ohwp, const float *dn, size_t ohw) {           \
        tile(NO, NT, l, T, r, rp, ohwp, dn, ohw);                                              \
    }
#define TILES(NO) TILE(NO, 1) TILE(NO, 2) TILE(NO, 3) TILE(NO, 4) TILE(NO, 5)
TILES(1)
TILES(2)
TILES(3)
TILES(4)
#define ROW(NO) {tile_##NO##_1, tile_##NO##_2, tile_##NO##_3, tile_##NO##_4, tile_##NO##_5}
static tile_fn *const tiles[OB][TB] = {ROW(1), ROW(2), ROW(3), ROW(4)};

static TARGET void lanes_sum(float *part, const float *lanes, size_t n) {
    for (size_t q = 0; q < n; q++) part[q] = _mm512_reduce_add_ps(_mm512_loadu_ps(lanes + q * 16));
}

static void chunks_task(void *vctx, int t, int nt) {
    const sc_job *j = vctx;
    float *D = j->ws + j->partial_floats + (size_t)t * j->thread_floats;
    float *R = D + j->d_floats, *lanes = R + j->r_floats;
    const size_t ohw = (size_t)j->OH * j->OW;
    size_t c0, c1;
    cpu_part_range((size_t)j->nchunks, t, nt, &c0, &c1);
    for (size_t ch = c0; ch < c1; ch++) {
        memset(lanes, 0, j->lane_floats * sizeof(float));
        const int n1 = (int)(ch + 1) * CHUNK < j->N ? (int)(ch + 1) * CHUNK : j->N;
        for (int n = (int)ch * CHUNK; n < n1; n++) {
            layout(D, j->in + (size_t)n * j->C * j->H * j->W, j);
            im2col_rows(R, D, j);
            const float *dn = j->dout + (size_t)n * j->K * ohw;
            // a block of taps' rows stays in L1 while the gradient streams past from L2
            for (int t0 = 0; t0 < j->T; t0 += TB) {
                const int ntap = j->T - t0 < TB ? j->T - t0 : TB;
                for (int o0 = 0; o0 < j->K; o0 += OB) {
                    const int no = j->K - o0 < OB ? j->K - o0 : OB;
                    tiles[no - 1][ntap - 1](lanes + ((size_t)o0 * j->T + t0) * 16, j->T,
                                            R + t0 * j->rp, j->rp, j->ohwp,
                                            dn + (size_t)o0 * ohw, ohw);
                }
            }
        }
        lanes_sum(j->ws + ch * (size_t)j->K * j->T, lanes, (size_t)j->K * j->T);
    }
}

void conv2d_smallc_weight_grad(float *dw, const float *in, const float *dout, int N, int C,
                               int H, int W, int K, int k, int stride, int pad, float *ws) {
    if (!shape_fits(C, H, W, k, stride, pad) || N <= 0 || K <= 0) return;
    sc_job j = job_make(N, C, H, W, K, k, stride, pad);
    j.ws = ws, j.in = in, j.dout = dout;
    const int nt = cpu_threads() < j.nchunks ? cpu_threads() : j.nchunks;
    cpu_parallel(chunks_task, &j, nt);
    const size_t n = (size_t)K * j.T;
    for (size_t q = 0; q < n; q++) {
        float s = ws[q];
        for (int ch = 1; ch < j.nchunks; ch++) s += ws[(size_t)ch * n + q];
        dw[q] += s;
    }
}
