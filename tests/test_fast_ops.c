// The fast memory-bound ops (ops/fast_ops.h) against the reference ops of ops.h, which
// tests/test_ops.py checks against PyTorch: batchnorm (train/eval, with and without the fused
// ReLU, forward and backward), relu, max pool with argmax, adaptive average pool, concat,
// dropout and the buffer helpers. Fixed shapes (odd sizes, C not a multiple of 16, N = 1 and 7,
// ceil-mode tails, 1x1 planes, shapes large enough to be split between threads) plus random
// ones; inputs with ties, zeros of both signs, -inf and NaN.
//
// Every op runs at every ISA level the CPU has and with 1, 2 and 3 threads; all these runs
// must give the same bits. The first run is compared with the reference: exactly where the
// arithmetic is the same, else (batchnorm statistics and parameter gradients, summed in
// another order) with |got - ref| / (|ref| + rms(ref)) <= 1e-6. Gradients accumulate into
// random initial values, so accumulation is checked too.
#include "ops/cpu.h"
#include "ops/fast_ops.h"
#include "ops/ops.h"
#include "util/rng.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL 1e-6

#include "tap.h"
static double worst_rel;  // the largest toleranced error seen, for the summary line


// ---- run configurations: every ISA level this CPU has x 1, 2, 3 threads ----

typedef struct {
    cpu_isa_level isa;
    int threads;
} config;

static config configs[9];
static int n_configs;

static void configs_init(void) {
    const int threads[3] = {1, 2, 3};
    // The best level first: that run is the one compared with the reference.
    for (int l = (int)cpu_isa_detected(); l >= 0; l--)
        for (int t = 0; t < 3; t++) configs[n_configs++] = (config){(cpu_isa_level)l, threads[t]};
}

static void config_use(int i) {
    if (cpu_isa_set(configs[i].isa) || cpu_threads_set(configs[i].threads)) {
        fprintf(stderr, "cannot set ISA %s / %d threads\n", cpu_isa_name(configs[i].isa),
                configs[i].threads);
        exit(1);
    }
}

// ---- buffers ----

static float *buf_new(size_t n) {
    float *x = malloc((n ? n : 1) * sizeof(float));
    if (!x) abort();
    return x;
}

static float *buf_copy(const float *x, size_t n) {
    float *y = buf_new(n);
    memcpy(y, x, n * sizeof(float));
    return y;
}

static float *buf_uniform(size_t n, rng *r, double lo, double hi) {
    float *x = buf_new(n);
    for (size_t i = 0; i < n; i++) x[i] = (float)(lo + (hi - lo) * rng_uniform(r));
    return x;
}

// Few distinct values, so that windows hold ties; zeros of both signs, some -inf and NaN.
static float *buf_ties(size_t n, rng *r, int with_nan) {
    static const float vals[] = {-2.0f, -1.0f, -0.0f, 0.0f, 0.5f, 1.0f, 2.0f};
    float *x = buf_new(n);
    for (size_t i = 0; i < n; i++) {
        uint32_t u = rng_below(r, 100);
        if (with_nan && u == 0) x[i] = NAN;
        else if (u == 1) x[i] = -INFINITY;
        else x[i] = vals[rng_below(r, sizeof vals / sizeof vals[0])];
    }
    return x;
}

// The same bits, or both NaN (NaN payloads may differ between two correct computations).
static int same_value(float a, float b) {
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    return memcmp(&a, &b, sizeof a) == 0;
}

// Index of the first mismatch, or -1.
static long first_diff(const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!same_value(a[i], b[i])) return (long)i;
    return -1;
}

// max |got-ref| / (|ref| + rms(ref)); NaN must match NaN; +inf on any other mismatch.
static double rel_err(const float *got, const float *ref, size_t n) {
    double ss = 0;
    size_t cnt = 0;
    for (size_t i = 0; i < n; i++)
        if (isfinite(ref[i])) ss += (double)ref[i] * ref[i], cnt++;
    const double rms = cnt ? sqrt(ss / cnt) : 0.0;
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(ref[i]) || isnan(got[i]) || isinf(ref[i]) || isinf(got[i])) {
            if (!same_value(got[i], ref[i])) return INFINITY;
            continue;
        }
        double d = fabs((double)got[i] - ref[i]), den = fabs((double)ref[i]) + rms;
        double e = den > 0 ? d / den : (d > 0 ? INFINITY : 0);
        if (e > worst) worst = e;
    }
    return worst;
}

// Results of one op: up to 12 float arrays compared as a group.
enum { MAX_OUTS = 12 };
typedef struct {
    const char *name[MAX_OUTS];
    float *v[MAX_OUTS];
    size_t n[MAX_OUTS];
    int exact[MAX_OUTS];  // must equal the reference bit for bit
    int count;
} outputs;

static void outputs_add(outputs *o, const char *name, float *v, size_t n, int exact) {
    o->name[o->count] = name;
    o->v[o->count] = v;
    o->n[o->count] = n;
    o->exact[o->count] = exact;
    o->count++;
}

static void outputs_free(outputs *o) {
    for (int i = 0; i < o->count; i++) free(o->v[i]);
    o->count = 0;
}

// Compares run `got` (config ci) with the reference (ci == 0) or with the first run (bitwise).
// Returns 1 if all match.
static int outputs_check(const outputs *got, const outputs *ref, int ci, const char *what) {
    int ok = 1;
    for (int i = 0; i < got->count; i++) {
        if (ci == 0) {
            if (got->exact[i]) {
                long d = first_diff(got->v[i], ref->v[i], got->n[i]);
                if (d >= 0) {
                    result(0, "%s: %s[%ld] = %.9g, reference %.9g", what, got->name[i], d,
                           got->v[i][d], ref->v[i][d]);
                    ok = 0;
                }
            } else {
                double e = rel_err(got->v[i], ref->v[i], got->n[i]);
                if (e > worst_rel) worst_rel = e;
                if (!(e <= TOL)) {
                    result(0, "%s: %s relative error %.3g vs reference (limit %g)", what,
                           got->name[i], e, TOL);
                    ok = 0;
                }
            }
        } else if (memcmp(got->v[i], ref->v[i], got->n[i] * sizeof(float)) != 0) {
            result(0, "%s: %s differs at ISA %s, %d threads from ISA %s, 1 thread", what,
                   got->name[i], cpu_isa_name(configs[ci].isa), configs[ci].threads,
                   cpu_isa_name(configs[0].isa));
            ok = 0;
        }
    }
    return ok;
}

// Runs `run` (which fills an outputs group) in every configuration and checks it.
typedef void (*run_fn)(outputs *o, void *ctx);

static int check_all_configs(run_fn run, void *ctx, const outputs *ref, const char *what) {
    outputs first = {0};
    int ok = 1;
    for (int ci = 0; ci < n_configs; ci++) {
        config_use(ci);
        outputs got = {0};
        run(&got, ctx);
        ok &= outputs_check(&got, ci == 0 ? ref : &first, ci, what);
        if (ci == 0) first = got;
        else outputs_free(&got);
    }
    outputs_free(&first);
    return ok;
}

// ---- batchnorm (+ relu) ----

typedef struct {
    int N, C, HW, relu, affine, nan, eval;
    int din_mode;   // 0: din += gradient; 1: din NULL; 2: BN_DIN_OVERWRITE (train), din not zeroed
    int wide;       // out and dout are channels [3, 3 + C) of tensors of C + 5 channels
    float *x, *gamma, *beta, *rmean, *rvar, *dout, *din0, *dg0, *db0;
} bn_case;

// A slice of channels [3, 3 + C) of a tensor of C + 5 (bn_case.wide): where it starts, the
// images' stride, and the wide tensor's size.
enum { WIDE_C0 = 3, WIDE_EXTRA = 5 };
static void bn_wide(const bn_case *c, size_t *c0, ptrdiff_t *os, size_t *total) {
    *c0 = (size_t)WIDE_C0 * c->HW;
    *os = (ptrdiff_t)(c->C + WIDE_EXTRA) * c->HW;
    *total = (size_t)c->N * *os;
}

static void bn_run_fast(outputs *o, void *ctx) {
    const bn_case *c = ctx;
    const size_t n = (size_t)c->N * c->C * c->HW, C = c->C;
    float *out = buf_new(n), *mean = buf_new(C), *invstd = buf_new(C);
    // Wide: out and dout inside larger tensors whose other channels must stay untouched (7)
    // and must not be read (NaN: it would show in the results).
    size_t c0 = 0, total = 0, plane = (size_t)c->C * c->HW;
    ptrdiff_t os = 0;
    float *wout = NULL, *wdout = NULL, *o_at = out;
    const float *d_at = c->dout;
    if (c->wide) {
        bn_wide(c, &c0, &os, &total);
        wout = buf_new(total), wdout = buf_new(total);
        for (size_t i = 0; i < total; i++) wout[i] = 7.0f, wdout[i] = NAN;
        for (int s = 0; s < c->N; s++)
            memcpy(wdout + s * os + c0, c->dout + s * plane, plane * sizeof(float));
        o_at = wout + c0, d_at = wdout + c0;
    }
    float *rm = buf_copy(c->rmean, C), *rv = buf_copy(c->rvar, C);
    float *din = c->din_mode == 1 ? NULL : buf_copy(c->din0, n);
    if (c->din_mode == 2)   // overwritten: what was there must not matter
        for (size_t i = 0; i < n; i++) din[i] = NAN;
    float *dg = c->affine ? buf_copy(c->dg0, C) : NULL, *db = c->affine ? buf_copy(c->db0, C) : NULL;
    const float *g = c->affine ? c->gamma : NULL, *b = c->affine ? c->beta : NULL;
    if (c->eval) {
        batchnorm2d_fast_forward_eval(o_at, os, c->x, g, b, rm, rv, c->N, c->C, c->HW, 1e-3f,
                                      c->relu);
        batchnorm2d_fast_backward_eval(din, dg, db, d_at, os, c->x, g, b, rm, rv, c->N, c->C,
                                       c->HW, 1e-3f, c->relu);
    } else {
        float *affine = buf_new(2 * C);
        batchnorm2d_fast_forward_train(o_at, os, mean, invstd, affine, rm, rv, c->x, g, b, c->N,
                                       c->C, c->HW, 1e-3f, 0.1f, c->relu);
        batchnorm2d_fast_backward_train(din, dg, db, d_at, os, c->x, g, mean, invstd, affine,
                                        c->N, c->C, c->HW, (c->relu ? BN_FUSED_RELU : 0) |
                                        (c->din_mode == 2 ? BN_DIN_OVERWRITE : 0));
        free(affine);
    }
    if (c->wide) {   // the slice back to a dense out; a touched margin shows as NaN in it
        int margin_ok = 1;
        for (int s = 0; s < c->N; s++) {
            const float *row = wout + s * os;
            for (size_t i = 0; i < (size_t)os; i++)
                if ((i < c0 || i >= c0 + plane) && row[i] != 7.0f) margin_ok = 0;
            memcpy(out + s * plane, row + c0, plane * sizeof(float));
        }
        if (!margin_ok) out[0] = NAN;
        free(wout), free(wdout);
    }
    outputs_add(o, "out", out, n, c->eval);
    if (!c->eval) {
        outputs_add(o, "save_mean", mean, C, 0);
        outputs_add(o, "save_invstd", invstd, C, 0);
        outputs_add(o, "running_mean", rm, C, 0);
        outputs_add(o, "running_var", rv, C, 0);
    } else {
        free(mean), free(invstd), free(rm), free(rv);
    }
    if (din) outputs_add(o, "din", din, n, c->eval);
    if (dg) {
        // Parameter gradients as one group: the same tolerance.
        float *p = buf_new(2 * C);
        memcpy(p, dg, C * sizeof(float));
        memcpy(p + C, db, C * sizeof(float));
        free(dg), free(db);
        outputs_add(o, "dgamma|dbeta", p, 2 * C, 0);
    }
}

// The reference: batchnorm then relu_forward; relu_backward into a zeroed buffer, then
// batchnorm backward, exactly as the executor chains the separate ops.
static void bn_run_ref(outputs *o, const bn_case *c) {
    const size_t n = (size_t)c->N * c->C * c->HW, C = c->C;
    float *bn = buf_new(n), *out = buf_new(n), *mean = buf_new(C), *invstd = buf_new(C);
    float *rm = buf_copy(c->rmean, C), *rv = buf_copy(c->rvar, C);
    float *din = c->din_mode == 1 ? NULL : buf_copy(c->din0, n);
    if (c->din_mode == 2) memset(din, 0, n * sizeof(float));   // overwrite = add to zeros
    float *dg = c->affine ? buf_copy(c->dg0, C) : NULL, *db = c->affine ? buf_copy(c->db0, C) : NULL;
    const float *g = c->affine ? c->gamma : NULL, *b = c->affine ? c->beta : NULL;
    if (c->eval) batchnorm2d_forward_eval(bn, c->x, g, b, rm, rv, c->N, c->C, c->HW, 1e-3f);
    else batchnorm2d_forward_train(bn, mean, invstd, rm, rv, c->x, g, b, c->N, c->C, c->HW,
                                   1e-3f, 0.1f);
    float *gbn = buf_new(n);
    if (c->relu) {
        relu_forward(out, bn, n);
        memset(gbn, 0, n * sizeof(float));
        relu_backward(gbn, c->dout, out, n);
    } else {
        memcpy(out, bn, n * sizeof(float));
        memcpy(gbn, c->dout, n * sizeof(float));
    }
    if (c->eval)
        batchnorm2d_backward_eval(din, dg, db, gbn, c->x, g, rm, rv, c->N, c->C, c->HW, 1e-3f);
    else
        batchnorm2d_backward_train(din, dg, db, gbn, c->x, g, mean, invstd, c->N, c->C, c->HW);
    free(bn), free(gbn);
    outputs_add(o, "out", out, n, c->eval);
    if (!c->eval) {
        outputs_add(o, "save_mean", mean, C, 0);
        outputs_add(o, "save_invstd", invstd, C, 0);
        outputs_add(o, "running_mean", rm, C, 0);
        outputs_add(o, "running_var", rv, C, 0);
    } else {
        free(mean), free(invstd), free(rm), free(rv);
    }
    if (din) outputs_add(o, "din", din, n, c->eval);
    if (dg) {
        float *p = buf_new(2 * C);
        memcpy(p, dg, C * sizeof(float));
        memcpy(p + C, db, C * sizeof(float));
        free(dg), free(db);
        outputs_add(o, "dgamma|dbeta", p, 2 * C, 0);
    }
}

static int bn_test(int N, int C, int HW, int relu, int affine, int nan, int eval, int din_mode,
                   int wide, rng *r) {
    const size_t n = (size_t)N * C * HW;
    bn_case c = {.N = N, .C = C, .HW = HW, .relu = relu, .affine = affine, .nan = nan,
                 .eval = eval, .din_mode = din_mode, .wide = wide};
    // Channels with an offset (the mean matters) and different spreads.
    c.x = buf_new(n);
    for (int ch = 0; ch < C; ch++) {
        const double off = 4.0 * rng_uniform(r) - 2.0, sc = 0.1 + 3.0 * rng_uniform(r);
        for (int s = 0; s < N; s++)
            for (int i = 0; i < HW; i++)
                c.x[((size_t)s * C + ch) * HW + i] = (float)(off + sc * (2 * rng_uniform(r) - 1));
    }
    if (nan) c.x[rng_below(r, (uint32_t)n)] = NAN;  // poisons one channel, as in PyTorch
    c.gamma = buf_uniform(C, r, -1.5, 1.5);
    c.beta = buf_uniform(C, r, -1, 1);
    if (C >= 2) {
        // Last channel: gamma 0, beta -0 and a positive mean with negative values: exact
        // zeros of both signs at the ReLU (x*0 + -0 is -0 for negative x, which ReLU makes +0).
        const int ch = C - 1;
        c.gamma[ch] = 0.0f;
        c.beta[ch] = -0.0f;
        for (int s = 0; s < N; s++)
            for (int i = 0; i < HW; i++)
                c.x[((size_t)s * C + ch) * HW + i] = (float)(0.5 + 2 * (2 * rng_uniform(r) - 1));
        c.x[(size_t)ch * HW] = 100.0f;  // keeps the mean positive
    }
    c.rmean = buf_uniform(C, r, -1, 1);
    c.rvar = buf_uniform(C, r, 0.2, 2);
    c.dout = buf_uniform(n, r, -1, 1);
    c.din0 = buf_uniform(n, r, -1, 1);
    c.dg0 = buf_uniform(C, r, -1, 1);
    c.db0 = buf_uniform(C, r, -1, 1);
    outputs ref = {0};
    bn_run_ref(&ref, &c);
    char what[160];
    snprintf(what, sizeof what, "batchnorm %s%s N=%d C=%d HW=%d%s%s%s%s", eval ? "eval" : "train",
             relu ? "+relu" : "", N, C, HW, affine ? "" : " no-affine", nan ? " NaN" : "",
             din_mode == 1 ? " din=NULL" : din_mode == 2 ? " din overwritten" : "",
             wide ? " (channels of a wider tensor)" : "");
    int ok = check_all_configs(bn_run_fast, &c, &ref, what);
    outputs_free(&ref);
    free(c.x), free(c.gamma), free(c.beta), free(c.rmean), free(c.rvar), free(c.dout);
    free(c.din0), free(c.dg0), free(c.db0);
    return ok;
}

static void test_batchnorm(rng *r) {
    static const int shapes[][3] = {
        {1, 3, 5},  {7, 37, 195}, {2, 16, 1},   {7, 17, 64}, {1, 5, 1},  {3, 1, 9},
        {7, 20, 4}, {1, 33, 256}, {4, 48, 121}, {7, 64, 16}, {2, 7, 1000},
        // Small planes (channel blocks) large enough to be split between threads.
        {64, 300, 4}, {128, 520, 1}, {16, 50, 49}, {9, 70, 63},
    };
    int ok = 1, count = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int eval = 0; eval < 2; eval++)
            for (int relu = 0; relu < 2; relu++) {
                ok &= bn_test(shapes[s][0], shapes[s][1], shapes[s][2], relu, 1, 0, eval, 0, 0, r);
                count++;
            }
    for (int i = 0; i < 12; i++) {
        int N = 1 + (int)rng_below(r, 8), C = 1 + (int)rng_below(r, 40);
        int HW = 1 + (int)rng_below(r, 300);
        ok &= bn_test(N, C, HW, (int)rng_below(r, 2), 1, 0, (int)rng_below(r, 2), 0, 0, r);
        count++;
    }
    // No affine parameters; NULL input gradient; a NaN in the input.
    for (int eval = 0; eval < 2; eval++)
        for (int relu = 0; relu < 2; relu++) {
            ok &= bn_test(7, 19, 49, relu, 0, 0, eval, 0, 0, r);
            ok &= bn_test(7, 19, 49, relu, 1, 0, eval, 1, 0, r);
            ok &= bn_test(7, 19, 49, relu, 1, 1, eval, 0, 0, r);
            count += 3;
        }
    // Training backward writing din whole (BN_DIN_OVERWRITE) over NaN: small and large planes.
    for (int relu = 0; relu < 2; relu++) {
        ok &= bn_test(7, 19, 49, relu, 1, 0, 0, 2, 0, r);
        ok &= bn_test(3, 5, 1000, relu, 1, 0, 0, 2, 0, r);
        ok &= bn_test(64, 300, 4, relu, 1, 0, 0, 2, 0, r);
        count += 3;
    }
    // Out and dout as channels of wider tensors (a concatenation written in place), with
    // channel blocks, segments of large planes, and din overwritten.
    for (int eval = 0; eval < 2; eval++)
        for (int relu = 0; relu < 2; relu++) {
            ok &= bn_test(7, 19, 49, relu, 1, 0, eval, 0, 1, r);
            ok &= bn_test(3, 5, 1000, relu, 1, 0, eval, eval ? 0 : 2, 1, r);
            ok &= bn_test(64, 300, 4, relu, 1, 0, eval, eval ? 0 : 2, 1, r);
            count += 3;
        }
    result(ok, "batchnorm2d_fast (train/eval, +relu): %d cases x %d configs vs reference, worst "
               "relative error %.2g", count, n_configs, worst_rel);
}

// ---- relu ----

typedef struct {
    size_t n;
    float *x, *dout, *din0;
} ew_case;

static void relu_run_fast(outputs *o, void *ctx) {
    const ew_case *c = ctx;
    float *out = buf_new(c->n), *din = buf_copy(c->din0, c->n);
    relu_fast_forward(out, c->x, c->n);
    relu_fast_backward(din, c->dout, out, c->n);
    relu_fast_backward(NULL, c->dout, out, c->n);  // must be a no-op
    outputs_add(o, "out", out, c->n, 1);
    outputs_add(o, "din", din, c->n, 1);
}

static void test_relu(rng *r) {
    const size_t sizes[] = {1, 15, 16, 17, 1000, 65537, 200003};
    int ok = 1;
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        ew_case c = {sizes[s], buf_ties(sizes[s], r, 1), buf_uniform(sizes[s], r, -1, 1),
                     buf_ties(sizes[s], r, 0)};
        outputs ref = {0};
        float *out = buf_new(c.n), *din = buf_copy(c.din0, c.n);
        relu_forward(out, c.x, c.n);
        relu_backward(din, c.dout, out, c.n);
        outputs_add(&ref, "out", out, c.n, 1);
        outputs_add(&ref, "din", din, c.n, 1);
        char what[64];
        snprintf(what, sizeof what, "relu n=%zu", c.n);
        ok &= check_all_configs(relu_run_fast, &c, &ref, what);
        outputs_free(&ref);
        free(c.x), free(c.dout), free(c.din0);
    }
    result(ok, "relu_fast forward/backward bit-identical to the reference (NaN, -0, ties)");
}

// ---- max pool ----

typedef struct {
    int N, C, H, W, k, s, pad, ceil;
    float *x, *dout, *din0;
    int argmax_bad;  // set by a run whose argmax does not point at its output value
} mp_case;

static void mp_run_fast(outputs *o, void *ctx) {
    mp_case *c = ctx;
    const int OH = pool_out_size(c->H, c->k, c->s, c->pad, c->ceil);
    const int OW = pool_out_size(c->W, c->k, c->s, c->pad, c->ceil);
    const size_t P = (size_t)c->N * c->C, ni = P * c->H * c->W, no = P * OH * OW;
    float *out = buf_new(no), *out2 = buf_new(no), *din = buf_copy(c->din0, ni);
    int32_t *arg = malloc(no * sizeof(int32_t));
    maxpool2d_fast_forward(out, arg, c->x, c->N, c->C, c->H, c->W, c->k, c->s, c->pad, c->ceil);
    maxpool2d_fast_forward(out2, NULL, c->x, c->N, c->C, c->H, c->W, c->k, c->s, c->pad, c->ceil);
    if (memcmp(out, out2, no * sizeof(float)) != 0) c->argmax_bad = 1;
    for (size_t i = 0; i < no; i++) {
        const size_t p = i / ((size_t)OH * OW);
        const int a = arg[i];
        if (a < -1 || a >= c->H * c->W) c->argmax_bad = 1;
        else if (a == -1 ? out[i] != -INFINITY
                         : memcmp(&out[i], &c->x[p * c->H * c->W + a], sizeof(float)) != 0)
            c->argmax_bad = 1;
    }
    maxpool2d_fast_backward(din, c->dout, arg, c->N, c->C, c->H, c->W, c->k, c->s, c->pad, c->ceil,
                            0);
    maxpool2d_fast_backward(NULL, c->dout, arg, c->N, c->C, c->H, c->W, c->k, c->s, c->pad,
                            c->ceil, 0);
    float *dset = buf_new(ni);   // overwrite: whatever din held (NaN) is never read
    for (size_t i = 0; i < ni; i++) dset[i] = NAN;
    maxpool2d_fast_backward(dset, c->dout, arg, c->N, c->C, c->H, c->W, c->k, c->s, c->pad,
                            c->ceil, 1);
    free(arg);
    free(out2);
    outputs_add(o, "out", out, no, 1);
    outputs_add(o, "din", din, ni, 1);
    outputs_add(o, "din overwritten", dset, ni, 1);
}

static int mp_test(int N, int C, int H, int W, int k, int s, int pad, int ceil, int nan, rng *r) {
    const int OH = pool_out_size(H, k, s, pad, ceil), OW = pool_out_size(W, k, s, pad, ceil);
    const size_t P = (size_t)N * C, ni = P * H * W, no = P * OH * OW;
    mp_case c = {N, C, H, W, k, s, pad, ceil, buf_ties(ni, r, nan), buf_uniform(no, r, -1, 1),
                 buf_uniform(ni, r, -1, 1), 0};
    // One plane entirely -inf: the argmax is the window's first element.
    for (int i = 0; i < H * W; i++) c.x[(P - 1) * H * W + i] = -INFINITY;
    outputs ref = {0};
    float *out = buf_new(no), *din = buf_copy(c.din0, ni);
    maxpool2d_forward(out, c.x, N, C, H, W, k, s, pad, ceil);
    maxpool2d_backward(din, c.dout, c.x, N, C, H, W, k, s, pad, ceil);
    float *dzero = calloc(ni, sizeof(float));
    maxpool2d_backward(dzero, c.dout, c.x, N, C, H, W, k, s, pad, ceil);
    outputs_add(&ref, "out", out, no, 1);
    outputs_add(&ref, "din", din, ni, 1);
    outputs_add(&ref, "din overwritten", dzero, ni, 1);
    char what[128];
    snprintf(what, sizeof what, "maxpool N=%d C=%d %dx%d k=%d s=%d pad=%d ceil=%d%s", N, C, H, W,
             k, s, pad, ceil, nan ? " NaN" : "");
    int ok = check_all_configs(mp_run_fast, &c, &ref, what);
    if (c.argmax_bad) {
        result(0, "%s: argmax does not point at the output value (or NULL argmax changes out)",
               what);
        ok = 0;
    }
    outputs_free(&ref);
    free(c.x), free(c.dout), free(c.din0);
    return ok;
}

static void test_maxpool(rng *r) {
    static const int shapes[][8] = {
        // N, C, H, W, k, s, pad, ceil
        {1, 3, 7, 7, 3, 1, 1, 1},   {7, 5, 9, 11, 3, 2, 0, 1},  {2, 3, 8, 8, 2, 2, 0, 1},
        {1, 2, 5, 6, 3, 2, 1, 0},   {3, 4, 13, 10, 5, 3, 2, 1}, {1, 1, 4, 4, 1, 1, 0, 0},
        {2, 3, 6, 5, 3, 3, 1, 1},   {7, 37, 14, 13, 3, 1, 1, 1}, {7, 33, 16, 15, 3, 2, 0, 1},
        {7, 19, 2, 2, 3, 1, 1, 1},  {7, 21, 1, 1, 3, 1, 1, 1},  {7, 40, 3, 3, 2, 2, 0, 1},
        {1, 2, 300, 5, 3, 1, 1, 0}, {1, 2, 5, 300, 3, 1, 1, 1}, {2, 2, 7, 9, 2, 2, 1, 1},
        // Wide outputs (the row kernel) split between threads; 1x1 and 2x2 planes in bulk.
        {7, 20, 40, 40, 3, 1, 1, 1}, {7, 5, 71, 70, 3, 2, 0, 1}, {128, 200, 2, 2, 3, 1, 1, 1},
        {128, 300, 1, 1, 3, 1, 1, 1}, {128, 100, 2, 2, 2, 2, 0, 1},
        // Inference (no argmax) kernels: stride 1 not "same", stride 2 wide and with padding,
        // "same" planes whose chunks of 16 straddle rows, GoogLeNet's stem shapes.
        {2, 3, 10, 37, 3, 1, 0, 0}, {2, 3, 33, 35, 3, 2, 1, 1}, {1, 3, 29, 29, 3, 1, 1, 1},
        {1, 4, 112, 112, 3, 2, 0, 1}, {2, 5, 56, 56, 3, 1, 1, 1}, {3, 2, 21, 50, 5, 1, 2, 0},
        // The "same" stride-1 backward gather: 8x8 and 4x4 planes, 2x2 and 1x1 planes packed
        // several a vector with a partial last group, 5x5/1, 16x16 (16 vectors a plane)
        {5, 7, 8, 8, 3, 1, 1, 1},   {3, 11, 4, 4, 3, 1, 1, 1},  {5, 7, 2, 2, 3, 1, 1, 0},
        {3, 9, 1, 1, 3, 1, 1, 1},   {2, 5, 8, 2, 5, 1, 2, 0},   {2, 3, 16, 16, 3, 1, 1, 1},
        {4, 7, 4, 4, 5, 1, 2, 1},
    };
    int ok = 1, count = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int nan = 0; nan < 2; nan++) {
            const int *s = shapes[i];
            ok &= mp_test(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], nan, r);
            count++;
        }
    for (int i = 0; i < 30; i++) {
        int k = 1 + (int)rng_below(r, 5), s = 1 + (int)rng_below(r, 3);
        int pad = (int)rng_below(r, k / 2 + 1), ceil = (int)rng_below(r, 2);
        int lo = k - 2 * pad > 1 ? k - 2 * pad : 1;
        int H = lo + (int)rng_below(r, 20), W = lo + (int)rng_below(r, 20);
        int N = rng_below(r, 2) ? 7 : 1, C = 1 + (int)rng_below(r, 20);
        ok &= mp_test(N, C, H, W, k, s, pad, ceil, (int)rng_below(r, 2), r);
        count++;
    }
    result(ok, "maxpool2d_fast with argmax: %d cases x %d configs, out and din bit-identical to "
               "the reference (ties, -inf planes, NaN, ceil tails; din added to and overwritten)",
           count, n_configs);
}

// ---- batch norm + ReLU + max pool (training forward) ----
// The fused pass against the two it replaces (each tested against the reference above), bit
// for bit: pooled output, argmax, saved and running statistics.

typedef struct {
    int N, C, H, W, k, s, pad, ceil;
    float *x, *gamma, *beta, *rm0, *rv0;
} bp_case;

static void bp_run(outputs *o, const bp_case *c, int fused) {
    const int OH = pool_out_size(c->H, c->k, c->s, c->pad, c->ceil);
    const int OW = pool_out_size(c->W, c->k, c->s, c->pad, c->ceil);
    const int HW = c->H * c->W, C = c->C;
    const size_t ni = (size_t)c->N * C * HW, no = (size_t)c->N * C * OH * OW;
    float *out = buf_new(no), *mean = buf_new(C), *invstd = buf_new(C), *aff = buf_new(2 * C);
    float *rm = buf_copy(c->rm0, C), *rv = buf_copy(c->rv0, C), *argf = buf_new(no);
    int32_t *arg = malloc(no * sizeof(int32_t));
    if (fused) {
        batchnorm2d_relu_maxpool_fast_forward_train(out, arg, mean, invstd, aff, rm, rv, c->x,
                                                    c->gamma, c->beta, c->N, C, c->H, c->W, 1e-3f,
                                                    0.1f, c->k, c->s, c->pad, c->ceil);
    } else {
        float *y = buf_new(ni);
        batchnorm2d_fast_forward_train(y, 0, mean, invstd, aff, rm, rv, c->x, c->gamma, c->beta,
                                       c->N, C, HW, 1e-3f, 0.1f, 1);
        maxpool2d_fast_forward(out, arg, y, c->N, C, c->H, c->W, c->k, c->s, c->pad, c->ceil);
        free(y);
    }
    for (size_t i = 0; i < no; i++) argf[i] = (float)arg[i];
    free(arg);
    outputs_add(o, "pooled", out, no, 1);
    outputs_add(o, "argmax", argf, no, 1);
    outputs_add(o, "save_mean", mean, C, 1);
    outputs_add(o, "save_invstd", invstd, C, 1);
    outputs_add(o, "save_affine", aff, 2 * C, 1);
    outputs_add(o, "running_mean", rm, C, 1);
    outputs_add(o, "running_var", rv, C, 1);
}

static void bp_run_fused(outputs *o, void *ctx) { bp_run(o, ctx, 1); }

static void test_bn_relu_maxpool(rng *r) {
    static const int shapes[][8] = {
        // N, C, H, W, k, s, pad, ceil: GoogLeNet's stem pools at 64x64 (long planes in
        // segments, the direct kernel; 2-channel groups, the table kernel), VGG's 2x2/2, a
        // "same" pool, odd sizes, the largest plane, many small pieces for the threads
        {5, 7, 32, 32, 3, 2, 0, 1}, {6, 9, 16, 16, 3, 2, 0, 1}, {4, 5, 10, 10, 2, 2, 0, 0},
        {7, 20, 5, 5, 3, 1, 1, 1},  {3, 6, 9, 7, 3, 2, 1, 1},   {2, 3, 64, 64, 3, 2, 0, 1},
        {64, 40, 4, 4, 3, 2, 0, 1}, {3, 4, 33, 20, 3, 2, 0, 1},
    };
    int ok = 1;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int nan = 0; nan < 2; nan++) {
            const int *h = shapes[i];
            const size_t ni = (size_t)h[0] * h[1] * h[2] * h[3];
            // Multiples of 1/4 (ties in the windows survive the affine map); with `nan`, one NaN,
            // which poisons its channel as in PyTorch.
            bp_case c = {h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], buf_uniform(ni, r, -2, 2),
                         buf_uniform(h[1], r, -1.5, 1.5), buf_uniform(h[1], r, -1, 1),
                         buf_uniform(h[1], r, -1, 1), buf_uniform(h[1], r, 0.2, 2)};
            for (size_t q = 0; q < ni; q++) c.x[q] = roundf(c.x[q] * 4.0f) / 4.0f;
            if (nan) c.x[rng_below(r, (uint32_t)ni)] = NAN;
            c.gamma[0] = 0.0f, c.beta[0] = -0.0f;   // a channel of exact zeros of both signs
            outputs ref = {0};
            config_use(0);
            bp_run(&ref, &c, 0);
            char what[128];
            snprintf(what, sizeof what, "bn+relu+maxpool N=%d C=%d %dx%d k=%d s=%d pad=%d ceil=%d%s",
                     h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], nan ? " NaN" : "");
            ok &= check_all_configs(bp_run_fused, &c, &ref, what);
            outputs_free(&ref);
            free(c.x), free(c.gamma), free(c.beta), free(c.rm0), free(c.rv0);
        }
    result(ok, "batchnorm2d_relu_maxpool_fast_forward_train bit-identical to batch norm (+relu) "
               "then max pool: 16 cases x %d configs", n_configs);
}

// ---- adaptive average pool ----

typedef struct {
    int N, C, H, W, OH, OW;
    float *x, *dout, *din0;
} ap_case;

static void ap_run_fast(outputs *o, void *ctx) {
    const ap_case *c = ctx;
    const size_t P = (size_t)c->N * c->C, ni = P * c->H * c->W, no = P * c->OH * c->OW;
    float *out = buf_new(no), *din = buf_copy(c->din0, ni);
    adaptive_avgpool2d_fast_forward(out, c->x, c->N, c->C, c->H, c->W, c->OH, c->OW);
    adaptive_avgpool2d_fast_backward(din, c->dout, c->N, c->C, c->H, c->W, c->OH, c->OW);
    outputs_add(o, "out", out, no, 1);
    outputs_add(o, "din", din, ni, 1);
}

static void test_adaptive(rng *r) {
    static const int shapes[][6] = {
        {7, 37, 7, 7, 1, 1}, {2, 3, 5, 7, 3, 2}, {1, 4, 3, 3, 5, 4},
        {7, 40, 8, 8, 1, 1}, {7, 1024, 1, 1, 1, 1}, {3, 9, 13, 11, 4, 3},
        {7, 33, 4, 4, 4, 4}, {5, 600, 4, 4, 4, 4},   // identity (aux heads on 4x4 maps)
        {9, 70, 3, 3, 4, 4}, {2, 5, 100, 3, 70, 2},  // aux heads on 3x3 maps; many windows
    };
    int ok = 1;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const int *s = shapes[i];
        const size_t P = (size_t)s[0] * s[1], ni = P * s[2] * s[3], no = P * s[4] * s[5];
        ap_case c = {s[0], s[1], s[2], s[3], s[4], s[5], buf_ties(ni, r, 1),
                     buf_uniform(no, r, -1, 1), buf_uniform(ni, r, -1, 1)};
        outputs ref = {0};
        float *out = buf_new(no), *din = buf_copy(c.din0, ni);
        adaptive_avgpool2d_forward(out, c.x, c.N, c.C, c.H, c.W, c.OH, c.OW);
        adaptive_avgpool2d_backward(din, c.dout, c.N, c.C, c.H, c.W, c.OH, c.OW);
        outputs_add(&ref, "out", out, no, 1);
        outputs_add(&ref, "din", din, ni, 1);
        char what[96];
        snprintf(what, sizeof what, "adaptive avgpool N=%d C=%d %dx%d -> %dx%d", s[0], s[1], s[2],
                 s[3], s[4], s[5]);
        ok &= check_all_configs(ap_run_fast, &c, &ref, what);
        outputs_free(&ref);
        free(c.x), free(c.dout), free(c.din0);
    }
    result(ok, "adaptive_avgpool2d_fast forward/backward bit-identical to the reference");
}

// ---- concat ----

typedef struct {
    int n_in, N, HW, Cs[4], null_in;
    float *ins[4], *dout, *din0[4];
    size_t total;
} cat_case;

static void cat_run_fast(outputs *o, void *ctx) {
    const cat_case *c = ctx;
    float *out = buf_new(c->total);
    concat_fast_forward(out, (const float *const *)c->ins, c->Cs, c->n_in, c->N, c->HW);
    float *dins[4] = {0};
    for (int i = 0; i < c->n_in; i++)
        if (i != c->null_in) dins[i] = buf_copy(c->din0[i], (size_t)c->N * c->Cs[i] * c->HW);
    concat_fast_backward(dins, c->dout, c->Cs, c->n_in, c->N, c->HW, 0);
    // overwriting inputs 0 and 2 (NaN before), adding into the others
    float *dset[4] = {0};
    for (int i = 0; i < c->n_in; i++)
        if (i != c->null_in) {
            const size_t len = (size_t)c->N * c->Cs[i] * c->HW;
            dset[i] = buf_copy(c->din0[i], len);
            for (size_t e = 0; i % 2 == 0 && e < len; e++) dset[i][e] = NAN;
        }
    concat_fast_backward(dset, c->dout, c->Cs, c->n_in, c->N, c->HW, 5u);
    outputs_add(o, "out", out, c->total, 1);
    for (int i = 0; i < c->n_in; i++)
        if (dins[i]) outputs_add(o, "din", dins[i], (size_t)c->N * c->Cs[i] * c->HW, 1);
    for (int i = 0; i < c->n_in; i++)
        if (dset[i]) outputs_add(o, "din overwritten", dset[i], (size_t)c->N * c->Cs[i] * c->HW, 1);
}

static void test_concat(rng *r) {
    int ok = 1;
    for (int t = 0; t < 10; t++) {
        cat_case c = {0};
        c.n_in = 1 + (int)rng_below(r, 4);
        c.N = t % 2 ? 7 : 1;
        c.HW = t < 5 ? 1 + (int)rng_below(r, 20) : 64 + (int)rng_below(r, 200);
        c.null_in = t % 3 == 0 ? (int)rng_below(r, c.n_in) : -1;
        for (int i = 0; i < c.n_in; i++) {
            c.Cs[i] = 1 + (int)rng_below(r, 70);
            const size_t len = (size_t)c.N * c.Cs[i] * c.HW;
            c.ins[i] = buf_ties(len, r, 1);
            c.din0[i] = buf_uniform(len, r, -1, 1);
            c.total += len;
        }
        c.dout = buf_uniform(c.total, r, -1, 1);
        outputs ref = {0};
        float *out = buf_new(c.total), *dins[4] = {0};
        concat_forward(out, (const float *const *)c.ins, c.Cs, c.n_in, c.N, c.HW);
        for (int i = 0; i < c.n_in; i++)
            if (i != c.null_in) dins[i] = buf_copy(c.din0[i], (size_t)c.N * c.Cs[i] * c.HW);
        concat_backward(dins, c.dout, c.Cs, c.n_in, c.N, c.HW);
        float *dset[4] = {0};   // inputs 0 and 2 from zeros, the others from din0
        for (int i = 0; i < c.n_in; i++)
            if (i != c.null_in) {
                const size_t len = (size_t)c.N * c.Cs[i] * c.HW;
                dset[i] = i % 2 == 0 ? calloc(len, sizeof(float)) : buf_copy(c.din0[i], len);
            }
        concat_backward(dset, c.dout, c.Cs, c.n_in, c.N, c.HW);
        outputs_add(&ref, "out", out, c.total, 1);
        for (int i = 0; i < c.n_in; i++)
            if (dins[i]) outputs_add(&ref, "din", dins[i], (size_t)c.N * c.Cs[i] * c.HW, 1);
        for (int i = 0; i < c.n_in; i++)
            if (dset[i])
                outputs_add(&ref, "din overwritten", dset[i], (size_t)c.N * c.Cs[i] * c.HW, 1);
        char what[64];
        snprintf(what, sizeof what, "concat of %d, N=%d HW=%d", c.n_in, c.N, c.HW);
        ok &= check_all_configs(cat_run_fast, &c, &ref, what);
        outputs_free(&ref);
        for (int i = 0; i < c.n_in; i++) free(c.ins[i]), free(c.din0[i]);
        free(c.dout);
    }
    result(ok, "concat_fast forward/backward bit-identical to the reference (NULL gradients, "
               "overwritten ones too)");
}

// ---- dropout and the buffer helpers ----

typedef struct {
    size_t n;
    float p;
    float *x, *dout, *din0;
} do_case;

static void do_run_fast(outputs *o, void *ctx) {
    const do_case *c = ctx;
    float *out = buf_new(c->n), *mask = buf_new(c->n), *din = buf_copy(c->din0, c->n);
    rng r;
    rng_seed(&r, 1234);
    dropout_fast_forward(out, mask, c->x, c->n, c->p, &r);
    dropout_fast_backward(din, c->dout, mask, c->n);
    // The rng must have advanced exactly as the reference's: compare the next draw.
    float *next = buf_new(1);
    next[0] = (float)rng_uniform(&r);
    outputs_add(o, "out", out, c->n, 1);
    outputs_add(o, "mask", mask, c->n, 1);
    outputs_add(o, "din", din, c->n, 1);
    outputs_add(o, "next draw", next, 1, 1);
}

typedef struct {
    size_t n;
    float *a, *b;
} buf_case;

static void buf_run_fast(outputs *o, void *ctx) {
    const buf_case *c = ctx;
    float *z = buf_copy(c->a, c->n), *cp = buf_new(c->n), *s = buf_copy(c->a, c->n);
    tensor_fast_zero(z, c->n);
    tensor_fast_copy(cp, c->b, c->n);
    tensor_fast_add(s, c->b, c->n);
    outputs_add(o, "zero", z, c->n, 1);
    outputs_add(o, "copy", cp, c->n, 1);
    outputs_add(o, "add", s, c->n, 1);
}

static void test_dropout_and_buffers(rng *r) {
    const float ps[] = {0.0f, 0.3f, 0.7f, 1.0f};
    const size_t sizes[] = {5, 1000, 70001};
    int ok = 1;
    for (size_t si = 0; si < 3; si++)
        for (int pi = 0; pi < 4; pi++) {
            do_case c = {sizes[si], ps[pi], buf_ties(sizes[si], r, 1),
                         buf_uniform(sizes[si], r, -1, 1), buf_uniform(sizes[si], r, -1, 1)};
            outputs ref = {0};
            float *out = buf_new(c.n), *mask = buf_new(c.n), *din = buf_copy(c.din0, c.n);
            rng rr;
            rng_seed(&rr, 1234);
            dropout_forward(out, mask, c.x, c.n, c.p, &rr);
            dropout_backward(din, c.dout, mask, c.n);
            float *next = buf_new(1);
            next[0] = (float)rng_uniform(&rr);
            outputs_add(&ref, "out", out, c.n, 1);
            outputs_add(&ref, "mask", mask, c.n, 1);
            outputs_add(&ref, "din", din, c.n, 1);
            outputs_add(&ref, "next draw", next, 1, 1);
            char what[64];
            snprintf(what, sizeof what, "dropout n=%zu p=%g", c.n, c.p);
            ok &= check_all_configs(do_run_fast, &c, &ref, what);
            outputs_free(&ref);
            free(c.x), free(c.dout), free(c.din0);
        }
    result(ok, "dropout_fast forward/backward bit-identical to the reference (same mask, same "
               "rng advance)");

    ok = 1;
    for (size_t si = 0; si < 3; si++) {
        buf_case c = {sizes[si], buf_ties(sizes[si], r, 1), buf_ties(sizes[si], r, 1)};
        outputs ref = {0};
        float *z = buf_new(c.n), *cp = buf_copy(c.b, c.n), *s = buf_copy(c.a, c.n);
        memset(z, 0, c.n * sizeof(float));
        for (size_t i = 0; i < c.n; i++) s[i] += c.b[i];
        outputs_add(&ref, "zero", z, c.n, 1);
        outputs_add(&ref, "copy", cp, c.n, 1);
        outputs_add(&ref, "add", s, c.n, 1);
        char what[64];
        snprintf(what, sizeof what, "buffers n=%zu", c.n);
        ok &= check_all_configs(buf_run_fast, &c, &ref, what);
        outputs_free(&ref);
        free(c.a), free(c.b);
    }
    result(ok, "tensor_fast_zero/copy/add match plain loops");
}

int main(void) {
    rng r;
    rng_seed(&r, 20240611);
    configs_init();
    test_batchnorm(&r);
    test_relu(&r);
    test_maxpool(&r);
    test_bn_relu_maxpool(&r);
    test_adaptive(&r);
    test_concat(&r);
    test_dropout_and_buffers(&r);
    return failed ? 1 : 0;
}
