// Finite-difference checks of every backward in src/ops: for a random projection
// L = sum(r * out), the analytic gradient (backward with dout = r) must match the central
// difference (L(t + h) - L(t - h)) / 2h for every element of every input and parameter tensor.
// Inputs are kept away from kinks (relu near 0, ties in max pooling) so the difference is valid.
// Each case also checks the backward conventions of ops.h: gradients accumulate (+=) into what
// is already there, and each gradient pointer may be NULL (the others unchanged).
#include "ops/ops.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAXT = 4 };

// Parameters of any op; each case sets the fields its op uses.
typedef struct {
    int N, C, H, W, HW, K, k, stride, pad, bias, ceil, cip, OH, OW, size, IN, OUT, n_in, Cs[MAXT];
    float eps, momentum, alpha, beta, lk, p, smoothing;
    int64_t target[8];
    float *aux[2];  // op state kept from forward to backward (BN saved stats, dropout mask...)
} op_params;

typedef struct fd_case fd_case;
struct fd_case {
    const char *name;
    int nt;                     // differentiable tensors: inputs and parameters
    const char *tname[MAXT];
    float *t[MAXT];
    size_t tn[MAXT];
    size_t nout;
    void (*forward)(const fd_case *c, float *out);
    // Accumulates d(sum dout*out)/dt[i] into grads[i]; any grads[i] may be NULL.
    void (*backward)(const fd_case *c, const float *dout, float *const *grads);
    op_params p;
};

static rng g_rng;
static int n_failed;

static float *alloc_floats(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

static float *randn(size_t n, float scale) {
    float *p = alloc_floats(n);
    for (size_t i = 0; i < n; i++) p[i] = (float)(scale * rng_normal(&g_rng));
    return p;
}

// Values at least 0.05 apart (a shuffled ramp), so no window maximum changes under +-h.
static float *distinct(size_t n) {
    float *p = alloc_floats(n);
    for (size_t i = 0; i < n; i++) p[i] = 0.05f * (float)i - 0.025f * (float)n;
    for (size_t i = n; i > 1; i--) {
        size_t j = rng_below(&g_rng, (uint32_t)i);
        float tmp = p[i - 1];
        p[i - 1] = p[j];
        p[j] = tmp;
    }
    return p;
}

static void add_tensor(fd_case *c, const char *name, float *t, size_t n) {
    c->tname[c->nt] = name;
    c->t[c->nt] = t;
    c->tn[c->nt] = n;
    c->nt++;
}

static double projected(const fd_case *c, const float *r, float *out) {
    c->forward(c, out);
    double L = 0.0;
    for (size_t i = 0; i < c->nout; i++) L += (double)r[i] * out[i];
    return L;
}

static double max_abs(const float *a, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(a[i]));
    return m;
}

// Runs every check of one case; prints one TAP line. `tol` bounds the finite-difference error
// max|num - analytic| / max|analytic| (float32 evaluation with h = 1e-2: rounding noise of L
// over 2h plus O(h^2) curvature; observed <= 6e-5, while a wrong term gives O(1e-1..1)).
static void fd_check(fd_case *c, double tol) {
    const float h = 1e-2f;
    float *out = alloc_floats(c->nout), *r = randn(c->nout, 1.0f);
    float *grad[MAXT] = {0}, *single[MAXT] = {0}, *none[MAXT] = {0};
    char why[256] = "";
    double worst = 0.0;

    projected(c, r, out);
    for (int i = 0; i < c->nt; i++) grad[i] = alloc_floats(c->tn[i]);
    c->backward(c, r, grad);
    c->backward(c, r, none);  // all NULL: must be a harmless no-op

    // Accumulation and NULL: backward into a buffer holding g0, with every other gradient NULL,
    // must leave g0 + grad (up to the rounding of adding several contributions onto g0).
    for (int i = 0; i < c->nt && !why[0]; i++) {
        float *g0 = randn(c->tn[i], 1.0f), *buf = alloc_floats(c->tn[i]);
        memcpy(buf, g0, c->tn[i] * sizeof(float));
        single[i] = buf;
        c->backward(c, r, single);
        single[i] = NULL;
        const double tiny = 1e-5 * (max_abs(g0, c->tn[i]) + max_abs(grad[i], c->tn[i]));
        for (size_t j = 0; j < c->tn[i]; j++)
            if (!(fabs(buf[j] - ((double)g0[j] + grad[i][j])) <= tiny)) {
                snprintf(why, sizeof why, "d%s does not accumulate (or depends on other NULL grads) at %zu",
                         c->tname[i], j);
                break;
            }
        free(g0);
        free(buf);
    }

    for (int i = 0; i < c->nt && !why[0]; i++) {
        double err = 0.0, scale = fmax(max_abs(grad[i], c->tn[i]), 1e-3);
        size_t at = 0;
        for (size_t j = 0; j < c->tn[i]; j++) {
            const float v = c->t[i][j];
            c->t[i][j] = v + h;
            const double Lp = projected(c, r, out);
            c->t[i][j] = v - h;
            const double Lm = projected(c, r, out);
            c->t[i][j] = v;
            const double e = fabs((Lp - Lm) / (2.0 * h) - grad[i][j]) / scale;
            if (e > err) err = e, at = j;
        }
        if (err > worst) worst = err;
        if (err > tol)
            snprintf(why, sizeof why, "max err %.3g > %.3g in d%s[%zu] (analytic %.6g)", err, tol,
                     c->tname[i], at, grad[i][at]);
    }

    if (why[0]) {
        printf("not ok - %s: %s\n", c->name, why);
        n_failed++;
    } else {
        printf("ok - %s\n# %s: finite-difference error %.2g\n", c->name, c->name, worst);
    }
    for (int i = 0; i < c->nt; i++) free(grad[i]);
    free(out);
    free(r);
}

static void free_case(fd_case *c) {
    for (int i = 0; i < c->nt; i++) free(c->t[i]);
    free(c->p.aux[0]);
    free(c->p.aux[1]);
}

// ---- per-op forward/backward adapters ----

static void conv_fwd(const fd_case *c, float *out) {
    const op_params *p = &c->p;
    conv2d_forward(out, c->t[0], c->t[1], p->bias ? c->t[2] : NULL, p->N, p->C, p->H, p->W, p->K,
                   p->k, p->stride, p->pad);
}
static void conv_bwd(const fd_case *c, const float *dout, float *const *g) {
    const op_params *p = &c->p;
    conv2d_backward(g[0], g[1], p->bias ? g[2] : NULL, dout, c->t[0], c->t[1], p->N, p->C, p->H,
                    p->W, p->K, p->k, p->stride, p->pad);
}

static void bn_train_fwd(const fd_case *c, float *out) {
    const op_params *p = &c->p;
    batchnorm2d_forward_train(out, p->aux[0], p->aux[1], NULL, NULL, c->t[0], c->t[1], c->t[2],
                              p->N, p->C, p->HW, p->eps, p->momentum);
}
static void bn_train_bwd(const fd_case *c, const float *dout, float *const *g) {
    const op_params *p = &c->p;
    batchnorm2d_backward_train(g[0], g[1], g[2], dout, c->t[0], c->t[1], p->aux[0], p->aux[1],
                               p->N, p->C, p->HW);
}

static void bn_eval_fwd(const fd_case *c, float *out) {
    const op_params *p = &c->p;
    batchnorm2d_forward_eval(out, c->t[0], c->t[1], c->t[2], p->aux[0], p->aux[1], p->N, p->C,
                             p->HW, p->eps);
}
static void bn_eval_bwd(const fd_case *c, const float *dout, float *const *g) {
    const op_params *p = &c->p;
    batchnorm2d_backward_eval(g[0], g[1], g[2], dout, c->t[0], c->t[1], p->aux[0], p->aux[1],
                              p->N, p->C, p->HW, p->eps);
}

static void relu_fwd(const fd_case *c, float *out) { relu_forward(out, c->t[0], c->tn[0]); }
static void relu_bwd(const fd_case *c, const float *dout, float *const *g) {
    float *out = alloc_floats(c->nout);  // relu's backward takes the forward output
    relu_forward(out, c->t[0], c->tn[0]);
    relu_backward(g[0], dout, out, c->tn[0]);
    free(out);
}

static void maxpool_fwd(const fd_case *c, float *out) {
    const op_params *p = &c->p;
    maxpool2d_forward(out, c->t[0], p->N, p->C, p->H, p->W, p->k, p->stride, p->pad, p->ceil);
}
static void maxpool_bwd(const fd_case *c, const float *dout, float *const *g) {
    const op_params *p = &c->p;
    maxpool2d_backward(g[0], dout, c->t[0], p->N, p->C, p->H, p->W, p->k, p->stride, p->pad, p->ceil);
}

static void avgpool_fwd(const fd_case *c, float *out) {
    const op_params *p = &c->p;
    avgpool2d_forward(out, c->t[0], p->N, p->C, p->H, p->W, p->k, p->stride, p->pad, p->ceil, p->cip);
}
static void avgpool_bwd(const fd_case *c, const float *dout, float *const *g) {
    const op_params *p = &c->p;
    avgpool2d_backward(g[0], dout, p->N, p->C, p->H, p->W, p->k, p->stride, p->pad, p->ceil, p->cip);
}

static void adaptive_fwd(const fd_case *c, float *out) {
    const op_params *p = &c->p;
    adaptive_avgpool2d_forward(out, c->t[0], p->N, p->C, p->H, p->W, p->OH, p->OW);
}
static void adaptive_bwd(const fd_case *c, const float *dout, float *const *g) {
    const op_params *p = &c->p;
    adaptive_avgpool2d_backward(g[0], dout, p->N, p->C, p->H, p->W, p->OH, p->OW);
}

static void lrn_fwd(const fd_case *c, float *out) {
    const op_params *p = &c->p;
    lrn_forward(out, c->t[0], p->N, p->C, p->HW, p->size, p->alpha, p->beta, p->lk);
}
static void lrn_bwd(const fd_case *c, const float *dout, float *const *g) {
    const op_params *p = &c->p;
    lrn_backward(g[0], dout, c->t[0], p->N, p->C, p->HW, p->size, p->alpha, p->beta, p->lk);
}

static void linear_fwd(const fd_case *c, float *out) {
    const op_params *p = &c->p;
    linear_forward(out, c->t[0], c->t[1], p->bias ? c->t[2] : NULL, p->N, p->IN, p->OUT);
}
static void linear_bwd(const fd_case *c, const float *dout, float *const *g) {
    const op_params *p = &c->p;
    linear_backward(g[0], g[1], p->bias ? g[2] : NULL, dout, c->t[0], c->t[1], p->N, p->IN, p->OUT);
}

// The same seed every call, so every forward draws the same mask (p->aux[0]).
static void dropout_fwd(const fd_case *c, float *out) {
    rng r;
    rng_seed(&r, 99);
    dropout_forward(out, c->p.aux[0], c->t[0], c->tn[0], c->p.p, &r);
}
static void dropout_bwd(const fd_case *c, const float *dout, float *const *g) {
    dropout_backward(g[0], dout, c->p.aux[0], c->tn[0]);
}

static void concat_fwd(const fd_case *c, float *out) {
    const float *ins[MAXT];
    for (int i = 0; i < c->nt; i++) ins[i] = c->t[i];
    concat_forward(out, ins, c->p.Cs, c->nt, c->p.N, c->p.HW);
}
static void concat_bwd(const fd_case *c, const float *dout, float *const *g) {
    concat_backward(g, dout, c->p.Cs, c->nt, c->p.N, c->p.HW);
}

static void transform_fwd(const fd_case *c, float *out) {
    transform_input_forward(out, c->t[0], c->p.N, c->p.HW);
}
static void transform_bwd(const fd_case *c, const float *dout, float *const *g) {
    transform_input_backward(g[0], dout, c->p.N, c->p.HW);
}

// Output: the scalar loss; probabilities kept in aux[0] for backward.
static void ce_fwd(const fd_case *c, float *out) {
    const op_params *p = &c->p;
    out[0] = cross_entropy_forward(p->aux[0], c->t[0], p->target, p->N, p->K, p->smoothing);
}
static void ce_bwd(const fd_case *c, const float *dout, float *const *g) {
    const op_params *p = &c->p;
    cross_entropy_backward(g[0], p->aux[0], p->target, p->N, p->K, p->smoothing, dout[0]);
}

// ---- cases ----

static void check_conv(int N, int C, int H, int W, int K, int k, int s, int pad, int bias) {
    char name[128];
    snprintf(name, sizeof name, "conv2d N%d C%d %dx%d K%d k%d s%d p%d bias%d", N, C, H, W, K, k, s,
             pad, bias);
    fd_case c = {.name = name, .forward = conv_fwd, .backward = conv_bwd,
                 .p = {.N = N, .C = C, .H = H, .W = W, .K = K, .k = k, .stride = s, .pad = pad, .bias = bias}};
    add_tensor(&c, "in", randn((size_t)N * C * H * W, 1.0f), (size_t)N * C * H * W);
    add_tensor(&c, "w", randn((size_t)K * C * k * k, 0.5f), (size_t)K * C * k * k);
    if (bias) add_tensor(&c, "b", randn(K, 1.0f), K);
    c.nout = (size_t)N * K * conv2d_out_size(H, k, s, pad) * conv2d_out_size(W, k, s, pad);
    fd_check(&c, 1e-3);
    free_case(&c);
}

static void check_bn(int train, int N, int C, int HW) {
    char name[128];
    snprintf(name, sizeof name, "batchnorm2d %s N%d C%d HW%d", train ? "train" : "eval", N, C, HW);
    fd_case c = {.name = name, .forward = train ? bn_train_fwd : bn_eval_fwd,
                 .backward = train ? bn_train_bwd : bn_eval_bwd,
                 .p = {.N = N, .C = C, .HW = HW, .eps = 1e-3f, .momentum = 0.1f}};
    const size_t n = (size_t)N * C * HW;
    float *x = randn(n, 1.5f);
    for (size_t i = 0; i < n; i++) x[i] += 0.5f;
    add_tensor(&c, "in", x, n);
    add_tensor(&c, "gamma", randn(C, 1.0f), C);
    add_tensor(&c, "beta", randn(C, 1.0f), C);
    c.p.aux[0] = randn(C, 0.5f);  // eval: running mean; train: saved mean
    c.p.aux[1] = alloc_floats(C);  // eval: running var; train: saved invstd
    for (int i = 0; i < C; i++) c.p.aux[1][i] = 0.5f + (float)rng_uniform(&g_rng);
    c.nout = n;
    fd_check(&c, 1e-3);
    free_case(&c);
}

static void check_relu(void) {
    fd_case c = {.name = "relu", .forward = relu_fwd, .backward = relu_bwd};
    float *x = randn(200, 1.0f);
    for (int i = 0; i < 200; i++)  // away from the kink at 0
        if (fabsf(x[i]) < 0.05f) x[i] = x[i] < 0 ? -0.05f : 0.05f;
    add_tensor(&c, "in", x, 200);
    c.nout = 200;
    fd_check(&c, 1e-3);
    free_case(&c);
}

static void check_pool(int max, int N, int C, int H, int W, int k, int s, int pad, int ceil, int cip) {
    char name[128];
    snprintf(name, sizeof name, "%s N%d C%d %dx%d k%d s%d p%d ceil%d%s", max ? "maxpool2d" : "avgpool2d",
             N, C, H, W, k, s, pad, ceil, max ? "" : cip ? " include_pad" : " exclude_pad");
    fd_case c = {.name = name, .forward = max ? maxpool_fwd : avgpool_fwd,
                 .backward = max ? maxpool_bwd : avgpool_bwd,
                 .p = {.N = N, .C = C, .H = H, .W = W, .k = k, .stride = s, .pad = pad, .ceil = ceil, .cip = cip}};
    const size_t n = (size_t)N * C * H * W;
    add_tensor(&c, "in", max ? distinct(n) : randn(n, 1.0f), n);
    c.nout = (size_t)N * C * pool_out_size(H, k, s, pad, ceil) * pool_out_size(W, k, s, pad, ceil);
    fd_check(&c, 1e-3);
    free_case(&c);
}

static void check_adaptive(int N, int C, int H, int W, int OH, int OW) {
    char name[128];
    snprintf(name, sizeof name, "adaptive_avgpool2d N%d C%d %dx%d -> %dx%d", N, C, H, W, OH, OW);
    fd_case c = {.name = name, .forward = adaptive_fwd, .backward = adaptive_bwd,
                 .p = {.N = N, .C = C, .H = H, .W = W, .OH = OH, .OW = OW}};
    const size_t n = (size_t)N * C * H * W;
    add_tensor(&c, "in", randn(n, 1.0f), n);
    c.nout = (size_t)N * C * OH * OW;
    fd_check(&c, 1e-3);
    free_case(&c);
}

static void check_lrn(int N, int C, int HW, int size, float alpha, float beta, float k) {
    char name[128];
    snprintf(name, sizeof name, "lrn N%d C%d HW%d size%d alpha%g beta%g k%g", N, C, HW, size, alpha,
             beta, k);
    fd_case c = {.name = name, .forward = lrn_fwd, .backward = lrn_bwd,
                 .p = {.N = N, .C = C, .HW = HW, .size = size, .alpha = alpha, .beta = beta, .lk = k}};
    const size_t n = (size_t)N * C * HW;
    add_tensor(&c, "in", randn(n, 1.0f), n);
    c.nout = n;
    fd_check(&c, 1e-3);
    free_case(&c);
}

static void check_linear(int N, int IN, int OUT, int bias) {
    char name[128];
    snprintf(name, sizeof name, "linear N%d in%d out%d bias%d", N, IN, OUT, bias);
    fd_case c = {.name = name, .forward = linear_fwd, .backward = linear_bwd,
                 .p = {.N = N, .IN = IN, .OUT = OUT, .bias = bias}};
    add_tensor(&c, "in", randn((size_t)N * IN, 1.0f), (size_t)N * IN);
    add_tensor(&c, "w", randn((size_t)OUT * IN, 0.5f), (size_t)OUT * IN);
    if (bias) add_tensor(&c, "b", randn(OUT, 1.0f), OUT);
    c.nout = (size_t)N * OUT;
    fd_check(&c, 1e-3);
    free_case(&c);
}

static void check_dropout(float p) {
    char name[64];
    snprintf(name, sizeof name, "dropout p%g (fixed mask)", p);
    fd_case c = {.name = name, .forward = dropout_fwd, .backward = dropout_bwd, .p = {.p = p}};
    add_tensor(&c, "in", randn(300, 1.0f), 300);
    c.p.aux[0] = alloc_floats(300);
    c.nout = 300;
    fd_check(&c, 1e-3);
    free_case(&c);
}

static void check_concat(void) {
    fd_case c = {.name = "concat N2 HW5 C 2+1+3", .forward = concat_fwd, .backward = concat_bwd,
                 .p = {.N = 2, .HW = 5, .Cs = {2, 1, 3}}};
    for (int i = 0; i < 3; i++) {
        static const char *names[] = {"in0", "in1", "in2"};
        const size_t n = (size_t)c.p.N * c.p.Cs[i] * c.p.HW;
        add_tensor(&c, names[i], randn(n, 1.0f), n);
    }
    c.nout = (size_t)2 * 6 * 5;
    fd_check(&c, 1e-3);
    free_case(&c);
}

static void check_transform(void) {
    fd_case c = {.name = "transform_input N2 HW6", .forward = transform_fwd, .backward = transform_bwd,
                 .p = {.N = 2, .HW = 6}};
    add_tensor(&c, "in", randn(36, 1.0f), 36);
    c.nout = 36;
    fd_check(&c, 1e-3);
    free_case(&c);
}

static void check_ce(float smoothing) {
    char name[64];
    snprintf(name, sizeof name, "cross_entropy N4 K5 smoothing%g", smoothing);
    fd_case c = {.name = name, .forward = ce_fwd, .backward = ce_bwd,
                 .p = {.N = 4, .K = 5, .smoothing = smoothing, .target = {3, 0, 4, 3}}};
    add_tensor(&c, "logits", randn(20, 2.0f), 20);
    c.p.aux[0] = alloc_floats(20);
    c.nout = 1;
    fd_check(&c, 1e-3);
    free_case(&c);
}

int main(void) {
    rng_seed(&g_rng, 20240601);
    check_conv(2, 3, 7, 6, 4, 3, 1, 1, 1);
    check_conv(1, 2, 8, 7, 3, 3, 2, 1, 0);  // stride 2, padding, no bias
    check_conv(2, 2, 5, 5, 3, 1, 1, 0, 1);  // pointwise fast path
    check_conv(1, 2, 9, 9, 2, 5, 2, 2, 1);
    check_conv(1, 1, 6, 6, 2, 2, 2, 0, 0);
    check_bn(1, 2, 3, 5);
    check_bn(1, 1, 2, 7);
    check_bn(0, 2, 3, 5);
    check_relu();
    check_pool(1, 2, 2, 7, 7, 2, 2, 0, 1, 0);  // ceil tail
    check_pool(1, 1, 2, 14, 14, 3, 2, 0, 1, 0);
    check_pool(1, 1, 2, 9, 9, 3, 2, 1, 1, 0);  // pad 1 with ceil
    check_pool(1, 1, 1, 5, 5, 2, 2, 1, 1, 0);  // ceil window dropped at the right
    check_pool(1, 2, 1, 6, 6, 3, 1, 1, 1, 0);
    for (int cip = 0; cip <= 1; cip++) {
        check_pool(0, 2, 2, 7, 7, 2, 2, 0, 1, cip);
        check_pool(0, 1, 2, 9, 9, 3, 2, 1, 1, cip);
        check_pool(0, 1, 1, 5, 5, 2, 2, 1, 1, cip);
        check_pool(0, 1, 2, 7, 6, 3, 1, 1, 0, cip);
    }
    check_adaptive(2, 2, 5, 5, 4, 4);  // non-divisible, overlapping windows
    check_adaptive(1, 2, 14, 9, 4, 4);
    check_adaptive(1, 2, 3, 2, 7, 5);  // upsampling
    check_adaptive(2, 2, 4, 4, 1, 1);  // global
    check_lrn(2, 3, 4, 5, 1.0f, 0.75f, 1.0f);  // C < size: every window clipped
    check_lrn(1, 9, 5, 5, 0.5f, 0.75f, 2.0f);  // interior and border channels
    check_lrn(1, 6, 3, 4, 2.0f, 0.5f, 1.0f);   // even size: asymmetric window
    check_linear(3, 7, 4, 1);
    check_linear(2, 5, 3, 0);
    check_dropout(0.4f);
    check_dropout(0.0f);
    check_dropout(1.0f);
    check_concat();
    check_transform();
    check_ce(0.0f);
    check_ce(0.1f);
    return n_failed ? 1 : 0;
}
