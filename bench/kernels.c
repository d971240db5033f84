// Benchmark of the fast CPU kernels: GFLOP/s and % of this CPU's measured FMA peak for
//   - a large GEMM (512 x 3136 x 832) and a few others,
//   - every convolution of torchvision's GoogLeNet at 224x224 (forward with fused bias+ReLU,
//     batch 1 and 16; with --backward also din+dW at batch 16), for 1 and 2 threads.
// Times are medians of 5 samples of wall-clock time (the machine may be shared: the peak is
// measured in the same run, and "cpu" columns use process CPU time, which other processes
// do not inflate).
//
// usage: kernels [--isa scalar|avx2|avx512] [--threads 1,2] [--backward] [--packed] [--quick]
//   --packed: forward passes use weights packed once (conv2d_fast_forward_packed)
#include "ops/conv_fast.h"
#include "ops/cpu.h"
#include "ops/gemm.h"
#include "util/err.h"
#include "util/rng.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double clock_s(clockid_t id) {
    struct timespec t;
    clock_gettime(id, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef void (*bench_fn)(void *ctx);

// Median seconds per call (wall and process CPU) over 5 samples of >= min_s each.
static void time_median(bench_fn fn, void *ctx, double min_s, double *wall, double *cpu) {
    fn(ctx);  // warm up (page faults, pool start)
    double t0 = clock_s(CLOCK_MONOTONIC);
    fn(ctx);
    double one = clock_s(CLOCK_MONOTONIC) - t0;
    int reps = one >= min_s ? 1 : (int)(min_s / (one > 1e-7 ? one : 1e-7)) + 1;
    double w[5], c[5];
    for (int s = 0; s < 5; s++) {
        double a = clock_s(CLOCK_MONOTONIC), b = clock_s(CLOCK_PROCESS_CPUTIME_ID);
        for (int r = 0; r < reps; r++) fn(ctx);
        w[s] = (clock_s(CLOCK_MONOTONIC) - a) / reps;
        c[s] = (clock_s(CLOCK_PROCESS_CPUTIME_ID) - b) / reps;
    }
    qsort(w, 5, sizeof(double), cmp_double);
    qsort(c, 5, sizeof(double), cmp_double);
    *wall = w[2];
    *cpu = c[2];
}

static float *rand_buf(size_t n, rng *r) {
    float *x = malloc(n * sizeof(float));
    if (!x) {
        fprintf(stderr, "kernels: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++) x[i] = (float)(rng_uniform(r) - 0.5);
    return x;
}

// ---- GEMM ----
typedef struct {
    int M, N, K;
    float *A, *B, *C, *ws;
} gemm_ctx;

static void gemm_call(void *p) {
    gemm_ctx *g = p;
    gemm(g->C, g->N, g->A, g->K, g->B, g->N, NULL, g->M, g->N, g->K, 0, g->ws);
}

// ---- GoogLeNet convolutions ----
typedef struct {
    const char *name;
    int C, H, K, k, stride, pad;
} layer;

// torchvision googlenet (aux heads off): stem, then per Inception block the 1x1, the 3x3
// reduce + 3x3, the "5x5" reduce + 3x3 (torchvision uses 3x3 there) and the pool projection.
#define INCEPTION(n, cin, H, c1, c3r, c3, c5r, c5, pp)                                       \
    {n ".1x1", cin, H, c1, 1, 1, 0}, {n ".3x3red", cin, H, c3r, 1, 1, 0},                   \
        {n ".3x3", c3r, H, c3, 3, 1, 1}, {n ".5x5red", cin, H, c5r, 1, 1, 0},               \
        {n ".5x5", c5r, H, c5, 3, 1, 1}, {n ".pool", cin, H, pp, 1, 1, 0}
static const layer googlenet[] = {
    {"conv1", 3, 224, 64, 7, 2, 3},
    {"conv2", 64, 56, 64, 1, 1, 0},
    {"conv3", 64, 56, 192, 3, 1, 1},
    INCEPTION("3a", 192, 28, 64, 96, 128, 16, 32, 32),
    INCEPTION("3b", 256, 28, 128, 128, 192, 32, 96, 64),
    INCEPTION("4a", 480, 14, 192, 96, 208, 16, 48, 64),
    INCEPTION("4b", 512, 14, 160, 112, 224, 24, 64, 64),
    INCEPTION("4c", 512, 14, 128, 128, 256, 24, 64, 64),
    INCEPTION("4d", 512, 14, 112, 144, 288, 32, 64, 64),
    INCEPTION("4e", 528, 14, 256, 160, 320, 32, 128, 128),
    INCEPTION("5a", 832, 7, 256, 160, 320, 32, 128, 128),
    INCEPTION("5b", 832, 7, 384, 192, 384, 48, 128, 128),
};
#define N_LAYERS (int)(sizeof googlenet / sizeof googlenet[0])

static int out_size(int H, int k, int s, int p) { return (H + 2 * p - k) / s + 1; }

static double layer_macs(const layer *l) {
    int OH = out_size(l->H, l->k, l->stride, l->pad);
    return (double)l->K * OH * OH * l->C * l->k * l->k;
}

typedef struct {
    const layer *l;
    int N;
    float *in, *w, *b, *out, *dout, *din, *dw, *ws;
    float *packed;  // weights from conv2d_fast_pack_weights, or NULL
} conv_ctx;

static void conv_fwd_call(void *p) {
    conv_ctx *c = p;
    const layer *l = c->l;
    if (c->packed)
        conv2d_fast_forward_packed(c->out, c->in, c->packed, c->b, c->N, l->C, l->H, l->H, l->K,
                                   l->k, l->stride, l->pad, 1, c->ws);
    else
        conv2d_fast_forward(c->out, c->in, c->w, c->b, c->N, l->C, l->H, l->H, l->K, l->k,
                            l->stride, l->pad, 1, c->ws);
}

static void conv_bwd_call(void *p) {
    conv_ctx *c = p;
    const layer *l = c->l;
    conv2d_fast_backward(c->din, c->dw, NULL, c->dout, c->in, c->w, c->N, l->C, l->H, l->H, l->K,
                         l->k, l->stride, l->pad, 0, c->ws);
}

int main(int argc, char **argv) {
    int threads_list[4] = {1, 2}, n_threads = 2, backward = 0, quick = 0, packed = 0;
    if (cpu_init() != 0) {
        fprintf(stderr, "kernels: %s\n", err_msg());
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--isa") && i + 1 < argc) {
            cpu_isa_level l;
            if (cpu_isa_parse(argv[++i], &l) != 0 || cpu_isa_set(l) != 0) {
                fprintf(stderr, "kernels: %s\n", err_msg());
                return 1;
            }
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            n_threads = sscanf(argv[++i], "%d,%d,%d,%d", &threads_list[0], &threads_list[1],
                               &threads_list[2], &threads_list[3]);
            if (n_threads < 1) {
                fprintf(stderr, "kernels: --threads wants a list like 1,2\n");
                return 1;
            }
        } else if (!strcmp(argv[i], "--backward")) {
            backward = 1;
        } else if (!strcmp(argv[i], "--packed")) {
            packed = 1;
        } else if (!strcmp(argv[i], "--quick")) {
            quick = 1;
        } else {
            fprintf(stderr, "usage: kernels [--isa scalar|avx2|avx512] [--threads 1,2] "
                            "[--backward] [--packed] [--quick]\n");
            return 1;
        }
    }
    for (int t = 0; t < n_threads; t++)
        if (cpu_threads_set(threads_list[t]) != 0) {
            fprintf(stderr, "kernels: %s\n", err_msg());
            return 1;
        }
    cpu_isa_level isa = cpu_isa();
    double peak = cpu_fma_peak_gflops(isa);
    printf("isa %s (detected %s), single-core FMA peak %.1f GFLOP/s (measured now)\n",
           cpu_isa_name(isa), cpu_isa_name(cpu_isa_detected()), peak);
    rng r;
    rng_seed(&r, 1);
    double min_s = quick ? 0.005 : 0.02;

    // ---- GEMM ----
    static const int gshapes[][3] = {{512, 3136, 832}, {1024, 1024, 1024}, {192, 3136, 576},
                                     {128, 784, 256},  {64, 12544, 147},   {384, 49, 832}};
    printf("\nGEMM C[MxN] = A[MxK] B[KxN]           GFLOP/s (%% of peak x threads)\n");
    for (size_t s = 0; s < sizeof gshapes / sizeof gshapes[0]; s++) {
        gemm_ctx g = {gshapes[s][0], gshapes[s][1], gshapes[s][2], 0, 0, 0, 0};
        g.A = rand_buf((size_t)g.M * g.K, &r);
        g.B = rand_buf((size_t)g.K * g.N, &r);
        g.C = rand_buf((size_t)g.M * g.N, &r);
        double flops = 2.0 * g.M * g.N * g.K;
        printf("  %5d x %5d x %5d ", g.M, g.N, g.K);
        for (int t = 0; t < n_threads; t++) {
            cpu_threads_set(threads_list[t]);
            g.ws = malloc(gemm_workspace_size(g.M, g.N, g.K) * sizeof(float));
            double wall, cpu;
            time_median(gemm_call, &g, min_s, &wall, &cpu);
            printf("  %dT %6.1f (%3.0f%%)", threads_list[t], flops / wall * 1e-9,
                   100 * flops / wall * 1e-9 / (peak * threads_list[t]));
            if (threads_list[t] == 1) printf(" cpu %3.0f%%", 100 * flops / cpu * 1e-9 / peak);
            free(g.ws);
        }
        printf("\n");
        free(g.A), free(g.B), free(g.C);
    }

    // ---- GoogLeNet ----
    double total_macs = 0;
    for (int i = 0; i < N_LAYERS; i++) total_macs += layer_macs(&googlenet[i]);
    printf("\nGoogLeNet convolutions at 224x224: %.4f G multiply-adds per image "
           "(+ 1.024 M in the classifier)\n", total_macs * 1e-9);
    static const int batches[] = {1, 16};
    for (int bi = 0; bi < (quick ? 1 : 2); bi++) {
        int N = batches[bi];
        for (int pass = 0; pass < (backward && N > 1 ? 2 : 1); pass++) {
            printf("\nbatch %d, %s: GFLOP/s per layer", N,
                   pass ? "backward (din + dW)"
                        : packed ? "forward (+bias+ReLU, packed weights)" : "forward (+bias+ReLU)");
            for (int t = 0; t < n_threads; t++) printf(" | %dT", threads_list[t]);
            printf("\n");
            double tot_wall[4] = {0}, tot_cpu = 0;
            for (int li = 0; li < N_LAYERS; li++) {
                const layer *l = &googlenet[li];
                int OH = out_size(l->H, l->k, l->stride, l->pad);
                conv_ctx c = {.l = l, .N = N};
                size_t nin = (size_t)N * l->C * l->H * l->H, nout = (size_t)N * l->K * OH * OH;
                size_t nw = (size_t)l->K * l->C * l->k * l->k;
                c.in = rand_buf(nin, &r);
                c.w = rand_buf(nw, &r);
                c.b = rand_buf(l->K, &r);
                c.out = rand_buf(nout, &r);
                if (packed && !pass) {
                    c.packed = malloc(conv2d_fast_pack_weights_size(l->C, l->K, l->k) *
                                      sizeof(float));
                    if (!c.packed) return 1;
                    conv2d_fast_pack_weights(c.packed, c.w, l->C, l->K, l->k);
                }
                if (pass) {
                    c.dout = rand_buf(nout, &r);
                    c.din = rand_buf(nin, &r);
                    c.dw = rand_buf(nw, &r);
                }
                double flops = 2.0 * layer_macs(l) * N * (pass ? 2 : 1);
                printf("  %-10s C%4d %3dx%-3d K%4d k%d s%d ", l->name, l->C, l->H, l->H, l->K,
                       l->k, l->stride);
                for (int t = 0; t < n_threads; t++) {
                    cpu_threads_set(threads_list[t]);
                    size_t wn = conv2d_fast_workspace_size(N, l->C, l->H, l->H, l->K, l->k,
                                                           l->stride, l->pad);
                    c.ws = malloc((wn + 1) * sizeof(float));
                    double wall, cpu;
                    time_median(pass ? conv_bwd_call : conv_fwd_call, &c, min_s, &wall, &cpu);
                    tot_wall[t] += wall;
                    if (threads_list[t] == 1) tot_cpu += cpu;
                    printf(" | %6.1f (%3.0f%%)", flops / wall * 1e-9,
                           100 * flops / wall * 1e-9 / (peak * threads_list[t]));
                    free(c.ws);
                }
                printf("\n");
                free(c.in), free(c.w), free(c.b), free(c.out), free(c.packed);
                if (pass) free(c.dout), free(c.din), free(c.dw);
            }
            double flops = 2.0 * total_macs * N * (pass ? 2 : 1);
            printf("  all convolutions:");
            for (int t = 0; t < n_threads; t++)
                printf("  %dT %.2f ms/image = %.1f GFLOP/s = %.0f%% of %d x peak;",
                       threads_list[t], 1e3 * tot_wall[t] / N, flops / tot_wall[t] * 1e-9,
                       100 * flops / tot_wall[t] * 1e-9 / (peak * threads_list[t]),
                       threads_list[t]);
            if (tot_cpu > 0) printf("  1T by CPU time %.0f%%", 100 * flops / tot_cpu * 1e-9 / peak);
            printf("\n");
        }
    }
    printf("\nFMA peak re-measured at the end: %.1f GFLOP/s\n", cpu_fma_peak_gflops(isa));
    cpu_threads_set(1);
    return 0;
}
