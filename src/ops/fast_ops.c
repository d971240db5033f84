// Fast versions of the memory-bound ops (see fast_ops.h).
//
// Each kernel is written once as a plain loop (an always-inline "body") and compiled three
// times, for AVX-512F, AVX2 and baseline x86-64; cpu_isa() picks the copy. The arithmetic is
// the same in every copy (ISO C mode: no FMA contraction; no reassociation without
// -ffast-math), so every ISA level gives the same bits. Double-precision sums use 8 explicit
// interleaved partial sums, a fixed order the compiler can vectorise without changing it.
//
// Threads split the work by channels (batchnorm: one channel's reduction is done by one
// thread) or by planes / element ranges, never by anything that changes an order of additions.
#include "ops/fast_ops.h"
#include "ops/cpu.h"
#include "ops/ops.h"
#include <math.h>
#include <string.h>

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF  // clang would otherwise fuse x*a+b into an FMA (gcc: ISO C = off)
#endif

#define AI static inline __attribute__((always_inline))

// Below this many elements per thread, waking a worker costs more than it saves.
enum { MIN_WORK_PER_THREAD = 16384 };

static int threads_for(size_t work) {
    size_t n = work / MIN_WORK_PER_THREAD;
    int max = cpu_threads();
    if (n < 1) n = 1;
    return n < (size_t)max ? (int)n : max;
}

// Part t of n of [0, total).
static void part_range(size_t total, int t, int n, size_t *lo, size_t *hi) {
    *lo = total * (size_t)t / (size_t)n;
    *hi = total * (size_t)(t + 1) / (size_t)n;
}

// ---------------------------------------------------------------------------------------------
// Kernel bodies

enum { LANES = 8 };

AI double lanes_total(const double *a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// Sum of one channel: N planes of HW values, `stride` floats apart.
AI double bn_sum_body(const float *x, int N, size_t stride, int HW) {
    double acc[LANES] = {0};
    for (int n = 0; n < N; n++) {
        const float *p = x + (size_t)n * stride;
        int i = 0;
        for (; i + LANES <= HW; i += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += p[i + j];
        for (; i < HW; i++) acc[i % LANES] += p[i];
    }
    return lanes_total(acc);
}

// Sum of squared deviations from mean (the reference's second pass).
AI double bn_ssd_body(const float *x, int N, size_t stride, int HW, double mean) {
    double acc[LANES] = {0};
    for (int n = 0; n < N; n++) {
        const float *p = x + (size_t)n * stride;
        int i = 0;
        for (; i + LANES <= HW; i += LANES)
            for (int j = 0; j < LANES; j++) {
                double d = p[i + j] - mean;
                acc[j] += d * d;
            }
        for (; i < HW; i++) {
            double d = p[i] - mean;
            acc[i % LANES] += d * d;
        }
    }
    return lanes_total(acc);
}

// o = x*a + b, then relu as relu_forward (`v <= 0 ? 0 : v` keeps NaN).
AI void bn_affine_body(float *o, const float *x, int N, size_t stride, int HW, float a, float b,
                       int relu) {
    for (int n = 0; n < N; n++) {
        const float *p = x + (size_t)n * stride;
        float *q = o + (size_t)n * stride;
        if (relu)
            for (int i = 0; i < HW; i++) {
                float v = p[i] * a + b;
                q[i] = v <= 0.0f ? 0.0f : v;
            }
        else
            for (int i = 0; i < HW; i++) q[i] = p[i] * a + b;
    }
}

// The gradient reaching the BN output: dout, masked by the ReLU output when fused
// (relu_backward: zero where out <= 0; a NaN output passes its gradient).
AI float bn_grad(const float *g, const float *out, int i, int relu) {
    return relu ? (out[i] <= 0.0f ? 0.0f : g[i]) : g[i];
}

// sum(dy) and sum(dy * (x - mean)) for one channel, with the reference's per-term arithmetic.
AI void bn_bwd_sums_body(double *sum_dy, double *sum_dy_xm, const float *g, const float *out,
                         const float *x, int N, size_t stride, int HW, float mean, int relu) {
    double a1[LANES] = {0}, a2[LANES] = {0};
    for (int n = 0; n < N; n++) {
        const size_t off = (size_t)n * stride;
        const float *gp = g + off, *op = relu ? out + off : NULL, *xp = x + off;
        int i = 0;
        for (; i + LANES <= HW; i += LANES)
            for (int j = 0; j < LANES; j++) {
                float gv = bn_grad(gp, op, i + j, relu);
                a1[j] += gv;
                a2[j] += (double)gv * (xp[i + j] - mean);
            }
        for (; i < HW; i++) {
            float gv = bn_grad(gp, op, i, relu);
            a1[i % LANES] += gv;
            a2[i % LANES] += (double)gv * (xp[i] - mean);
        }
    }
    *sum_dy = lanes_total(a1);
    *sum_dy_xm = lanes_total(a2);
}

// dx += (dy - gmean - (x - mean) * proj) * a, as the reference.
AI void bn_bwd_apply_body(float *dx, const float *g, const float *out, const float *x, int N,
                          size_t stride, int HW, float gmean, float proj, float mean, float a,
                          int relu) {
    for (int n = 0; n < N; n++) {
        const size_t off = (size_t)n * stride;
        const float *gp = g + off, *op = relu ? out + off : NULL, *xp = x + off;
        float *d = dx + off;
        for (int i = 0; i < HW; i++)
            d[i] += (bn_grad(gp, op, i, relu) - gmean - (xp[i] - mean) * proj) * a;
    }
}

// dx += dy * a (eval mode: the statistics are constants).
AI void bn_bwd_apply_eval_body(float *dx, const float *g, const float *out, int N, size_t stride,
                               int HW, float a, int relu) {
    for (int n = 0; n < N; n++) {
        const size_t off = (size_t)n * stride;
        const float *gp = g + off, *op = relu ? out + off : NULL;
        float *d = dx + off;
        for (int i = 0; i < HW; i++) d[i] += bn_grad(gp, op, i, relu) * a;
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

// ---------------------------------------------------------------------------------------------
// One copy of every kernel per ISA level

typedef struct {
    double (*bn_sum)(const float *, int, size_t, int);
    double (*bn_ssd)(const float *, int, size_t, int, double);
    void (*bn_affine)(float *, const float *, int, size_t, int, float, float, int);
    void (*bn_bwd_sums)(double *, double *, const float *, const float *, const float *, int,
                        size_t, int, float, int);
    void (*bn_bwd_apply)(float *, const float *, const float *, const float *, int, size_t, int,
                         float, float, float, float, int);
    void (*bn_bwd_apply_eval)(float *, const float *, const float *, int, size_t, int, float, int);
    void (*relu_fwd)(float *, const float *, size_t);
    void (*relu_bwd)(float *, const float *, const float *, size_t);
    void (*add)(float *, const float *, size_t);
    void (*mul)(float *, const float *, const float *, size_t);
    void (*muladd)(float *, const float *, const float *, size_t);
    void (*maxpool)(float *, int32_t *, const float *, size_t, size_t, int, int, int, int, int,
                    int, int);
} fast_kernels;

// The `relu` flag becomes a constant in each branch, so each loop is compiled without a test.
#define DEFINE_KERNELS(SFX, ATTR)                                                                \
    ATTR static double bn_sum_##SFX(const float *x, int N, size_t st, int HW) {                  \
        return bn_sum_body(x, N, st, HW);                                                        \
    }                                                                                            \
    ATTR static double bn_ssd_##SFX(const float *x, int N, size_t st, int HW, double mean) {     \
        return bn_ssd_body(x, N, st, HW, mean);                                                  \
    }                                                                                            \
    ATTR static void bn_affine_##SFX(float *o, const float *x, int N, size_t st, int HW,         \
                                     float a, float b, int relu) {                               \
        if (relu) bn_affine_body(o, x, N, st, HW, a, b, 1);                                      \
        else bn_affine_body(o, x, N, st, HW, a, b, 0);                                           \
    }                                                                                            \
    ATTR static void bn_bwd_sums_##SFX(double *s1, double *s2, const float *g, const float *out, \
                                       const float *x, int N, size_t st, int HW, float mean,     \
                                       int relu) {                                               \
        if (relu) bn_bwd_sums_body(s1, s2, g, out, x, N, st, HW, mean, 1);                       \
        else bn_bwd_sums_body(s1, s2, g, out, x, N, st, HW, mean, 0);                            \
    }                                                                                            \
    ATTR static void bn_bwd_apply_##SFX(float *dx, const float *g, const float *out,             \
                                        const float *x, int N, size_t st, int HW, float gmean,   \
                                        float proj, float mean, float a, int relu) {             \
        if (relu) bn_bwd_apply_body(dx, g, out, x, N, st, HW, gmean, proj, mean, a, 1);          \
        else bn_bwd_apply_body(dx, g, out, x, N, st, HW, gmean, proj, mean, a, 0);               \
    }                                                                                            \
    ATTR static void bn_bwd_apply_eval_##SFX(float *dx, const float *g, const float *out, int N, \
                                             size_t st, int HW, float a, int relu) {             \
        if (relu) bn_bwd_apply_eval_body(dx, g, out, N, st, HW, a, 1);                           \
        else bn_bwd_apply_eval_body(dx, g, out, N, st, HW, a, 0);                                \
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
        bn_sum_##SFX,   bn_ssd_##SFX,  bn_affine_##SFX, bn_bwd_sums_##SFX,                       \
        bn_bwd_apply_##SFX, bn_bwd_apply_eval_##SFX, relu_fwd_##SFX, relu_bwd_##SFX,             \
        add_##SFX,      mul_##SFX,     muladd_##SFX,    maxpool_##SFX,                           \
    };

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

typedef struct {
    const fast_kernels *K;
    float *out, *save_mean, *save_invstd, *running_mean, *running_var;
    float *din, *dgamma, *dbeta;
    const float *in, *gamma, *beta, *dout, *fout, *mean_in, *invstd_in, *rvar_in;
    int N, C, HW, relu;
    float eps, momentum;
} bn_job;

static void bn_fwd_train_task(void *ctx, int t, int nt) {
    const bn_job *j = ctx;
    const fast_kernels *K = j->K;
    const size_t M = (size_t)j->N * j->HW, stride = (size_t)j->C * j->HW;
    size_t c0, c1;
    part_range((size_t)j->C, t, nt, &c0, &c1);
    for (size_t c = c0; c < c1; c++) {
        const float *x = j->in + c * j->HW;
        const double mean = K->bn_sum(x, j->N, stride, j->HW) / (double)M;
        const double ssd = K->bn_ssd(x, j->N, stride, j->HW, mean);
        const double var = ssd / (double)M;
        const double invstd = 1.0 / sqrt(var + j->eps);
        if (j->save_mean) j->save_mean[c] = (float)mean;
        if (j->save_invstd) j->save_invstd[c] = (float)invstd;
        if (j->running_mean)
            j->running_mean[c] =
                (float)((1.0 - j->momentum) * j->running_mean[c] + j->momentum * mean);
        if (j->running_var) {
            const double uvar = M > 1 ? ssd / (double)(M - 1) : NAN;  // as the reference
            j->running_var[c] =
                (float)((1.0 - j->momentum) * j->running_var[c] + j->momentum * uvar);
        }
        const double scale = invstd * (j->gamma ? j->gamma[c] : 1.0f);
        const float a = (float)scale, b = (float)((j->beta ? j->beta[c] : 0.0f) - mean * scale);
        K->bn_affine(j->out + c * j->HW, x, j->N, stride, j->HW, a, b, j->relu);
    }
}

void batchnorm2d_fast_forward_train(float *out, float *save_mean, float *save_invstd,
                                    float *running_mean, float *running_var,
                                    const float *in, const float *gamma, const float *beta,
                                    int N, int C, int HW, float eps, float momentum, int relu) {
    bn_job j = {.K = kernels(), .out = out, .save_mean = save_mean, .save_invstd = save_invstd,
                .running_mean = running_mean, .running_var = running_var, .in = in,
                .gamma = gamma, .beta = beta, .N = N, .C = C, .HW = HW, .relu = relu,
                .eps = eps, .momentum = momentum};
    int nt = threads_for((size_t)N * C * HW);
    if (nt > C) nt = C;
    cpu_parallel(bn_fwd_train_task, &j, nt);
}

static void bn_bwd_train_task(void *ctx, int t, int nt) {
    const bn_job *j = ctx;
    const fast_kernels *K = j->K;
    const size_t M = (size_t)j->N * j->HW, stride = (size_t)j->C * j->HW;
    size_t c0, c1;
    part_range((size_t)j->C, t, nt, &c0, &c1);
    for (size_t c = c0; c < c1; c++) {
        const size_t off = c * j->HW;
        const float mean = j->mean_in[c], invstd = j->invstd_in[c];
        double sum_dy, sum_dy_xm;
        K->bn_bwd_sums(&sum_dy, &sum_dy_xm, j->dout + off, j->relu ? j->fout + off : NULL,
                       j->in + off, j->N, stride, j->HW, mean, j->relu);
        if (j->dbeta) j->dbeta[c] += (float)sum_dy;
        if (j->dgamma) j->dgamma[c] += (float)(sum_dy_xm * invstd);
        if (!j->din) continue;
        const float gmean = (float)(sum_dy / (double)M);
        const float proj = (float)(sum_dy_xm * invstd * invstd / (double)M);
        const float a = invstd * (j->gamma ? j->gamma[c] : 1.0f);
        K->bn_bwd_apply(j->din + off, j->dout + off, j->relu ? j->fout + off : NULL, j->in + off,
                        j->N, stride, j->HW, gmean, proj, mean, a, j->relu);
    }
}

void batchnorm2d_fast_backward_train(float *din, float *dgamma, float *dbeta, const float *dout,
                                     const float *out, const float *in, const float *gamma,
                                     const float *save_mean, const float *save_invstd,
                                     int N, int C, int HW, int relu) {
    if (!din && !dgamma && !dbeta) return;
    bn_job j = {.K = kernels(), .din = din, .dgamma = dgamma, .dbeta = dbeta, .dout = dout,
                .fout = out, .in = in, .gamma = gamma, .mean_in = save_mean,
                .invstd_in = save_invstd, .N = N, .C = C, .HW = HW, .relu = relu};
    int nt = threads_for((size_t)N * C * HW);
    if (nt > C) nt = C;
    cpu_parallel(bn_bwd_train_task, &j, nt);
}

static void bn_fwd_eval_task(void *ctx, int t, int nt) {
    const bn_job *j = ctx;
    const size_t stride = (size_t)j->C * j->HW;
    size_t c0, c1;
    part_range((size_t)j->C, t, nt, &c0, &c1);
    for (size_t c = c0; c < c1; c++) {
        const double scale =
            (j->gamma ? j->gamma[c] : 1.0f) / sqrt((double)j->rvar_in[c] + j->eps);
        const float a = (float)scale;
        const float b = (float)((j->beta ? j->beta[c] : 0.0f) - j->mean_in[c] * scale);
        j->K->bn_affine(j->out + c * j->HW, j->in + c * j->HW, j->N, stride, j->HW, a, b,
                        j->relu);
    }
}

void batchnorm2d_fast_forward_eval(float *out, const float *in, const float *gamma,
                                   const float *beta, const float *running_mean,
                                   const float *running_var, int N, int C, int HW, float eps,
                                   int relu) {
    bn_job j = {.K = kernels(), .out = out, .in = in, .gamma = gamma, .beta = beta,
                .mean_in = running_mean, .rvar_in = running_var, .N = N, .C = C, .HW = HW,
                .relu = relu, .eps = eps};
    int nt = threads_for((size_t)N * C * HW);
    if (nt > C) nt = C;
    cpu_parallel(bn_fwd_eval_task, &j, nt);
}

static void bn_bwd_eval_task(void *ctx, int t, int nt) {
    const bn_job *j = ctx;
    const fast_kernels *K = j->K;
    const size_t stride = (size_t)j->C * j->HW;
    size_t c0, c1;
    part_range((size_t)j->C, t, nt, &c0, &c1);
    for (size_t c = c0; c < c1; c++) {
        const size_t off = c * j->HW;
        const double invstd = 1.0 / sqrt((double)j->rvar_in[c] + j->eps);
        const float mean = j->mean_in[c];
        const float a = (float)(invstd * (j->gamma ? j->gamma[c] : 1.0f));
        const float *fo = j->relu ? j->fout + off : NULL;
        if (j->dgamma || j->dbeta) {
            double sum_dy, sum_dy_xm;
            K->bn_bwd_sums(&sum_dy, &sum_dy_xm, j->dout + off, fo, j->in + off, j->N, stride,
                           j->HW, mean, j->relu);
            if (j->dbeta) j->dbeta[c] += (float)sum_dy;
            if (j->dgamma) j->dgamma[c] += (float)(sum_dy_xm * invstd);
        }
        if (j->din)
            K->bn_bwd_apply_eval(j->din + off, j->dout + off, fo, j->N, stride, j->HW, a, j->relu);
    }
}

void batchnorm2d_fast_backward_eval(float *din, float *dgamma, float *dbeta, const float *dout,
                                    const float *out, const float *in, const float *gamma,
                                    const float *running_mean, const float *running_var,
                                    int N, int C, int HW, float eps, int relu) {
    if (!din && !dgamma && !dbeta) return;
    bn_job j = {.K = kernels(), .din = din, .dgamma = dgamma, .dbeta = dbeta, .dout = dout,
                .fout = out, .in = in, .gamma = gamma, .mean_in = running_mean,
                .rvar_in = running_var, .N = N, .C = C, .HW = HW, .relu = relu, .eps = eps};
    int nt = threads_for((size_t)N * C * HW);
    if (nt > C) nt = C;
    cpu_parallel(bn_bwd_eval_task, &j, nt);
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
    part_range(j->n, t, nt, &lo, &hi);
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
    const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    for (size_t i = 0; i < n; i++) {
        float m;
        if (p <= 0.0f) m = 1.0f;
        else if (p >= 1.0f) m = 0.0f;
        else m = rng_uniform(r) < p ? 0.0f : scale;
        mask[i] = m;
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
} pool_job;

static void maxpool_fwd_task(void *ctx, int t, int nt) {
    const pool_job *j = ctx;
    size_t p0, p1;
    part_range(j->planes, t, nt, &p0, &p1);
    j->K->maxpool(j->out, j->arg, j->in, p0, p1, j->H, j->W, j->OH, j->OW, j->k, j->s, j->pad);
}

void maxpool2d_fast_forward(float *out, int32_t *argmax, const float *in, int N, int C, int H,
                            int W, int k, int stride, int pad, int ceil_mode) {
    pool_job j = {.K = kernels(), .out = out, .arg = argmax, .in = in,
                  .planes = (size_t)N * C, .H = H, .W = W,
                  .OH = pool_out_size(H, k, stride, pad, ceil_mode),
                  .OW = pool_out_size(W, k, stride, pad, ceil_mode), .k = k, .s = stride,
                  .pad = pad};
    int nt = threads_for(j.planes * H * W);
    cpu_parallel(maxpool_fwd_task, &j, nt);
}

static void maxpool_bwd_task(void *ctx, int t, int nt) {
    const pool_job *j = ctx;
    size_t p0, p1;
    part_range(j->planes, t, nt, &p0, &p1);
    const size_t ip = (size_t)j->H * j->W, op = (size_t)j->OH * j->OW;
    for (size_t p = p0; p < p1; p++) {
        float *dx = j->out + p * ip;
        const float *g = j->in + p * op;
        const int32_t *a = j->carg + p * op;
        for (size_t i = 0; i < op; i++)
            if (a[i] >= 0) dx[a[i]] += g[i];
    }
}

void maxpool2d_fast_backward(float *din, const float *dout, const int32_t *argmax, int N, int C,
                             int H, int W, int k, int stride, int pad, int ceil_mode) {
    if (!din) return;
    pool_job j = {.out = din, .carg = argmax, .in = dout, .planes = (size_t)N * C, .H = H,
                  .W = W, .OH = pool_out_size(H, k, stride, pad, ceil_mode),
                  .OW = pool_out_size(W, k, stride, pad, ceil_mode)};
    int nt = threads_for(j.planes * H * W);
    cpu_parallel(maxpool_bwd_task, &j, nt);
}

// The reference loops treat the N*C planes alike, so a range of planes is a smaller problem of
// the same op: each thread runs the reference on its planes (the same bits, no new code).
static void adaptive_fwd_task(void *ctx, int t, int nt) {
    const pool_job *j = ctx;
    size_t p0, p1;
    part_range(j->planes, t, nt, &p0, &p1);
    if (p1 > p0)
        adaptive_avgpool2d_forward(j->out + p0 * j->OH * j->OW, j->in + p0 * j->H * j->W, 1,
                                   (int)(p1 - p0), j->H, j->W, j->OH, j->OW);
}

static void adaptive_bwd_task(void *ctx, int t, int nt) {
    const pool_job *j = ctx;
    size_t p0, p1;
    part_range(j->planes, t, nt, &p0, &p1);
    if (p1 > p0)
        adaptive_avgpool2d_backward(j->out + p0 * j->H * j->W, j->in + p0 * j->OH * j->OW, 1,
                                    (int)(p1 - p0), j->H, j->W, j->OH, j->OW);
}

void adaptive_avgpool2d_fast_forward(float *out, const float *in, int N, int C, int H, int W,
                                     int OH, int OW) {
    pool_job j = {.out = out, .in = in, .planes = (size_t)N * C, .H = H, .W = W, .OH = OH,
                  .OW = OW};
    cpu_parallel(adaptive_fwd_task, &j, threads_for(j.planes * H * W));
}

void adaptive_avgpool2d_fast_backward(float *din, const float *dout, int N, int C, int H, int W,
                                      int OH, int OW) {
    if (!din) return;
    pool_job j = {.out = din, .in = dout, .planes = (size_t)N * C, .H = H, .W = W, .OH = OH,
                  .OW = OW};
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
} concat_job;

static void concat_task(void *ctx, int t, int nt) {
    const concat_job *j = ctx;
    size_t q0, q1;
    part_range((size_t)j->N * j->n_in, t, nt, &q0, &q1);
    for (size_t q = q0; q < q1; q++) {
        const int n = (int)(q / j->n_in), i = (int)(q % j->n_in);
        size_t at = 0;  // channel offset of input i
        for (int k = 0; k < i; k++) at += j->Cs[k];
        const size_t len = (size_t)j->Cs[i] * j->HW;
        const size_t o = ((size_t)n * j->Ctot + at) * j->HW;
        if (j->out) memcpy(j->out + o, j->ins[i] + (size_t)n * len, len * sizeof(float));
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
                          int HW) {
    concat_job j = {.K = kernels(), .dins = dins, .dout = dout, .Cs = Cs, .n_in = n_in, .N = N,
                    .HW = HW};
    for (int i = 0; i < n_in; i++) j.Ctot += Cs[i];
    cpu_parallel(concat_task, &j, threads_for((size_t)N * j.Ctot * HW));
}
