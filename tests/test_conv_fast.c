// conv2d_fast_forward / conv2d_fast_backward at every ISA level against a double-precision
// direct convolution written here, and against the reference conv2d_forward/backward of ops.h:
// fixed shapes (1x1 with and without stride, 3x3, 5x5, 7x7 stride 2, stride 3, padding up to
// k, batch 1 and 7, outputs that do not fill the GEMM tiles) plus random ones; bias or none,
// fused ReLU; gradients accumulate into what is there; bit-identical results for 1, 2 and 3
// threads; the workspace never overrun. Some 3x3 stride-1 shapes take the Winograd path
// (test_winograd.c tests it on its own); its error stays within the same bounds.
//
// Error measure: |got - exact| / (sum of |terms| + |initial value| + |bias|), below 1e-5
// (against the double loop) and 2e-5 (against the float reference, itself rounded).
#include "ops/conv_fast.h"
#include "ops/conv_smallc.h"
#include "ops/cpu.h"
#include "ops/ops.h"
#include "ops/winograd.h"
#include "util/err.h"
#include "util/rng.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL_EXACT 1e-5
#define TOL_REF 2e-5

#include "guard.h"
#include "tap.h"


typedef struct {
    int N, C, H, W, K, k, stride, pad;
} cshape;

static int osize(int H, int k, int s, int p) { return (H + 2 * p - k) / s + 1; }


// Exact values (double) and magnitudes of all four results for one problem.
typedef struct {
    double *out, *out_mag, *din, *din_mag, *dw, *dw_mag, *db, *db_mag;
} exact;

static void exact_compute(exact *e, const cshape *s, const float *in, const float *w,
                          const float *b, int relu, const float *dout, const float *din0,
                          const float *dw0, const float *db0) {
    int OH = osize(s->H, s->k, s->stride, s->pad), OW = osize(s->W, s->k, s->stride, s->pad);
    size_t no = (size_t)s->N * s->K * OH * OW, ni = (size_t)s->N * s->C * s->H * s->W;
    size_t nw = (size_t)s->K * s->C * s->k * s->k;
    e->out = calloc(no, sizeof(double));
    e->out_mag = calloc(no, sizeof(double));
    e->din = calloc(ni, sizeof(double));
    e->din_mag = calloc(ni, sizeof(double));
    e->dw = calloc(nw, sizeof(double));
    e->dw_mag = calloc(nw, sizeof(double));
    e->db = calloc(s->K, sizeof(double));
    e->db_mag = calloc(s->K, sizeof(double));
    for (size_t i = 0; i < ni; i++) e->din[i] = din0[i], e->din_mag[i] = fabs(din0[i]);
    for (size_t i = 0; i < nw; i++) e->dw[i] = dw0[i], e->dw_mag[i] = fabs(dw0[i]);
    for (int o = 0; o < s->K; o++) e->db[o] = db0[o], e->db_mag[o] = fabs(db0[o]);
    for (int n = 0; n < s->N; n++)
        for (int o = 0; o < s->K; o++)
            for (int oy = 0; oy < OH; oy++)
                for (int ox = 0; ox < OW; ox++) {
                    size_t oi = (((size_t)n * s->K + o) * OH + oy) * OW + ox;
                    double acc = b ? b[o] : 0.0, mag = b ? fabs(b[o]) : 0.0;
                    double g = dout[oi];
                    e->db[o] += g;
                    e->db_mag[o] += fabs(g);
                    for (int c = 0; c < s->C; c++)
                        for (int dy = 0; dy < s->k; dy++)
                            for (int dx = 0; dx < s->k; dx++) {
                                int y = oy * s->stride - s->pad + dy, x = ox * s->stride - s->pad + dx;
                                if (y < 0 || y >= s->H || x < 0 || x >= s->W) continue;
                                size_t ii = (((size_t)n * s->C + c) * s->H + y) * s->W + x;
                                size_t wi = (((size_t)o * s->C + c) * s->k + dy) * s->k + dx;
                                double t = (double)in[ii] * w[wi];
                                acc += t, mag += fabs(t);
                                e->din[ii] += g * w[wi], e->din_mag[ii] += fabs(g * w[wi]);
                                e->dw[wi] += g * in[ii], e->dw_mag[wi] += fabs(g * in[ii]);
                            }
                    if (relu && acc < 0) acc = 0;
                    e->out[oi] = acc, e->out_mag[oi] = mag;
                }
}

static void exact_free(exact *e) {
    free(e->out), free(e->out_mag), free(e->din), free(e->din_mag);
    free(e->dw), free(e->dw_mag), free(e->db), free(e->db_mag);
}

// Worst |got - want| / mag; NaN or a changed canary (element n) gives infinity.
static double err_vs_double(const float *got, const double *want, const double *mag, size_t n,
                            float canary) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs(got[i] - want[i]) / (mag[i] + 1e-30);
        if (!(e <= worst)) worst = e;
    }
    if (memcmp(&got[n], &canary, sizeof canary) != 0) return INFINITY;
    return worst;
}

static double err_vs_float(const float *got, const float *want, const double *mag, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]) / (mag[i] + 1e-30);
        if (!(e <= worst)) worst = e;
    }
    return worst;
}

// Results of the fast kernels for one problem under the current ISA and thread settings.
typedef struct {
    float *out, *din, *dw, *db;
    int ws_ok;
} fast_result;

static fast_result fast_run(const cshape *s, const float *in, const float *w, const float *b,
                            int relu, const float *dout, const float *din0, const float *dw0,
                            const float *db0) {
    int OH = osize(s->H, s->k, s->stride, s->pad), OW = osize(s->W, s->k, s->stride, s->pad);
    size_t no = (size_t)s->N * s->K * OH * OW, ni = (size_t)s->N * s->C * s->H * s->W;
    size_t nw = (size_t)s->K * s->C * s->k * s->k;
    fast_result r;
    r.out = malloc((no + 1) * sizeof(float));
    r.out[no] = 777.0f;  // canary
    r.din = copy_buf(din0, ni);
    r.dw = copy_buf(dw0, nw);
    r.db = copy_buf(db0, s->K);
    guarded ws = guarded_new(
        conv2d_fast_workspace_size(s->N, s->C, s->H, s->W, s->K, s->k, s->stride, s->pad));
    conv2d_fast_forward(r.out, in, w, b, s->N, s->C, s->H, s->W, s->K, s->k, s->stride, s->pad,
                        relu, ws.p);
    conv2d_fast_backward(r.din, r.dw, r.db, dout, in, w, s->N, s->C, s->H, s->W, s->K, s->k,
                         s->stride, s->pad, 0, ws.p);
    r.ws_ok = guarded_intact(&ws);
    guarded_free(&ws);
    return r;
}

static void fast_free(fast_result *r) { free(r->out), free(r->din), free(r->dw), free(r->db); }

// din_overwrite: din = the gradient whatever it held (NaN here), as adding it to zeros gives;
// dw alongside unchanged.
static int overwrite_same(const cshape *s, const float *in, const float *w, const float *dout,
                          const float *dw0) {
    const size_t ni = (size_t)s->N * s->C * s->H * s->W, nw = (size_t)s->K * s->C * s->k * s->k;
    float *a = calloc(ni, sizeof(float)), *b = malloc(ni * sizeof(float));
    float *dwa = copy_buf(dw0, nw), *dwb = copy_buf(dw0, nw);
    for (size_t i = 0; i < ni; i++) b[i] = NAN;
    float *ws = malloc(
        conv2d_fast_workspace_size(s->N, s->C, s->H, s->W, s->K, s->k, s->stride, s->pad) *
        sizeof(float));
    conv2d_fast_backward(a, dwa, NULL, dout, in, w, s->N, s->C, s->H, s->W, s->K, s->k,
                         s->stride, s->pad, 0, ws);
    conv2d_fast_backward(b, dwb, NULL, dout, in, w, s->N, s->C, s->H, s->W, s->K, s->k,
                         s->stride, s->pad, 1, ws);
    int ok = memcmp(dwa, dwb, nw * sizeof(float)) == 0;
    for (size_t i = 0; i < ni; i++) ok &= a[i] == b[i];
    free(a), free(b), free(dwa), free(dwb), free(ws);
    return ok;
}

static int fast_equal(const fast_result *a, const fast_result *b, size_t no, size_t ni,
                      size_t nw, size_t nb) {
    return !memcmp(a->out, b->out, no * 4) && !memcmp(a->din, b->din, ni * 4) &&
           !memcmp(a->dw, b->dw, nw * 4) && !memcmp(a->db, b->db, nb * 4);
}

static const cshape fixed[] = {
    {1, 3, 9, 11, 5, 3, 1, 1},   {7, 4, 8, 8, 6, 1, 1, 0},    {2, 5, 13, 7, 9, 5, 2, 2},
    {1, 1, 1, 1, 1, 1, 1, 0},    {7, 3, 15, 15, 8, 7, 2, 3},  {3, 16, 14, 14, 24, 3, 1, 1},
    {2, 8, 10, 10, 17, 1, 2, 0}, {1, 6, 7, 7, 50, 3, 1, 0},   {2, 3, 6, 5, 4, 3, 1, 3},
    {1, 2, 5, 5, 3, 5, 3, 0},    {7, 32, 7, 7, 48, 3, 1, 1},  {1, 20, 30, 30, 16, 5, 1, 2},
    {2, 130, 6, 6, 10, 1, 1, 0}, {2, 50, 9, 9, 20, 3, 1, 1},  {1, 2, 2, 2, 3, 3, 1, 1},
    {7, 4, 12, 12, 9, 3, 2, 1},
    // maps smaller than the kernel (the dense path, conv2d_fast_dense): 1x1 images meet only
    // the tap dy = dx = pad; GoogLeNet's 4a-4e at 2x2; odd shapes, stride 2, big padding
    {5, 20, 1, 1, 12, 3, 1, 1},  {3, 7, 1, 1, 5, 3, 2, 1},    {9, 11, 1, 1, 30, 5, 1, 2},
    {6, 13, 2, 2, 17, 3, 1, 1},  {3, 9, 2, 3, 11, 5, 1, 2},   {4, 5, 1, 2, 7, 3, 2, 1},
    {2, 4, 3, 2, 6, 5, 2, 4},    {16, 160, 2, 2, 320, 3, 1, 1},
    // output rows of 16 and 32 at stride 1 (bf16 on AMX: im2col rows loaded straight into
    // tiles), padded and not, a K block boundary inside a channel's taps
    {3, 5, 16, 16, 7, 3, 1, 1},  {2, 3, 18, 18, 6, 3, 1, 0},   {1, 4, 32, 32, 5, 5, 1, 2},
    {2, 60, 16, 16, 70, 3, 1, 1},
    // pointwise on planes of 16 pixels or fewer (bf16 on AMX: the weight gradient's pixels
    // loaded or gathered straight into tiles): two K blocks, a tail, 2-pixel and 8-pixel planes
    {40, 7, 4, 4, 9, 1, 1, 0},   {70, 13, 2, 2, 11, 1, 1, 0},  {33, 5, 1, 2, 6, 1, 1, 0},
    {9, 6, 2, 4, 5, 1, 1, 0},
    // "same" convolutions on planes of 16 to 64 pixels (bf16 on AMX: the weight gradient's 16
    // pixels are whole rows, one masked load per tap): 8x8 and 4x4 as in 3a-4e, a tail half,
    // three K blocks, 5x5, 2- and 4-pixel rows
    {18, 7, 8, 8, 9, 3, 1, 1},   {40, 6, 4, 4, 10, 3, 1, 1},  {3, 5, 4, 4, 7, 3, 1, 1},
    {5, 3, 8, 8, 4, 5, 1, 2},    {6, 3, 8, 2, 5, 3, 1, 1},    {3, 4, 8, 4, 6, 3, 1, 1},
    // stride 2, output rows of 16 and 32 (bf16 on AMX: even floats of two loads per tap):
    // a grayscale conv1 at 64x64, padded or not, odd heights
    {2, 1, 64, 64, 8, 7, 2, 3},  {3, 3, 32, 33, 5, 3, 2, 1},  {1, 2, 34, 64, 4, 5, 2, 2},
    {2, 2, 33, 33, 3, 3, 2, 0},
    // big enough (>= 4M multiply-adds) to be split over threads
    {7, 24, 20, 20, 40, 3, 1, 1}, {2, 300, 9, 9, 200, 1, 1, 0},
    // few input channels (conv_smallc.h's weight gradient): a grayscale conv1 over three
    // chunks of images, output rows of 18 (a masked tail vector), K not a multiple of 4, RGB
    {19, 1, 40, 36, 22, 7, 2, 3}, {9, 3, 23, 35, 6, 5, 1, 2},  {3, 2, 17, 16, 33, 3, 3, 1},
};
#define N_FIXED (int)(sizeof fixed / sizeof fixed[0])
#define N_RANDOM 14

static cshape shape_at(int i, rng *r) {
    if (i < N_FIXED) return fixed[i];
    static const int ks[] = {1, 2, 3, 5};
    cshape s;
    s.N = 1 + (int)rng_below(r, 7);
    s.C = 1 + (int)rng_below(r, 20);
    s.K = 1 + (int)rng_below(r, 20);
    s.k = ks[rng_below(r, 4)];
    s.stride = 1 + (int)rng_below(r, 3);
    s.pad = (int)rng_below(r, (uint32_t)s.k + 1);
    s.H = 1 + (int)rng_below(r, 16);
    s.W = 1 + (int)rng_below(r, 16);
    if (s.H + 2 * s.pad < s.k) s.H = s.k;
    if (s.W + 2 * s.pad < s.k) s.W = s.k;
    return s;
}

static void test_level(cpu_isa_level level) {
    const char *name = cpu_isa_name(level);
    if (level > cpu_isa_detected()) {
        result(1, "conv_fast %s (skipped: cpu lacks %s)", name, name);
        return;
    }
    if (cpu_isa_set(level) != 0) {
        result(0, "conv_fast %s: %s", name, err_msg());
        return;
    }
    rng r;
    rng_seed(&r, 99 + level);
    double worst_fwd = 0, worst_bwd = 0, worst_ref_fwd = 0, worst_ref_bwd = 0;
    char at_fwd[128] = "", at_bwd[128] = "", at_same[160] = "";
    int same = 1, ws_ok = 1, packed_ok = 1, n_dense = 0, n_wino_din = 0, overwrite_ok = 1;
    int n_smallc = 0;
    char at_packed[160] = "", at_overwrite[128] = "";
    for (int i = 0; i < N_FIXED + N_RANDOM; i++) {
        cshape s = shape_at(i, &r);
        int OH = osize(s.H, s.k, s.stride, s.pad), OW = osize(s.W, s.k, s.stride, s.pad);
        size_t no = (size_t)s.N * s.K * OH * OW, ni = (size_t)s.N * s.C * s.H * s.W;
        size_t nw = (size_t)s.K * s.C * s.k * s.k;
        float *in = rand_buf(ni, &r), *w = rand_buf(nw, &r), *b = rand_buf(s.K, &r);
        float *dout = rand_buf(no, &r), *din0 = rand_buf(ni, &r), *dw0 = rand_buf(nw, &r);
        float *db0 = rand_buf(s.K, &r);
        int relu = i % 3 == 1;
        const float *bias = i % 2 ? b : NULL;
        exact e;
        exact_compute(&e, &s, in, w, bias, relu, dout, din0, dw0, db0);

        cpu_threads_set(1);
        fast_result f = fast_run(&s, in, w, bias, relu, dout, din0, dw0, db0);
        ws_ok &= f.ws_ok;
        char where[100];
        snprintf(where, sizeof where, "N%d C%d %dx%d K%d k%d s%d p%d", s.N, s.C, s.H, s.W, s.K,
                 s.k, s.stride, s.pad);
        double ef = err_vs_double(f.out, e.out, e.out_mag, no, 777.0f);
        double eb = fmax(err_vs_double(f.din, e.din, e.din_mag, ni, din0[ni]),
                         fmax(err_vs_double(f.dw, e.dw, e.dw_mag, nw, dw0[nw]),
                              err_vs_double(f.db, e.db, e.db_mag, s.K, db0[s.K])));
        if (!(ef <= worst_fwd)) worst_fwd = ef, snprintf(at_fwd, sizeof at_fwd, "%s", where);
        if (!(eb <= worst_bwd)) worst_bwd = eb, snprintf(at_bwd, sizeof at_bwd, "%s", where);

        // the reference kernels of ops.h (ReLU applied here)
        float *rout = malloc(no * sizeof(float));
        float *rdin = copy_buf(din0, ni), *rdw = copy_buf(dw0, nw), *rdb = copy_buf(db0, s.K);
        conv2d_forward(rout, in, w, bias, s.N, s.C, s.H, s.W, s.K, s.k, s.stride, s.pad);
        if (relu)
            for (size_t j = 0; j < no; j++) rout[j] = rout[j] < 0 ? 0 : rout[j];
        conv2d_backward(rdin, rdw, rdb, dout, in, w, s.N, s.C, s.H, s.W, s.K, s.k, s.stride, s.pad);
        worst_ref_fwd = fmax(worst_ref_fwd, err_vs_float(f.out, rout, e.out_mag, no));
        worst_ref_bwd = fmax(worst_ref_bwd,
                             fmax(err_vs_float(f.din, rdin, e.din_mag, ni),
                                  fmax(err_vs_float(f.dw, rdw, e.dw_mag, nw),
                                       err_vs_float(f.db, rdb, e.db_mag, s.K))));
        free(rout), free(rdin), free(rdw), free(rdb);
        if (overwrite_ok && !overwrite_same(&s, in, w, dout, dw0)) {
            overwrite_ok = 0;
            snprintf(at_overwrite, sizeof at_overwrite, " (differs at %s)", where);
        }

        // pre-packed weights: the same bits as conv2d_fast_forward, except where that takes the
        // dense path (the packed forward never does): there within the tolerance
        {
            float *packed = malloc(conv2d_fast_pack_weights_size(s.C, s.K, s.k) * sizeof(float));
            conv2d_fast_pack_weights(packed, w, s.C, s.K, s.k);
            float *pout = malloc((no + 1) * sizeof(float));
            pout[no] = 0.0f;
            float *pws = malloc(conv2d_fast_workspace_size(s.N, s.C, s.H, s.W, s.K, s.k, s.stride,
                                                           s.pad) * sizeof(float));
            int rc = conv2d_fast_forward_packed(pout, in, packed, bias, s.N, s.C, s.H, s.W, s.K,
                                                s.k, s.stride, s.pad, relu, pws);
            int bad_rc = conv2d_fast_forward_packed(pout, in, packed, bias, s.N, s.C, s.H, s.W,
                                                    s.K + 1, s.k, s.stride, s.pad, relu, pws);
            // where conv2d_fast_forward takes the dense or the Winograd path, the packed one
            // stays direct: then it must match the exact result as closely as the direct path
            int dense = conv2d_fast_dense(s.H, s.W, s.k);
            int wino = s.k == 3 && s.stride == 1 && winograd_tile(s.N, s.C, s.H, s.W, s.K, s.pad);
            int same_out = dense || wino
                               ? err_vs_double(pout, e.out, e.out_mag, no, pout[no]) <= TOL_EXACT
                               : memcmp(pout, f.out, no * 4) == 0;
            n_dense += dense;
            n_smallc += !dense && conv2d_smallc_use(s.C, s.H, s.W, s.k, s.stride, s.pad) &&
                        !(s.k == 3 && s.stride == 1 &&
                          winograd_weight_grad_tile(s.N, s.C, s.H, s.W, s.K, s.pad));
            // the backward's din of a 3x3 stride-1 convolution: Winograd on dout
            n_wino_din += !dense && s.k == 3 && s.stride == 1 && s.pad <= 2 &&
                          winograd_tile(s.N, s.K, s.H + 2 * s.pad - 2, s.W + 2 * s.pad - 2, s.C,
                                        2 - s.pad) != 0;
            if (packed_ok && (rc != 0 || bad_rc != -1 || !same_out)) {
                packed_ok = 0;
                snprintf(at_packed, sizeof at_packed, "%s (rc %d, %d)", where, rc, bad_rc);
            }
            free(packed), free(pout), free(pws);
        }

        for (int t = 2; t <= 3; t++) {
            cpu_threads_set(t);
            fast_result g = fast_run(&s, in, w, bias, relu, dout, din0, dw0, db0);
            ws_ok &= g.ws_ok;
            if (same && !fast_equal(&f, &g, no, ni, nw, s.K)) {
                same = 0;
                snprintf(at_same, sizeof at_same, "%s, %d threads", where, t);
            }
            fast_free(&g);
        }
        fast_free(&f);
        exact_free(&e);
        free(in), free(w), free(b), free(dout), free(din0), free(dw0), free(db0);
    }
    int n = N_FIXED + N_RANDOM;
    result(worst_fwd <= TOL_EXACT, "conv_fast %s forward vs double loop, %d shapes (worst %.2g at %s)",
           name, n, worst_fwd, at_fwd);
    result(worst_bwd <= TOL_EXACT,
           "conv_fast %s backward din/dw/db vs double loop, %d shapes (worst %.2g at %s)", name, n,
           worst_bwd, at_bwd);
    result(worst_ref_fwd <= TOL_REF && worst_ref_bwd <= TOL_REF,
           "conv_fast %s vs reference conv2d_forward/backward (worst %.2g / %.2g)", name,
           worst_ref_fwd, worst_ref_bwd);
    result(same, "conv_fast %s bit-identical for 1, 2, 3 threads%s%s", name,
           same ? "" : ": differs at ", at_same);
    result(ws_ok, "conv_fast %s stays inside conv2d_fast_workspace_size()", name);
    result(packed_ok,
           "conv_fast %s forward with packed weights bit-identical (direct where the unpacked one "
           "is dense or Winograd)%s%s",
           name, packed_ok ? "" : ", not at ", at_packed);
    result(overwrite_ok, "conv_fast %s backward with din_overwrite = adding to zeros%s", name,
           at_overwrite);
    result(n_dense >= 8, "conv_fast %s: %d shapes took the dense path", name, n_dense);
    if (level == CPU_ISA_AVX512)
        result(n_smallc >= 8, "conv_fast %s: %d shapes took conv_smallc's weight gradient", name,
               n_smallc);
    result(n_wino_din >= 3, "conv_fast %s: %d shapes took Winograd for din", name, n_wino_din);
}

// bfloat16 mode (cpu_bf16_set): no Winograd; every product of a convolution rounds its two
// operands, so out, din and dw must match the double loop run on rounded in, w and dout
// (db sums dout as it is: against the unrounded loop). Bit-identical for 1, 2, 3 threads.
static float *rounded(const float *x, size_t n) {
    float *y = malloc((n + 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) y[i] = bf16_ref(x[i]);
    y[n] = x[n];
    return y;
}

static void test_bf16(cpu_isa_level level, int amx) {
    char name[64];
    snprintf(name, sizeof name, "%s%s", cpu_isa_name(level), amx ? " + AMX" : "");
    if (level > cpu_isa_detected() || (amx && !cpu_amx_detected())) {
        result(1, "conv_fast bf16 %s (skipped: cpu lacks it)", name);
        return;
    }
    cpu_isa_set(level);
    cpu_amx_allow(amx);
    cpu_bf16_set(1);
    rng r;
    rng_seed(&r, 199 + level);
    double worst = 0, unrounded = 0;
    char at[128] = "", at_same[160] = "";
    int same = 1, ws_ok = 1;
    for (int i = 0; i < N_FIXED + N_RANDOM; i++) {
        cshape s = shape_at(i, &r);
        int OH = osize(s.H, s.k, s.stride, s.pad), OW = osize(s.W, s.k, s.stride, s.pad);
        size_t no = (size_t)s.N * s.K * OH * OW, ni = (size_t)s.N * s.C * s.H * s.W;
        size_t nw = (size_t)s.K * s.C * s.k * s.k;
        float *in = rand_buf(ni, &r), *w = rand_buf(nw, &r), *b = rand_buf(s.K, &r);
        float *dout = rand_buf(no, &r), *din0 = rand_buf(ni, &r), *dw0 = rand_buf(nw, &r);
        float *db0 = rand_buf(s.K, &r);
        float *rin = rounded(in, ni), *rw = rounded(w, nw), *rdout = rounded(dout, no);
        int relu = i % 3 == 1;
        const float *bias = i % 2 ? b : NULL;
        exact e, er;
        exact_compute(&e, &s, in, w, bias, relu, dout, din0, dw0, db0);
        exact_compute(&er, &s, rin, rw, bias, relu, rdout, din0, dw0, db0);
        cpu_threads_set(1);
        fast_result f = fast_run(&s, in, w, bias, relu, dout, din0, dw0, db0);
        ws_ok &= f.ws_ok;
        double err = fmax(fmax(err_vs_double(f.out, er.out, er.out_mag, no, 777.0f),
                               err_vs_double(f.din, er.din, er.din_mag, ni, din0[ni])),
                          fmax(err_vs_double(f.dw, er.dw, er.dw_mag, nw, dw0[nw]),
                               err_vs_double(f.db, e.db, e.db_mag, s.K, db0[s.K])));
        unrounded = fmax(unrounded, fmax(err_vs_double(f.out, e.out, e.out_mag, no, 777.0f),
                                         err_vs_double(f.dw, e.dw, e.dw_mag, nw, dw0[nw])));
        if (!(err <= worst)) {
            worst = err;
            snprintf(at, sizeof at, "N%d C%d %dx%d K%d k%d s%d p%d", s.N, s.C, s.H, s.W, s.K, s.k,
                     s.stride, s.pad);
        }
        for (int t = 2; t <= 3; t++) {
            cpu_threads_set(t);
            fast_result g = fast_run(&s, in, w, bias, relu, dout, din0, dw0, db0);
            ws_ok &= g.ws_ok;
            if (same && !fast_equal(&f, &g, no, ni, nw, s.K)) {
                same = 0;
                snprintf(at_same, sizeof at_same, ": differs at shape %d, %d threads", i, t);
            }
            fast_free(&g);
        }
        fast_free(&f);
        exact_free(&e), exact_free(&er);
        free(in), free(w), free(b), free(dout), free(din0), free(dw0), free(db0);
        free(rin), free(rw), free(rdout);
    }
    int on_amx = cpu_amx();
    cpu_bf16_set(0);
    cpu_amx_allow(1);
    int n = N_FIXED + N_RANDOM;
    result(on_amx == amx, "conv_fast bf16 %s: %s AMX", name, on_amx ? "runs on" : "does not use");
    result(worst <= TOL_EXACT,
           "conv_fast bf16 %s forward and backward vs double loop on rounded operands, %d shapes "
           "(worst %.2g at %s)", name, n, worst, at);
    result(unrounded > 1e-4, "conv_fast bf16 %s rounds: worst err vs unrounded operands %.2g", name,
           unrounded);
    result(same, "conv_fast bf16 %s bit-identical for 1, 2, 3 threads%s", name, at_same);
    result(ws_ok, "conv_fast bf16 %s stays inside conv2d_fast_workspace_size()", name);
}

// ---- 1x1 groups (conv2d_fast_1x1_group_*) against the convolutions one at a time ----
// Forward, dW and db must be the single convs' bits; din (one GEMM over the stacked depth)
// within TOL_EXACT of the double sum; 1, 2, 3 threads bit-identical; workspace never overrun.

typedef struct {
    int N, C, H, W, ng, Ks[4], bias;
} gshape;

static const gshape groups[] = {
    {7, 19, 4, 4, 3, {21, 9, 5}, 0},    {3, 40, 8, 8, 3, {16, 24, 4}, 1},
    {5, 33, 2, 2, 2, {48, 17, 0}, 0},   {1, 64, 5, 3, 4, {8, 8, 8, 40}, 1},
    {16, 48, 1, 1, 3, {12, 30, 7}, 1},
};

typedef struct {
    float *out[4], *din, *dw[4], *db[4];
    int ws_ok;
} group_result;

static group_result group_run(const gshape *s, const float *in, float *const *w, float *const *b,
                              float *const *dout, const float *din0, float *const *dw0,
                              float *const *db0) {
    const int hw = s->H * s->W, ng = s->ng;
    int K = 0;
    for (int g = 0; g < ng; g++) K += s->Ks[g];
    group_result r = {.ws_ok = 1};
    const size_t ni = (size_t)s->N * s->C * hw;
    for (int g = 0; g < ng; g++) {
        const size_t nw = (size_t)s->Ks[g] * s->C;
        r.out[g] = malloc(((size_t)s->N * s->Ks[g] * hw + 1) * sizeof(float));
        r.dw[g] = copy_buf(dw0[g], nw);
        r.db[g] = copy_buf(db0[g], s->Ks[g]);
    }
    r.din = copy_buf(din0, ni);
    guarded ws = guarded_new(conv2d_fast_1x1_group_workspace_size(s->N, s->C, s->H, s->W, K));
    conv2d_fast_1x1_group_forward(r.out, in, (const float *const *)w,
                                  s->bias ? (const float *const *)b : NULL, s->Ks, ng, s->N, s->C,
                                  s->H, s->W, ws.p);
    conv2d_fast_1x1_group_backward(r.din, r.dw, s->bias ? r.db : NULL,
                                   (const float *const *)dout, in, (const float *const *)w, s->Ks,
                                   ng, s->N, s->C, s->H, s->W, 0, ws.p);
    r.ws_ok = guarded_intact(&ws);
    guarded_free(&ws);
    return r;
}

static void group_free(group_result *r, int ng) {
    for (int g = 0; g < ng; g++) free(r->out[g]), free(r->dw[g]), free(r->db[g]);
    free(r->din);
}

// a and b agree to 1e-5 of b's largest magnitude (a NaN anywhere fails: fmax would skip it).
static int near_rel(const float *a, const float *b, size_t n) {
    double big = 1e-30, worst = 0;
    for (size_t i = 0; i < n; i++) big = fmax(big, fabs(b[i]));
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - b[i]);
        if (!(d <= worst)) worst = d;
    }
    return worst <= 1e-5 * big;
}

// amx: bfloat16 products on AMX (din's GEMM reads the stacked weights as a transposed A);
// the exact din then takes the rounded operands.
static void test_groups(cpu_isa_level level, int amx) {
    char name[64];
    snprintf(name, sizeof name, "%s%s", cpu_isa_name(level), amx ? " + AMX bf16" : "");
    if (level > cpu_isa_detected() || cpu_isa_set(level) != 0 || (amx && !cpu_amx_detected())) {
        result(1, "conv_fast 1x1 groups %s (skipped: cpu lacks it)", name);
        return;
    }
    cpu_amx_allow(amx);
    cpu_bf16_set(amx);
    rng r;
    rng_seed(&r, 7 + level);
    int same_single = 1, same_threads = 1, ws_ok = 1, overwrite_ok = 1;
    double worst_din = 0;
    char at[160] = "";
    for (size_t si = 0; si < sizeof groups / sizeof groups[0]; si++) {
        const gshape *s = &groups[si];
        const int hw = s->H * s->W, ng = s->ng;
        const size_t ni = (size_t)s->N * s->C * hw;
        float *in = rand_buf(ni, &r), *din0 = rand_buf(ni, &r);
        float *w[4], *b[4], *dout[4], *dw0[4], *db0[4];
        for (int g = 0; g < ng; g++) {
            w[g] = rand_buf((size_t)s->Ks[g] * s->C, &r);
            b[g] = g == 1 ? NULL : rand_buf(s->Ks[g], &r);   // a member without bias
            dout[g] = rand_buf((size_t)s->N * s->Ks[g] * hw, &r);
            dw0[g] = rand_buf((size_t)s->Ks[g] * s->C, &r);
            db0[g] = rand_buf(s->Ks[g], &r);
        }
        cpu_threads_set(2);
        group_result gr = group_run(s, in, w, b, dout, din0, dw0, db0);
        ws_ok &= gr.ws_ok;
        // one conv at a time, and the exact din
        double *exact = malloc(ni * sizeof(double)), *mag = malloc(ni * sizeof(double));
        for (size_t i = 0; i < ni; i++) exact[i] = din0[i], mag[i] = fabs(din0[i]);
        for (int g = 0; g < ng; g++) {
            const int Kg = s->Ks[g];
            const size_t no = (size_t)s->N * Kg * hw, nw = (size_t)Kg * s->C;
            float *out = malloc((no + 1) * sizeof(float)), *dw = copy_buf(dw0[g], nw),
                  *db = copy_buf(db0[g], Kg), *scratch = copy_buf(din0, ni);
            float *ws = malloc(conv2d_fast_workspace_size(s->N, s->C, s->H, s->W, Kg, 1, 1, 0) *
                               sizeof(float) + 64);
            conv2d_fast_forward(out, in, w[g], s->bias ? b[g] : NULL, s->N, s->C, s->H, s->W, Kg,
                                1, 1, 0, 0, ws);
            conv2d_fast_backward(scratch, dw, s->bias ? db : NULL, dout[g], in, w[g], s->N, s->C,
                                 s->H, s->W, Kg, 1, 1, 0, 0, ws);
            // (bf16 on AMX: a small single GEMM may take the float32 kernels on the same
            // rounded operands, summing in another order: equal to float32 rounding)
            int ok = amx ? near_rel(out, gr.out[g], no) && near_rel(dw, gr.dw[g], nw) &&
                               near_rel(db, gr.db[g], Kg)
                         : memcmp(out, gr.out[g], no * sizeof(float)) == 0 &&
                               memcmp(dw, gr.dw[g], nw * sizeof(float)) == 0 &&
                               memcmp(db, gr.db[g], Kg * sizeof(float)) == 0;
            if (!ok && same_single)
                snprintf(at, sizeof at, " (differs: shape %zu member %d)", si, g);
            same_single &= ok;
            for (int n = 0; n < s->N; n++)
                for (int k = 0; k < Kg; k++)
                    for (int ch = 0; ch < s->C; ch++)
                        for (int p = 0; p < hw; p++) {
                            float wv = w[g][(size_t)k * s->C + ch];
                            float dv = dout[g][((size_t)n * Kg + k) * hw + p];
                            if (amx) wv = bf16_ref(wv), dv = bf16_ref(dv);
                            const double t = (double)wv * dv;
                            const size_t ii = ((size_t)n * s->C + ch) * hw + p;
                            exact[ii] += t, mag[ii] += fabs(t);
                        }
            free(out), free(dw), free(db), free(scratch), free(ws);
        }
        double e = err_vs_double(gr.din, exact, mag, ni, din0[ni]);
        if (!(e <= worst_din)) worst_din = e;
        for (int t = 1; t <= 3; t += 2) {
            cpu_threads_set(t);
            group_result o = group_run(s, in, w, b, dout, din0, dw0, db0);
            int ok = memcmp(o.din, gr.din, ni * sizeof(float)) == 0;
            for (int g = 0; g < ng; g++) {
                const size_t no = (size_t)s->N * s->Ks[g] * hw, nw = (size_t)s->Ks[g] * s->C;
                ok &= memcmp(o.out[g], gr.out[g], no * sizeof(float)) == 0 &&
                      memcmp(o.dw[g], gr.dw[g], nw * sizeof(float)) == 0 &&
                      memcmp(o.db[g], gr.db[g], s->Ks[g] * sizeof(float)) == 0;
            }
            same_threads &= ok;
            ws_ok &= o.ws_ok;
            group_free(&o, ng);
        }
        {   // din_overwrite (NaN before) against adding to zeros
            float *a = calloc(ni, sizeof(float)), *o = malloc(ni * sizeof(float));
            for (size_t i = 0; i < ni; i++) o[i] = NAN;
            int K = 0;
            for (int g = 0; g < ng; g++) K += s->Ks[g];
            float *ws = malloc(conv2d_fast_1x1_group_workspace_size(s->N, s->C, s->H, s->W, K) *
                               sizeof(float));
            conv2d_fast_1x1_group_backward(a, NULL, NULL, (const float *const *)dout, in,
                                           (const float *const *)w, s->Ks, ng, s->N, s->C, s->H,
                                           s->W, 0, ws);
            conv2d_fast_1x1_group_backward(o, NULL, NULL, (const float *const *)dout, in,
                                           (const float *const *)w, s->Ks, ng, s->N, s->C, s->H,
                                           s->W, 1, ws);
            for (size_t i = 0; i < ni; i++) overwrite_ok &= a[i] == o[i];
            free(a), free(o), free(ws);
        }
        group_free(&gr, ng);
        free(exact), free(mag), free(in), free(din0);
        for (int g = 0; g < ng; g++) free(w[g]), free(b[g]), free(dout[g]), free(dw0[g]), free(db0[g]);
    }
    cpu_threads_set(2);
    int on_amx = cpu_amx();
    cpu_bf16_set(0);
    cpu_amx_allow(1);
    if (amx) result(on_amx, "conv_fast 1x1 groups %s: runs on AMX", name);
    result(same_single, "conv_fast 1x1 groups %s: out, dW, db %s one conv at a time%s", name,
           amx ? "within 1e-5 of" : "bit-identical to", at);
    result(worst_din <= TOL_EXACT, "conv_fast 1x1 groups %s: din vs double sum (worst %.2g)", name,
           worst_din);
    result(same_threads, "conv_fast 1x1 groups %s bit-identical for 1, 2, 3 threads", name);
    result(overwrite_ok, "conv_fast 1x1 groups %s: din_overwrite = adding to zeros", name);
    result(ws_ok, "conv_fast 1x1 groups %s stay inside their workspace size", name);
}

int main(void) {
    cpu_isa_level det = cpu_isa_detected();
    int threads = cpu_threads();
    test_level(CPU_ISA_SCALAR);
    test_level(CPU_ISA_AVX2);
    test_level(CPU_ISA_AVX512);
    test_bf16(CPU_ISA_AVX2, 0);
    test_bf16(CPU_ISA_AVX512, 1);
    test_groups(CPU_ISA_SCALAR, 0);
    test_groups(CPU_ISA_AVX2, 0);
    test_groups(CPU_ISA_AVX512, 0);
    test_groups(CPU_ISA_AVX512, 1);
    cpu_isa_set(det);
    cpu_threads_set(threads);
    cpu_threads_set(1);  // joins the workers
    return failed ? 1 : 0;
}
