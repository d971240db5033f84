// GEMM driver: blocking, packing, thread split and the plain-C micro-kernel. See gemm.h.
//
// Loop nest per thread (C block rows m0..m1, columns n0..n1):
//   for ic in rows, MC at a time (MC is large: usually all the rows at once):
//     for each K block (KC deep):    pack A[ic block, K block] -> ap   (each element once)
//       for jc in columns, NC at a time: pack B[K block, jc block] -> bp  (stays in L2)
//         for each MR-row panel of ap:     (stays in L1)
//           for each NR-column sliver of bp: micro-kernel -> C tile
// The K blocks are the same for every thread count, and each C tile is summed over them in
// order, which makes results independent of the thread split.
#include "ops/gemm.h"
#include "ops/cpu.h"
#include "util/err.h"
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MR_MAX 32  // the AMX kernel's; 8 for the float32 ones
#define NR_MAX 48
#define PACK_HEADER 16  // floats before the panels of a pre-packed A (64 bytes)

typedef struct pixel_run pixel_run;
typedef void im2col_rows_fn(float *dst, const gemm_operand *b, int k0, int kc, int NR,
                            const pixel_run *runs, int nruns);
typedef void im2col_line_fn(float *line, const gemm_operand *b, int q, const pixel_run *runs,
                            int nruns);
static im2col_rows_fn im2col_rows_c, im2col_rows_avx512;
static im2col_line_fn im2col_line_c, im2col_line_avx512;
typedef struct dense_piece dense_piece;
typedef void dense_rows_fn(float *dst, int kc, int NR, const float *src, ptrdiff_t rs,
                           const dense_piece *pieces, int npieces);
static dense_rows_fn dense_rows_c, dense_rows_avx512;
static void copy_c(float *d, const float *s, int n);
static void copy_avx512(float *d, const float *s, int n);

typedef struct {
    int MR, NR;      // micro-tile
    int KC, MC, NC;  // cache blocks (MC a multiple of MR, NC of NR)
    gemm_kernel_fn *kernel;
    // packs a full 8-row A panel (MR 8 only): d[t*8 + i] = s[i*rs + t]
    void (*pack_a8)(float *d, const float *s, ptrdiff_t rs, int n);
    void (*copy)(float *d, const float *s, int n);  // d[t] = s[t]
    // d[r*ld + c] = s[c*ls + r] for r < rows, c < 16
    void (*transpose16)(float *d, ptrdiff_t ld, const float *s, ptrdiff_t ls, int rows);
    im2col_rows_fn *im2col_rows;
    im2col_line_fn *im2col_line;
    dense_rows_fn *dense_rows;
    int amx;         // bfloat16 on AMX tiles: operands packed into tiles (gemm_block_amx)
} gemm_config;

static void transpose16_c(float *d, ptrdiff_t ld, const float *s, ptrdiff_t ls, int rows) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 16; c++) d[r * ld + c] = s[c * ls + r];
}

// Block sizes measured on a Zen 5 core (48 KiB L1d, 1 MiB L2); see bench/kernels.c.
static const gemm_config configs[3] = {
    [CPU_ISA_SCALAR] = {GEMM_SCALAR_MR, GEMM_SCALAR_NR, 256, 512, 512, gemm_kernel_scalar, NULL,
                        copy_c, transpose16_c, im2col_rows_c, im2col_line_c, dense_rows_c, 0},
    [CPU_ISA_AVX2] = {GEMM_AVX2_MR, GEMM_AVX2_NR, 256, 516, 1024, gemm_kernel_avx2, NULL,
                      copy_c, transpose16_c, im2col_rows_c, im2col_line_c, dense_rows_c, 0},
    [CPU_ISA_AVX512] = {GEMM_AVX512_MR, GEMM_AVX512_NR, 384, 512, 480, gemm_kernel_avx512,
                        gemm_pack_a8_avx512, copy_avx512, gemm_transpose16_avx512,
                        im2col_rows_avx512, im2col_line_avx512, dense_rows_avx512, 0},
};

// bfloat16 mode with AMX (cpu_amx()). A and dense B go straight into tiles; im2col B is packed
// in float32 as for AVX-512, then converted. KC 512 measured best (256: more epilogues, 1024:
// panels past L1) on the 64x64 GoogLeNet training step.
enum { AMX_KC = 512, AMX_NC = 512 };
static const gemm_config amx_config = {32, 32, AMX_KC, 512, AMX_NC, gemm_kernel_amx, NULL, copy_avx512,
                                       gemm_transpose16_avx512, im2col_rows_avx512,
                                       im2col_line_avx512, dense_rows_avx512, 1};

// ---------------------------------------------------------------------------------------------
// Plain-C micro-kernel (4 x 16). ISO C mode keeps a*b+c as two roundings (no contraction).

enum { SMR = GEMM_SCALAR_MR, SNR = GEMM_SCALAR_NR };

void gemm_kernel_scalar(int kc, const float *a, const float *b, float *c, ptrdiff_t ldc,
                        int mr, int nr, const gemm_epilogue *e) {
    float acc[SMR][SNR];
    memset(acc, 0, sizeof acc);
    for (int k = 0; k < kc; k++) {
        const float *bk = b + (ptrdiff_t)k * SNR;
        for (int i = 0; i < SMR; i++) {
            float ai = a[k * SMR + i];
            for (int j = 0; j < SNR; j++) acc[i][j] += ai * bk[j];
        }
    }
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        for (int j = 0; j < nr; j++) {
            float x = acc[i][j];
            if (e->load_c) x = ci[j] + x;
            if (e->bias_row) x += e->bias_row[i];
            if (e->bias_col) x += e->bias_col[j];
            if (e->relu && x < 0.0f) x = 0.0f;  // NaN < 0 is false: NaN stays
            ci[j] = x;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packing

static int ceil_div(int a, int b) { return (a + b - 1) / b; }
static size_t round_up(size_t a, size_t b) { return (a + b - 1) / b * b; }

// A dense operand's element (r, c) address for a column segment that does not cross a fold.
static const float *dense_at(const gemm_operand *o, int r, int c) {
    ptrdiff_t off = (ptrdiff_t)r * o->rs;
    if (o->fold) off += (ptrdiff_t)(c / o->fold) * o->fold_stride + (ptrdiff_t)(c % o->fold) * o->cs;
    else off += (ptrdiff_t)c * o->cs;
    return o->p + off;
}

// Length of the run of columns from c on (at most n) that stays within one fold.
static int dense_run(const gemm_operand *o, int c, int n) {
    if (!o->fold) return n;
    int left = o->fold - c % o->fold;
    return left < n ? left : n;
}

// A rows i0..i0+mc-1, columns k0..k0+kc-1 -> panels of MR rows: dst[p][k][i]; rows >= M are 0.
static void pack_a(float *dst, const gemm_operand *a, int M, int i0, int mc, int k0, int kc,
                   const gemm_config *cfg) {
    int MR = cfg->MR;
    for (int p = 0; p < ceil_div(mc, MR); p++) {
        float *d = dst + (size_t)p * MR * kc;
        int r0 = i0 + p * MR;
        if (a->cs == 1 && r0 + MR <= M && r0 + MR <= i0 + mc) {  // the common full panel
            for (int k = 0; k < kc;) {
                int n = dense_run(a, k0 + k, kc - k);
                const float *s = dense_at(a, r0, k0 + k);
                if (cfg->pack_a8) cfg->pack_a8(d + k * 8, s, a->rs, n);
                else
                    for (int i = 0; i < MR; i++)
                        for (int t = 0; t < n; t++) d[(k + t) * MR + i] = s[i * a->rs + t];
                k += n;
            }
            continue;
        }
        for (int i = 0; i < MR; i++) {
            int r = i0 + p * MR + i;
            if (r >= M || r >= i0 + mc) {
                for (int k = 0; k < kc; k++) d[k * MR + i] = 0.0f;
                continue;
            }
            for (int k = 0; k < kc;) {
                int n = dense_run(a, k0 + k, kc - k);
                const float *s = dense_at(a, r, k0 + k);
                ptrdiff_t cs = a->cs;
                for (int t = 0; t < n; t++) d[(k + t) * MR + i] = s[t * cs];
                k += n;
            }
        }
    }
}


// Zeroes the columns nc..(slivers*NR) of the last sliver: the kernel computes them too.
static void pack_b_pad(float *dst, int kc, int nc, int NR) {
    int tail = nc % NR;
    if (!tail) return;
    float *d = dst + (size_t)(nc / NR) * NR * kc;
    for (int k = 0; k < kc; k++)
        for (int j = tail; j < NR; j++) d[k * NR + j] = 0.0f;
}

// Address of element (k, j) of the packed B block.
static inline float *bp_at(float *dst, int kc, int NR, int k, int j) {
    return dst + ((size_t)(j / NR) * kc + k) * NR + j % NR;
}

// ---- im2col packing ----
// The pixels (columns of GEMM_IM2COL, rows of GEMM_IM2COL_T) are walked as runs along one
// output row, listed once per packing call and reused for every (channel, dy, dx).
struct pixel_run {
    int at;       // offset of the run's first pixel from the start of the packed range
    int img, oy, ox, len;
};

// Lists the runs of pixels j0..j0+n-1, also split where (phase + offset) crosses a multiple
// of `split` (sliver edges; 0 = no split). Stops early when `max` runs are listed; returns the
// count, *done = pixels covered.
static int pixel_runs(pixel_run *runs, int max, const gemm_operand *o, int j0, int n, int split,
                      int phase, int *done) {
    int ohw = o->OH * o->OW;
    int img = j0 / ohw, oy = j0 % ohw / o->OW, ox = j0 % o->OW;
    int count = 0, j = 0;
    // 1x1, stride 1, no padding: a whole image plane is one contiguous run
    int pointwise = o->k == 1 && o->stride == 1 && o->pad == 0;
    while (j < n && count < max) {
        int len = pointwise ? ohw - (oy * o->OW + ox) : o->OW - ox;
        if (len > n - j) len = n - j;
        if (split && len > split - (phase + j) % split) len = split - (phase + j) % split;
        runs[count++] = (pixel_run){j, img, oy, ox, len};
        j += len;
        if (pointwise) {
            int at = oy * o->OW + ox + len;
            if (at == ohw) at = 0, img++;
            oy = at / o->OW, ox = at % o->OW;
            continue;
        }
        ox += len;
        if (ox == o->OW) {
            ox = 0;
            if (++oy == o->OH) oy = 0, img++;
        }
    }
    *done = j;
    return count;
}

// ---- copies (the innermost loops of packing), plain and AVX-512 ----
#define AVX512 __attribute__((target("avx512f")))
#define INLINE static inline __attribute__((always_inline))

static void copy_c(float *d, const float *s, int n) { memcpy(d, s, (size_t)n * sizeof(float)); }

INLINE void copy2_c(float *d, const float *s, int n) {
    for (int t = 0; t < n; t++) d[t] = s[2 * t];
}

INLINE AVX512 void copy_avx512_inline(float *d, const float *s, int n) {
    int t = 0;
    for (; t + 16 <= n; t += 16) _mm512_storeu_ps(d + t, _mm512_loadu_ps(s + t));
    if (t < n) {
        __mmask16 m = (__mmask16)((1u << (n - t)) - 1);
        _mm512_mask_storeu_ps(d + t, m, _mm512_maskz_loadu_ps(m, s + t));
    }
}

static AVX512 void copy_avx512(float *d, const float *s, int n) { copy_avx512_inline(d, s, n); }

// d[t] = s[2t]: two loads, then the even elements of both picked by one permute. Masked loads
// never touch memory past the last element used.
INLINE AVX512 void copy2_avx512(float *d, const float *s, int n) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        __m512 lo = _mm512_loadu_ps(s + 2 * t);
        __m512 hi = _mm512_maskz_loadu_ps(0x7fff, s + 2 * t + 16);  // up to s[2t + 30]
        _mm512_storeu_ps(d + t, _mm512_permutex2var_ps(lo, even, hi));
    }
    if (t < n) {
        int need = 2 * (n - t) - 1;  // s[2t .. 2t + need - 1]
        __mmask16 m1 = need >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << need) - 1);
        __mmask16 m2 = need > 16 ? (__mmask16)((1u << (need - 16)) - 1) : 0;
        __m512 lo = _mm512_maskz_loadu_ps(m1, s + 2 * t);
        __m512 hi = _mm512_maskz_loadu_ps(m2, s + 2 * t + 16);
        _mm512_mask_storeu_ps(d + t, (__mmask16)((1u << (n - t)) - 1),
                              _mm512_permutex2var_ps(lo, even, hi));
    }
}

typedef void copy_fn(float *d, const float *s, int n);

// One run of an im2col row: out[t] = image row at x = x0 + t*stride, 0 outside [0, W) or
// where row is NULL (padding rows). copy/copy2 are constants after inlining.
INLINE void im2col_run(float *out, const float *row, int W, int x0, int stride, int n,
                       copy_fn *copy, copy_fn *copy2) {
    if (!row) {
        memset(out, 0, (size_t)n * sizeof(float));
        return;
    }
    int lo = 0, hi = n;  // valid t: 0 <= x0 + t*stride < W
    if (x0 < 0 || x0 + (n - 1) * stride >= W) {  // only at the image's left and right edges
        lo = x0 >= 0 ? 0 : ceil_div(-x0, stride);
        hi = x0 >= W ? 0 : ceil_div(W - x0, stride);
        if (lo > n) lo = n;
        if (hi > n) hi = n;
        if (hi < lo) hi = lo;
        for (int t = 0; t < lo; t++) out[t] = 0.0f;
        for (int t = hi; t < n; t++) out[t] = 0.0f;
    }
    const float *src = row + x0 + lo * stride;
    if (stride == 1) copy(out + lo, src, hi - lo);
    else if (stride == 2) copy2(out + lo, src, hi - lo);
    else
        for (int t = 0; t < hi - lo; t++) out[lo + t] = src[t * stride];
}

// The width that im2col_run may read from im2col_row(): a pointwise run continues over the
// following rows of the plane.
static int im2col_width(const gemm_operand *o, const pixel_run *u) {
    if (o->k == 1 && o->stride == 1 && o->pad == 0) return (o->H - u->oy) * o->W;
    return o->W;
}

// The input row that output row oy reads at kernel row dy, or NULL if it is padding.
static const float *im2col_row(const gemm_operand *o, int img, int ch, int oy, int dy) {
    int y = oy * o->stride - o->pad + dy;
    if (y < 0 || y >= o->H) return NULL;
    return o->p + (((size_t)img * o->C + ch) * o->H + y) * o->W;
}

// Rows r < kc (q = k0 + r) of a packed im2col block over the listed pixel runs, which do not
// straddle slivers. Run by run, walking (channel, dy, dx) down the rows without divisions.
INLINE void im2col_rows_body(float *dst, const gemm_operand *b, int k0, int kc, int NR,
                             const pixel_run *runs, int nruns, copy_fn *copy, copy_fn *copy2) {
    int k = b->k, kk = k * k;
    size_t plane = (size_t)b->H * b->W;
    for (int q = 0; q < nruns; q++) {
        const pixel_run *u = &runs[q];
        float *d = bp_at(dst, kc, NR, 0, u->at);
        int W = im2col_width(b, u), y0 = u->oy * b->stride - b->pad;
        int x0 = u->ox * b->stride - b->pad;
        int ch = k0 / kk, dy = k0 % kk / k, dx = k0 % k;
        const float *img = b->p + ((size_t)u->img * b->C + ch) * plane;
        for (int r = 0; r < kc; r++, d += NR) {
            int y = y0 + dy;
            const float *row = y >= 0 && y < b->H ? img + (size_t)y * b->W : NULL;
            im2col_run(d, row, W, x0 + dx, b->stride, u->len, copy, copy2);
            if (++dx == k) {
                dx = 0;
                if (++dy == k) dy = 0, img += plane;
            }
        }
    }
}

// Column q of im2col over the listed pixel runs, into a contiguous line.
INLINE void im2col_line_body(float *line, const gemm_operand *b, int qq, const pixel_run *runs,
                             int nruns, copy_fn *copy, copy_fn *copy2) {
    int kk = b->k * b->k, ch = qq / kk, dy = qq % kk / b->k, dx = qq % b->k;
    for (int q = 0; q < nruns; q++) {
        const pixel_run *u = &runs[q];
        im2col_run(line + u->at, im2col_row(b, u->img, ch, u->oy, dy), im2col_width(b, u),
                   u->ox * b->stride - b->pad + dx, b->stride, u->len, copy, copy2);
    }
}

static void im2col_rows_c(float *dst, const gemm_operand *b, int k0, int kc, int NR,
                          const pixel_run *runs, int nruns) {
    im2col_rows_body(dst, b, k0, kc, NR, runs, nruns, copy_c, copy2_c);
}

static AVX512 void im2col_rows_avx512(float *dst, const gemm_operand *b, int k0, int kc, int NR,
                                      const pixel_run *runs, int nruns) {
    im2col_rows_body(dst, b, k0, kc, NR, runs, nruns, copy_avx512_inline, copy2_avx512);
}

static void im2col_line_c(float *line, const gemm_operand *b, int q, const pixel_run *runs,
                          int nruns) {
    im2col_line_body(line, b, q, runs, nruns, copy_c, copy2_c);
}

static AVX512 void im2col_line_avx512(float *line, const gemm_operand *b, int q,
                                      const pixel_run *runs, int nruns) {
    im2col_line_body(line, b, q, runs, nruns, copy_avx512_inline, copy2_avx512);
}

// ---- dense packing ----
// A block of a dense B with contiguous rows is copied row by row in pieces that stay within
// one fold (image) and one sliver, listed once per packing call.
struct dense_piece {
    int at, len;     // packed columns at..at+len-1
    ptrdiff_t src;   // offset of the piece's first element in row 0
};

INLINE void dense_rows_body(float *dst, int kc, int NR, const float *src, ptrdiff_t rs,
                            const dense_piece *pieces, int npieces, copy_fn *copy) {
    // rows far apart in memory: prefetch 4 rows ahead (the pieces' span), for big matrices
    const float *pf_from = src + pieces[0].src;
    ptrdiff_t pf_len = pieces[npieces - 1].src + pieces[npieces - 1].len - pieces[0].src;
    int prefetch = rs > 4096 && pf_len <= 4096;
    for (int k = 0; k < kc; k++, src += rs, pf_from += rs) {
        if (prefetch && k + 4 < kc)
            for (ptrdiff_t t = 0; t < pf_len; t += 16) __builtin_prefetch(pf_from + 4 * rs + t);
        for (int q = 0; q < npieces; q++)
            copy(bp_at(dst, kc, NR, k, pieces[q].at), src + pieces[q].src, pieces[q].len);
    }
}

static void dense_rows_c(float *dst, int kc, int NR, const float *src, ptrdiff_t rs,
                         const dense_piece *pieces, int npieces) {
    dense_rows_body(dst, kc, NR, src, rs, pieces, npieces, copy_c);
}

static AVX512 void dense_rows_avx512(float *dst, int kc, int NR, const float *src, ptrdiff_t rs,
                                     const dense_piece *pieces, int npieces) {
    dense_rows_body(dst, kc, NR, src, rs, pieces, npieces, copy_avx512_inline);
}

enum { RUNS_MAX = 512 };

static void pack_b_dense(float *dst, const gemm_operand *b, int k0, int kc, int j0, int nc,
                         const gemm_config *cfg) {
    int NR = cfg->NR;
    if (b->cs == 1) {  // rows contiguous: copy pieces along each row
        dense_piece pieces[RUNS_MAX];
        for (int j = 0; j < nc;) {
            int np = 0;
            for (; j < nc && np < RUNS_MAX; np++) {
                int n = dense_run(b, j0 + j, nc - j);
                if (n > NR - j % NR) n = NR - j % NR;
                pieces[np] = (dense_piece){j, n, dense_at(b, 0, j0 + j) - b->p};
                j += n;
            }
            cfg->dense_rows(dst, kc, NR, b->p + (ptrdiff_t)k0 * b->rs, b->rs, pieces, np);
        }
    } else {  // e.g. a transposed B: walk down each column instead
        for (int j = 0; j < nc; j++) {
            const float *s = dense_at(b, k0, j0 + j);
            float *d = bp_at(dst, kc, NR, 0, j);
            for (int k = 0; k < kc; k++) d[k * NR] = s[k * b->rs];
        }
    }
    pack_b_pad(dst, kc, nc, NR);
}

static void pack_b_im2col(float *dst, const gemm_operand *b, int k0, int kc, int j0, int nc,
                          const gemm_config *cfg) {
    pixel_run runs[RUNS_MAX];
    for (int jb = 0; jb < nc;) {  // runs in batches of at most RUNS_MAX
        int covered;
        int nruns = pixel_runs(runs, RUNS_MAX, b, j0 + jb, nc - jb, cfg->NR, jb, &covered);
        for (int q = 0; q < nruns; q++) runs[q].at += jb;
        cfg->im2col_rows(dst, b, k0, kc, cfg->NR, runs, nruns);
        jb += covered;
    }
    pack_b_pad(dst, kc, nc, cfg->NR);
}

// B(k, j) = im2col(j, k): rows are pixels, columns are (ch, dy, dx). For 16 columns at a
// time, each column's pixels are first copied into a line (contiguous runs along output rows),
// then 16 x 16 blocks of the lines are transposed into the sliver.
enum { LINE_MAX = 528 };  // not a power of two: the 16 lines map to different cache sets

static void pack_b_im2col_t(float *dst, const gemm_operand *b, int k0, int kc, int j0, int nc,
                            const gemm_config *cfg) {
    int NR = cfg->NR;
    pixel_run runs[RUNS_MAX];
    float lines[16 * LINE_MAX];
    for (int rb = 0; rb < kc;) {  // pixel rows in batches of at most LINE_MAX
        int want = kc - rb < LINE_MAX ? kc - rb : LINE_MAX, len;
        int nruns = pixel_runs(runs, RUNS_MAX, b, k0 + rb, want, 0, 0, &len);
        int padded = (len + 15) / 16 * 16;
        for (int jc = 0; jc < nc; jc += 16) {
            for (int c = 0; c < 16; c++) {
                float *line = lines + c * LINE_MAX;
                if (jc + c >= nc) {  // past the last column: zeros
                    memset(line, 0, (size_t)padded * sizeof(float));
                    continue;
                }
                cfg->im2col_line(line, b, j0 + jc + c, runs, nruns);
                for (int t = len; t < padded; t++) line[t] = 0.0f;
            }
            for (int g = 0; g < len; g += 16)  // packed(rb + g + r, jc + c) = lines[c][g + r]
                cfg->transpose16(bp_at(dst, kc, NR, rb + g, jc), NR, lines + g, LINE_MAX,
                                 len - g < 16 ? len - g : 16);
        }
        rb += len;
    }
    pack_b_pad(dst, kc, nc, NR);
}

// ---- im2col of small images (AVX-512) ----
// With short output rows (GoogLeNet's 8x8 ... 1x1 maps on small inputs) the runs above are a
// few pixels long and their bookkeeping costs more than the copying. Instead, for 16
// consecutive pixels at a time, a table gives each pixel's input offset and validity for
// every tap (dy, dx); one masked gather then fills 16 entries of an im2col row per channel.
enum { SMALL_OW_MAX = 8, SMALL_TAPS_MAX = 25 };

typedef struct {
    __m512i off[SMALL_TAPS_MAX];     // offset of tap t from the channel-0 plane of image img0
    __mmask16 ok[SMALL_TAPS_MAX];    // lanes inside the image (and among the n pixels)
} tap_table;

// Whether the small-image packing applies to `o` for pixels [j, j + n) (offsets fit int32).
static int im2col_small_ok(const gemm_operand *o, int j, int n) {
    if (o->OW > SMALL_OW_MAX || o->k * o->k > SMALL_TAPS_MAX) return 0;
    if (o->k == 1 && o->stride == 1 && o->pad == 0) return 0;  // pointwise: long runs already
    int ohw = o->OH * o->OW;
    size_t imgs = (size_t)((j + n - 1) / ohw - j / ohw + 1);
    return imgs * (size_t)o->C * o->H * o->W < (size_t)INT32_MAX / 2;
}

// The table of pixels j..j+n-1 (n <= 16), offsets relative to image img0.
static AVX512 void tap_table_fill(tap_table *t, const gemm_operand *o, int j, int n, int img0) {
    int ohw = o->OH * o->OW, chw = o->C * o->H * o->W;
    int base[16], y0[16], x0[16];
    for (int l = 0; l < 16; l++) {
        int p = j + (l < n ? l : 0), r = p % ohw;
        y0[l] = r / o->OW * o->stride - o->pad;
        x0[l] = r % o->OW * o->stride - o->pad;
        base[l] = (p / ohw - img0) * chw + y0[l] * o->W + x0[l];
    }
    __m512i vb = _mm512_loadu_si512(base), vy = _mm512_loadu_si512(y0);
    __m512i vx = _mm512_loadu_si512(x0);
    __mmask16 lanes = (__mmask16)((1u << n) - 1);
    for (int dy = 0, tap = 0; dy < o->k; dy++) {
        __m512i y = _mm512_add_epi32(vy, _mm512_set1_epi32(dy));
        __mmask16 oky = _mm512_mask_cmpge_epi32_mask(lanes, y, _mm512_setzero_si512()) &
                        _mm512_cmplt_epi32_mask(y, _mm512_set1_epi32(o->H));
        for (int dx = 0; dx < o->k; dx++, tap++) {
            __m512i x = _mm512_add_epi32(vx, _mm512_set1_epi32(dx));
            t->ok[tap] = _mm512_mask_cmpge_epi32_mask(oky, x, _mm512_setzero_si512()) &
                         _mm512_cmplt_epi32_mask(x, _mm512_set1_epi32(o->W));
            t->off[tap] = _mm512_add_epi32(vb, _mm512_set1_epi32(dy * o->W + dx));
        }
    }
}

// The least and greatest offset in use over the first kk taps (hi -1: none in use).
static AVX512 void tap_span(const tap_table *t, int kk, int *lo, int *hi) {
    *lo = INT32_MAX, *hi = -1;
    for (int q = 0; q < kk; q++) {
        if (!t->ok[q]) continue;
        __m512i big = _mm512_set1_epi32(INT32_MAX), none = _mm512_set1_epi32(-1);
        int a = _mm512_reduce_min_epi32(_mm512_mask_mov_epi32(big, t->ok[q], t->off[q]));
        int z = _mm512_reduce_max_epi32(_mm512_mask_mov_epi32(none, t->ok[q], t->off[q]));
        if (a < *lo) *lo = a;
        if (z > *hi) *hi = z;
    }
}

// Load masks of the 32 floats from lo (hi - lo < 32): the first and second 16 in use.
static void span_masks(int lo, int hi, __mmask16 *m0, __mmask16 *m1) {
    int span = hi - lo + 1;
    *m0 = span >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << span) - 1);
    *m1 = span > 16 ? (__mmask16)((1u << (span - 16)) - 1) : 0;
}

// pack_b_im2col for small images: rows q = k0.. (channel, tap), 16 columns at a time.
static AVX512 void pack_b_im2col_small(float *dst, const gemm_operand *b, int k0, int kc, int j0,
                                       int nc, int NR) {
    int kk = b->k * b->k, ohw = b->OH * b->OW, img0 = j0 / ohw;
    size_t plane = (size_t)b->H * b->W;
    const float *from = b->p + (size_t)img0 * b->C * plane;
    tap_table t;
    for (int g = 0; g < nc; g += 16) {  // NR is a multiple of 16: a group stays in one sliver
        tap_table_fill(&t, b, j0 + g, nc - g < 16 ? nc - g : 16, img0);
        float *d = bp_at(dst, kc, NR, 0, g);
        int tap = k0 % kk;
        const float *src = from + (size_t)(k0 / kk) * plane;
        // The offsets in use of all taps within 32 floats (16 pixels of one image, e.g. 4x4
        // or two rows of 8x8): load them once per channel and permute instead of gathering.
        int lo, hi;
        tap_span(&t, kk, &lo, &hi);
        if (hi >= 0 && hi - lo < 32) {
            __mmask16 m0, m1;
            span_masks(lo, hi, &m0, &m1);
            __m512i idx[SMALL_TAPS_MAX];
            for (int q = 0; q < kk; q++)
                idx[q] = _mm512_sub_epi32(t.off[q], _mm512_set1_epi32(lo));
            src += lo;
            __m512 w0 = _mm512_maskz_loadu_ps(m0, src), w1 = _mm512_maskz_loadu_ps(m1, src + 16);
            for (int r = 0; r < kc; r++, d += NR) {
                _mm512_storeu_ps(d, _mm512_maskz_permutex2var_ps(t.ok[tap], w0, idx[tap], w1));
                if (++tap == kk && r + 1 < kc) {
                    tap = 0, src += plane;
                    w0 = _mm512_maskz_loadu_ps(m0, src), w1 = _mm512_maskz_loadu_ps(m1, src + 16);
                }
            }
            continue;
        }
        for (int r = 0; r < kc; r++, d += NR) {
            _mm512_storeu_ps(d, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), t.ok[tap],
                                                          t.off[tap], src, 4));
            if (++tap == kk) tap = 0, src += plane;
        }
    }
    pack_b_pad(dst, kc, nc, NR);
}

// pack_b_im2col_t for small images: 16 pixel rows at a time, 16 columns q gathered into a
// 16 x 16 tile and transposed into the sliver.
static AVX512 void pack_b_im2col_t_small(float *dst, const gemm_operand *b, int k0, int kc,
                                         int j0, int nc, int NR) {
    int kk = b->k * b->k, ohw = b->OH * b->OW, img0 = k0 / ohw;
    size_t plane = (size_t)b->H * b->W;
    const float *from = b->p + (size_t)img0 * b->C * plane;
    tap_table t;
    float tile[16 * 16];
    for (int g = 0; g < kc; g += 16) {
        int n = kc - g < 16 ? kc - g : 16;
        tap_table_fill(&t, b, k0 + g, n, img0);
        int tap = j0 % kk;
        const float *src = from + (size_t)(j0 / kk) * plane;
        for (int jc = 0; jc < nc; jc += 16) {
            for (int c = 0; c < 16; c++) {
                __m512 v = _mm512_setzero_ps();
                if (jc + c < nc) {
                    v = _mm512_mask_i32gather_ps(v, t.ok[tap], t.off[tap], src, 4);
                    if (++tap == kk) tap = 0, src += plane;
                }
                _mm512_storeu_ps(tile + c * 16, v);
            }
            gemm_transpose16_avx512(bp_at(dst, kc, NR, g, jc), NR, tile, 16, n);
        }
    }
    pack_b_pad(dst, kc, nc, NR);
}

// ---- im2col straight into AMX B tiles ----
// Where every 16 pixels (columns of a GEMM_IM2COL block, rows of a GEMM_IM2COL_T one) lie at 16
// consecutive floats of each input plane, shifted by the tap (rows16_ok), or are pixels of a
// small image (the tap tables above: permutes or gathers), the 16 values of one tap are made in
// registers and converted pairwise into the tiles, with no float32 block in between. Tiles as
// in pack_b_dense_amx().
#define BF16CVT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Where the B tiles of column j's group of 16 start (layout: gemm.h, gemm_amx_pack_b_rows).
static inline unsigned short *b_tiles_at(unsigned short *d, int j, int kcp) {
    return d + (size_t)(j / 32) * kcp * 32 + (j % 32 / 16) * 512;
}

// Lanes 0..n-1 of 16 (none for n <= 0): the rows of a 16-row half tile step that exist.
static inline __mmask16 lanes16(int n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

// Stride 1, and the 16 pixels from p (a multiple of 16) lie at 16 consecutive floats of every
// input plane, tap by tap: output rows of a multiple of 16 pixels (conv3 at 16x16), or whole
// output rows as wide as the input of planes of a multiple of 16 pixels ("same" convolutions
// on 8x8 and 4x4 maps: 3a-4e, and their input gradients).
static int rows16_ok(const gemm_operand *b, int p) {
    if (b->stride != 1 || p % 16) return 0;
    if (b->OW % 16 == 0) return 1;
    return 16 % b->OW == 0 && b->OW == b->W && b->OH * b->OW % 16 == 0;
}

// Lane l of 16 rows16_ok pixels is l / OW output rows and l % OW columns past the first
// (0 and l on rows of 16 pixels or more), and l floats past it in every input plane.
typedef struct {
    __m512i y, x;
} lane_grid;

static BF16CVT lane_grid rows16_grid(const gemm_operand *b) {
    int ly[16], lx[16];
    for (int l = 0; l < 16; l++) ly[l] = l / b->OW, lx[l] = l % b->OW;
    return (lane_grid){_mm512_loadu_si512(ly), _mm512_loadu_si512(lx)};
}

// For the 16 pixels from p: each lane's output row (*ys) and column (*xs), and the offset of
// lane 0 in its image's planes (returned; the image is p / (OH * OW)).
static inline BF16CVT ptrdiff_t rows16_at(const gemm_operand *b, lane_grid g, int p,
                                          __m512i *ys, __m512i *xs) {
    const int ohw = b->OH * b->OW, oy = p % ohw / b->OW, ox = p % ohw % b->OW;
    *ys = _mm512_add_epi32(g.y, _mm512_set1_epi32(oy));
    *xs = _mm512_add_epi32(g.x, _mm512_set1_epi32(ox));
    return (ptrdiff_t)oy * b->W + ox;
}

// The lanes of `live` whose input pixel at tap offset (dy, dx) from the output pixel is inside
// the H x W plane.
static inline BF16CVT __mmask16 rows16_inside(const gemm_operand *b, __mmask16 live, __m512i ys,
                                              __m512i xs, int dy, int dx) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i y = _mm512_add_epi32(ys, _mm512_set1_epi32(dy));
    __m512i x = _mm512_add_epi32(xs, _mm512_set1_epi32(dx));
    __mmask16 m = _mm512_mask_cmpge_epi32_mask(live, y, zero);
    m = _mm512_mask_cmplt_epi32_mask(m, y, _mm512_set1_epi32(b->H));
    m = _mm512_mask_cmpge_epi32_mask(m, x, zero);
    return _mm512_mask_cmplt_epi32_mask(m, x, _mm512_set1_epi32(b->W));
}

// Stride 2 with output rows of a multiple of 16 pixels (conv1, 7x7/2, at 64x64 and larger).
enum { ROW2_TAPS_MAX = 49 };
static int rows16_s2_ok(const gemm_operand *b, int p) {
    return b->stride == 2 && b->OW % 16 == 0 && p % 16 == 0 && b->k * b->k <= ROW2_TAPS_MAX;
}

static int im2col_amx_ok(const gemm_operand *b, int j0, int nc) {
    if (b->kind != GEMM_IM2COL) return 0;
    if (rows16_s2_ok(b, j0)) return 1;
    if (b->k * b->k > SMALL_TAPS_MAX) return 0;
    return rows16_ok(b, j0) || im2col_small_ok(b, j0, nc);
}

// Rows (q, q+1) of 16 columns, bf16 pairs side by side, at pair-row k of a tile column group.
static inline BF16CVT void tile_pair(unsigned short *d, int k, __m512 x, __m512 y) {
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                           16, 0);
    __m512i v = _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(y, x));
    _mm512_storeu_si512(d + (size_t)(k / 32) * 1024 + (k % 32 / 2) * 32, v);
}

// Rows k0..k0+kc-1 of 16 pixels of image img from their taps' load masks and offsets (from a
// channel's plane), walking (channel, tap) down the rows: tap t is one masked load (lo[t]),
// or with hi the even floats of two (lo[t], hi[t]: stride 2), lanes of `keep` kept.
static inline __attribute__((always_inline)) BF16CVT void im2col_amx_taps(
    unsigned short *d, const gemm_operand *b, int img, int k0, int kc, int kcp,
    const __mmask16 *lo, const __mmask16 *hi, const ptrdiff_t *off, __mmask16 keep) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const int kk = b->k * b->k;
    const size_t plane = (size_t)b->H * b->W;
    uintptr_t base = (uintptr_t)(b->p + ((size_t)img * b->C + (size_t)(k0 / kk)) * plane);
    int t = k0 % kk;
    __m512 v[2];
    for (int k = 0; k < kcp; k += 2) {
        for (int h = 0; h < 2; h++) {
            v[h] = _mm512_setzero_ps();
            if (k + h >= kc) continue;
            const float *src = (const float *)(base + (uintptr_t)(off[t] * 4));
            v[h] = !hi ? _mm512_maskz_loadu_ps(lo[t], src)
                       : _mm512_maskz_permutex2var_ps(keep, _mm512_maskz_loadu_ps(lo[t], src), even,
                                                      _mm512_maskz_loadu_ps(hi[t], src + 16));
            if (++t == kk) t = 0, base += plane * sizeof(float);
        }
        tile_pair(d, k, v[0], v[1]);
    }
}

// Rows k0.. of pixels p..p+n-1 (rows16_ok): row (c, dy, dx) is one masked load from channel
// c's plane at tap offset (dy - pad, dx - pad) from the pixels, lanes outside the plane off.
static BF16CVT void im2col_amx_row(unsigned short *d, const gemm_operand *b, lane_grid g,
                                   int k0, int kc, int kcp, int p, int n) {
    int kk = b->k * b->k, img = p / (b->OH * b->OW);
    __mmask16 ok[SMALL_TAPS_MAX];
    ptrdiff_t off[SMALL_TAPS_MAX];
    __m512i ys, xs;
    ptrdiff_t at = rows16_at(b, g, p, &ys, &xs);
    for (int t = 0; t < kk; t++) {
        int dy = t / b->k - b->pad, dx = t % b->k - b->pad;
        ok[t] = rows16_inside(b, lanes16(n), ys, xs, dy, dx);
        off[t] = at + (ptrdiff_t)dy * b->W + dx;   // may point before the plane: masked lanes only
    }
    im2col_amx_taps(d, b, img, k0, kc, kcp, ok, NULL, off, 0);
}

// The same for pixels p..p+n-1 of small images, through their tap table (as in
// pack_b_im2col_small: one permute of a channel's 32 floats, else a gather).
static BF16CVT void im2col_amx_small(unsigned short *d, const gemm_operand *b, int k0, int kc,
                                     int kcp, int p, int n) {
    int kk = b->k * b->k, img0 = p / (b->OH * b->OW);
    size_t plane = (size_t)b->H * b->W;
    tap_table t;
    tap_table_fill(&t, b, p, n, img0);
    int lo, hi;
    tap_span(&t, kk, &lo, &hi);
    const int permute = hi >= 0 && hi - lo < 32;
    __mmask16 m0 = 0, m1 = 0;
    if (permute) span_masks(lo, hi, &m0, &m1);
    else lo = 0;   // gathers: the offsets as they are
    for (int q = 0; q < kk; q++) t.off[q] = _mm512_sub_epi32(t.off[q], _mm512_set1_epi32(lo));
    const float *src = b->p + ((size_t)img0 * b->C + (size_t)(k0 / kk)) * plane + lo;
    int tap = k0 % kk;
    __m512 w0 = _mm512_setzero_ps(), w1 = w0, v[2];
    if (permute) w0 = _mm512_maskz_loadu_ps(m0, src), w1 = _mm512_maskz_loadu_ps(m1, src + 16);
    for (int k = 0; k < kcp; k += 2) {
        for (int h = 0; h < 2; h++) {
            v[h] = _mm512_setzero_ps();
            if (k + h >= kc) continue;
            v[h] = permute ? _mm512_maskz_permutex2var_ps(t.ok[tap], w0, t.off[tap], w1)
                           : _mm512_mask_i32gather_ps(v[h], t.ok[tap], t.off[tap], src, 4);
            if (++tap == kk && k + h + 1 < kc) {
                tap = 0, src += plane;
                if (permute)
                    w0 = _mm512_maskz_loadu_ps(m0, src), w1 = _mm512_maskz_loadu_ps(m1, src + 16);
            }
        }
        tile_pair(d, k, v[0], v[1]);
    }
}

// The same for rows16_s2_ok pixels: row (c, dy, dx) of lane l is input column
// 2 (ox + l) + dx - pad, the even floats of two masked loads of 16, picked by one permute.
static BF16CVT void im2col_amx_row_s2(unsigned short *d, const gemm_operand *b, int k0, int kc,
                                      int kcp, int p, int n) {
    int kk = b->k * b->k, ohw = b->OH * b->OW, img = p / ohw;
    int oy = p % ohw / b->OW, ox = p % ohw % b->OW;
    __mmask16 lo[ROW2_TAPS_MAX], hi[ROW2_TAPS_MAX];
    ptrdiff_t off[ROW2_TAPS_MAX];
    for (int t = 0; t < kk; t++) {
        int y = 2 * oy + t / b->k - b->pad, x = 2 * ox + t % b->k - b->pad;
        // floats i of the 32 from x with 0 <= x + i < W (none on a padding row)
        int i0 = x < 0 ? -x : 0, i1 = y >= 0 && y < b->H ? b->W - x : 0;
        if (i0 > 32) i0 = 32;
        if (i1 > 32) i1 = 32;
        uint32_t m = i1 > i0 ? (uint32_t)((((uint64_t)1 << i1) - 1) & ~(((uint64_t)1 << i0) - 1)) : 0;
        lo[t] = (__mmask16)m, hi[t] = (__mmask16)(m >> 16);
        off[t] = (ptrdiff_t)y * b->W + x;   // may point outside the plane: masked lanes only
    }
    im2col_amx_taps(d, b, img, k0, kc, kcp, lo, hi, off, lanes16(n));
}

// B rows k0..k0+kc-1, columns j0..j0+nc-1 of GEMM_IM2COL (im2col_amx_ok) into B tiles; the
// columns past nc in the last sliver are zero.
static BF16CVT void pack_b_im2col_amx(unsigned short *d, const gemm_operand *b, int k0, int kc,
                                      int kcp, int j0, int nc) {
    const int row = rows16_ok(b, j0), row_s2 = rows16_s2_ok(b, j0);
    const lane_grid grid = row ? rows16_grid(b) : (lane_grid){0};
    for (int g = 0; g < (int)round_up((size_t)nc, 32); g += 16) {
        unsigned short *dg = b_tiles_at(d, g, kcp);
        if (g >= nc) {
            for (int s = 0; s < kcp / 32; s++) memset(dg + (size_t)s * 1024, 0, 1024);
            continue;
        }
        int n = nc - g < 16 ? nc - g : 16;
        if (row_s2) im2col_amx_row_s2(dg, b, k0, kc, kcp, j0 + g, n);
        else if (row) im2col_amx_row(dg, b, grid, k0, kc, kcp, j0 + g, n);
        else im2col_amx_small(dg, b, k0, kc, kcp, j0 + g, n);
    }
}

// GEMM_IM2COL_T of large images (not im2col_small_ok) into B tiles: as pack_b_im2col_t, each
// of 16 columns' pixels becomes a line (long runs along output rows); 32 pixels of a line
// convert to 16 bf16 pairs, and a 16 x 16 transpose of those pairs is 16 pair-rows of a tile.
// Small images keep the float32 path (gathers), which is faster there.
static BF16CVT void pack_b_im2col_t_amx(unsigned short *d, const gemm_operand *b, int k0, int kc,
                                        int kcp, int j0, int nc) {
    pixel_run runs[RUNS_MAX];
    float lines[16 * LINE_MAX];
    float pairs[16 * 16] __attribute__((aligned(64)));
    for (int rb = 0; rb < kc;) {  // pixels in batches of 512 (whole tile steps), one run each
        int want = kc - rb < 512 ? kc - rb : 512, len;  // at most 512 runs: covers all of want
        int nruns = pixel_runs(runs, RUNS_MAX, b, k0 + rb, want, 0, 0, &len);
        int padded = (len + 31) / 32 * 32;
        for (int jc = 0; jc < (int)round_up((size_t)nc, 32); jc += 16) {
            unsigned short *dg = b_tiles_at(d, jc, kcp);
            for (int c = 0; c < 16; c++) {
                float *line = lines + c * LINE_MAX;
                if (jc + c >= nc) {  // past the last column: zeros
                    memset(line, 0, (size_t)padded * sizeof(float));
                    continue;
                }
                im2col_line_avx512(line, b, j0 + jc + c, runs, nruns);
                for (int t = len; t < padded; t++) line[t] = 0.0f;
            }
            for (int s = 0; s < padded; s += 32) {
                for (int c = 0; c < 16; c++) {
                    const float *line = lines + c * LINE_MAX + s;
                    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(line + 16), _mm512_loadu_ps(line));
                    _mm512_store_si512(pairs + c * 16, (__m512i)v);
                }
                gemm_transpose16_avx512((float *)(void *)(dg + (size_t)((rb + s) / 32) * 1024), 16,
                                        pairs, 16, 16);
            }
        }
        rb += len;
    }
}

// GEMM_IM2COL_T of rows16_ok pixels from k0 (conv3's weight gradient at 16x16, the 3x3 ones
// on 8x8 and 4x4 maps): column (c, dy, dx) of 16 pixels is one masked load from channel c's
// plane; two such loads convert to the 16 bf16 pairs of one tile column, and a 16 x 16
// transpose of 16 columns' pairs makes their tile. No float32 line in between.
static int im2col_t_amx_rows_ok(const gemm_operand *b, int k0) {
    return b->kind == GEMM_IM2COL_T && rows16_ok(b, k0) &&
           b->k > 1;   // pointwise: pack_b_pointwise_t_amx or pack_b_im2col_t_amx's runs
}

static BF16CVT void pack_b_im2col_t_amx_rows(unsigned short *d, const gemm_operand *b, int k0,
                                             int kc, int kcp, int j0, int nc) {
    const int kk = b->k * b->k, ohw = b->OH * b->OW;
    const size_t plane = (size_t)b->H * b->W;
    // the 16-pixel halves of the tile steps, the same for every group of 16 columns
    const float *px[AMX_KC / 16];      // channel 0 of the half's image, at its first pixel
    __m512i ys[AMX_KC / 16], xs[AMX_KC / 16];   // each lane's output row and column
    __mmask16 live[AMX_KC / 16];
    const lane_grid grid = rows16_grid(b);
    for (int h = 0; h < kcp / 16; h++) {
        int p = k0 + 16 * h;
        live[h] = lanes16(kc - 16 * h);
        px[h] = NULL;
        if (live[h])
            px[h] = b->p + (size_t)(p / ohw) * b->C * plane + rows16_at(b, grid, p, &ys[h], &xs[h]);
    }
    float pairs[16 * 16] __attribute__((aligned(64)));
    for (int jc = 0; jc < (int)round_up((size_t)nc, 32); jc += 16) {
        unsigned short *dg = b_tiles_at(d, jc, kcp);
        int cols = nc - jc < 16 ? (nc - jc > 0 ? nc - jc : 0) : 16;
        int ch[16], dy[16], dx[16];
        for (int c = 0; c < cols; c++) {
            int q = j0 + jc + c;
            ch[c] = q / kk, dy[c] = q % kk / b->k - b->pad, dx[c] = q % b->k - b->pad;
        }
        for (int s = 0; s < kcp; s += 32) {
            for (int c = 0; c < 16; c++) {
                __m512 v[2];
                for (int i = 0; i < 2; i++) {
                    const int h = s / 16 + i;
                    v[i] = _mm512_setzero_ps();
                    if (c >= cols || !live[h]) continue;
                    __mmask16 m = rows16_inside(b, live[h], ys[h], xs[h], dy[c], dx[c]);
                    if (m)   // (masked lanes are never read)
                        v[i] = _mm512_maskz_loadu_ps(
                            m, px[h] + ch[c] * plane + (ptrdiff_t)dy[c] * b->W + dx[c]);
                }
                _mm512_store_si512(pairs + c * 16, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
            }
            gemm_transpose16_avx512((float *)(void *)(dg + (size_t)(s / 32) * 1024), 16, pairs,
                                    16, 16);
        }
    }
}

// GEMM_IM2COL_T of a pointwise convolution (the weight gradient of a 1x1 one) on planes of
// 16, 8, 4, 2 or 1 pixels (16 pixels: whole images), from pixel k0 a multiple of 16: column c
// of 16 pixels is one load from channel c's plane, or a gather from 16/hw images; then as
// pack_b_im2col_t_amx_rows. There pack_b_im2col_t_amx's whole-plane runs are 16 floats or
// fewer (on 2x2 maps its lines took 37 % of the weight gradient: 5a's 1x1 ~2.2 -> ~1.3 ms at
// batch 128); on larger planes they are long and stay quicker.
static int pointwise_t_amx_ok(const gemm_operand *b, int k0) {
    const int hw = b->OH * b->OW;
    return b->kind == GEMM_IM2COL_T && b->k == 1 && b->stride == 1 && b->pad == 0 &&
           k0 % 16 == 0 && hw <= 16 && 16 % hw == 0 &&
           (size_t)16 * b->C * hw < (size_t)INT32_MAX;   // gather offsets
}

static BF16CVT void pack_b_pointwise_t_amx(unsigned short *d, const gemm_operand *b, int k0,
                                           int kc, int kcp, int j0, int nc) {
    const int hw = b->OH * b->OW;
    const size_t img = (size_t)b->C * hw;
    __m512i idx = _mm512_setzero_si512();   // hw < 16: lane l's pixel, from the first image's
    if (hw < 16) {
        int32_t at[16];
        for (int l = 0; l < 16; l++) at[l] = (int32_t)((size_t)(l / hw) * img + l % hw);
        idx = _mm512_loadu_si512(at);
    }
    float pairs[16 * 16] __attribute__((aligned(64)));
    for (int jc = 0; jc < (int)round_up((size_t)nc, 32); jc += 16) {
        unsigned short *dg = b_tiles_at(d, jc, kcp);
        const int cols = nc - jc < 16 ? (nc - jc > 0 ? nc - jc : 0) : 16;
        for (int s = 0; s < kcp; s += 32) {
            const float *src[2];   // channel 0 at the half's first pixel
            __mmask16 live[2];
            for (int h = 0; h < 2; h++) {
                int r = s + 16 * h, n = kc - r, p = k0 + r;
                live[h] = lanes16(n);
                src[h] = b->p + (size_t)(p / hw) * img + p % hw;
            }
            for (int c = 0; c < 16; c++) {
                __m512 v[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
                for (int h = 0; h < 2 && c < cols; h++) {
                    const float *q = src[h] + (size_t)(j0 + jc + c) * hw;
                    if (!live[h]) continue;
                    v[h] = hw >= 16 ? _mm512_maskz_loadu_ps(live[h], q)
                                    : _mm512_mask_i32gather_ps(v[h], live[h], idx, q, 4);
                }
                _mm512_store_si512(pairs + c * 16, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
            }
            gemm_transpose16_avx512((float *)(void *)(dg + (size_t)(s / 32) * 1024), 16, pairs,
                                    16, 16);
        }
    }
}

// A dense B whose columns are contiguous runs of k (rs 1: a transposed matrix, e.g. W^T of a
// linear layer) into tiles: 32 k of a column are two loads, converted to that column's 16
// bf16 pairs, and a 16 x 16 transpose of 16 columns' pairs makes their tile (the float32
// slivers and their tiles pass over all of B twice: 2.9 ms for the aux heads' 1024 x 2048).
static BF16CVT void pack_b_dense_t_amx(unsigned short *d, const gemm_operand *b, int k0, int kc,
                                       int kcp, int j0, int nc) {
    float pairs[16 * 16] __attribute__((aligned(64)));
    for (int jc = 0; jc < (int)round_up((size_t)nc, 32); jc += 16) {
        unsigned short *dg = b_tiles_at(d, jc, kcp);
        const float *col[16];
        for (int c = 0; c < 16; c++) col[c] = jc + c < nc ? dense_at(b, k0, j0 + jc + c) : NULL;
        for (int s = 0; s < kcp; s += 32) {
            __mmask16 live[2];
            for (int h = 0; h < 2; h++) {
                int n = kc - s - 16 * h;
                live[h] = lanes16(n);
            }
            for (int c = 0; c < 16; c++) {
                __m512 lo = _mm512_setzero_ps(), hi = lo;
                if (col[c]) {
                    lo = _mm512_maskz_loadu_ps(live[0], col[c] + s);
                    hi = _mm512_maskz_loadu_ps(live[1], col[c] + s + 16);
                }
                _mm512_store_si512(pairs + c * 16, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
            gemm_transpose16_avx512((float *)(void *)(dg + (size_t)(s / 32) * 1024), 16, pairs,
                                    16, 16);
        }
    }
}

static void pack_b(float *dst, const gemm_operand *b, int k0, int kc, int j0, int nc,
                   const gemm_config *cfg) {
    switch (b->kind) {
    case GEMM_DENSE: pack_b_dense(dst, b, k0, kc, j0, nc, cfg); break;
    case GEMM_IM2COL:
        if (cfg->im2col_rows == im2col_rows_avx512 && im2col_small_ok(b, j0, nc))
            pack_b_im2col_small(dst, b, k0, kc, j0, nc, cfg->NR);
        else
            pack_b_im2col(dst, b, k0, kc, j0, nc, cfg);
        break;
    case GEMM_IM2COL_T:
        if (cfg->im2col_rows == im2col_rows_avx512 && im2col_small_ok(b, k0, kc))
            pack_b_im2col_t_small(dst, b, k0, kc, j0, nc, cfg->NR);
        else
            pack_b_im2col_t(dst, b, k0, kc, j0, nc, cfg);
        break;
    case GEMM_PACKED: break;  // A only (gemm.h)
    }
}

// ---------------------------------------------------------------------------------------------
// Driver

typedef struct {
    const gemm_config *cfg;
    const gemm_output *c;
    const gemm_operand *a, *b;
    const float *bias;
    int M, N, K, flags;
    int nkb, kcb;     // K blocks: nkb blocks of kcb (the last may be shorter)
    int split_rows;   // threads split the rows of C (else the columns)
    int bf16;         // round the packed operands to bfloat16 (cpu_bf16() without AMX)
    float *ws;
    size_t ws_thread; // floats per thread
    unsigned short *a_tiles;  // AMX, split by columns: all of A's tiles, packed once for all
                              // threads (amx_a_shared) instead of by each; else NULL
    int chunks;       // split by columns: pieces of NR-column slivers that threads claim
    cpu_claims claims;
    const gemm_operand *a_dense;  // a_shared_task: A as given, packed into a_panels
    float *a_panels;
} gemm_job;

static void k_blocks(const gemm_config *cfg, int K, int *nkb, int *kcb);
static size_t bp_floats(const gemm_config *cfg, int N, int kcb);

static float *align64(float *p) { return (float *)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

// The row group of row i (row groups: see gemm_output).
static int out_group(const gemm_output *c, int i) {
    int g = 0;
    while (g + 1 < c->ngroups && i >= c->row0[g + 1]) g++;
    return g;
}

// The output that rows i .. i+rows-1 of C are written to and, in *li, the first one's row
// there: c itself, or (row groups) their group as an output of its own in *local; NULL if the
// rows span two groups.
static const gemm_output *rows_out(const gemm_output *c, int i, int rows, gemm_output *local,
                                   int *li) {
    *li = i;
    if (!c->ngroups) return c;
    int g = out_group(c, i);
    if (g != out_group(c, i + rows - 1)) return NULL;
    *local = (gemm_output){.p = c->gp[g], .ldc = c->ldc, .fold = c->fold, .fold_stride = c->gfs[g]};
    *li = i - c->row0[g];
    return local;
}

// Where C(i, j) is stored.
static float *c_at(const gemm_output *c, int i, int j) {
    float *p = c->p;
    ptrdiff_t fs = c->fold_stride;
    if (c->ngroups) {
        int g = out_group(c, i);
        p = c->gp[g], fs = c->gfs[g], i -= c->row0[g];
    }
    return c->fold ? p + (ptrdiff_t)(j / c->fold) * fs + (ptrdiff_t)i * c->ldc + j % c->fold
                   : p + (ptrdiff_t)i * c->ldc + j;
}

// A tile over many small folds (e.g. 2x2 images: 12 in a tile of 48 columns): its columns are
// gathered from and scattered to C with one index vector per 16 columns, not a copy per run.
// base: C(i, j) of the tile's first column, r = j % fold.
static AVX512 void tile_folded_avx512(const gemm_job *g, const gemm_output *c, int kc,
                                      const float *a, const float *b, float *base, int r, int mr,
                                      int nr, const gemm_epilogue *e) {
    int col[NR_MAX];  // offset of column jj from base
    for (int jj = 0; jj < nr; jj++)
        col[jj] = (int)((r + jj) / c->fold * c->fold_stride + (r + jj) % c->fold - r);
    float tmp[MR_MAX * NR_MAX];
    int NR = g->cfg->NR, nv = ceil_div(nr, 16);
    __m512i idx[NR_MAX / 16];
    __mmask16 m[NR_MAX / 16];
    for (int v = 0; v < nv; v++) {
        int n = nr - 16 * v;
        m[v] = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
        idx[v] = _mm512_maskz_loadu_epi32(m[v], col + 16 * v);
    }
    if (e->load_c)
        for (int ii = 0; ii < mr; ii++)
            for (int v = 0; v < nv; v++)
                _mm512_storeu_ps(tmp + ii * NR + 16 * v,
                                 _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m[v], idx[v],
                                                          base + (ptrdiff_t)ii * c->ldc, 4));
    g->cfg->kernel(kc, a, b, tmp, NR, mr, nr, e);
    for (int ii = 0; ii < mr; ii++)
        for (int v = 0; v < nv; v++)
            _mm512_mask_i32scatter_ps(base + (ptrdiff_t)ii * c->ldc, m[v], idx[v],
                                      _mm512_maskz_loadu_ps(m[v], tmp + ii * NR + 16 * v), 4);
}

// Where the 16 x 16 quarters of an AMX tile at C(i, j) start, if each lies in one row group
// and one fold (its rows ldc apart): so a tile that crosses from one image to the next at
// column 16 (4x4 maps, fold 16) or from one row group to the next at row 16 is still written
// by the tiles themselves. 0 if one does not. (For tiles that do cross: run_tile_amx finds the
// others' addresses more cheaply.)
static int amx_quarters(const gemm_output *c, int i, int j, int mr, int nr, float **q) {
    for (int t = 0; t < 4; t++) {
        int rows = mr - 16 * (t / 2), cols = nr - 16 * (t % 2), ii = i + 16 * (t / 2), jj = j + 16 * (t % 2);
        if (rows <= 0 || cols <= 0) {   // not in the tile: never touched
            q[t] = q[0];
            continue;
        }
        if (rows > 16) rows = 16;
        if (cols > 16) cols = 16;
        if (c->ngroups && out_group(c, ii) != out_group(c, ii + rows - 1)) return 0;
        if (c->fold && jj % c->fold + cols > c->fold) return 0;
        q[t] = c_at(c, ii, jj);
    }
    return 1;
}

// One MR x NR tile of C at (i, j). A tile whose columns cross a fold (a batch boundary) is
// computed in a contiguous scratch tile and copied in and out one contiguous run at a time.
// (Not inlined into run_tile_amx: its scratch tiles' 7 KB stack frame would come with it.)
static __attribute__((noinline)) void run_tile(const gemm_job *g, int kc, const float *a,
                                               const float *b, int i, int j, int mr, int nr,
                                               const gemm_epilogue *e) {
    gemm_output local;
    const gemm_output *c = rows_out(g->c, i, mr, &local, &i);
    if (!c) {   // rows of two groups: through a scratch tile, element by element
        float tmp[MR_MAX * NR_MAX];
        int NR = g->cfg->NR;
        if (e->load_c)
            for (int ii = 0; ii < mr; ii++)
                for (int jj = 0; jj < nr; jj++) tmp[ii * NR + jj] = *c_at(g->c, i + ii, j + jj);
        g->cfg->kernel(kc, a, b, tmp, NR, mr, nr, e);
        for (int ii = 0; ii < mr; ii++)
            for (int jj = 0; jj < nr; jj++) *c_at(g->c, i + ii, j + jj) = tmp[ii * NR + jj];
        return;
    }
    float *base = c_at(c, i, j);
    int r = c->fold ? j % c->fold : 0;
    if (!c->fold || r + nr <= c->fold) {
        g->cfg->kernel(kc, a, b, base, c->ldc, mr, nr, e);
        return;
    }
    if ((g->cfg->kernel == gemm_kernel_avx512 || g->cfg->amx) && c->fold < 16 &&
        (size_t)(nr / c->fold + 2) * (size_t)c->fold_stride < (size_t)INT32_MAX / 2) {
        tile_folded_avx512(g, c, kc, a, b, base, r, mr, nr, e);
        return;
    }
    enum { MAX_RUNS = NR_MAX + 1 };
    float *run_at[MAX_RUNS];
    int run_len[MAX_RUNS], runs = 0;
    for (int jj = 0; jj < nr; runs++) {  // runs of columns within one image
        run_at[runs] = base;
        run_len[runs] = c->fold - r < nr - jj ? c->fold - r : nr - jj;
        jj += run_len[runs];
        base += c->fold_stride - r;  // start of the next image's row i
        r = 0;
    }
    float tmp[MR_MAX * NR_MAX];
    int NR = g->cfg->NR;
    if (e->load_c)
        for (int ii = 0; ii < mr; ii++)
            for (int q = 0, jj = 0; q < runs; jj += run_len[q], q++)
                memcpy(tmp + ii * NR + jj, run_at[q] + (ptrdiff_t)ii * c->ldc,
                       (size_t)run_len[q] * sizeof(float));
    g->cfg->kernel(kc, a, b, tmp, NR, mr, nr, e);
    for (int ii = 0; ii < mr; ii++)
        for (int q = 0, jj = 0; q < runs; jj += run_len[q], q++)
            memcpy(run_at[q] + (ptrdiff_t)ii * c->ldc, tmp + ii * NR + jj,
                   (size_t)run_len[q] * sizeof(float));
}

// Where column j of C lies (fold and offset in it), worked out once per block of columns for
// all its AMX tiles (divisions by the fold cost as much as a small tile's epilogue), and whether
// the tile's columns from j (at most 32 of n) stay in that fold.
typedef struct {
    int img, off, fits;
} amx_col;

static void amx_col_at(amx_col *cl, const gemm_output *c, int j, int n) {
    int nr = n < 32 ? n : 32;
    cl->img = c->fold ? j / c->fold : 0;
    cl->off = c->fold ? j % c->fold : j;
    cl->fits = !c->fold || cl->off + nr <= c->fold;
}

static inline void run_tile_amx(const gemm_job *g, int kc, const float *a, const float *b, int i,
                                int j, int mr, int nr, const gemm_epilogue *e, const amx_col *cl) {
    const gemm_output *c = g->c;
    int grp = c->ngroups ? out_group(c, i) : 0;
    if (cl->fits && (!c->ngroups || grp == out_group(c, i + mr - 1))) {
        float *p = c->ngroups ? c->gp[grp] : c->p;
        ptrdiff_t fs = c->ngroups ? c->gfs[grp] : c->fold_stride;
        int li = c->ngroups ? i - c->row0[grp] : i;
        float *base = p + (ptrdiff_t)cl->img * fs + (ptrdiff_t)li * c->ldc + cl->off;
        float *q[4] = {base, base + 16, base + 16 * c->ldc, base + 16 * c->ldc + 16};
        gemm_kernel_amx_quads(kc, a, b, q, c->ldc, mr, nr, e);
        return;
    }
    float *q[4];
    if (amx_quarters(c, i, j, mr, nr, q)) gemm_kernel_amx_quads(kc, a, b, q, c->ldc, mr, nr, e);
    else run_tile(g, kc, a, b, i, j, mr, nr, e);
}

// Up to 3 panels (rows i .. i+rows-1, panel p at a + p*pstride) against one narrow sliver:
// the tall kernel where the rows are in one row group and the columns in one fold, else a
// run_tile per panel (the same bits either way).
static void tall_tile(const gemm_job *g, int kc, const float *a, ptrdiff_t pstride,
                      const float *b, int i, int j, int rows, int nr, const gemm_epilogue *e) {
    gemm_output local;
    int li;
    const gemm_output *c = rows_out(g->c, i, rows, &local, &li);
    if (c && (!c->fold || j % c->fold + nr <= c->fold)) {
        gemm_kernel_avx512_tall(kc, a, pstride, b, c_at(c, li, j), c->ldc, rows, nr, e);
        return;
    }
    for (int p = 0; p * g->cfg->MR < rows; p++) {
        int MR = g->cfg->MR, mr = rows - p * MR < MR ? rows - p * MR : MR;
        gemm_epilogue ep = *e;
        if (ep.bias_row) ep.bias_row += p * MR;
        run_tile(g, kc, a + p * pstride, b, i + p * MR, j, mr, nr, &ep);
    }
}

// a_ready: the workspace already holds A's panels for these rows from the thread's previous
// call (one row block and one K block only: a_ready_ok()).
static void gemm_block(const gemm_job *g, float *ws, int m0, int m1, int n0, int n1, int a_ready) {
    const gemm_config *cfg = g->cfg;
    int MR = cfg->MR, NR = cfg->NR;
    float *bp = align64(ws);
    float *ap = align64(bp + bp_floats(cfg, g->N, g->kcb));
    for (int ic = m0; ic < m1; ic += cfg->MC) {
        int mc = m1 - ic < cfg->MC ? m1 - ic : cfg->MC;
        for (int kb = 0; kb < g->nkb; kb++) {
            int pc = kb * g->kcb, kc = g->K - pc < g->kcb ? g->K - pc : g->kcb;
            int last = kb == g->nkb - 1;
            const float *a_panels = ap;
            size_t a_floats = round_up((size_t)mc, MR) * kc;
            if (g->a->kind == GEMM_PACKED) {  // K block kb, rows from ic: see gemm_pack_a()
                a_panels = g->a->p + PACK_HEADER + (size_t)pc * round_up(g->M, MR) +
                           (size_t)ic * kc;
                if (g->bf16) {   // rounded in a copy: the packed weights stay as they are
                    if (!a_ready) memcpy(ap, a_panels, a_floats * sizeof(float));
                    a_panels = ap;
                }
            } else if (!a_ready)
                pack_a(ap, g->a, g->M, ic, mc, pc, kc, cfg);
            if (g->bf16 && !a_ready) gemm_bf16_round(ap, a_floats, cfg->copy == copy_avx512);
            for (int jc = n0; jc < n1; jc += cfg->NC) {
                int nc = n1 - jc < cfg->NC ? n1 - jc : cfg->NC;
                pack_b(bp, g->b, pc, kc, jc, nc, cfg);
                if (g->bf16)
                    gemm_bf16_round(bp, round_up((size_t)nc, NR) * kc, cfg->copy == copy_avx512);
                for (int ir = 0; ir < mc; ir += MR) {
                    int mr = mc - ir < MR ? mc - ir : MR;
                    for (int jr = 0; jr < nc; jr += NR) {
                        int nr = nc - jr < NR ? nc - jr : NR;
                        // a narrow last sliver: 3 panels at a time (tall_tile)
                        const int tall = cfg->kernel == gemm_kernel_avx512 && nr <= 16;
                        if (tall && ir % (3 * MR)) continue;   // done with the panel 1 or 2 back
                        gemm_epilogue e = {
                            .load_c = kb > 0 || (g->flags & GEMM_ACCUMULATE),
                            .bias_row = last && (g->flags & GEMM_BIAS_ROW) ? g->bias + ic + ir : NULL,
                            .bias_col = last && (g->flags & GEMM_BIAS_COL) ? g->bias + jc + jr : NULL,
                            .relu = last && (g->flags & GEMM_RELU),
                        };
                        if (tall) {
                            int rows = mc - ir < 3 * MR ? mc - ir : 3 * MR;
                            tall_tile(g, kc, a_panels + (size_t)ir * kc, (ptrdiff_t)MR * kc,
                                      bp + (size_t)jr * kc, ic + ir, jc + jr, rows, nr, &e);
                            continue;
                        }
                        run_tile(g, kc, a_panels + (size_t)ir * kc, bp + (size_t)jr * kc, ic + ir,
                                 jc + jr, mr, nr, &e);
                    }
                }
            }
        }
    }
}

// ---- bfloat16 on AMX ----
// Row r of A, k0..k0+kc-1 with k contiguous (cs 1), as tile rows (step s at row + s*1024):
// 16 k at a time, one load, or on folds of fewer than 16 columns a gather from 16/fold folds.
// amx_a_rows_ok: no fold, or k0 and the fold such that no 16 k straddle two folds unevenly.
static int amx_a_rows_ok(const gemm_operand *a, int k0) {
    if (a->kind != GEMM_DENSE || a->cs != 1) return 0;
    if (!a->fold) return 1;
    return k0 % 16 == 0 && (a->fold % 16 == 0 || (a->fold < 16 && 16 % a->fold == 0)) &&
           16 * a->fold_stride < INT32_MAX;   // gather offsets
}

static BF16CVT void pack_a_row_amx(unsigned short *row, const gemm_operand *a, int r, int k0,
                                   int kc, int steps) {
    const int f = a->fold;
    __m512i idx = _mm512_setzero_si512();
    if (f && f < 16) {
        int32_t at[16];
        for (int l = 0; l < 16; l++) at[l] = (int32_t)((l / f) * a->fold_stride + l % f);
        idx = _mm512_loadu_si512(at);
    }
    const float *base = a->p + (ptrdiff_t)r * a->rs;
    ptrdiff_t img = f ? k0 / f : 0;
    int off = f ? k0 % f : k0;
    for (int s = 0; s < steps; s++) {
        __m512 v[2];
        for (int h = 0; h < 2; h++) {
            const int n = kc - 32 * s - 16 * h;
            const __mmask16 m = lanes16(n);
            const float *src = base + img * a->fold_stride + off;
            v[h] = _mm512_setzero_ps();
            if (m) v[h] = f && f < 16 ? _mm512_mask_i32gather_ps(v[h], m, idx, src, 4)
                                      : _mm512_maskz_loadu_ps(m, src);
            if (!f) off += 16;
            else if (f < 16) img += 16 / f;
            else if ((off += 16) == f) off = 0, img++;
        }
        _mm512_store_si512(row + (size_t)s * 1024, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
    }
}

// 16 rows r0.. of a transposed A (rs 1: a row's k are cs apart, the rows of one k contiguous)
// as the tile rows of one half panel (d: its first row): each 32-k step is packed as B tiles
// are (pairs of k side by side, per row) and transposed.
static BF16CVT void pack_a_cols_amx(unsigned short *d, const gemm_operand *a, int r0, int k0,
                                    int kc, int steps) {
    float pairs[16 * 16] __attribute__((aligned(64)));
    for (int s = 0; s < steps; s++) {
        const int n = kc - 32 * s < 32 ? kc - 32 * s : 32;
        gemm_amx_pack_b_rows((unsigned short *)(void *)pairs, a->p + r0 + (ptrdiff_t)(k0 + 32 * s) * a->cs,
                             a->cs, n, 32, 16);
        gemm_transpose16_avx512((float *)(void *)(d + (size_t)s * 1024), 16, pairs, 16, 16);
    }
}

// A rows i0..i0+mc-1, columns k0..k0+kc-1 -> 32-row panels of kcp / 32 steps of two 16 x 32
// A tiles: d[((p*steps + s)*2 + h)*512 + r*32 + t] = bf16(A(i0 + 32p + 16h + r, k0 + 32s + t)),
// zero for rows past the block and for k >= kc.
static void pack_a_amx(unsigned short *d, const gemm_operand *a, int M, int i0, int mc, int k0,
                       int kc, int kcp) {
    int steps = kcp / 32;
    const int rows_ok = amx_a_rows_ok(a, k0);
    const int cols_ok = a->kind == GEMM_DENSE && a->rs == 1 && a->cs != 1 && !a->fold;
    for (int p = 0; p < ceil_div(mc, 32); p++)
        for (int ii = 0; ii < 32; ii++) {
            int r = i0 + 32 * p + ii;
            unsigned short *row = d + ((size_t)p * steps * 2 + ii / 16) * 512 + (ii % 16) * 32;
            if (cols_ok && ii % 16 == 0 && r + 16 <= M && r + 16 <= i0 + mc) {
                pack_a_cols_amx(row, a, r, k0, kc, steps);
                ii += 15;
                continue;
            }
            if (r >= M || r >= i0 + mc) {
                for (int s = 0; s < steps; s++) memset(row + (size_t)s * 1024, 0, 64);
                continue;
            }
            if (rows_ok) {
                pack_a_row_amx(row, a, r, k0, kc, steps);
                continue;
            }
            if (kc < kcp) memset(row + (size_t)(steps - 1) * 1024, 0, 64);
            for (int k = 0; k < kc;) {  // pieces within one fold of A and one 32-step
                int n = dense_run(a, k0 + k, kc - k);
                if (n > 32 - k % 32) n = 32 - k % 32;
                const float *src = dense_at(a, r, k0 + k);
                unsigned short *dst = row + (size_t)(k / 32) * 1024 + k % 32;
                if (a->cs == 1) gemm_amx_cvt(dst, src, n);
                else
                    for (int t = 0; t < n; t++) dst[t] = gemm_bf16_of(src[t * a->cs]);
                k += n;
            }
        }
}

// B rows k0..k0+kc-1, columns j0..j0+nc-1 of a dense B with contiguous rows (cs 1) straight
// into B tiles (the layout in gemm.h), in pieces of at most 16 columns that stay
// within one fold and one tile; the columns past nc in the last sliver are zero.
static void pack_b_dense_amx(unsigned short *d, const gemm_operand *b, int k0, int kc, int kcp,
                             int j0, int nc) {
    if (nc % 32) memset(d + (size_t)(nc / 32) * kcp * 32, 0, (size_t)kcp * 32 * sizeof *d);
    for (int j = 0; j < nc;) {
        int n = dense_run(b, j0 + j, nc - j);
        if (n > 16 - j % 16) n = 16 - j % 16;
        gemm_amx_pack_b_rows(b_tiles_at(d, j, kcp) + (j % 16) * 2,
                             dense_at(b, k0, j0 + j), b->rs, kc, kcp, n);
        j += n;
    }
}

// Sizes of the AMX workspace parts (floats): the float32 B block, its bf16 tiles, A's tiles.
static size_t amx_b_floats(const gemm_config *cfg, int N, int kcb) {
    return round_up((size_t)kcb, 32) * round_up((size_t)(N < cfg->NC ? N : cfg->NC), 32) / 2;
}

static size_t amx_a_floats(const gemm_config *cfg, int M, int kcb) {
    return round_up((size_t)kcb, 32) * round_up((size_t)(M < cfg->MC ? M : cfg->MC), 32) / 2;
}

// Shared A tiles: block (ic / MC, kb) of A at ((ic / MC) * nkb + kb) * amx_a_floats() floats.
static size_t amx_a_shared_floats(const gemm_config *cfg, int M, int K) {
    int nkb, kcb;
    k_blocks(cfg, K, &nkb, &kcb);
    return (size_t)ceil_div(M, cfg->MC) * nkb * amx_a_floats(cfg, M, kcb);
}

static unsigned short *amx_a_block(const gemm_job *g, int ic, int kb) {
    return g->a_tiles + ((size_t)(ic / g->cfg->MC) * g->nkb + kb) * amx_a_floats(g->cfg, g->M, g->kcb) * 2;
}

// The shared A tiles, in pieces of two 32-row panels of one block claimed in turn (only the
// last row block can be shorter: its surplus pieces are empty).
static void amx_a_shared_task(void *ctx, int t, int n) {
    (void)t, (void)n;
    gemm_job *g = ctx;
    const int MC = g->cfg->MC, per_block = ceil_div(g->M < MC ? g->M : MC, 64);
    const int pieces = ceil_div(g->M, MC) * g->nkb * per_block;
    for (int c; (c = cpu_claim(&g->claims)) < pieces;) {
        int b = c / per_block, p = c % per_block * 2;
        int ic = b / g->nkb * MC, kb = b % g->nkb;
        int mc = g->M - ic < MC ? g->M - ic : MC;
        if (32 * p >= mc) continue;
        int pc = kb * g->kcb, kc = g->K - pc < g->kcb ? g->K - pc : g->kcb;
        int kcp = (int)round_up((size_t)kc, 32), rows = mc - 32 * p < 64 ? mc - 32 * p : 64;
        pack_a_amx(amx_a_block(g, ic, kb) + (size_t)p * kcp * 32, g->a, g->M, ic + 32 * p, rows,
                   pc, kc, kcp);
    }
}

static void gemm_block_amx(const gemm_job *g, float *ws, int m0, int m1, int n0, int n1,
                           int a_ready) {
    (void)a_ready;  // A's tiles are shared (a_tiles) where columns are split in chunks
    const gemm_config *cfg = g->cfg;
    float *bp = align64(ws);
    unsigned short *bb = (unsigned short *)align64(bp + bp_floats(cfg, g->N, g->kcb));
    unsigned short *ab =
        (unsigned short *)align64((float *)bb + amx_b_floats(cfg, g->N, g->kcb));
    gemm_amx_begin();
    for (int ic = m0; ic < m1; ic += cfg->MC) {
        int mc = m1 - ic < cfg->MC ? m1 - ic : cfg->MC;
        for (int kb = 0; kb < g->nkb; kb++) {
            int pc = kb * g->kcb, kc = g->K - pc < g->kcb ? g->K - pc : g->kcb;
            int kcp = (int)round_up((size_t)kc, 32), last = kb == g->nkb - 1;
            if (g->a_tiles) ab = amx_a_block(g, ic, kb);  // m0 is 0 when they are shared
            else pack_a_amx(ab, g->a, g->M, ic, mc, pc, kc, kcp);
            for (int jc = n0; jc < n1; jc += cfg->NC) {
                int nc = n1 - jc < cfg->NC ? n1 - jc : cfg->NC;
                if (g->b->kind == GEMM_DENSE && g->b->cs == 1)
                    pack_b_dense_amx(bb, g->b, pc, kc, kcp, jc, nc);
                else if (g->b->kind == GEMM_DENSE && g->b->rs == 1)
                    pack_b_dense_t_amx(bb, g->b, pc, kc, kcp, jc, nc);
                else if (im2col_amx_ok(g->b, jc, nc))
                    pack_b_im2col_amx(bb, g->b, pc, kc, kcp, jc, nc);
                else if (im2col_t_amx_rows_ok(g->b, pc))
                    pack_b_im2col_t_amx_rows(bb, g->b, pc, kc, kcp, jc, nc);
                else if (pointwise_t_amx_ok(g->b, pc))
                    pack_b_pointwise_t_amx(bb, g->b, pc, kc, kcp, jc, nc);
                else if (g->b->kind == GEMM_IM2COL_T && !im2col_small_ok(g->b, pc, kc))
                    pack_b_im2col_t_amx(bb, g->b, pc, kc, kcp, jc, nc);
                else {  // float32 slivers first (im2col, transposed B), then their tiles
                    pack_b(bp, g->b, pc, kc, jc, nc, cfg);
                    for (int jr = 0; jr < (int)round_up((size_t)nc, 32); jr += 16)  // 2 halves a sliver
                        gemm_amx_pack_b_rows(b_tiles_at(bb, jr, kcp),
                                             bp + (size_t)(jr / 32) * 32 * kc + jr % 32, 32, kc,
                                             kcp, 16);
                }
                amx_col cols[AMX_NC / 32];
                for (int jr = 0; jr < nc; jr += 32) amx_col_at(&cols[jr / 32], g->c, jc + jr, nc - jr);
                for (int ir = 0; ir < mc; ir += 32) {
                    int mr = mc - ir < 32 ? mc - ir : 32;
                    for (int jr = 0; jr < nc; jr += 32) {
                        int nr = nc - jr < 32 ? nc - jr : 32;
                        gemm_epilogue e = {
                            .load_c = kb > 0 || (g->flags & GEMM_ACCUMULATE),
                            .bias_row = last && (g->flags & GEMM_BIAS_ROW) ? g->bias + ic + ir : NULL,
                            .bias_col = last && (g->flags & GEMM_BIAS_COL) ? g->bias + jc + jr : NULL,
                            .relu = last && (g->flags & GEMM_RELU),
                        };
                        run_tile_amx(g, kcp, (const float *)(const void *)(ab + (size_t)ir * kcp),
                                     (const float *)(const void *)(bb + (size_t)jr * kcp), ic + ir,
                                     jc + jr, mr, nr, &e, &cols[jr / 32]);
                    }
                }
            }
        }
    }
    gemm_amx_end();
}

// ---- pre-packed A: a header, then for each K block (as k_blocks() cuts K) the panels of all
// rows, round_up(M, MR) x kc floats, exactly as pack_a() lays them out in the workspace.
enum { PACK_MAGIC = 0x41636e49 /* "IncA" */ };

typedef struct {
    uint32_t magic, isa, M, K;
} pack_header;

size_t gemm_pack_a_size(int M, int K) {
    size_t most = 0;
    for (int l = 0; l < 3; l++) {
        size_t s = round_up((size_t)(M > 0 ? M : 0), configs[l].MR) * (size_t)(K > 0 ? K : 0);
        if (s > most) most = s;
    }
    return PACK_HEADER + most;
}

void gemm_pack_a(float *packed, const float *A, int lda, int flags, int M, int K) {
    cpu_isa_level isa = cpu_isa();
    const gemm_config *cfg = &configs[isa];
    pack_header h = {PACK_MAGIC, (uint32_t)isa, (uint32_t)M, (uint32_t)K};
    memset(packed, 0, PACK_HEADER * sizeof(float));
    memcpy(packed, &h, sizeof h);
    gemm_operand a = {.kind = GEMM_DENSE, .p = A};
    if (flags & GEMM_TRANS_A) a.rs = 1, a.cs = lda;
    else a.rs = lda, a.cs = 1;
    int nkb, kcb;
    k_blocks(cfg, K, &nkb, &kcb);
    for (int kb = 0; kb < nkb; kb++) {
        int pc = kb * kcb, kc = K - pc < kcb ? K - pc : kcb;
        pack_a(packed + PACK_HEADER + (size_t)pc * round_up(M, cfg->MR), &a, M, 0, M, pc, kc,
               cfg);
    }
}

int gemm_pack_a_check(const float *packed, int M, int K) {
    pack_header h;
    memcpy(&h, packed, sizeof h);
    if (h.magic != PACK_MAGIC) return err_set("packed weights: not made by gemm_pack_a");
    if (h.M != (uint32_t)M || h.K != (uint32_t)K)
        return err_set("packed weights are %u x %u, expected %d x %d", h.M, h.K, M, K);
    if (h.isa != (uint32_t)cpu_isa())
        return err_set("packed weights were made for ISA level %s, now %s (pack again)",
                       cpu_isa_name((cpu_isa_level)h.isa), cpu_isa_name(cpu_isa()));
    return 0;
}

// A in one row block and one K block: a thread taking several column chunks packs it once.
static int a_ready_ok(const gemm_job *g) { return g->M <= g->cfg->MC && g->nkb == 1; }

// Float32 kernels, columns split in chunks, A more than one block: A's panels are packed once,
// in parallel, in gemm_pack_a()'s layout (g->a then points at them as GEMM_PACKED), rather than
// by each thread for each chunk. Pieces: 8 panels of one K block, claimed in turn.
static void a_shared_task(void *ctx, int t, int n) {
    (void)t, (void)n;
    gemm_job *g = ctx;
    const int MR = g->cfg->MR, per_kb = ceil_div(ceil_div(g->M, MR), 8);
    for (int c; (c = cpu_claim(&g->claims)) < g->nkb * per_kb;) {
        int kb = c / per_kb, p = c % per_kb * 8;
        int pc = kb * g->kcb, kc = g->K - pc < g->kcb ? g->K - pc : g->kcb;
        int rows = g->M - p * MR < 8 * MR ? g->M - p * MR : 8 * MR;
        pack_a(g->a_panels + PACK_HEADER + (size_t)pc * round_up(g->M, MR) + (size_t)p * MR * kc,
               g->a_dense, g->M, p * MR, rows, pc, kc, g->cfg);
    }
}

// Part t of n: a contiguous range of MR-row panels, or column chunks (ranges of NR-column
// slivers) claimed in turn. Either way one gemm_block call computes each element of C, with the
// same operations whichever thread makes it.
static void gemm_task(void *ctx, int t, int n) {
    gemm_job *g = ctx;
    float *ws = g->ws + (size_t)t * g->ws_thread;
    void (*block)(const gemm_job *, float *, int, int, int, int, int) =
        g->cfg->amx ? gemm_block_amx : gemm_block;
    if (g->split_rows) {
        int MR = g->cfg->MR, units = ceil_div(g->M, MR);
        int u0 = (int)((long)units * t / n), u1 = (int)((long)units * (t + 1) / n);
        int m1 = u1 * MR < g->M ? u1 * MR : g->M;
        if (u0 < u1) block(g, ws, u0 * MR, m1, 0, g->N, 0);
        return;
    }
    int NR = g->cfg->NR, units = ceil_div(g->N, NR), a_ready = 0;
    for (int c; (c = cpu_claim(&g->claims)) < g->chunks;) {
        int u0 = (int)((long)units * c / g->chunks), u1 = (int)((long)units * (c + 1) / g->chunks);
        int n1 = u1 * NR < g->N ? u1 * NR : g->N;
        if (u0 < u1) block(g, ws, 0, g->M, u0 * NR, n1, a_ready);
        a_ready = u0 < u1 && a_ready_ok(g);
    }
}

// K blocks of near-equal depth, at most KC: depends on K only, never on the thread count.
static void k_blocks(const gemm_config *cfg, int K, int *nkb, int *kcb) {
    *nkb = K > 0 ? ceil_div(K, cfg->KC) : 0;
    *kcb = K > 0 ? ceil_div(K, *nkb) : 0;
}

// Floats of the packed B block: kcb deep, NC (or all N, if fewer) wide.
static size_t bp_floats(const gemm_config *cfg, int N, int kcb) {
    return (size_t)kcb * round_up((size_t)(N < cfg->NC ? N : cfg->NC), cfg->NR);
}

static size_t ws_per_thread(const gemm_config *cfg, int M, int N, int K) {
    int nkb, kcb;
    k_blocks(cfg, K, &nkb, &kcb);
    if (cfg->amx)
        return bp_floats(cfg, N, kcb) + amx_b_floats(cfg, N, kcb) + amx_a_floats(cfg, M, kcb) +
               4 * 16;
    size_t mc = round_up((size_t)(M < cfg->MC ? M : cfg->MC), cfg->MR);
    return bp_floats(cfg, N, kcb) + mc * kcb + 3 * 16;  // + 64-byte alignment of each part
}

// The largest per-thread workspace of any configuration, so that one sized by
// gemm_workspace_size() fits whichever gemm_ex() picks at call time.
static size_t ws_most(int M, int N, int K) {
    size_t best = ws_per_thread(&amx_config, M, N, K);
    for (int l = 0; l < 3; l++) {
        size_t s = ws_per_thread(&configs[l], M, N, K);
        if (s > best) best = s;
    }
    return best;
}

// Per-thread parts, then room for A packed once for all threads (float32 panels, or AMX tiles).
size_t gemm_workspace_size(int M, int N, int K) {
    size_t shared = gemm_pack_a_size(M, K);   // float32 panels of all of A (a_shared_task)
    if (cpu_amx_detected() && amx_a_shared_floats(&amx_config, M, K) > shared)
        shared = amx_a_shared_floats(&amx_config, M, K);
    return ws_most(M, N, K) * (size_t)cpu_threads() + shared + 16;
}

// K = 0: C = (C or 0) + bias, then ReLU.
static void gemm_no_k(const gemm_output *c, const float *bias, int M, int N, int flags) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float *x = c_at(c, i, j);
            float v = flags & GEMM_ACCUMULATE ? *x : 0.0f;
            if (flags & GEMM_BIAS_ROW) v += bias[i];
            if (flags & GEMM_BIAS_COL) v += bias[j];
            if ((flags & GEMM_RELU) && v < 0.0f) v = 0.0f;
            *x = v;
        }
}

// ---- few rows of A against a B with contiguous columns (a linear layer at batch <= 8) ----
// C(i,j) is then a dot product of two contiguous vectors, and packing B (a transposing copy
// of all of it, e.g. 400 MB for VGG's first linear layer) would cost more than the product:
// read each column of B once, straight from where it is. 16 partial sums in a fixed order
// (the same at every ISA level: no contraction, and vectorising keeps the order), so results
// do not depend on the thread count.
enum { SMALL_M = 8 };

INLINE float dot16_body(const float *x, const float *y, int n) {
    float acc[16] = {0};
    int k = 0;
    for (; k + 16 <= n; k += 16)
        for (int l = 0; l < 16; l++) acc[l] += x[k + l] * y[k + l];
    for (int l = 0; k < n; k++, l++) acc[l] += x[k] * y[k];
    for (int w = 8; w >= 1; w /= 2)  // pairwise: lanes l and l + w
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

static float dot16_c(const float *x, const float *y, int n) { return dot16_body(x, y, n); }
static AVX512 float dot16_avx512(const float *x, const float *y, int n) {
    return dot16_body(x, y, n);
}

typedef struct {
    const gemm_output *c;
    const gemm_operand *a, *b;
    const float *bias;
    int M, N, K, flags;
} small_m_job;

static void small_m_task(void *ctx, int t, int n) {
    const small_m_job *g = ctx;
    float (*dot)(const float *, const float *, int) =
        cpu_isa() == CPU_ISA_AVX512 ? dot16_avx512 : dot16_c;
    int j0 = (int)((long long)g->N * t / n), j1 = (int)((long long)g->N * (t + 1) / n);
    for (int j = j0; j < j1; j++) {
        const float *bj = g->b->p + (ptrdiff_t)j * g->b->cs;
        for (int i = 0; i < g->M; i++) {
            float x = dot(g->a->p + (ptrdiff_t)i * g->a->rs, bj, g->K);
            float *ci = c_at(g->c, i, j);
            if (g->flags & GEMM_ACCUMULATE) x = *ci + x;
            if (g->flags & GEMM_BIAS_ROW) x += g->bias[i];
            if (g->flags & GEMM_BIAS_COL) x += g->bias[j];
            if ((g->flags & GEMM_RELU) && x < 0.0f) x = 0.0f;  // NaN stays
            *ci = x;
        }
    }
}

static int small_m_fits(const gemm_output *c, const gemm_operand *a, const gemm_operand *b,
                        int M) {
    return M <= SMALL_M && a->kind == GEMM_DENSE && a->cs == 1 && !a->fold &&
           b->kind == GEMM_DENSE && b->rs == 1 && !b->fold && !c->fold;
}

static void small_m(const gemm_output *c, const gemm_operand *a, const gemm_operand *b,
                    const float *bias, int M, int N, int K, int flags) {
    small_m_job g = {c, a, b, bias, M, N, K, flags};
    double macs = (double)M * N * K;
    int T = macs < 0.25e6 ? 1 : cpu_threads();
    if (T > N) T = N;
    cpu_parallel(small_m_task, &g, T);
}

void gemm_ex(const gemm_output *c, const gemm_operand *a, const gemm_operand *b,
             const float *bias, int M, int N, int K, int flags, float *ws) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        gemm_no_k(c, bias, M, N, flags);
        return;
    }
    int bf16 = cpu_bf16();
    if (!bf16 && small_m_fits(c, a, b, M)) {
        small_m(c, a, b, bias, M, N, K, flags);
        return;
    }
    gemm_job g = {.cfg = &configs[cpu_isa()], .c = c, .a = a, .b = b, .bias = bias,
                  .M = M, .N = N, .K = K, .flags = flags, .ws = ws};
    if (bf16 && a->kind != GEMM_PACKED && cpu_amx()) g.cfg = &amx_config;
    else g.bf16 = bf16;
    k_blocks(g.cfg, K, &g.nkb, &g.kcb);
    g.ws_thread = ws_most(M, N, K);  // the layout of gemm_workspace_size()

    // Thread split: compare the estimated per-thread time of splitting rows or columns
    // (tiles computed, plus the packing each thread repeats). Small problems stay on one thread.
    // Handing a part to a spinning worker costs ~1 us (cpu_parallel), about 0.5M multiply-adds
    // at one core's speed, so each thread gets at least that.
    int T = cpu_threads();
    double macs = (double)M * N * K;
    if (macs < 0.5e6 * T) T = macs < 1e6 ? 1 : (int)(macs / 0.5e6);
    int MR = g.cfg->MR, NR = g.cfg->NR;
    int mp = ceil_div(M, MR), sp = ceil_div(N, NR);
    double tile = (double)MR * NR * K / 32.0;  // ~cycles per tile at peak
    double by_cols = ceil_div(sp, T) * (double)mp * tile + (double)M * K + (double)K * NR * ceil_div(sp, T);
    double by_rows = ceil_div(mp, T) * (double)sp * tile + (double)K * N + (double)MR * K * ceil_div(mp, T);
    g.split_rows = by_rows < by_cols;
    int units = g.split_rows ? mp : sp;
    if (T > units) T = units;
    // Threads that split the columns each need all of A: on AMX its tiles are made once, in
    // parallel, when that is worth a second hand-over (the same bytes either way). The shared
    // region follows cpu_threads() parts, where gemm_workspace_size() put it.
    float *shared = align64(ws + g.ws_thread * (size_t)cpu_threads());
    gemm_operand packed = {.kind = GEMM_PACKED, .p = shared};
    int share = !g.split_rows && T > 1 && (double)M * K >= 65536;
    if (share && g.cfg->amx) {
        g.a_tiles = (unsigned short *)shared;
        cpu_parallel(amx_a_shared_task, &g, T);
        atomic_store(&g.claims.next, 0);
    } else if (share && !g.bf16 && a->kind == GEMM_DENSE && !a_ready_ok(&g)) {
        g.a_dense = a, g.a_panels = shared;
        cpu_parallel(a_shared_task, &g, T);
        atomic_store(&g.claims.next, 0);
        g.a = &packed;
    }
    // Column chunks: up to 8 a thread, so that one held up by the host leaves the other work
    // to take. Where A's tiles are shared (AMX) or A is one block (packed once per thread) a
    // chunk costs nothing extra; otherwise a thread packs all of A for each chunk it takes, so
    // each chunk keeps >= ~768 columns, against which that packing is a few per cent.
    g.chunks = T;
    if (!g.split_rows && T > 1) {
        int per = g.a_tiles || g.a == &packed || a_ready_ok(&g) ? 8 : (int)((double)N / T / 768);
        per = per < 1 ? 1 : per > 8 ? 8 : per;
        g.chunks = T * per < units ? T * per : units;
    }
    cpu_parallel(gemm_task, &g, T);
}

void gemm(float *C, int ldc, const float *A, int lda, const float *B, int ldb, const float *bias,
          int M, int N, int K, int flags, float *ws) {
    gemm_output c = {.p = C, .ldc = ldc};
    gemm_operand a = {.kind = GEMM_DENSE, .p = A};
    gemm_operand b = {.kind = GEMM_DENSE, .p = B};
    if (flags & GEMM_TRANS_A) a.rs = 1, a.cs = lda;
    else a.rs = lda, a.cs = 1;
    if (flags & GEMM_TRANS_B) b.rs = 1, b.cs = ldb;
    else b.rs = ldb, b.cs = 1;
    gemm_ex(&c, &a, &b, bias, M, N, K, flags & ~(GEMM_TRANS_A | GEMM_TRANS_B), ws);
}
