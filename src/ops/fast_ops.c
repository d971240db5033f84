// Fast versions of the memory-bound ops (see fast_ops.h).
//
// Each kernel is written once as a plain loop (an always-inline "body") and compiled three
// times, for AVX-512F, AVX2 and baseline x86-64; cpu_isa() picks the copy. The arithmetic is
// the same in every copy (ISO C mode: no FMA contraction; no reassociation without
// -ffast-math), so every ISA level gives the same bits. Batchnorm's double sums keep one
// partial sum per position of a row (summed over the batch in order, then over the positions
// in order): a fixed order that vectorises across positions. The max pool on narrow outputs
// has hand-written AVX-512 / AVX2 kernels (masked loads, gathers) with the same update rule.
//
// Threads split the work by channels (batchnorm: one channel's reduction is done by one
// thread) or by planes / element ranges, never by anything that changes an order of additions.
#include "ops/fast_ops.h"
#include "ops/cpu.h"
#include "ops/ops.h"
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF  // clang would otherwise fuse x*a+b into an FMA (gcc: ISO C = off)
#endif

#define AI static inline __attribute__((always_inline))

// Below this many elements per thread, waking a worker costs more than it saves.
enum { MIN_WORK_PER_THREAD = 4096 };

static int threads_for(size_t work) { return cpu_threads_for(work, MIN_WORK_PER_THREAD); }

// ---------------------------------------------------------------------------------------------
// Kernel bodies

// The ReLU output when fused, recomputed from the BN input x with the forward's own per-position
// affine (ra, rb): the same expression as bnb_affine_body, so the same bits.
AI float bn_relu_in(const float *x, const float *ra, const float *rb, int q) {
    return x[q] * ra[q] + rb[q];
}

// The gradient reaching the BN output: dout, masked by the ReLU when fused (relu_backward: zero
// where the output is <= 0; a NaN output passes its gradient).
// The loads are unconditional so that the compiler can turn the choice into a vector select.
AI float bn_grad(const float *g, const float *x, const float *ra, const float *rb, int q,
                 int relu) {
    const float gv = g[q];
    if (!relu) return gv;
    return bn_relu_in(x, ra, rb, q) <= 0.0f ? 0.0f : gv;
}

// ---- batchnorm ----
enum { BN_BLOCK_MAX = 512 };  // the longest row a kernel is given (BN_BLOCK below)

// The kernels work on a "block": per sample n, a contiguous row of L <= BN_BLOCK floats (a few
// whole channels when planes are small, a segment of one channel's plane when they are large),
// rows `stride` floats apart (the output, or the output's gradient, `ostride` apart: it may be
// a slice of a wider tensor, such as a concatenation's channels). Every position q of the row
// keeps its own double partial sums (over n, in order), which vectorises across positions; the
// caller then adds the positions up in order. Per-channel constants come expanded to one value
// per position.

// The sums over n take four samples at a time: their terms are added among themselves in
// double, then to the position's partial sum, a quarter of the loads and stores of the
// accumulators that bound these loops (the order is fixed: no dependence on the thread count).

AI void bnb_sum_body(double *restrict acc, const float *restrict x, int N, size_t stride, int L) {
    int n = 0;
    for (; n + 4 <= N; n += 4) {
        const float *restrict p0 = x + (size_t)n * stride, *restrict p1 = p0 + stride,
                    *restrict p2 = p1 + stride, *restrict p3 = p2 + stride;
        for (int q = 0; q < L; q++)
            acc[q] += ((double)p0[q] + (double)p1[q]) + ((double)p2[q] + (double)p3[q]);
    }
    for (; n < N; n++) {
        const float *p = x + (size_t)n * stride;
        for (int q = 0; q < L; q++) acc[q] += p[q];
    }
}

AI double sq(double d) { return d * d; }

AI void bnb_ssd_body(double *restrict acc, const float *restrict x, int N, size_t stride,
                     int L, const double *restrict mean) {
    int n = 0;
    for (; n + 4 <= N; n += 4) {
        const float *restrict p0 = x + (size_t)n * stride, *restrict p1 = p0 + stride,
                    *restrict p2 = p1 + stride, *restrict p3 = p2 + stride;
        for (int q = 0; q < L; q++)
            acc[q] += (sq(p0[q] - mean[q]) + sq(p1[q] - mean[q])) +
                      (sq(p2[q] - mean[q]) + sq(p3[q] - mean[q]));
    }
    for (; n < N; n++) {
        const float *p = x + (size_t)n * stride;
        for (int q = 0; q < L; q++) acc[q] += sq(p[q] - mean[q]);
    }
}

AI void bnb_affine_body(float *restrict o, const float *restrict x, int N, size_t stride,
                        size_t ostride, int L, const float *restrict a, const float *restrict b,
                        int relu) {
    for (int n = 0; n < N; n++) {
        const float *p = x + (size_t)n * stride;
        float *r = o + (size_t)n * ostride;
        if (relu)
            for (int q = 0; q < L; q++) {
                float v = p[q] * a[q] + b[q];
                r[q] = v <= 0.0f ? 0.0f : v;
            }
        else
            for (int q = 0; q < L; q++) r[q] = p[q] * a[q] + b[q];
    }
}

AI void bnb_bwd_sums_body(double *restrict a1, double *restrict a2, const float *restrict g,
                          const float *restrict x, int N, size_t stride, size_t ostride,
                          int L, const float *restrict mean, const float *restrict ra,
                          const float *restrict rb, int relu) {
    float gm[4][BN_BLOCK_MAX];  // masked gradient rows: gcc 12 will not vectorise a float
                                // select feeding double sums in one loop
    int n = 0;
    for (; n + 4 <= N; n += 4) {
        const float *restrict g0 = g + (size_t)n * ostride, *restrict g1 = g0 + ostride,
                    *restrict g2 = g1 + ostride, *restrict g3 = g2 + ostride;
        const float *restrict x0 = x + (size_t)n * stride, *restrict x1 = x0 + stride,
                    *restrict x2 = x1 + stride, *restrict x3 = x2 + stride;
        if (relu) {
            for (int q = 0; q < L; q++) {
                gm[0][q] = bn_grad(g0, x0, ra, rb, q, 1);
                gm[1][q] = bn_grad(g1, x1, ra, rb, q, 1);
                gm[2][q] = bn_grad(g2, x2, ra, rb, q, 1);
                gm[3][q] = bn_grad(g3, x3, ra, rb, q, 1);
            }
            g0 = gm[0], g1 = gm[1], g2 = gm[2], g3 = gm[3];
        }
        for (int q = 0; q < L; q++) {
            const float m = mean[q];
            a1[q] += ((double)g0[q] + (double)g1[q]) + ((double)g2[q] + (double)g3[q]);
            a2[q] += ((double)g0[q] * (x0[q] - m) + (double)g1[q] * (x1[q] - m)) +
                     ((double)g2[q] * (x2[q] - m) + (double)g3[q] * (x3[q] - m));
        }
    }
    for (; n < N; n++) {
        const float *gp = g + (size_t)n * ostride, *xp = x + (size_t)n * stride;
        if (relu) {
            for (int q = 0; q < L; q++) gm[0][q] = bn_grad(gp, xp, ra, rb, q, 1);
            gp = gm[0];
        }
        for (int q = 0; q < L; q++) {
            const float gv = gp[q];
            a1[q] += gv;
            a2[q] += (double)gv * (xp[q] - mean[q]);
        }
    }
}

AI void bnb_bwd_apply_body(float *restrict dx, const float *restrict g,
                           const float *restrict x, int N, size_t stride, size_t ostride,
                           int L, const float *restrict gmean, const float *restrict proj,
                           const float *restrict mean, const float *restrict a,
                           const float *restrict ra, const float *restrict rb, int relu,
                           int overwrite) {
    for (int n = 0; n < N; n++) {
        const size_t off = (size_t)n * stride;
        const float *gp = g + (size_t)n * ostride, *xp = x + off;
        float *d = dx + off;
        for (int q = 0; q < L; q++) {
            const float v =
                (bn_grad(gp, xp, ra, rb, q, relu) - gmean[q] - (xp[q] - mean[q]) * proj[q]) * a[q];
            d[q] = overwrite ? v : d[q] + v;
        }
    }
}

AI void bnb_bwd_apply_eval_body(float *restrict dx, const float *restrict g,
                                const float *restrict x, int N, size_t stride, size_t ostride,
                                int L, const float *restrict a, const float *restrict ra,
                                const float *restrict rb, int relu) {
    for (int n = 0; n < N; n++) {
        const size_t off = (size_t)n * stride;
        const float *gp = g + (size_t)n * ostride, *xp = relu ? x + off : gp;
        float *d = dx + off;
        for (int q = 0; q < L; q++) d[q] += bn_grad(gp, xp, ra, rb, q, relu) * a[q];
    }
}

AI void relu_fwd_body(float *o, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) o[i] = x[i] <= 0.0f ? 0.0f : x[i];
}

// Skips masked elements rather than adding 0 (which would turn a -0 gradient into +0).
AI void relu_bwd_body(float *dx, const float *g, const float *out, size_t n) {
    for (size_t i = 0; i < n; i++) dx[i] = out[i] <= 0.0f ? dx[i] : dx[i] + g[i];
}

AI void add_body(float *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

AI void mul_body(float *dst, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = a[i] * b[i];
}

AI void muladd_body(float *dst, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] += a[i] * b[i];
}

// ---- max pool ----
// Output row by row, in chunks of columns held in small arrays: for each window row h and
// window column kw (row-major window order, as the reference scans it), every output column
// whose window contains that input column compares it with its running maximum. The update
// rule is the reference's (`v > max || isnan(v)`), so ties and NaN pick the same element.

enum { MP_CHUNK = 128 };

AI int imin(int a, int b) { return a < b ? a : b; }
AI int imax(int a, int b) { return a > b ? a : b; }

AI void maxpool_plane_body(float *o, int32_t *arg, const float *x, int H, int W, int OH, int OW,
                           int k, int s, int pad) {
    float m[MP_CHUNK];
    int32_t id[MP_CHUNK];
    for (int oh = 0; oh < OH; oh++) {
        const int h0 = oh * s - pad, h1 = imin(h0 + k, H), hs = imax(h0, 0);
        for (int c0 = 0; c0 < OW; c0 += MP_CHUNK) {
            const int c1 = imin(c0 + MP_CHUNK, OW), len = c1 - c0;
            for (int j = 0; j < len; j++) {
                m[j] = -INFINITY;
                id[j] = -1;
            }
            for (int h = hs; h < h1; h++) {
                const float *xr = x + (size_t)h * W;
                for (int kw = 0; kw < k; kw++) {
                    // Columns ow with 0 <= ow*s - pad + kw < W, within this chunk.
                    const int lo_num = pad - kw, hi_num = W - 1 + pad - kw;
                    int lo = lo_num <= 0 ? 0 : (lo_num + s - 1) / s;
                    int hi = hi_num < 0 ? 0 : hi_num / s + 1;
                    lo = imax(lo, c0);
                    hi = imin(hi, c1);
                    for (int ow = lo; ow < hi; ow++) {
                        const int w = ow * s - pad + kw, j = ow - c0;
                        const float v = xr[w];
                        const int better = v > m[j] || isnan(v);
                        m[j] = better ? v : m[j];
                        id[j] = better ? h * W + w : id[j];
                    }
                }
            }
            // A window of only -inf keeps its first element (the reference's starting point);
            // a window entirely in the padding has none (-1, output -inf).
            for (int j = 0; j < len; j++) {
                if (id[j] < 0) {
                    const int w0 = (c0 + j) * s - pad, ws = imax(w0, 0), we = imin(w0 + k, W);
                    if (hs < h1 && ws < we) id[j] = hs * W + ws;
                }
                o[(size_t)oh * OW + c0 + j] = m[j];
            }
            if (arg)
                for (int j = 0; j < len; j++) arg[(size_t)oh * OW + c0 + j] = id[j];
        }
    }
}

// Planes [p0, p1); common window shapes get their own constant-folded copy.
AI void maxpool_planes_body(float *out, int32_t *arg, const float *in, size_t p0, size_t p1,
                            int H, int W, int OH, int OW, int k, int s, int pad) {
    const size_t ip = (size_t)H * W, op = (size_t)OH * OW;
    for (size_t p = p0; p < p1; p++) {
        float *o = out + p * op;
        int32_t *a = arg ? arg + p * op : NULL;
        const float *x = in + p * ip;
        if (k == 3 && s == 1 && pad == 1) maxpool_plane_body(o, a, x, H, W, OH, OW, 3, 1, 1);
        else if (k == 3 && s == 2 && pad == 0) maxpool_plane_body(o, a, x, H, W, OH, OW, 3, 2, 0);
        else if (k == 2 && s == 2 && pad == 0) maxpool_plane_body(o, a, x, H, W, OH, OW, 2, 2, 0);
        else maxpool_plane_body(o, a, x, H, W, OH, OW, k, s, pad);
    }
}

// ---- max pool on narrow outputs: candidate tables ----
// With OW < MP_TABLE_OW (late GoogLeNet layers: 4x4, 2x2, 1x1 planes) a row is too short to
// vectorise. There blocks of B planes are treated as one flat vector of B*OH*OW outputs, and a
// table lists, for every output position q and window element c (row-major window order), the
// element's index in its plane (-1 where the window element lies in the padding). Outputs then
// go 16 at a time, each candidate fetched by a gather; the update rule is the reference's.

enum { MP_TABLE_OW = 32, MP_TABLE_INTS = 16384, MP_BLOCK_OUT = 256 };

typedef struct {
    int B;              // planes per block
    int Q;              // table row length: B*OH*OW rounded up to 16
    int KK;             // window elements (k*k)
    int HW, OHW;        // plane sizes
    const int32_t *idx; // [KK][Q]: index in the plane, or -1
    const int32_t *first;  // [Q]: first element inside the window (the reference's start), or -1
    const int32_t *poff;   // [Q]: offset of the position's plane from the block's first plane
    // "Same" pooling (stride 1, output size = input size): window element c of output q is
    // input q + delta[c] of the block, so candidates come by (masked) contiguous loads.
    int same;
    const int32_t *delta;  // [KK]
    // The window elements inside the input for at least one position, in window order (in a
    // 1x1 plane only the centre of a 3x3 window): the others are skipped.
    int n_act;
    const int32_t *act;
} mp_table;

// p + d for a masked load: lanes outside the plane are masked off (never read), but the
// address itself may lie before the buffer, which plain pointer arithmetic may not produce.
static inline const float *shifted(const float *p, ptrdiff_t d) {
    return (const float *)((uintptr_t)p + (uintptr_t)(d * (ptrdiff_t)sizeof(float)));
}

// Without branches on the data (a mispredicted branch per candidate would cost more than all
// the rest): each candidate is read (the plane's first element stands in for one in the
// padding) and the update is a select.
AI void maxpool_table_body(float *out, int32_t *arg, const float *in, size_t p0, size_t p1,
                           const mp_table *T) {
    for (size_t p = p0; p < p1; p += (size_t)T->B) {
        const size_t nb = p1 - p < (size_t)T->B ? p1 - p : (size_t)T->B;
        const int Qn = (int)nb * T->OHW;
        const float *xb = in + p * T->HW;
        float *ob = out + p * T->OHW;
        int32_t *ab = arg ? arg + p * T->OHW : NULL;
        for (int q = 0; q < Qn; q++) {
            const float *xq = xb + T->poff[q];
            float m = -INFINITY;
            int32_t id = T->first[q];
            for (int a = 0; a < T->n_act; a++) {
                const int32_t li = T->idx[(size_t)T->act[a] * T->Q + q];
                const int ok = li >= 0;
                const float v = xq[ok ? li : 0];
                // All ones where v replaces the maximum; integer blends, which gcc does not
                // turn back into branches as it does float selects.
                const uint32_t mask = -(uint32_t)(ok & ((v > m) | isnan(v)));
                uint32_t vb, mb;
                memcpy(&vb, &v, 4);
                memcpy(&mb, &m, 4);
                mb = (mb & ~mask) | (vb & mask);
                memcpy(&m, &mb, 4);
                id = (int32_t)(((uint32_t)id & ~mask) | ((uint32_t)li & mask));
            }
            ob[q] = m;
            if (ab) ab[q] = id;
        }
    }
}

__attribute__((target("avx2"))) static void maxpool_table_avx2(float *out, int32_t *arg,
                                                              const float *in, size_t p0,
                                                              size_t p1, const mp_table *T) {
    const __m256i minus1 = _mm256_set1_epi32(-1), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (size_t p = p0; p < p1; p += (size_t)T->B) {
        const size_t nb = p1 - p < (size_t)T->B ? p1 - p : (size_t)T->B;
        const int Qn = (int)nb * T->OHW;
        const float *xb = in + p * T->HW;
        float *ob = out + p * T->OHW;
        int32_t *ab = arg ? arg + p * T->OHW : NULL;
        for (int q = 0; q < Qn; q += 8) {
            const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(Qn - q), lane);
            const __m256i po = _mm256_loadu_si256((const __m256i *)(T->poff + q));
            __m256 m = _mm256_set1_ps(-INFINITY);
            __m256i id = _mm256_loadu_si256((const __m256i *)(T->first + q));
            for (int a = 0; a < T->n_act; a++) {
                const int c = T->act[a];
                const __m256i li = _mm256_loadu_si256((const __m256i *)(T->idx + (size_t)c * T->Q + q));
                const __m256i valid = _mm256_and_si256(lanes, _mm256_cmpgt_epi32(li, minus1));
                const __m256 vm = _mm256_castsi256_ps(valid);
                const __m256 v =
                    T->same ? _mm256_maskload_ps(shifted(xb + q, T->delta[c]), valid)
                            : _mm256_mask_i32gather_ps(m, xb, _mm256_add_epi32(po, li), vm, 4);
                const __m256 better = _mm256_and_ps(
                    vm, _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
                m = _mm256_blendv_ps(m, v, better);
                id = _mm256_castps_si256(
                    _mm256_blendv_ps(_mm256_castsi256_ps(id), _mm256_castsi256_ps(li), better));
            }
            _mm256_maskstore_ps(ob + q, lanes, m);
            if (ab) _mm256_maskstore_epi32(ab + q, lanes, id);
        }
    }
}

__attribute__((target("avx512f"))) static void maxpool_table_avx512(float *out, int32_t *arg,
                                                                    const float *in, size_t p0,
                                                                    size_t p1,
                                                                    const mp_table *T) {
    const __m512i zero = _mm512_setzero_si512();
    for (size_t p = p0; p < p1; p += (size_t)T->B) {
        const size_t nb = p1 - p < (size_t)T->B ? p1 - p : (size_t)T->B;
        const int Qn = (int)nb * T->OHW;
        const float *xb = in + p * T->HW;
        float *ob = out + p * T->OHW;
        int32_t *ab = arg ? arg + p * T->OHW : NULL;
        for (int q = 0; q < Qn; q += 16) {
            const __mmask16 lanes = Qn - q >= 16 ? (__mmask16)0xffff
                                                 : (__mmask16)((1u << (Qn - q)) - 1);
            const __m512i po = _mm512_loadu_si512(T->poff + q);
            __m512 m = _mm512_set1_ps(-INFINITY);
            __m512i id = _mm512_loadu_si512(T->first + q);
            for (int a = 0; a < T->n_act; a++) {
                const int c = T->act[a];
                const __m512i li = _mm512_loadu_si512(T->idx + (size_t)c * T->Q + q);
                const __mmask16 valid = _mm512_mask_cmpge_epi32_mask(lanes, li, zero);
                const __m512 v =
                    T->same ? _mm512_mask_loadu_ps(m, valid, shifted(xb + q, T->delta[c]))
                            : _mm512_mask_i32gather_ps(m, valid, _mm512_add_epi32(po, li), xb, 4);
                const __mmask16 better = _mm512_mask_cmp_ps_mask(valid, v, m, _CMP_GT_OQ) |
                                         _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q);
                m = _mm512_mask_mov_ps(m, better, v);
                id = _mm512_mask_mov_epi32(id, better, li);
            }
            _mm512_mask_storeu_ps(ob + q, lanes, m);
            if (ab) _mm512_mask_storeu_epi32(ab + q, lanes, id);
        }
    }
}

// Fills the tables (caller's storage, MP_TABLE_INTS ints) for this geometry; 0 if they do not
// fit or the outputs are wide enough for the row kernel.
static int mp_table_build(mp_table *T, int32_t *store, int H, int W, int OH, int OW, int k,
                          int s, int pad) {
    const int OHW = OH * OW;
    if (OW >= MP_TABLE_OW || OHW <= 0) return 0;
    const int B = OHW >= MP_BLOCK_OUT ? 1 : MP_BLOCK_OUT / OHW;
    const int Q = (B * OHW + 15) / 16 * 16, KK = k * k;
    if ((size_t)(KK + 2) * Q + 2 * KK > MP_TABLE_INTS) return 0;
    int32_t *idx = store, *first = store + (size_t)KK * Q, *poff = first + Q, *delta = poff + Q;
    int32_t *act = delta + KK;
    for (int c = 0; c < KK; c++) delta[c] = (c / k - pad) * W + (c % k - pad);
    for (int q = 0; q < Q; q++) {
        const int b = q / OHW, j = q % OHW, oh = j / OW, ow = j % OW;
        first[q] = -1;
        poff[q] = q < B * OHW ? b * H * W : 0;
        for (int c = 0; c < KK; c++) {
            const int h = oh * s - pad + c / k, w = ow * s - pad + c % k;
            const int in = q < B * OHW && h >= 0 && h < H && w >= 0 && w < W;
            idx[(size_t)c * Q + q] = in ? h * W + w : -1;
            if (in && first[q] < 0) first[q] = h * W + w;
        }
    }
    int n_act = 0;
    for (int c = 0; c < KK; c++) {
        int any = 0;
        for (int q = 0; q < Q; q++) any |= idx[(size_t)c * Q + q] >= 0;
        if (any) act[n_act++] = c;
    }
    *T = (mp_table){B,     Q,   KK, H * W, OHW, idx, first, poff, s == 1 && OH == H && OW == W,
                    delta, n_act, act};
    return 1;
}

// ---- max pool on AVX-512 ----
// 16 outputs per register, each candidate a load straight from the input (no gathers, no index
// tables); the argmax, when wanted, as a vector of element indices beside the maximum. The
// window order and the update rule are the reference's, so the bits are the same as every
// other path's.
//  - "Same" pooling (stride 1, output size = input size; GoogLeNet's branch-4 pools): the
//    plane is one flat vector, window element c of output q is input q + delta[c]; a table
//    gives, per chunk of 16 outputs and per window element, which lanes lie inside the input.
//  - Stride 1 or 2 otherwise: row by row; stride 2 loads 32 consecutive inputs per window
//    column and keeps the even ones (a two-source permute). Column masks per chunk of 16
//    outputs and window column; rows outside the input are skipped.

enum { MPV_MAX_MASKS = 8192, MPV_MAX_K = 7, MPV_SEP_MAX = 4096 };

typedef struct {
    int H, W, OH, OW, k, s, pad, same;
    int nchunk;               // chunks of 16 outputs: of the plane (same) or of a row
    // Same: [nchunk][k*k] valid lanes. Rows: [nchunk][k][2] loaded elements (stride 2: of 32),
    // valid lanes.
    const uint32_t *mask;
    int32_t delta[MPV_MAX_K * MPV_MAX_K];
} mpv_plan;

// 0 if this geometry is not for these kernels.
static int mpv_plan_build(mpv_plan *P, uint32_t *store, int H, int W, int OH, int OW, int k,
                          int s, int pad) {
    if (k > MPV_MAX_K || (s != 1 && s != 2) || OH <= 0 || OW <= 0) return 0;
    *P = (mpv_plan){H, W, OH, OW, k, s, pad, s == 1 && OH == H && OW == W, 0, store, {0}};
    const int KK = k * k;
    if (P->same) {
        const int HW = H * W;
        P->nchunk = (HW + 15) / 16;
        if ((size_t)P->nchunk * KK > MPV_MAX_MASKS) return 0;
        for (int c = 0; c < KK; c++) P->delta[c] = (c / k - pad) * W + (c % k - pad);
        for (int j = 0; j < P->nchunk; j++)
            for (int c = 0; c < KK; c++) {
                uint32_t m = 0;
                for (int l = 0; l < 16; l++) {
                    const int q = 16 * j + l, h = q / W - pad + c / k, w = q % W - pad + c % k;
                    if (q < HW && h >= 0 && h < H && w >= 0 && w < W) m |= 1u << l;
                }
                store[(size_t)j * KK + c] = m;
            }
        return 1;
    }
    P->nchunk = (OW + 15) / 16;
    if ((size_t)P->nchunk * k * 2 > MPV_MAX_MASKS) return 0;
    // Lane l reads column ow*s - pad + kw; with stride 2 that is element 2l of the 32 loaded.
    for (int j = 0; j < P->nchunk; j++)
        for (int kw = 0; kw < k; kw++) {
            uint32_t load = 0, lanes = 0;
            for (int l = 0; l < 16; l++) {
                const int ow = 16 * j + l, w = ow * s - pad + kw;
                if (ow < OW && w >= 0 && w < W) {
                    lanes |= 1u << l;
                    load |= s == 1 ? 1u << l : 1u << (2 * l);
                }
            }
            store[((size_t)j * k + kw) * 2] = load;
            store[((size_t)j * k + kw) * 2 + 1] = lanes;
        }
    return 1;
}

// One candidate: v (lanes `valid`, element indices idx) against the running maximum m. With an
// argmax, `seen` marks lanes that had a candidate inside the input; a lane's first such
// candidate becomes its index until one is better (the reference's choice for a window of
// -inf only).
typedef struct { __m512 m; __m512i id; __mmask16 seen; } mpv_acc;

__attribute__((target("avx512f"))) static inline void mpv_update(mpv_acc *a, __mmask16 valid,
                                                                 __m512 v, __m512i idx,
                                                                 int with_arg) {
    const __mmask16 better = _mm512_mask_cmp_ps_mask(valid, v, a->m, _CMP_GT_OQ) |
                             _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q);
    a->m = _mm512_mask_mov_ps(a->m, better, v);
    if (with_arg) {
        a->id = _mm512_mask_mov_epi32(a->id, (__mmask16)(valid & ~a->seen) | better, idx);
        a->seen |= valid;
    }
}

// 16 floats of a plane of n from x + at: a plain load where they all lie inside the plane
// (masked loads stream at half the rate on some CPUs; the update's compare masks the lanes),
// else the lanes `valid` only (the address may then lie outside the buffer: never read).
__attribute__((target("avx512f"))) static inline __m512 mpv_load(const float *x, ptrdiff_t at,
                                                                 ptrdiff_t n, __mmask16 valid) {
    return at >= 0 && at + 16 <= n ? _mm512_loadu_ps(x + at)
                                   : _mm512_maskz_loadu_ps(valid, shifted(x, at));
}

__attribute__((target("avx512f"))) static inline void mpv_store(float *o, int32_t *arg,
                                                                const mpv_acc *a, int left,
                                                                int with_arg) {
    const __mmask16 lanes = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
    _mm512_mask_storeu_ps(o, lanes, a->m);
    if (with_arg) _mm512_mask_storeu_epi32(arg, lanes, a->id);
}

__attribute__((target("avx512f"), always_inline)) static inline void
maxpool_avx512_body(float *out, int32_t *arg, const float *in, size_t p0, size_t p1,
                    const mpv_plan *P, const int with_arg) {
    const int H = P->H, W = P->W, OH = P->OH, OW = P->OW, k = P->k, KK = k * k;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i evens = _mm512_slli_epi32(iota, 1);
    const __m512i step = P->s == 1 ? iota : evens;   // lane l reads column ... + s*l
    const mpv_acc empty = {_mm512_set1_ps(-INFINITY), _mm512_set1_epi32(-1), 0};
    for (size_t p = p0; p < p1; p++) {
        const float *x = in + p * H * W;
        float *o = out + p * OH * OW;
        int32_t *ar = with_arg ? arg + p * OH * OW : NULL;
        if (P->same && !with_arg && k == 3 && H * W <= MPV_SEP_MAX) {
            // Separable: each row's maxima of 3 (window columns in order), then of those the
            // maxima of 3 rows (in order). Each step keeps the first of equal values and the
            // last NaN, so the pick is the row-major window's: the same bits, 6 updates, not 9.
            float t[MPV_SEP_MAX];
            for (int pass = 0; pass < 2; pass++) {
                const float *src = pass ? t : x;
                float *dst = pass ? o : t;
                for (int j = 0; j < P->nchunk; j++) {
                    const uint32_t *mk = P->mask + (size_t)j * KK;
                    mpv_acc a = empty;
                    for (int e = 0; e < 3; e++) {
                        const int c = pass ? e * 3 + 1 : 3 + e;   // (dy, 1) or (1, dx)
                        const __mmask16 valid = (__mmask16)mk[c];
                        const ptrdiff_t at = 16 * (ptrdiff_t)j + P->delta[c];
                        mpv_update(&a, valid, mpv_load(src, at, H * W, valid), iota, 0);
                    }
                    mpv_store(dst + 16 * j, NULL, &a, H * W - 16 * j, 0);
                }
            }
            continue;
        }
        if (P->same) {
            for (int j = 0; j < P->nchunk; j++) {
                const uint32_t *mk = P->mask + (size_t)j * KK;
                mpv_acc a = empty;
                for (int c = 0; c < KK; c++) {
                    const __mmask16 valid = (__mmask16)mk[c];
                    const ptrdiff_t at = 16 * (ptrdiff_t)j + P->delta[c];
                    mpv_update(&a, valid, mpv_load(x, at, H * W, valid),
                               _mm512_add_epi32(iota, _mm512_set1_epi32((int)at)), with_arg);
                }
                mpv_store(o + 16 * j, with_arg ? ar + 16 * j : NULL, &a, H * W - 16 * j, with_arg);
            }
            continue;
        }
        for (int oh = 0; oh < OH; oh++) {
            const int h0 = oh * P->s - P->pad, hs = imax(h0, 0), he = imin(h0 + k, H);
            for (int j = 0; j < P->nchunk; j++) {
                const uint32_t *mk = P->mask + (size_t)j * k * 2;
                const int ow0 = 16 * j;
                mpv_acc a = empty;
                for (int h = hs; h < he; h++) {
                    for (int kw = 0; kw < k; kw++) {
                        const ptrdiff_t at = (ptrdiff_t)h * W + ow0 * P->s - P->pad + kw;
                        const uint32_t lm = mk[2 * kw];
                        const __mmask16 valid = (__mmask16)mk[2 * kw + 1];
                        // stride 2: the even ones of 32 consecutive inputs
                        const __m512 v =
                            P->s == 1 ? mpv_load(x, at, (ptrdiff_t)H * W, valid)
                                      : _mm512_permutex2var_ps(
                                            mpv_load(x, at, (ptrdiff_t)H * W, (__mmask16)lm), evens,
                                            mpv_load(x, at + 16, (ptrdiff_t)H * W, (__mmask16)(lm >> 16)));
                        mpv_update(&a, valid, v, _mm512_add_epi32(step, _mm512_set1_epi32((int)at)),
                                   with_arg);
                    }
                }
                mpv_store(o + (size_t)oh * OW + ow0, with_arg ? ar + (size_t)oh * OW + ow0 : NULL,
                          &a, OW - ow0, with_arg);
            }
        }
    }
}

__attribute__((target("avx512f"))) static void maxpool_direct_avx512(float *out, int32_t *arg,
                                                                   const float *in, size_t p0,
                                                                   size_t p1, const mpv_plan *P) {
    if (arg) maxpool_avx512_body(out, arg, in, p0, p1, P, 1);
    else maxpool_avx512_body(out, NULL, in, p0, p1, P, 0);
}

// ---------------------------------------------------------------------------------------------
// One copy of every kernel per ISA level

typedef struct {
    void (*bnb_sum)(double *, const float *, int, size_t, int);
    void (*bnb_ssd)(double *, const float *, int, size_t, int, const double *);
    void (*bnb_affine)(float *, const float *, int, size_t, size_t, int, const float *,
                       const float *, int);
    void (*bnb_bwd_sums)(double *, double *, const float *, const float *, int, size_t, size_t,
                         int, const float *, const float *, const float *, int);
    void (*bnb_bwd_apply)(float *, const float *, const float *, int, size_t, size_t, int,
                          const float *, const float *, const float *, const float *,
                          const float *, const float *, int);
    void (*bnb_bwd_apply_eval)(float *, const float *, const float *, int, size_t, size_t, int,
                               const float *, const float *, const float *, int);
    void (*relu_fwd)(float *, const float *, size_t);
    void (*relu_bwd)(float *, const float *, const float *, size_t);
    void (*add)(float *, const float *, size_t);
    void (*mul)(float *, const float *, const float *, size_t);
    void (*muladd)(float *, const float *, const float *, size_t);
    void (*maxpool)(float *, int32_t *, const float *, size_t, size_t, int, int, int, int, int,
                    int, int);
    void (*maxpool_table)(float *, int32_t *, const float *, size_t, size_t, const mp_table *);
} fast_kernels;

// The `relu` flag becomes a constant in each branch, so each loop is compiled without a test.
#define DEFINE_KERNELS(SFX, ATTR)                                                                \
    ATTR static void bnb_sum_##SFX(double *acc, const float *x, int N, size_t st, int L) {       \
        bnb_sum_body(acc, x, N, st, L);                                                          \
    }                                                                                            \
    ATTR static void bnb_ssd_##SFX(double *acc, const float *x, int N, size_t st, int L,         \
                                   const double *mean) {                                         \
        bnb_ssd_body(acc, x, N, st, L, mean);                                                    \
    }                                                                                            \
    ATTR static void bnb_affine_##SFX(float *o, const float *x, int N, size_t st, size_t os,    \
                                      int L, const float *a, const float *b, int relu) {         \
        if (relu) bnb_affine_body(o, x, N, st, os, L, a, b, 1);                                  \
        else bnb_affine_body(o, x, N, st, os, L, a, b, 0);                                       \
    }                                                                                            \
    ATTR static void bnb_bwd_sums_##SFX(double *a1, double *a2, const float *g, const float *x,  \
                                        int N, size_t st, size_t os, int L, const float *mean,   \
                                        const float *ra, const float *rb, int relu) {            \
        if (relu) bnb_bwd_sums_body(a1, a2, g, x, N, st, os, L, mean, ra, rb, 1);                \
        else bnb_bwd_sums_body(a1, a2, g, x, N, st, os, L, mean, ra, rb, 0);                     \
    }                                                                                            \
    ATTR static void bnb_bwd_apply_##SFX(float *dx, const float *g, const float *x, int N,       \
                                         size_t st, size_t os, int L, const float *gmean,        \
                                         const float *proj, const float *mean, const float *a,   \
                                         const float *ra, const float *rb, int mode) {           \
        switch (mode) { /* relu | overwrite << 1 */                                              \
        case 0: bnb_bwd_apply_body(dx, g, x, N, st, os, L, gmean, proj, mean, a, ra, rb, 0, 0); break; \
        case 1: bnb_bwd_apply_body(dx, g, x, N, st, os, L, gmean, proj, mean, a, ra, rb, 1, 0); break; \
        case 2: bnb_bwd_apply_body(dx, g, x, N, st, os, L, gmean, proj, mean, a, ra, rb, 0, 1); break; \
        default: bnb_bwd_apply_body(dx, g, x, N, st, os, L, gmean, proj, mean, a, ra, rb, 1, 1); \
        }                                                                                        \
    }                                                                                            \
    ATTR static void bnb_bwd_apply_eval_##SFX(float *dx, const float *g, const float *x, int N,  \
                                              size_t st, size_t os, int L, const float *a,       \
                                              const float *ra, const float *rb, int relu) {      \
        if (relu) bnb_bwd_apply_eval_body(dx, g, x, N, st, os, L, a, ra, rb, 1);                 \
        else bnb_bwd_apply_eval_body(dx, g, x, N, st, os, L, a, ra, rb, 0);                      \
    }                                                                                            \
    ATTR static void relu_fwd_##SFX(float *o, const float *x, size_t n) {                        \
        relu_fwd_body(o, x, n);                                                                  \
    }                                                                                            \
    ATTR static void relu_bwd_##SFX(float *dx, const float *g, const float *out, size_t n) {     \
        relu_bwd_body(dx, g, out, n);                                                            \
    }                                                                                            \
    ATTR static void add_##SFX(float *d, const float *s, size_t n) { add_body(d, s, n); }        \
    ATTR static void mul_##SFX(float *d, const float *a, const float *b, size_t n) {             \
        mul_body(d, a, b, n);                                                                    \
    }                                                                                            \
    ATTR static void muladd_##SFX(float *d, const float *a, const float *b, size_t n) {          \
        muladd_body(d, a, b, n);                                                                 \
    }                                                                                            \
    ATTR static void maxpool_##SFX(float *out, int32_t *arg, const float *in, size_t p0,         \
                                   size_t p1, int H, int W, int OH, int OW, int k, int s,        \
                                   int pad) {                                                    \
        maxpool_planes_body(out, arg, in, p0, p1, H, W, OH, OW, k, s, pad);                      \
    }                                                                                            \
    static const fast_kernels kernels_##SFX = {                                                  \
        bnb_sum_##SFX,  bnb_ssd_##SFX,                                                           \
        bnb_affine_##SFX, bnb_bwd_sums_##SFX, bnb_bwd_apply_##SFX, bnb_bwd_apply_eval_##SFX,     \
        relu_fwd_##SFX, relu_bwd_##SFX,                                                          \
        add_##SFX,      mul_##SFX,     muladd_##SFX,    maxpool_##SFX,                           \
        maxpool_table_##SFX,                                                                     \
    };

// The table kernel: AVX-512 and AVX2 have their own (masked loads and gathers).
static void maxpool_table_scalar(float *out, int32_t *arg, const float *in, size_t p0, size_t p1,
                                 const mp_table *T) {
    maxpool_table_body(out, arg, in, p0, p1, T);
}

DEFINE_KERNELS(scalar, )
DEFINE_KERNELS(avx2, __attribute__((target("avx2"))))
DEFINE_KERNELS(avx512, __attribute__((target("avx512f"))))

static const fast_kernels *kernels(void) {
    switch (cpu_isa()) {
    case CPU_ISA_AVX512: return &kernels_avx512;
    case CPU_ISA_AVX2: return &kernels_avx2;
    default: return &kernels_scalar;
    }
}

// ---------------------------------------------------------------------------------------------
// batchnorm2d

// Channels go in groups of G = BN_BLOCK / HW whole channels (one block), or, when a plane is
// longer than BN_BLOCK, one channel at a time in segments of BN_BLOCK positions. Which way
// depends only on HW, and every channel's sums are the same whichever group it falls in, so
// results do not depend on the thread count.

enum { BN_BLOCK = BN_BLOCK_MAX };

typedef struct {
    const fast_kernels *K;
    float *out, *save_mean, *save_invstd, *save_affine, *running_mean, *running_var;
    float *din, *dgamma, *dbeta;
    const float *in, *gamma, *beta, *dout, *mean_in, *invstd_in, *rvar_in, *affine_in;
    int N, C, HW, relu;
    size_t ostride;  // floats from one image's out (or dout) to the next's: C*HW when dense
    int overwrite;   // backward (train): din = gradient, not din += gradient
    float eps, momentum;
    cpu_claims claims;  // training passes: pieces of channels (bn_piece), claimed in turn
} bn_job;

static int bn_group(int HW) { return HW <= BN_BLOCK ? BN_BLOCK / HW : 1; }
// Training passes cut the channels into pieces of at most a group, ~8 a thread, that the
// threads claim in turn (a thread held up by the host leaves its pieces to the other).
static int bn_piece(const bn_job *j, int nt) {
    int p = (j->C + 8 * nt - 1) / (8 * nt), G = bn_group(j->HW);
    return p < G ? p : G;
}

static int bn_segments(int HW) { return HW <= BN_BLOCK ? 1 : (HW + BN_BLOCK - 1) / BN_BLOCK; }

// Segment s of group [c, c+nc): its offset in a sample's row and its length.
static void bn_segment(const bn_job *j, int c, int nc, int s, size_t *off, int *L) {
    if (j->HW <= BN_BLOCK) {
        *off = (size_t)c * j->HW;
        *L = nc * j->HW;
    } else {
        const int i0 = s * BN_BLOCK;
        *off = (size_t)c * j->HW + i0;
        *L = j->HW - i0 < BN_BLOCK ? j->HW - i0 : BN_BLOCK;
    }
}

// The group channel (0..nc-1) that position q of a segment belongs to.
static int bn_chan(const bn_job *j, int q) { return j->HW <= BN_BLOCK ? q / j->HW : 0; }

// tot[chan] += acc[q] for the segment's positions, in order.
static void bn_add_totals(double *tot, const double *acc, const bn_job *j, int L) {
    for (int q = 0; q < L; q++) tot[bn_chan(j, q)] += acc[q];
}

// Expands per-channel values v[0..nc) to per-position values e[0..L).
static void bn_expand_f(float *e, const float *v, const bn_job *j, int L) {
    for (int q = 0; q < L; q++) e[q] = v[bn_chan(j, q)];
}

// sum(x) and then sum((x - mean)^2) of channels [c, c+nc).
static void bn_group_sum(double *sum, const bn_job *j, int c, int nc) {
    const size_t stride = (size_t)j->C * j->HW;
    for (int k = 0; k < nc; k++) sum[k] = 0.0;
    for (int s = 0; s < bn_segments(j->HW); s++) {
        size_t off;
        int L;
        bn_segment(j, c, nc, s, &off, &L);
        double acc[BN_BLOCK] = {0};
        j->K->bnb_sum(acc, j->in + off, j->N, stride, L);
        bn_add_totals(sum, acc, j, L);
    }
}

static void bn_group_ssd(double *ssd, const bn_job *j, int c, int nc, const double *mean) {
    const size_t stride = (size_t)j->C * j->HW;
    for (int k = 0; k < nc; k++) ssd[k] = 0.0;
    for (int s = 0; s < bn_segments(j->HW); s++) {
        size_t off;
        int L;
        bn_segment(j, c, nc, s, &off, &L);
        double acc[BN_BLOCK] = {0}, mq[BN_BLOCK];
        for (int q = 0; q < L; q++) mq[q] = mean[bn_chan(j, q)];
        j->K->bnb_ssd(acc, j->in + off, j->N, stride, L, mq);
        bn_add_totals(ssd, acc, j, L);
    }
}

// out = x*a + b (then relu) for channels [c, c+nc).
static void bn_group_affine(const bn_job *j, int c, int nc, const float *a, const float *b) {
    const size_t stride = (size_t)j->C * j->HW;
    for (int s = 0; s < bn_segments(j->HW); s++) {
        size_t off;
        int L;
        bn_segment(j, c, nc, s, &off, &L);
        float aq[BN_BLOCK], bq[BN_BLOCK];
        bn_expand_f(aq, a, j, L);
        bn_expand_f(bq, b, j, L);
        j->K->bnb_affine(j->out + off, j->in + off, j->N, stride, j->ostride, L, aq, bq, j->relu);
    }
}

// sum(dy) and sum(dy * (x - mean)) of channels [c, c+nc), dy masked by the ReLU if fused
// (whose input the forward computed as x * ra + rb; per channel of the group).
static void bn_group_bwd_sums(double *sdy, double *sdyxm, const bn_job *j, int c, int nc,
                              const float *mean, const float *ra, const float *rb) {
    const size_t stride = (size_t)j->C * j->HW;
    for (int k = 0; k < nc; k++) sdy[k] = sdyxm[k] = 0.0;
    for (int s = 0; s < bn_segments(j->HW); s++) {
        size_t off;
        int L;
        bn_segment(j, c, nc, s, &off, &L);
        double a1[BN_BLOCK] = {0}, a2[BN_BLOCK] = {0};
        float mq[BN_BLOCK], raq[BN_BLOCK], rbq[BN_BLOCK];
        bn_expand_f(mq, mean, j, L);
        if (j->relu) { bn_expand_f(raq, ra, j, L); bn_expand_f(rbq, rb, j, L); }
        j->K->bnb_bwd_sums(a1, a2, j->dout + off, j->in + off, j->N, stride, j->ostride, L, mq,
                           raq, rbq, j->relu);
        bn_add_totals(sdy, a1, j, L);
        bn_add_totals(sdyxm, a2, j, L);
    }
}

// din += (dy - gmean - (x - mean) * proj) * a for channels [c, c+nc).
static void bn_group_bwd_apply(const bn_job *j, int c, int nc, const float *gmean,
                               const float *proj, const float *mean, const float *a,
                               const float *ra, const float *rb) {
    const size_t stride = (size_t)j->C * j->HW;
    for (int s = 0; s < bn_segments(j->HW); s++) {
        size_t off;
        int L;
        bn_segment(j, c, nc, s, &off, &L);
        float gq[BN_BLOCK], pq[BN_BLOCK], mq[BN_BLOCK], aq[BN_BLOCK], raq[BN_BLOCK], rbq[BN_BLOCK];
        bn_expand_f(gq, gmean, j, L);
        bn_expand_f(pq, proj, j, L);
        bn_expand_f(mq, mean, j, L);
        bn_expand_f(aq, a, j, L);
        if (j->relu) { bn_expand_f(raq, ra, j, L); bn_expand_f(rbq, rb, j, L); }
        j->K->bnb_bwd_apply(j->din + off, j->dout + off, j->in + off, j->N, stride, j->ostride, L,
                            gq, pq, mq, aq, raq, rbq, j->relu | j->overwrite << 1);
    }
}

// din += dy * a (eval) for channels [c, c+nc).
static void bn_group_bwd_apply_eval(const bn_job *j, int c, int nc, const float *a,
                                    const float *ra, const float *rb) {
    const size_t stride = (size_t)j->C * j->HW;
    for (int s = 0; s < bn_segments(j->HW); s++) {
        size_t off;
        int L;
        bn_segment(j, c, nc, s, &off, &L);
        float aq[BN_BLOCK], raq[BN_BLOCK], rbq[BN_BLOCK];
        bn_expand_f(aq, a, j, L);
        if (j->relu) { bn_expand_f(raq, ra, j, L); bn_expand_f(rbq, rb, j, L); }
        j->K->bnb_bwd_apply_eval(j->din + off, j->dout + off, j->in + off, j->N, stride,
                                 j->ostride, L, aq, raq, rbq, j->relu);
    }
}

// Training statistics of channels [c0, c0+nc): saved, running, and the affine out = x*a + b
// that normalises them (a[k], b[k] for channel c0 + k).
static void bn_piece_stats(bn_job *j, int c0, int nc, float *a, float *b) {
    const size_t M = (size_t)j->N * j->HW;
    double sum[BN_BLOCK], mean[BN_BLOCK], ssd[BN_BLOCK];
    bn_group_sum(sum, j, c0, nc);
    for (int k = 0; k < nc; k++) mean[k] = sum[k] / (double)M;
    bn_group_ssd(ssd, j, c0, nc, mean);
    for (int k = 0; k < nc; k++) {
        const int c = c0 + k;
        const double var = ssd[k] / (double)M;  // biased: used to normalise
        const double invstd = 1.0 / sqrt(var + j->eps);
        if (j->save_mean) j->save_mean[c] = (float)mean[k];
        if (j->save_invstd) j->save_invstd[c] = (float)invstd;
        if (j->running_mean)
            j->running_mean[c] =
                (float)((1.0 - j->momentum) * j->running_mean[c] + j->momentum * mean[k]);
        if (j->running_var) {
            const double uvar = M > 1 ? ssd[k] / (double)(M - 1) : NAN;  // as the reference
            j->running_var[c] =
                (float)((1.0 - j->momentum) * j->running_var[c] + j->momentum * uvar);
        }
        const double scale = invstd * (j->gamma ? j->gamma[c] : 1.0f);
        a[k] = (float)scale;
        b[k] = (float)((j->beta ? j->beta[c] : 0.0f) - mean[k] * scale);
        if (j->save_affine) { j->save_affine[c] = a[k]; j->save_affine[j->C + c] = b[k]; }
    }
}

static void bn_fwd_train_task(void *ctx, int t, int nt) {
    (void)t;
    bn_job *j = ctx;
    const int P = bn_piece(j, nt);
    float a[BN_BLOCK], b[BN_BLOCK];
    for (int c0; (c0 = P * cpu_claim(&j->claims)) < j->C;) {
        const int nc = j->C - c0 < P ? j->C - c0 : P;
        bn_piece_stats(j, c0, nc, a, b);
        bn_group_affine(j, c0, nc, a, b);
    }
}

// Empty tensors: nothing to do (and no HW to divide by).
static int bn_empty(int N, int C, int HW) { return N <= 0 || C <= 0 || HW <= 0; }

static int bn_threads(int N, int C, int HW) {
    int nt = threads_for((size_t)N * C * HW);
    return nt > C ? C : nt;
}

// Images' stride of out / dout: os, or dense (C*HW) when os is 0.
static size_t bn_ostride(ptrdiff_t os, int C, int HW) { return os ? (size_t)os : (size_t)C * HW; }

void batchnorm2d_fast_forward_train(float *out, ptrdiff_t os, float *save_mean, float *save_invstd,
                                    float *save_affine, float *running_mean, float *running_var,
                                    const float *in, const float *gamma, const float *beta,
                                    int N, int C, int HW, float eps, float momentum, int relu) {
    if (bn_empty(N, C, HW)) return;
    bn_job j = {.K = kernels(), .out = out, .ostride = bn_ostride(os, C, HW),
                .save_mean = save_mean, .save_invstd = save_invstd,
                .save_affine = save_affine, .running_mean = running_mean, .running_var = running_var, .in = in,
                .gamma = gamma, .beta = beta, .N = N, .C = C, .HW = HW, .relu = relu,
                .eps = eps, .momentum = momentum};
    cpu_parallel(bn_fwd_train_task, &j, bn_threads(N, C, HW));
}

static void bn_bwd_train_task(void *ctx, int t, int nt) {
    (void)t;
    bn_job *j = ctx;
    const size_t M = (size_t)j->N * j->HW;
    const int P = bn_piece(j, nt);
    double sdy[BN_BLOCK], sdyxm[BN_BLOCK];
    float gmean[BN_BLOCK], proj[BN_BLOCK], a[BN_BLOCK];
    for (int c0; (c0 = P * cpu_claim(&j->claims)) < j->C;) {
        const int nc = j->C - c0 < P ? j->C - c0 : P;
        const float *mean = j->mean_in + c0;
        const float *ra = j->relu ? j->affine_in + c0 : NULL;
        const float *rb = j->relu ? j->affine_in + j->C + c0 : NULL;
        bn_group_bwd_sums(sdy, sdyxm, j, c0, nc, mean, ra, rb);
        for (int k = 0; k < nc; k++) {
            const int c = c0 + k;
            const float invstd = j->invstd_in[c];
            if (j->dbeta) j->dbeta[c] += (float)sdy[k];
            if (j->dgamma) j->dgamma[c] += (float)(sdyxm[k] * invstd);
            // dx = gamma*invstd * (dy - mean(dy) - xhat * mean(dy*xhat)), as the reference.
            gmean[k] = (float)(sdy[k] / (double)M);
            proj[k] = (float)(sdyxm[k] * invstd * invstd / (double)M);
            a[k] = invstd * (j->gamma ? j->gamma[c] : 1.0f);
        }
        if (j->din) bn_group_bwd_apply(j, c0, nc, gmean, proj, mean, a, ra, rb);
    }
}

void batchnorm2d_fast_backward_train(float *din, float *dgamma, float *dbeta, const float *dout,
                                     ptrdiff_t os, const float *in, const float *gamma,
                                     const float *save_mean, const float *save_invstd,
                                     const float *save_affine, int N, int C, int HW, int flags) {
    if ((!din && !dgamma && !dbeta) || bn_empty(N, C, HW)) return;
    bn_job j = {.K = kernels(), .din = din, .dgamma = dgamma, .dbeta = dbeta, .dout = dout,
                .ostride = bn_ostride(os, C, HW),
                .in = in, .gamma = gamma, .mean_in = save_mean, .invstd_in = save_invstd,
                .affine_in = save_affine, .N = N, .C = C, .HW = HW,
                .relu = (flags & BN_FUSED_RELU) != 0, .overwrite = (flags & BN_DIN_OVERWRITE) != 0};
    cpu_parallel(bn_bwd_train_task, &j, bn_threads(N, C, HW));
}

static void bn_fwd_eval_task(void *ctx, int t, int nt) {
    const bn_job *j = ctx;
    const int G = bn_group(j->HW);
    size_t lo, hi;
    cpu_part_range((size_t)j->C, t, nt, &lo, &hi);
    float a[BN_BLOCK], b[BN_BLOCK];
    for (int c0 = (int)lo; c0 < (int)hi; c0 += G) {
        const int nc = (int)hi - c0 < G ? (int)hi - c0 : G;
        for (int k = 0; k < nc; k++) {
            const int c = c0 + k;
            const double scale =
                (j->gamma ? j->gamma[c] : 1.0f) / sqrt((double)j->rvar_in[c] + j->eps);
            a[k] = (float)scale;
            b[k] = (float)((j->beta ? j->beta[c] : 0.0f) - j->mean_in[c] * scale);
        }
        bn_group_affine(j, c0, nc, a, b);
    }
}

void batchnorm2d_fast_forward_eval(float *out, ptrdiff_t os, const float *in,
                                   const float *gamma, const float *beta,
                                   const float *running_mean, const float *running_var, int N,
                                   int C, int HW, float eps, int relu) {
    if (bn_empty(N, C, HW)) return;
    bn_job j = {.K = kernels(), .out = out, .ostride = bn_ostride(os, C, HW), .in = in, .gamma = gamma, .beta = beta,
                .mean_in = running_mean, .rvar_in = running_var, .N = N, .C = C, .HW = HW,
                .relu = relu, .eps = eps};
    cpu_parallel(bn_fwd_eval_task, &j, bn_threads(N, C, HW));
}

static void bn_bwd_eval_task(void *ctx, int t, int nt) {
    const bn_job *j = ctx;
    const int G = bn_group(j->HW);
    size_t lo, hi;
    cpu_part_range((size_t)j->C, t, nt, &lo, &hi);
    double sdy[BN_BLOCK], sdyxm[BN_BLOCK];
    float a[BN_BLOCK], ra[BN_BLOCK], rb[BN_BLOCK];
    for (int c0 = (int)lo; c0 < (int)hi; c0 += G) {
        const int nc = (int)hi - c0 < G ? (int)hi - c0 : G;
        for (int k = 0; k < nc && j->relu; k++) {   // the forward's affine, as bn_fwd_eval_task
            const int c = c0 + k;
            const double scale =
                (j->gamma ? j->gamma[c] : 1.0f) / sqrt((double)j->rvar_in[c] + j->eps);
            ra[k] = (float)scale;
            rb[k] = (float)((j->beta ? j->beta[c] : 0.0f) - j->mean_in[c] * scale);
        }
        if (j->dgamma || j->dbeta) bn_group_bwd_sums(sdy, sdyxm, j, c0, nc, j->mean_in + c0, ra, rb);
        for (int k = 0; k < nc; k++) {
            const int c = c0 + k;
            const double invstd = 1.0 / sqrt((double)j->rvar_in[c] + j->eps);
            if (j->dbeta) j->dbeta[c] += (float)sdy[k];
            if (j->dgamma) j->dgamma[c] += (float)(sdyxm[k] * invstd);
            a[k] = (float)(invstd * (j->gamma ? j->gamma[c] : 1.0f));
        }
        if (j->din) bn_group_bwd_apply_eval(j, c0, nc, a, ra, rb);
    }
}

void batchnorm2d_fast_backward_eval(float *din, float *dgamma, float *dbeta, const float *dout,
                                    ptrdiff_t os, const float *in, const float *gamma,
                                    const float *beta, const float *running_mean,
                                    const float *running_var, int N, int C, int HW, float eps,
                                    int relu) {
    if ((!din && !dgamma && !dbeta) || bn_empty(N, C, HW)) return;
    bn_job j = {.K = kernels(), .din = din, .dgamma = dgamma, .dbeta = dbeta, .dout = dout,
                .ostride = bn_ostride(os, C, HW),
                .in = in, .gamma = gamma, .beta = beta, .mean_in = running_mean,
                .rvar_in = running_var, .N = N, .C = C, .HW = HW, .relu = relu, .eps = eps};
    cpu_parallel(bn_bwd_eval_task, &j, bn_threads(N, C, HW));
}

// ---------------------------------------------------------------------------------------------
// Element-wise ops, split into contiguous element ranges

typedef enum { EW_RELU_FWD, EW_RELU_BWD, EW_ADD, EW_COPY, EW_ZERO, EW_MUL, EW_MULADD } ew_op;

typedef struct {
    const fast_kernels *K;
    ew_op op;
    float *dst;
    const float *a, *b;
    size_t n;
} ew_job;

static void ew_task(void *ctx, int t, int nt) {
    const ew_job *j = ctx;
    size_t lo, hi;
    cpu_part_range(j->n, t, nt, &lo, &hi);
    const size_t len = hi - lo;
    float *d = j->dst + lo;
    const float *a = j->a ? j->a + lo : NULL, *b = j->b ? j->b + lo : NULL;
    switch (j->op) {
    case EW_RELU_FWD: j->K->relu_fwd(d, a, len); break;
    case EW_RELU_BWD: j->K->relu_bwd(d, a, b, len); break;
    case EW_ADD: j->K->add(d, a, len); break;
    case EW_COPY: memcpy(d, a, len * sizeof(float)); break;
    case EW_ZERO: memset(d, 0, len * sizeof(float)); break;
    case EW_MUL: j->K->mul(d, a, b, len); break;
    case EW_MULADD: j->K->muladd(d, a, b, len); break;
    }
}

static void ew_run(ew_op op, float *dst, const float *a, const float *b, size_t n) {
    if (n == 0) return;
    ew_job j = {.K = kernels(), .op = op, .dst = dst, .a = a, .b = b, .n = n};
    cpu_parallel(ew_task, &j, threads_for(n));
}

void relu_fast_forward(float *out, const float *in, size_t n) {
    ew_run(EW_RELU_FWD, out, in, NULL, n);
}

void relu_fast_backward(float *din, const float *dout, const float *out, size_t n) {
    if (din) ew_run(EW_RELU_BWD, din, dout, out, n);
}

void tensor_fast_zero(float *x, size_t n) { ew_run(EW_ZERO, x, NULL, NULL, n); }
void tensor_fast_copy(float *dst, const float *src, size_t n) { ew_run(EW_COPY, dst, src, NULL, n); }
void tensor_fast_add(float *dst, const float *src, size_t n) { ew_run(EW_ADD, dst, src, NULL, n); }

void dropout_fast_forward(float *out, float *mask, const float *in, size_t n, float p, rng *r) {
    // The draws are sequential by nature; only the multiply is spread over the threads.
    // rng_uniform(r) < p, with the state in registers: the uniform is k * 2^-53 for the top 53
    // bits k of a draw, so the test is k < p * 2^53 (exact in double), i.e. k < its ceiling.
    const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    if (p <= 0.0f || p >= 1.0f) {
        for (size_t i = 0; i < n; i++) mask[i] = p <= 0.0f ? 1.0f : 0.0f;
    } else {
        const uint64_t threshold = (uint64_t)ceil((double)p * 0x1.0p53);
        rng s = *r;
        for (size_t i = 0; i < n; i++)   // (branch-free: a kept element is a coin flip)
            mask[i] = scale * (float)(rng_u64(&s) >> 11 >= threshold);
        *r = s;
    }
    ew_run(EW_MUL, out, in, mask, n);
}

void dropout_fast_backward(float *din, const float *dout, const float *mask, size_t n) {
    if (din) ew_run(EW_MULADD, din, dout, mask, n);
}

// ---------------------------------------------------------------------------------------------
// Pooling, split by planes

typedef struct {
    const fast_kernels *K;
    float *out;
    int32_t *arg;
    const int32_t *carg;
    const float *in;
    size_t planes;
    int H, W, OH, OW, k, s, pad;
    int overwrite;          // max pool backward: out = the gradient (else +=)
} pool_job;

// The kernel max pool uses for one geometry, with its tables (built in place: never copied).
typedef struct {
    const fast_kernels *K;
    int H, W, OH, OW, k, s, pad;
    int direct;                       // maxpool_direct_avx512 with P
    mpv_plan P;
    uint32_t masks[MPV_MAX_MASKS];
    int table;                        // else maxpool_table with T, else the row kernel
    mp_table T;
    int32_t store[MP_TABLE_INTS];
} mp_kernel;

static void mp_kernel_init(mp_kernel *mk, int H, int W, int OH, int OW, int k, int s, int pad) {
    mk->K = kernels();
    mk->H = H, mk->W = W, mk->OH = OH, mk->OW = OW, mk->k = k, mk->s = s, mk->pad = pad;
    mk->direct = mk->table = 0;
    if (cpu_isa() == CPU_ISA_AVX512) {
        // Narrow outputs fill few lanes of a row (or of a small plane): the table kernel
        // packs several planes into each vector there (2x2 maps: ~4x faster; 8x8 -> 4x4 with
        // stride 2: 5.4 -> 1.8 ms in 64-px GoogLeNet training, where the rows fill 4 lanes;
        // 16x16 -> 8x8: 3.2 -> 2.2 ms; 3x3/1 on 4x4 planes: 0.94 -> 0.71 ms; on 8x8 planes the
        // direct kernel stays ahead, 1.45 vs 1.57 ms).
        const int wide = s == 1 && OH == H && OW == W ? H * W > 16 : OW > 8;
        mk->direct = wide && mpv_plan_build(&mk->P, mk->masks, H, W, OH, OW, k, s, pad);
        if (mk->direct) return;
    }
    mk->table = mp_table_build(&mk->T, mk->store, H, W, OH, OW, k, s, pad);
}

// Planes [p0, p1) of in into out and arg (NULL: none), on this thread.
static void mp_kernel_run(const mp_kernel *mk, float *out, int32_t *arg, const float *in,
                          size_t p0, size_t p1) {
    if (mk->direct) maxpool_direct_avx512(out, arg, in, p0, p1, &mk->P);
    else if (mk->table) mk->K->maxpool_table(out, arg, in, p0, p1, &mk->T);
    else mk->K->maxpool(out, arg, in, p0, p1, mk->H, mk->W, mk->OH, mk->OW, mk->k, mk->s, mk->pad);
}

typedef struct {
    const mp_kernel *mk;
    float *out;
    int32_t *arg;
    const float *in;
    size_t planes;
} mp_job;

static void maxpool_fwd_task(void *ctx, int t, int nt) {
    const mp_job *j = ctx;
    // The table kernel takes whole blocks of planes: block boundaries do not change results,
    // only speed.
    const size_t B = j->mk->table ? (size_t)j->mk->T.B : 1, nblk = (j->planes + B - 1) / B;
    size_t p0, p1;
    cpu_part_range(nblk, t, nt, &p0, &p1);
    p0 *= B;
    p1 = p1 * B < j->planes ? p1 * B : j->planes;
    if (p0 < p1) mp_kernel_run(j->mk, j->out, j->arg, j->in, p0, p1);
}

void maxpool2d_fast_forward(float *out, int32_t *argmax, const float *in, int N, int C, int H,
                            int W, int k, int stride, int pad, int ceil_mode) {
    const int OH = pool_out_size(H, k, stride, pad, ceil_mode);
    const int OW = pool_out_size(W, k, stride, pad, ceil_mode);
    mp_kernel mk;
    mp_kernel_init(&mk, H, W, OH, OW, k, stride, pad);
    mp_job j = {&mk, out, argmax, in, (size_t)N * C};
    cpu_parallel(maxpool_fwd_task, &j, threads_for(j.planes * H * W));
}

// ---- batch norm + ReLU + max pool (training forward) ----
typedef struct {
    bn_job bn;
    const mp_kernel *mk;
    float *pool_out;
    int32_t *arg;
} bn_pool_job;

static void bn_pool_fwd_task(void *ctx, int t, int nt) {
    (void)t;
    bn_pool_job *bp = ctx;
    bn_job *j = &bp->bn;
    const int P = bn_piece(j, nt), HW = j->HW;
    const size_t ohw = (size_t)bp->mk->OH * bp->mk->OW, img = (size_t)j->C * HW;
    float a[BN_BLOCK], b[BN_BLOCK], aq[BN_BLOCK], bq[BN_BLOCK];
    _Static_assert((int)BN_POOL_MAX_HW >= (int)BN_BLOCK, "a piece's planes fit in y");
    float y[BN_POOL_MAX_HW];
    for (int c0; (c0 = P * cpu_claim(&j->claims)) < j->C;) {
        const int nc = j->C - c0 < P ? j->C - c0 : P;
        bn_piece_stats(j, c0, nc, a, b);
        // Every segment of the piece has segment 0's per-position a and b: a group of whole
        // channels is one segment, and a long plane's segments are one channel's.
        size_t off0;
        int L0;
        bn_segment(j, c0, nc, 0, &off0, &L0);
        bn_expand_f(aq, a, j, L0);
        bn_expand_f(bq, b, j, L0);
        for (int n = 0; n < j->N; n++) {
            // y: planes c0.. of image n after BN and ReLU (bn_group_affine's bits), then pooled
            for (int s = 0; s < bn_segments(HW); s++) {
                size_t off;
                int L;
                bn_segment(j, c0, nc, s, &off, &L);
                j->K->bnb_affine(y + (off - off0), j->in + n * img + off, 1, 0, 0, L, aq, bq, 1);
            }
            const size_t p = (size_t)n * j->C + c0;
            mp_kernel_run(bp->mk, bp->pool_out + p * ohw, bp->arg ? bp->arg + p * ohw : NULL, y,
                          0, (size_t)nc);
        }
    }
}

void batchnorm2d_relu_maxpool_fast_forward_train(
    float *pool_out, int32_t *argmax, float *save_mean, float *save_invstd, float *save_affine,
    float *running_mean, float *running_var, const float *in, const float *gamma,
    const float *beta, int N, int C, int H, int W, float eps, float momentum, int k, int stride,
    int pad, int ceil_mode) {
    const int HW = H * W;
    if (bn_empty(N, C, HW)) return;
    if (HW > BN_POOL_MAX_HW) abort();   // the caller's contract (fast_ops.h)
    mp_kernel mk;
    mp_kernel_init(&mk, H, W, pool_out_size(H, k, stride, pad, ceil_mode),
                   pool_out_size(W, k, stride, pad, ceil_mode), k, stride, pad);
    bn_pool_job bp = {.bn = {.K = kernels(), .save_mean = save_mean, .save_invstd = save_invstd,
                             .save_affine = save_affine, .running_mean = running_mean,
                             .running_var = running_var, .in = in, .gamma = gamma, .beta = beta,
                             .N = N, .C = C, .HW = HW, .relu = 1, .eps = eps,
                             .momentum = momentum},
                      .mk = &mk, .pool_out = pool_out, .arg = argmax};
    cpu_parallel(bn_pool_fwd_task, &bp, bn_threads(N, C, HW));
}

static void maxpool_bwd_task(void *ctx, int t, int nt) {
    const pool_job *j = ctx;
    size_t p0, p1;
    cpu_part_range(j->planes, t, nt, &p0, &p1);
    const size_t ip = (size_t)j->H * j->W, op = (size_t)j->OH * j->OW;
    // overwrite: zeroed a few KiB of planes at a time, just before their scatter (hot in cache,
    // and not one memset call per 2x2 plane)
    const size_t zb = ip >= 1024 ? 1 : 1024 / ip;
    for (size_t p = p0; p < p1; p++) {
        float *dx = j->out + p * ip;
        const float *g = j->in + p * op;
        const int32_t *a = j->carg + p * op;
        if (j->overwrite && (p - p0) % zb == 0)
            memset(dx, 0, (p1 - p < zb ? p1 - p : zb) * ip * sizeof(float));
        // The unsigned compare also skips -1 (an all-padding window) and keeps a stale or
        // corrupt index from writing outside the plane.
        for (size_t i = 0; i < op; i++)
            if ((uint32_t)a[i] < (uint32_t)ip) dx[a[i]] += g[i];
    }
}

// Backward of a stride-1 pool that keeps the plane size (k = 2*pad + 1: GoogLeNet's branch-4
// 3x3/1 pools) on small planes, as a gather: each input position adds the gradients of the
// outputs whose argmax it is, in output order (the scatter's order, so the same sums), 16
// positions a vector (several whole planes a vector when a plane is shorter). The outputs seen
// through one tap are the plane shifted by (pad-ky)*W + (pad-kx): a load, not a gather.
enum { MPB_MAX_K = 5, MPB_MAX_PLANE = 256 };

static int maxpool_bwd_same_fits(int H, int W, int OH, int OW, int k, int s, int pad) {
    const int ip = H * W;
    return cpu_isa() == CPU_ISA_AVX512 && s == 1 && OH == H && OW == W && k == 2 * pad + 1 &&
           k <= MPB_MAX_K && ip <= MPB_MAX_PLANE && (16 % ip == 0 || ip % 16 == 0);
}

__attribute__((target("avx512f"))) static void maxpool_bwd_same_task(void *ctx, int t, int nt) {
    const pool_job *j = ctx;
    const int H = j->H, W = j->W, k = j->k, pad = j->pad, ip = H * W, kk = k * k;
    const int group = ip >= 16 ? 1 : 16 / ip;     // planes per vector
    const int per = ip >= 16 ? ip / 16 : 1;       // vectors per plane
    // Per vector of a plane (group): each lane's position in its plane, and per tap (in output
    // order) the lanes whose output lies inside the plane.
    int32_t pos[MPB_MAX_PLANE];
    __mmask16 valid[MPB_MAX_PLANE / 16][MPB_MAX_K * MPB_MAX_K];
    int shift[MPB_MAX_K * MPB_MAX_K];
    for (int v = 0; v < per; v++)
        for (int l = 0; l < 16; l++) pos[v * 16 + l] = ip >= 16 ? v * 16 + l : l % ip;
    for (int ky = k - 1, q = 0; ky >= 0; ky--)
        for (int kx = k - 1; kx >= 0; kx--, q++) {
            shift[q] = (pad - ky) * W + (pad - kx);
            for (int v = 0; v < per; v++) {
                unsigned m = 0;
                for (int l = 0; l < 16; l++) {
                    const int at = pos[v * 16 + l], y = at / W + pad - ky, x = at % W + pad - kx;
                    if (y >= 0 && y < H && x >= 0 && x < W) m |= 1u << l;
                }
                valid[v][q] = (__mmask16)m;
            }
        }
    size_t p0, p1;   // in groups of planes
    const size_t ngroups = (j->planes + group - 1) / group;
    cpu_part_range(ngroups, t, nt, &p0, &p1);
    for (size_t gi = p0; gi < p1; gi++) {
        const size_t first = gi * group;
        const size_t np = j->planes - first < (size_t)group ? j->planes - first : (size_t)group;
        const __mmask16 used = np * ip >= 16 ? 0xFFFF : (__mmask16)((1u << (np * ip)) - 1);
        for (int v = 0; v < per; v++) {
            const size_t at = first * ip + (size_t)v * 16;
            const __m512i pv = _mm512_loadu_si512(pos + v * 16);
            __m512 acc =
                j->overwrite ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(used, j->out + at);
            for (int q = 0; q < kk; q++) {
                const __mmask16 vm = valid[v][q] & used;
                const __m512i av = _mm512_maskz_loadu_epi32(vm, j->carg + at + shift[q]);
                const __mmask16 hit = _mm512_mask_cmpeq_epi32_mask(vm, av, pv);
                const __m512 gv = _mm512_maskz_loadu_ps(hit, j->in + at + shift[q]);
                acc = _mm512_mask_add_ps(acc, hit, acc, gv);
            }
            _mm512_mask_storeu_ps(j->out + at, used, acc);
        }
    }
}

void maxpool2d_fast_backward(float *din, const float *dout, const int32_t *argmax, int N, int C,
                             int H, int W, int k, int stride, int pad, int ceil_mode,
                             int overwrite) {
    if (!din) return;
    pool_job j = {.out = din, .carg = argmax, .in = dout, .planes = (size_t)N * C, .H = H,
                  .W = W, .OH = pool_out_size(H, k, stride, pad, ceil_mode),
                  .OW = pool_out_size(W, k, stride, pad, ceil_mode), .k = k, .s = stride,
                  .pad = pad, .overwrite = overwrite};
    int nt = threads_for(j.planes * H * W);
    const int same = maxpool_bwd_same_fits(H, W, j.OH, j.OW, k, stride, pad);
    cpu_parallel(same ? maxpool_bwd_same_task : maxpool_bwd_task, &j, nt);
}

// The reference loops treat the N*C planes alike, so a range of planes is a smaller problem of
// the same op: each thread runs the reference on its planes (the same bits, no new code).
// Windows of the adaptive pool (pool.c's formulas), computed once per call instead of per
// output; the loops are then the reference's, in its order, so the bits are the same.
enum { AP_MAX = 64 };
typedef struct { int h0[AP_MAX], h1[AP_MAX], w0[AP_MAX], w1[AP_MAX]; } ap_windows;

static int ap_windows_make(ap_windows *a, int H, int W, int OH, int OW) {
    if (OH > AP_MAX || OW > AP_MAX) return 0;
    for (int i = 0; i < OH; i++) {
        a->h0[i] = (int)(((long long)i * H) / OH);
        a->h1[i] = (int)(((long long)(i + 1) * H + OH - 1) / OH);
    }
    for (int i = 0; i < OW; i++) {
        a->w0[i] = (int)(((long long)i * W) / OW);
        a->w1[i] = (int)(((long long)(i + 1) * W + OW - 1) / OW);
    }
    return 1;
}

static void adaptive_fwd_task(void *ctx, int t, int nt) {
    const pool_job *j = ctx;
    size_t p0, p1;
    cpu_part_range(j->planes, t, nt, &p0, &p1);
    if (j->H == j->OH && j->W == j->OW) {
        // Each window is one element: the reference's 0 + x, divided by 1 (-0 becomes +0).
        const size_t hw = (size_t)j->H * j->W;
        float *o = j->out + p0 * hw;
        const float *x = j->in + p0 * hw;
        for (size_t i = 0; i < (p1 - p0) * hw; i++) o[i] = 0.0f + x[i];
        return;
    }
    ap_windows a;
    if (ap_windows_make(&a, j->H, j->W, j->OH, j->OW)) {
        const int H = j->H, W = j->W, OH = j->OH, OW = j->OW;
        for (size_t p = p0; p < p1; p++) {
            const float *x = j->in + p * H * W;
            float *o = j->out + p * OH * OW;
            for (int oh = 0; oh < OH; oh++)
                for (int ow = 0; ow < OW; ow++) {
                    float s = 0.0f;
                    for (int h = a.h0[oh]; h < a.h1[oh]; h++)
                        for (int w = a.w0[ow]; w < a.w1[ow]; w++) s += x[h * W + w];
                    o[oh * OW + ow] = s / (float)((a.h1[oh] - a.h0[oh]) * (a.w1[ow] - a.w0[ow]));
                }
        }
        return;
    }
    if (p1 > p0)
        adaptive_avgpool2d_forward(j->out + p0 * j->OH * j->OW, j->in + p0 * j->H * j->W, 1,
                                   (int)(p1 - p0), j->H, j->W, j->OH, j->OW);
}

static void adaptive_bwd_task(void *ctx, int t, int nt) {
    const pool_job *j = ctx;
    size_t p0, p1;
    cpu_part_range(j->planes, t, nt, &p0, &p1);
    if (j->H == j->OH && j->W == j->OW) {   // dx += g / 1
        const size_t hw = (size_t)j->H * j->W;
        if (p1 > p0) j->K->add(j->out + p0 * hw, j->in + p0 * hw, (p1 - p0) * hw);
        return;
    }
    ap_windows a;
    if (ap_windows_make(&a, j->H, j->W, j->OH, j->OW)) {
        const int H = j->H, W = j->W, OH = j->OH, OW = j->OW;
        for (size_t p = p0; p < p1; p++) {
            const float *g = j->in + p * OH * OW;
            float *dx = j->out + p * H * W;
            for (int oh = 0; oh < OH; oh++)
                for (int ow = 0; ow < OW; ow++) {
                    const float gv = g[oh * OW + ow] /
                                     (float)((a.h1[oh] - a.h0[oh]) * (a.w1[ow] - a.w0[ow]));
                    for (int h = a.h0[oh]; h < a.h1[oh]; h++)
                        for (int w = a.w0[ow]; w < a.w1[ow]; w++) dx[h * W + w] += gv;
                }
        }
        return;
    }
    if (p1 > p0)
        adaptive_avgpool2d_backward(j->out + p0 * j->H * j->W, j->in + p0 * j->OH * j->OW, 1,
                                    (int)(p1 - p0), j->H, j->W, j->OH, j->OW);
}

void adaptive_avgpool2d_fast_forward(float *out, const float *in, int N, int C, int H, int W,
                                     int OH, int OW) {
    pool_job j = {.K = kernels(), .out = out, .in = in, .planes = (size_t)N * C, .H = H, .W = W,
                  .OH = OH, .OW = OW};
    cpu_parallel(adaptive_fwd_task, &j, threads_for(j.planes * H * W));
}

void adaptive_avgpool2d_fast_backward(float *din, const float *dout, int N, int C, int H, int W,
                                      int OH, int OW) {
    if (!din) return;
    pool_job j = {.K = kernels(), .out = din, .in = dout, .planes = (size_t)N * C, .H = H,
                  .W = W, .OH = OH, .OW = OW};
    cpu_parallel(adaptive_bwd_task, &j, threads_for(j.planes * H * W));
}

// ---------------------------------------------------------------------------------------------
// Concat: pieces (sample n, input i) of Cs[i]*HW contiguous floats, split between threads.

typedef struct {
    const fast_kernels *K;
    float *out;
    const float *const *ins;
    float *const *dins;
    const float *dout;
    const int *Cs;
    int n_in, N, HW, Ctot;
    unsigned overwrite;   // backward: bit i set: dins[i] = its slice (else += it)
} concat_job;

static void concat_task(void *ctx, int t, int nt) {
    const concat_job *j = ctx;
    size_t q0, q1;
    cpu_part_range((size_t)j->N * j->n_in, t, nt, &q0, &q1);
    for (size_t q = q0; q < q1; q++) {
        const int n = (int)(q / j->n_in), i = (int)(q % j->n_in);
        size_t at = 0;  // channel offset of input i
        for (int k = 0; k < i; k++) at += j->Cs[k];
        const size_t len = (size_t)j->Cs[i] * j->HW;
        const size_t o = ((size_t)n * j->Ctot + at) * j->HW;
        if (j->out) memcpy(j->out + o, j->ins[i] + (size_t)n * len, len * sizeof(float));
        else if (j->dins[i] && (j->overwrite >> i & 1))
            memcpy(j->dins[i] + (size_t)n * len, j->dout + o, len * sizeof(float));
        else if (j->dins[i]) j->K->add(j->dins[i] + (size_t)n * len, j->dout + o, len);
    }
}

void concat_fast_forward(float *out, const float *const *ins, const int *Cs, int n_in, int N,
                         int HW) {
    concat_job j = {.K = kernels(), .out = out, .ins = ins, .Cs = Cs, .n_in = n_in, .N = N,
                    .HW = HW};
    for (int i = 0; i < n_in; i++) j.Ctot += Cs[i];
    cpu_parallel(concat_task, &j, threads_for((size_t)N * j.Ctot * HW));
}

void concat_fast_backward(float *const *dins, const float *dout, const int *Cs, int n_in, int N,
                          int HW, unsigned overwrite) {
    concat_job j = {.K = kernels(), .dins = dins, .dout = dout, .Cs = Cs, .n_in = n_in, .N = N,
                    .HW = HW, .overwrite = overwrite};
    for (int i = 0; i < n_in; i++) j.Ctot += Cs[i];
    cpu_parallel(concat_task, &j, threads_for((size_t)N * j.Ctot * HW));
}
