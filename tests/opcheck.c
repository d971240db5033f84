// opcheck: runs one reference op, forward and backward, on raw float32 files, for
// tests/test_ops.py to compare against PyTorch. Not a test by itself (the name does not start
// with test_, so the runner leaves it alone).
//
//   opcheck DIR OP key=value...
//
// Inputs are read from DIR/NAME.bin (raw little-endian float32; int64 for `target`), outputs
// written to DIR/NAME.bin. `dy` is the upstream gradient; every gradient is computed into a
// zeroed buffer. Per op (inputs -> outputs):
//   conv2d   N C H W K k stride pad bias      x w [b] dy -> y dx dw [db]
//   bn_train N C HW eps momentum             x gamma beta rm rv dy -> y rm rv save_mean save_invstd
//                                                                      dx dgamma dbeta
//   bn_eval  N C HW eps                      x gamma beta rm rv dy -> y dx dgamma dbeta
//   relu     n                               x dy -> y dx
//   maxpool  N C H W k stride pad ceil       x dy -> y dx
//   avgpool  N C H W k stride pad ceil cip   x dy -> y dx
//   adaptive N C H W OH OW                   x dy -> y dx
//   lrn      N C HW size alpha beta k        x dy -> y dx
//   linear   N IN OUT bias                   x w [b] dy -> y dx dw [db]
//   dropout  n p seed                        x dy -> y mask dx
//   concat   N HW n_in C0 C1 ...             x0 x1 ... dy -> y dx0 dx1 ...
//   transform_input N HW                     x dy -> y dx
//   softmax  N K                             x -> y
//   cross_entropy N K smoothing dloss        x target -> loss probs dx
// Output sizes come from the library's own size helpers; the Python side checks them against
// PyTorch's shapes.
#include "ops/ops.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *dir;
static int n_kv;
static char **kv;

// Every buffer, freed at the end of main (keeps LeakSanitizer quiet under SAN=1).
static void *allocs[64];
static int n_allocs;

static void die(const char *fmt, const char *a) {
    fprintf(stderr, "opcheck: ");
    fprintf(stderr, fmt, a);
    fprintf(stderr, "\n");
    exit(2);
}

static double param(const char *key) {
    size_t len = strlen(key);
    for (int i = 0; i < n_kv; i++)
        if (strncmp(kv[i], key, len) == 0 && kv[i][len] == '=') {
            char *end;
            double v = strtod(kv[i] + len + 1, &end);
            if (*end) die("parameter %s is not a number", kv[i]);
            return v;
        }
    die("missing parameter %s", key);
    return 0;
}
static int iparam(const char *key) { return (int)param(key); }

static void path_of(char *buf, size_t cap, const char *name) {
    if ((size_t)snprintf(buf, cap, "%s/%s.bin", dir, name) >= cap) die("path too long: %s", name);
}

// Reads exactly `bytes` bytes of DIR/NAME.bin into a fresh buffer.
static void *load_bytes(const char *name, size_t bytes) {
    char path[4096];
    path_of(path, sizeof path, name);
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s", path);
    void *p = malloc(bytes ? bytes : 1);
    if (!p || n_allocs == 64) die("out of memory reading %s", path);
    allocs[n_allocs++] = p;
    if (fread(p, 1, bytes, f) != bytes || fgetc(f) != EOF) die("%s has the wrong size", path);
    fclose(f);
    return p;
}
static float *load(const char *name, size_t n) { return load_bytes(name, n * sizeof(float)); }

static void save(const char *name, const float *p, size_t n) {
    char path[4096];
    path_of(path, sizeof path, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, sizeof(float), n, f) != n || fclose(f) != 0) die("cannot write %s", path);
}

static float *zeros(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    if (!p || n_allocs == 64) die("out of memory%s", "");
    allocs[n_allocs++] = p;
    return p;
}

static void op_conv2d(void) {
    int N = iparam("N"), C = iparam("C"), H = iparam("H"), W = iparam("W"), K = iparam("K");
    int k = iparam("k"), s = iparam("stride"), p = iparam("pad"), bias = iparam("bias");
    int OH = conv2d_out_size(H, k, s, p), OW = conv2d_out_size(W, k, s, p);
    size_t nx = (size_t)N * C * H * W, nw = (size_t)K * C * k * k, ny = (size_t)N * K * OH * OW;
    float *x = load("x", nx), *w = load("w", nw), *b = bias ? load("b", K) : NULL;
    float *dy = load("dy", ny), *y = zeros(ny), *dx = zeros(nx), *dw = zeros(nw), *db = zeros(K);
    conv2d_forward(y, x, w, b, N, C, H, W, K, k, s, p);
    conv2d_backward(dx, dw, bias ? db : NULL, dy, x, w, N, C, H, W, K, k, s, p);
    save("y", y, ny);
    save("dx", dx, nx);
    save("dw", dw, nw);
    if (bias) save("db", db, K);
}

static void op_bn(int train) {
    int N = iparam("N"), C = iparam("C"), HW = iparam("HW");
    float eps = (float)param("eps");
    size_t n = (size_t)N * C * HW;
    float *x = load("x", n), *gamma = load("gamma", C), *beta = load("beta", C);
    float *rm = load("rm", C), *rv = load("rv", C), *dy = load("dy", n);
    float *y = zeros(n), *dx = zeros(n), *dgamma = zeros(C), *dbeta = zeros(C);
    if (train) {
        float *mean = zeros(C), *invstd = zeros(C);
        batchnorm2d_forward_train(y, mean, invstd, rm, rv, x, gamma, beta, N, C, HW, eps,
                                  (float)param("momentum"));
        batchnorm2d_backward_train(dx, dgamma, dbeta, dy, x, gamma, mean, invstd, N, C, HW);
        save("rm", rm, C);
        save("rv", rv, C);
        save("save_mean", mean, C);
        save("save_invstd", invstd, C);
    } else {
        batchnorm2d_forward_eval(y, x, gamma, beta, rm, rv, N, C, HW, eps);
        batchnorm2d_backward_eval(dx, dgamma, dbeta, dy, x, gamma, rm, rv, N, C, HW, eps);
    }
    save("y", y, n);
    save("dx", dx, n);
    save("dgamma", dgamma, C);
    save("dbeta", dbeta, C);
}

static void op_relu(void) {
    size_t n = (size_t)iparam("n");
    float *x = load("x", n), *dy = load("dy", n), *y = zeros(n), *dx = zeros(n);
    relu_forward(y, x, n);
    relu_backward(dx, dy, y, n);
    save("y", y, n);
    save("dx", dx, n);
}

static void op_pool(int kind) {  // 0 max, 1 avg, 2 adaptive avg
    int N = iparam("N"), C = iparam("C"), H = iparam("H"), W = iparam("W");
    int k = 0, s = 0, p = 0, ceil = 0, cip = 0, OH, OW;
    if (kind == 2) {
        OH = iparam("OH");
        OW = iparam("OW");
    } else {
        k = iparam("k"), s = iparam("stride"), p = iparam("pad"), ceil = iparam("ceil");
        if (kind == 1) cip = iparam("cip");
        OH = pool_out_size(H, k, s, p, ceil);
        OW = pool_out_size(W, k, s, p, ceil);
    }
    size_t nx = (size_t)N * C * H * W, ny = (size_t)N * C * OH * OW;
    float *x = load("x", nx), *dy = load("dy", ny), *y = zeros(ny), *dx = zeros(nx);
    if (kind == 0) {
        maxpool2d_forward(y, x, N, C, H, W, k, s, p, ceil);
        maxpool2d_backward(dx, dy, x, N, C, H, W, k, s, p, ceil);
    } else if (kind == 1) {
        avgpool2d_forward(y, x, N, C, H, W, k, s, p, ceil, cip);
        avgpool2d_backward(dx, dy, N, C, H, W, k, s, p, ceil, cip);
    } else {
        adaptive_avgpool2d_forward(y, x, N, C, H, W, OH, OW);
        adaptive_avgpool2d_backward(dx, dy, N, C, H, W, OH, OW);
    }
    save("y", y, ny);
    save("dx", dx, nx);
}

static void op_lrn(void) {
    int N = iparam("N"), C = iparam("C"), HW = iparam("HW"), size = iparam("size");
    float alpha = (float)param("alpha"), beta = (float)param("beta"), k = (float)param("k");
    size_t n = (size_t)N * C * HW;
    float *x = load("x", n), *dy = load("dy", n), *y = zeros(n), *dx = zeros(n);
    lrn_forward(y, x, N, C, HW, size, alpha, beta, k);
    lrn_backward(dx, dy, x, N, C, HW, size, alpha, beta, k);
    save("y", y, n);
    save("dx", dx, n);
}

static void op_linear(void) {
    int N = iparam("N"), IN = iparam("IN"), OUT = iparam("OUT"), bias = iparam("bias");
    size_t nx = (size_t)N * IN, nw = (size_t)OUT * IN, ny = (size_t)N * OUT;
    float *x = load("x", nx), *w = load("w", nw), *b = bias ? load("b", OUT) : NULL;
    float *dy = load("dy", ny), *y = zeros(ny), *dx = zeros(nx), *dw = zeros(nw), *db = zeros(OUT);
    linear_forward(y, x, w, b, N, IN, OUT);
    linear_backward(dx, dw, bias ? db : NULL, dy, x, w, N, IN, OUT);
    save("y", y, ny);
    save("dx", dx, nx);
    save("dw", dw, nw);
    if (bias) save("db", db, OUT);
}

static void op_dropout(void) {
    size_t n = (size_t)iparam("n");
    float p = (float)param("p");
    rng r;
    rng_seed(&r, (uint64_t)iparam("seed"));
    float *x = load("x", n), *dy = load("dy", n), *y = zeros(n), *mask = zeros(n), *dx = zeros(n);
    dropout_forward(y, mask, x, n, p, &r);
    dropout_backward(dx, dy, mask, n);
    save("y", y, n);
    save("mask", mask, n);
    save("dx", dx, n);
}

static void op_concat(void) {
    int N = iparam("N"), HW = iparam("HW"), n_in = iparam("n_in"), Ctot = 0;
    if (n_in < 1 || n_in > 16) die("n_in must be 1..16%s", "");
    int Cs[16];
    const float *ins[16];
    float *dins[16];
    char name[32];
    for (int j = 0; j < n_in; j++) {
        snprintf(name, sizeof name, "C%d", j);
        Cs[j] = iparam(name);
        Ctot += Cs[j];
        snprintf(name, sizeof name, "x%d", j);
        ins[j] = load(name, (size_t)N * Cs[j] * HW);
        dins[j] = zeros((size_t)N * Cs[j] * HW);
    }
    size_t ny = (size_t)N * Ctot * HW;
    float *y = zeros(ny), *dy = load("dy", ny);
    concat_forward(y, ins, Cs, n_in, N, HW);
    concat_backward(dins, dy, Cs, n_in, N, HW);
    save("y", y, ny);
    for (int j = 0; j < n_in; j++) {
        snprintf(name, sizeof name, "dx%d", j);
        save(name, dins[j], (size_t)N * Cs[j] * HW);
    }
}

static void op_transform_input(void) {
    int N = iparam("N"), HW = iparam("HW");
    size_t n = (size_t)N * 3 * HW;
    float *x = load("x", n), *dy = load("dy", n), *y = zeros(n), *dx = zeros(n);
    transform_input_forward(y, x, N, HW);
    transform_input_backward(dx, dy, N, HW);
    save("y", y, n);
    save("dx", dx, n);
}

static void op_softmax(void) {
    int N = iparam("N"), K = iparam("K");
    size_t n = (size_t)N * K;
    float *x = load("x", n), *y = zeros(n);
    softmax_forward(y, x, N, K);
    save("y", y, n);
}

static void op_cross_entropy(void) {
    int N = iparam("N"), K = iparam("K");
    float s = (float)param("smoothing"), dloss = (float)param("dloss");
    size_t n = (size_t)N * K;
    float *x = load("x", n), *probs = zeros(n), *dx = zeros(n);
    int64_t *target = load_bytes("target", (size_t)N * sizeof(int64_t));
    for (int i = 0; i < N; i++)
        if (target[i] < 0 || target[i] >= K) die("target out of range%s", "");
    float loss = cross_entropy_forward(probs, x, target, N, K, s);
    cross_entropy_backward(dx, probs, target, N, K, s, dloss);
    save("loss", &loss, 1);
    save("probs", probs, n);
    save("dx", dx, n);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: opcheck DIR OP key=value...\n");
        return 2;
    }
    dir = argv[1];
    const char *op = argv[2];
    n_kv = argc - 3;
    kv = argv + 3;
    if (!strcmp(op, "conv2d")) op_conv2d();
    else if (!strcmp(op, "bn_train")) op_bn(1);
    else if (!strcmp(op, "bn_eval")) op_bn(0);
    else if (!strcmp(op, "relu")) op_relu();
    else if (!strcmp(op, "maxpool")) op_pool(0);
    else if (!strcmp(op, "avgpool")) op_pool(1);
    else if (!strcmp(op, "adaptive")) op_pool(2);
    else if (!strcmp(op, "lrn")) op_lrn();
    else if (!strcmp(op, "linear")) op_linear();
    else if (!strcmp(op, "dropout")) op_dropout();
    else if (!strcmp(op, "concat")) op_concat();
    else if (!strcmp(op, "transform_input")) op_transform_input();
    else if (!strcmp(op, "softmax")) op_softmax();
    else if (!strcmp(op, "cross_entropy")) op_cross_entropy();
    else die("unknown op %s", op);
    for (int i = 0; i < n_allocs; i++) free(allocs[i]);
    return 0;
}
