// winograd_forward (F(2x2,3x3) and F(4x4,3x3)) at every ISA level against a double-precision
// direct convolution: odd sizes (tiles that do not divide the output), padding 0, 1 and 2,
// channel counts that fill no GEMM tile, batch 1 and 7, bias or none, fused ReLU, enough tiles
// for several chunks and filters enough for the one-chunk plan; bit-identical results for 1, 2
// and 3 threads; the workspace never overrun; conv2d_fast_forward taking this path where
// winograd_tile() says so.
//
// Error measure as in test_conv_fast.c: |got - exact| / (sum of |terms| + |bias|). Winograd's
// transforms add and scale terms before the products, so the bounds are looser than the direct
// convolution's 1e-5: F(2x2) sums at most 4 terms of the input patch (and halves the filter's),
// F(4x4) up to 6 with weights to 5 and 8 (about 10x the direct error on uniform data). The
// "realistic" data (ReLU'd activations, He-scaled filters) reports the same measure.
#include "ops/conv_fast.h"
#include "ops/cpu.h"
#include "ops/winograd.h"
#include "util/rng.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guard.h"
#include "tap.h"

#define TOL_F2 2e-6
#define TOL_F4 2e-5

typedef struct {
    int N, C, H, W, K, pad;
} wshape;

static const wshape fixed[] = {
    {1, 3, 9, 11, 5, 1},   {7, 17, 13, 7, 19, 1},  {1, 20, 5, 5, 33, 0},  {2, 16, 8, 8, 16, 1},
    {1, 1, 3, 3, 1, 0},    {3, 5, 4, 9, 50, 2},    {1, 33, 15, 17, 9, 0}, {2, 3, 2, 2, 4, 1},
    {1, 2, 1, 1, 3, 1},    {1, 64, 14, 14, 64, 1}, {7, 4, 6, 6, 7, 0},
    // several chunks of tiles (by_chunks for 1 thread, by phases for more)
    {7, 24, 30, 30, 40, 1}, {1, 16, 64, 64, 16, 1},
    // U too big to re-read per chunk: one chunk of all tiles
    {1, 384, 6, 5, 390, 1},
};
#define N_FIXED (int)(sizeof fixed / sizeof fixed[0])
#define N_RANDOM 12

static wshape shape_at(int i, rng *r) {
    if (i < N_FIXED) return fixed[i];
    wshape s;
    s.N = 1 + (int)rng_below(r, 7);
    s.C = 1 + (int)rng_below(r, 40);
    s.K = 1 + (int)rng_below(r, 40);
    s.pad = (int)rng_below(r, 3);
    s.H = 1 + (int)rng_below(r, 20);
    s.W = 1 + (int)rng_below(r, 20);
    if (s.H + 2 * s.pad < 3) s.H = 3;
    if (s.W + 2 * s.pad < 3) s.W = 3;
    return s;
}

static int osize(int H, int pad) { return H + 2 * pad - 2; }

// Uniform [-1, 1) data, or "realistic": inputs ReLU(N(0,1)), filters N(0, 2/(9C)) (He).
static float *make_buf(size_t n, rng *r, int kind, double scale) {
    float *x = malloc((n + 1) * sizeof(float));
    for (size_t i = 0; i < n + 1; i++) {
        double v = kind == 0 ? 2.0 * rng_uniform(r) - 1.0 : rng_normal(r) * scale;
        if (kind == 1) v = v > 0 ? v : 0;
        x[i] = (float)v;
    }
    return x;
}

// Worst |got - exact| / (sum |terms| + |bias|) over the output; NaN gives infinity.
static double worst_error(const float *got, const wshape *s, const float *in, const float *w,
                          const float *b, int relu) {
    int OH = osize(s->H, s->pad), OW = osize(s->W, s->pad);
    double worst = 0;
    for (int n = 0; n < s->N; n++)
        for (int o = 0; o < s->K; o++)
            for (int oy = 0; oy < OH; oy++)
                for (int ox = 0; ox < OW; ox++) {
                    double acc = b ? b[o] : 0.0, mag = b ? fabs(b[o]) : 0.0;
                    for (int c = 0; c < s->C; c++)
                        for (int dy = 0; dy < 3; dy++)
                            for (int dx = 0; dx < 3; dx++) {
                                int y = oy - s->pad + dy, x = ox - s->pad + dx;
                                if (y < 0 || y >= s->H || x < 0 || x >= s->W) continue;
                                double t = (double)in[(((size_t)n * s->C + c) * s->H + y) * s->W + x] *
                                           w[(((size_t)o * s->C + c) * 3 + dy) * 3 + dx];
                                acc += t, mag += fabs(t);
                            }
                    if (relu && acc < 0) acc = 0;
                    double g = got[(((size_t)n * s->K + o) * OH + oy) * OW + ox];
                    double e = fabs(g - acc) / (mag + 1e-30);
                    if (!(e <= worst)) worst = e;
                }
    return worst;
}

// winograd_forward under the current settings into a fresh buffer; *ws_ok = 0 if the canaries
// after the output or the workspace changed.
static float *run(const wshape *s, const float *in, const float *w, const float *b, int relu,
                  int m, int *ws_ok) {
    size_t no = (size_t)s->N * s->K * osize(s->H, s->pad) * osize(s->W, s->pad);
    float *out = malloc((no + 1) * sizeof(float));
    out[no] = 777.0f;
    guarded ws = guarded_new(winograd_workspace_size(s->N, s->C, s->H, s->W, s->K, s->pad, m));
    winograd_forward(out, in, w, b, s->N, s->C, s->H, s->W, s->K, s->pad, relu, m, ws.p);
    if (!guarded_intact(&ws) || out[no] != 777.0f) *ws_ok = 0;
    guarded_free(&ws);
    return out;
}

static void test_level(cpu_isa_level level) {
    const char *name = cpu_isa_name(level);
    if (level > cpu_isa_detected()) {
        result(1, "winograd %s (skipped: cpu lacks %s)", name, name);
        return;
    }
    if (cpu_isa_set(level) != 0) {
        result(0, "winograd %s: cannot set the level", name);
        return;
    }
    rng r;
    rng_seed(&r, 1234 + level);
    double worst[2][2] = {{0}};  // [F2, F4][uniform, realistic]
    char at[2][2][100] = {{""}};
    int same = 1, ws_ok = 1, dispatch_ok = 1, dispatched = 0;
    char at_same[140] = "", at_dispatch[140] = "";
    for (int i = 0; i < N_FIXED + N_RANDOM; i++) {
        wshape s = shape_at(i, &r);
        int kind = i % 4 == 3;  // every fourth shape realistic
        size_t ni = (size_t)s.N * s.C * s.H * s.W, nw = (size_t)s.K * s.C * 9;
        size_t no = (size_t)s.N * s.K * osize(s.H, s.pad) * osize(s.W, s.pad);
        float *in = make_buf(ni, &r, kind, 1.0), *w = make_buf(nw, &r, kind ? 2 : 0, sqrt(2.0 / (9 * s.C)));
        float *b = make_buf(s.K, &r, 0, 1.0);
        int relu = i % 3 == 1;
        const float *bias = i % 2 ? b : NULL;
        char where[100];
        snprintf(where, sizeof where, "N%d C%d %dx%d K%d p%d%s%s", s.N, s.C, s.H, s.W, s.K, s.pad,
                 bias ? " bias" : "", relu ? " relu" : "");
        for (int mi = 0; mi < 2; mi++) {
            int m = mi ? 4 : 2;
            cpu_threads_set(1);
            float *one = run(&s, in, w, bias, relu, m, &ws_ok);
            double e = worst_error(one, &s, in, w, bias, relu);
            if (!(e <= worst[mi][kind])) {
                worst[mi][kind] = e;
                snprintf(at[mi][kind], sizeof at[mi][kind], "%s", where);
            }
            for (int t = 2; t <= 3; t++) {
                cpu_threads_set(t);
                float *more = run(&s, in, w, bias, relu, m, &ws_ok);
                if (same && memcmp(one, more, no * sizeof(float)) != 0) {
                    same = 0;
                    snprintf(at_same, sizeof at_same, "F%d %s, %d threads", m, where, t);
                }
                free(more);
            }
            free(one);
        }
        // conv2d_fast_forward takes this path when winograd_tile() chooses a tile
        int m = winograd_tile(s.N, s.C, s.H, s.W, s.K, s.pad);
        if (m) {
            dispatched++;
            cpu_threads_set(2);
            int ok = 1;
            float *want = run(&s, in, w, bias, relu, m, &ok);
            float *got = malloc(no * sizeof(float));
            float *ws = malloc(conv2d_fast_workspace_size(s.N, s.C, s.H, s.W, s.K, 3, 1, s.pad) *
                               sizeof(float));
            conv2d_fast_forward(got, in, w, bias, s.N, s.C, s.H, s.W, s.K, 3, 1, s.pad, relu, ws);
            if (dispatch_ok && memcmp(want, got, no * sizeof(float)) != 0) {
                dispatch_ok = 0;
                snprintf(at_dispatch, sizeof at_dispatch, "%s (F%d)", where, m);
            }
            free(want), free(got), free(ws);
        }
        free(in), free(w), free(b);
    }
    int n = N_FIXED + N_RANDOM;
    for (int mi = 0; mi < 2; mi++) {
        double tol = mi ? TOL_F4 : TOL_F2;
        result(worst[mi][0] <= tol && worst[mi][1] <= tol,
               "winograd %s F(%dx%d,3x3) vs double loop, %d shapes (worst %.2g at %s; realistic "
               "data %.2g at %s; bound %.0e)",
               name, mi ? 4 : 2, mi ? 4 : 2, n, worst[mi][0], at[mi][0], worst[mi][1],
               at[mi][1], tol);
    }
    result(same, "winograd %s bit-identical for 1, 2, 3 threads%s%s", name,
           same ? "" : ": differs at ", at_same);
    result(ws_ok, "winograd %s stays inside winograd_workspace_size() and the output", name);
    result(dispatch_ok && dispatched > 0,
           "winograd %s: conv2d_fast_forward uses it where winograd_tile() says (%d shapes)%s%s",
           name, dispatched, dispatch_ok ? "" : ", not at ", at_dispatch);
}

// winograd_weight_grad (AVX-512 only) against a double-precision sum over the batch and the
// output pixels, for F(2x2) and F(4x4) wherever the rows hold at most 8 tiles: dw starts
// non-zero (the gradient accumulates), bit-identical results for 1, 2 and 3 threads, the
// workspace never overrun, and batches large enough for several chunks of tiles. The bounds
// (same measure) are looser than the forward's, the direct path's 1e-5 for F(2x2): the output
// gradient's terms grow by up to 8 x 8 (F(4x4)) in its transform before the products.
#define TOL_WG_F2 1e-5
#define TOL_WG_F4 4e-5

static double wg_error(const float *got, const float *dw0, const wshape *s, const float *in,
                       const float *dout) {
    int OH = osize(s->H, s->pad), OW = osize(s->W, s->pad);
    double worst = 0;
    for (int o = 0; o < s->K; o++)
        for (int c = 0; c < s->C; c++)
            for (int dy = 0; dy < 3; dy++)
                for (int dx = 0; dx < 3; dx++) {
                    size_t i = ((size_t)o * s->C + c) * 9 + dy * 3 + dx;
                    double acc = dw0[i], mag = fabs(dw0[i]);
                    for (int n = 0; n < s->N; n++)
                        for (int oy = 0; oy < OH; oy++)
                            for (int ox = 0; ox < OW; ox++) {
                                int y = oy + dy - s->pad, x = ox + dx - s->pad;
                                if (y < 0 || y >= s->H || x < 0 || x >= s->W) continue;
                                double t = (double)dout[(((size_t)n * s->K + o) * OH + oy) * OW + ox] *
                                           in[(((size_t)n * s->C + c) * s->H + y) * s->W + x];
                                acc += t, mag += fabs(t);
                            }
                    double e = fabs(got[i] - acc) / (mag > 0 ? mag : 1);
                    if (!(e <= worst)) worst = isnan(e) ? INFINITY : e;
                }
    return worst;
}

static float *wg_run(const wshape *s, const float *in, const float *dout, const float *dw0,
                     int m, int *ws_ok) {
    size_t nw = (size_t)s->K * s->C * 9;
    float *dw = malloc((nw + 1) * sizeof(float));
    memcpy(dw, dw0, nw * sizeof(float));
    dw[nw] = 777.0f;
    guarded ws = guarded_new(
        winograd_weight_grad_workspace_size(s->N, s->C, s->H, s->W, s->K, s->pad, m));
    winograd_weight_grad(dw, in, dout, s->N, s->C, s->H, s->W, s->K, s->pad, m, ws.p);
    if (!guarded_intact(&ws) || dw[nw] != 777.0f) *ws_ok = 0;
    guarded_free(&ws);
    return dw;
}

static void test_weight_grad(void) {
    if (cpu_isa_detected() < CPU_ISA_AVX512) {
        result(1, "winograd weight gradient (skipped: cpu lacks avx512)");
        return;
    }
    cpu_isa_set(CPU_ISA_AVX512);
    static const wshape extra[] = {
        {64, 24, 8, 8, 40, 1},   // several chunks of tiles
        {96, 20, 4, 4, 36, 1},   // one tile per image
        {40, 16, 16, 16, 24, 1}, // 4 tiles a row
        {3, 5, 30, 30, 7, 1},    // rows of 8 tiles (F(4x4)), too wide for F(2x2)
    };
    enum { N_EXTRA = sizeof extra / sizeof extra[0] };
    rng r;
    rng_seed(&r, 4321);
    double worst[2] = {0};
    char at[2][100] = {"", ""};
    int same = 1, ws_ok = 1, tested[2] = {0};
    char at_same[140] = "";
    for (int i = 0; i < N_FIXED + N_RANDOM + N_EXTRA; i++) {
        wshape s = i < N_FIXED + N_RANDOM ? shape_at(i, &r) : extra[i - N_FIXED - N_RANDOM];
        int OH = osize(s.H, s.pad), OW = osize(s.W, s.pad);
        size_t ni = (size_t)s.N * s.C * s.H * s.W, nw = (size_t)s.K * s.C * 9;
        size_t no = (size_t)s.N * s.K * OH * OW;
        int kind = i % 4 == 3;
        float *in = make_buf(ni, &r, kind, 1.0), *dout = make_buf(no, &r, 0, 1.0);
        float *dw0 = make_buf(nw, &r, 0, 1.0);
        char where[100];
        snprintf(where, sizeof where, "N%d C%d %dx%d K%d p%d", s.N, s.C, s.H, s.W, s.K, s.pad);
        for (int mi = 0; mi < 2; mi++) {
            int m = mi ? 4 : 2;
            if ((OW + m - 1) / m > 8) continue;  // rows of more than 8 tiles: not this path
            tested[mi]++;
            cpu_threads_set(1);
            float *one = wg_run(&s, in, dout, dw0, m, &ws_ok);
            double e = wg_error(one, dw0, &s, in, dout);
            if (!(e <= worst[mi])) {
                worst[mi] = e;
                snprintf(at[mi], sizeof at[mi], "%s", where);
            }
            for (int t = 2; t <= 3; t++) {
                cpu_threads_set(t);
                float *more = wg_run(&s, in, dout, dw0, m, &ws_ok);
                if (same && memcmp(one, more, nw * sizeof(float)) != 0) {
                    same = 0;
                    snprintf(at_same, sizeof at_same, "F%d %s, %d threads", m, where, t);
                }
                free(more);
            }
            free(one);
        }
        free(in), free(dout), free(dw0);
    }
    for (int mi = 0; mi < 2; mi++) {
        double tol = mi ? TOL_WG_F4 : TOL_WG_F2;
        result(worst[mi] <= tol && tested[mi] > 10,
               "winograd weight gradient F(%dx%d,3x3) vs double loop, %d shapes (worst %.2g at %s; "
               "bound %.0e)",
               mi ? 4 : 2, mi ? 4 : 2, tested[mi], worst[mi], at[mi], tol);
    }
    result(same, "winograd weight gradient bit-identical for 1, 2, 3 threads%s%s",
           same ? "" : ": differs at ", at_same);
    result(ws_ok, "winograd weight gradient stays inside its workspace and dw");
}

int main(void) {
    cpu_isa_level det = cpu_isa_detected();
    int threads = cpu_threads();
    test_level(CPU_ISA_SCALAR);
    test_level(CPU_ISA_AVX2);
    test_level(CPU_ISA_AVX512);
    test_weight_grad();
    cpu_isa_set(det);
    cpu_threads_set(threads);
    cpu_threads_set(1);  // joins the workers
    return failed ? 1 : 0;
}
