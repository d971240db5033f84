// gemm() at every ISA level against a double-precision triple loop, on odd shapes (1, primes,
// sizes that are not multiples of the tiles, several K/M/N blocks), all transpose/accumulate/
// bias/ReLU combinations and padded leading dimensions; results bit-identical for 1, 2 and 3
// threads; the workspace never overrun; the thread pool and the ISA settings.
//
// Error measure: |c - ref| / (sum_k |a_ik b_kj| + |c_old| + |bias|), the natural scale of a
// float dot product's rounding error; must stay below 1e-5 (float32 eps is 6e-8, K <= 1100).
#include "ops/cpu.h"
#include "ops/gemm.h"
#include "util/err.h"
#include "util/rng.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TOL 1e-5

#include "guard.h"
#include "tap.h"


static void fill(float *x, size_t n, rng *r) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(2.0 * rng_uniform(r) - 1.0);
}

typedef struct {
    int M, N, K;
} shape;

// One problem instance, with its inputs fixed so it can be re-run under other settings.
typedef struct {
    shape s;
    int flags, lda, ldb, ldc;
    float *A, *B, *C0, *bias;
} problem;

static problem problem_make(shape s, int flags, rng *r) {
    problem p = {.s = s, .flags = flags};
    int pad = (int)rng_below(r, 3);  // leading dimensions larger than the rows
    p.lda = (flags & GEMM_TRANS_A ? s.M : s.K) + pad;
    p.ldb = (flags & GEMM_TRANS_B ? s.K : s.N) + pad;
    p.ldc = s.N + pad;
    size_t na = (size_t)p.lda * (flags & GEMM_TRANS_A ? s.K : s.M) + 1;
    size_t nb = (size_t)p.ldb * (flags & GEMM_TRANS_B ? s.N : s.K) + 1;
    p.A = malloc(na * sizeof(float));
    p.B = malloc(nb * sizeof(float));
    p.C0 = malloc(((size_t)p.ldc * s.M + 1) * sizeof(float));
    p.bias = malloc(((size_t)(s.M > s.N ? s.M : s.N) + 1) * sizeof(float));
    fill(p.A, na, r);
    fill(p.B, nb, r);
    fill(p.C0, (size_t)p.ldc * s.M + 1, r);
    fill(p.bias, (size_t)(s.M > s.N ? s.M : s.N) + 1, r);
    return p;
}

static void problem_free(problem *p) {
    free(p->A);
    free(p->B);
    free(p->C0);
    free(p->bias);
}

// Runs gemm() into a fresh copy of C0 (returned, caller frees). *ws_ok = 0 if the workspace
// canary after gemm_workspace_size() floats was overwritten.
static float *problem_run(const problem *p, int *ws_ok) {
    size_t cn = (size_t)p->ldc * p->s.M + 1;
    float *C = malloc(cn * sizeof(float));
    memcpy(C, p->C0, cn * sizeof(float));
    guarded ws = guarded_new(gemm_workspace_size(p->s.M, p->s.N, p->s.K));
    const float *bias = p->flags & (GEMM_BIAS_ROW | GEMM_BIAS_COL) ? p->bias : NULL;
    gemm(C, p->ldc, p->A, p->lda, p->B, p->ldb, bias, p->s.M, p->s.N, p->s.K, p->flags, ws.p);
    *ws_ok = guarded_intact(&ws);
    guarded_free(&ws);
    return C;
}

// Worst error ratio of C against the double-precision reference (on A and B rounded to
// bfloat16 first if `bf16`); also checks that the padding columns of C were left alone
// (ratio = INFINITY if not).
static double problem_check_as(const problem *p, const float *C, int bf16) {
    const shape s = p->s;
    double worst = 0.0;
    for (int i = 0; i < s.M; i++) {
        for (int j = 0; j < p->ldc; j++) {
            float got = C[(size_t)i * p->ldc + j];
            float old = p->C0[(size_t)i * p->ldc + j];
            if (j >= s.N) {
                if (memcmp(&got, &old, sizeof got) != 0) return INFINITY;
                continue;
            }
            double sum = 0.0, mag = 0.0;
            for (int k = 0; k < s.K; k++) {
                double a = p->flags & GEMM_TRANS_A ? p->A[(size_t)k * p->lda + i]
                                                   : p->A[(size_t)i * p->lda + k];
                double b = p->flags & GEMM_TRANS_B ? p->B[(size_t)j * p->ldb + k]
                                                   : p->B[(size_t)k * p->ldb + j];
                if (bf16) a = bf16_ref((float)a), b = bf16_ref((float)b);
                sum += a * b;
                mag += fabs(a * b);
            }
            if (p->flags & GEMM_ACCUMULATE) sum += old, mag += fabs(old);
            if (p->flags & GEMM_BIAS_ROW) sum += p->bias[i], mag += fabs(p->bias[i]);
            if (p->flags & GEMM_BIAS_COL) sum += p->bias[j], mag += fabs(p->bias[j]);
            if ((p->flags & GEMM_RELU) && sum < 0) sum = 0;
            double e = fabs(got - sum) / (mag + 1e-30);
            if (!(e <= worst)) worst = e;  // NaN propagates
        }
    }
    return worst;
}

static double problem_check(const problem *p, const float *C) { return problem_check_as(p, C, 0); }

static const shape shapes[] = {
    {1, 1, 1},    {1, 1, 7},     {1, 37, 1},     {5, 1, 3},       {7, 13, 5},
    {8, 48, 16},  {9, 49, 17},   {16, 16, 16},   {17, 100, 33},   {6, 17, 300},
    {3, 5, 0},    {33, 95, 391}, {130, 61, 70},  {64, 200, 800},  {600, 20, 30},
    {20, 1100, 30}, {13, 1031, 9},
    // big enough (>= 4M multiply-adds) to be split over threads, by rows and by columns
    {130, 700, 50}, {1000, 30, 200}, {37, 1500, 100},
    // wide enough that threads splitting the columns claim several chunks each
    {40, 3500, 60},
    // long K (a weight gradient), split by columns: AMX makes A's tiles once for all threads,
    // over several K blocks, and over several row blocks
    {70, 600, 1100}, {600, 700, 120},
    // few rows (a linear layer at a small batch): B read in place when transposed, by columns
    {1, 1000, 4100}, {8, 600, 1200}, {9, 500, 1000},
};

static const int flag_sets[] = {
    0,
    GEMM_ACCUMULATE,
    GEMM_BIAS_ROW | GEMM_RELU,
    GEMM_BIAS_COL | GEMM_ACCUMULATE | GEMM_RELU,
};

static void test_level(cpu_isa_level level) {
    const char *name = cpu_isa_name(level);
    if (level > cpu_isa_detected()) {
        result(1, "gemm %s (skipped: cpu lacks %s)", name, name);
        return;
    }
    if (cpu_isa_set(level) != 0) {
        result(0, "gemm %s: cpu_isa_set: %s", name, err_msg());
        return;
    }
    rng r;
    rng_seed(&r, 1234 + level);
    double worst = 0.0;
    char worst_case[160] = "";
    int ws_ok = 1, same = 1;
    char diff_case[160] = "";
    int n_cases = 0;
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        shape s = shapes[si];
        int big = (double)s.M * s.N * s.K > 2e5;
        for (int t = 0; t < 4; t++)
            for (size_t fi = 0; fi < sizeof flag_sets / sizeof flag_sets[0]; fi++) {
                // all 16 combinations on small shapes; on big ones, each transpose pair once
                if (big && fi != (size_t)t) continue;
                int flags = flag_sets[fi] | (t & 1 ? GEMM_TRANS_A : 0) | (t & 2 ? GEMM_TRANS_B : 0);
                problem p = problem_make(s, flags, &r);
                float *ref_C = NULL;
                for (int threads = 1; threads <= 3; threads++) {
                    cpu_threads_set(threads);
                    int ok;
                    float *C = problem_run(&p, &ok);
                    if (!ok) ws_ok = 0;
                    if (threads == 1) {
                        double e = problem_check(&p, C);
                        n_cases++;
                        if (!(e <= worst)) {
                            worst = e;
                            snprintf(worst_case, sizeof worst_case, "M=%d N=%d K=%d flags=%d",
                                     s.M, s.N, s.K, flags);
                        }
                        ref_C = C;
                    } else {
                        if (memcmp(C, ref_C, ((size_t)p.ldc * s.M + 1) * sizeof(float)) != 0 &&
                            same) {
                            same = 0;
                            snprintf(diff_case, sizeof diff_case,
                                     "M=%d N=%d K=%d flags=%d threads=%d", s.M, s.N, s.K, flags,
                                     threads);
                        }
                        free(C);
                    }
                }
                free(ref_C);
                problem_free(&p);
            }
    }
    // NaN passes through the fused ReLU (as torch.relu), in full and in edge tiles
    {
        enum { M = 11, N = 53, K = 5 };
        float A[M * K], B[K * N], C[M * N];
        for (int i = 0; i < M * K; i++) A[i] = (float)(i % 7) - 3.0f;
        for (int i = 0; i < K * N; i++) B[i] = (float)(i % 5) - 2.0f;
        A[0] = NAN;      // row 0: all NaN
        A[9 * K] = NAN;  // row 9 lies in an edge tile for MR 4, 6 and 8
        guarded ws = guarded_new(gemm_workspace_size(M, N, K));
        gemm(C, N, A, K, B, N, NULL, M, N, K, GEMM_RELU, ws.p);
        int ok = guarded_intact(&ws);
        guarded_free(&ws);
        for (int j = 0; j < N && ok; j++)
            ok = isnan(C[j]) && isnan(C[9 * N + j]) && C[N + j] >= 0.0f;
        result(ok, "gemm %s: ReLU keeps NaN", name);
    }
    cpu_threads_set(2);
    result(worst <= TOL, "gemm %s vs double loop, %d cases (worst err %.2g at %s)", name,
           n_cases, worst, worst_case);
    result(same, "gemm %s bit-identical for 1, 2, 3 threads%s%s", name, same ? "" : ": differs at ",
           diff_case);
    result(ws_ok, "gemm %s stays inside gemm_workspace_size()", name);
}

// bfloat16 mode (cpu_bf16_set): on AMX, or the float32 kernels of `level` on rounded operands.
// Against the double loop on rounded A and B within TOL; against the unrounded one the error
// must be bfloat16's (> 1e-4 somewhere), which shows the rounding happens; bit-identical for
// 1, 2, 3 threads; workspace; ReLU keeps NaN.
static void test_bf16(cpu_isa_level level, int amx) {
    char name[64];
    snprintf(name, sizeof name, "%s%s", cpu_isa_name(level), amx ? " + AMX" : "");
    if (level > cpu_isa_detected() || (amx && !cpu_amx_detected())) {
        result(1, "gemm bf16 %s (skipped: cpu lacks it)", name);
        return;
    }
    cpu_isa_set(level);
    cpu_amx_allow(amx);
    cpu_bf16_set(1);
    rng r;
    rng_seed(&r, 4321 + level);
    double worst = 0.0, unrounded = 0.0;
    char worst_case[160] = "", diff_case[160] = "";
    int ws_ok = 1, same = 1, n_cases = 0, on_amx = cpu_amx();
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        shape s = shapes[si];
        for (int t = 0; t < 4; t++) {
            int flags = flag_sets[(si + t) % 4] | (t & 1 ? GEMM_TRANS_A : 0) | (t & 2 ? GEMM_TRANS_B : 0);
            problem p = problem_make(s, flags, &r);
            float *ref_C = NULL;
            for (int threads = 1; threads <= 3; threads++) {
                cpu_threads_set(threads);
                int ok;
                float *C = problem_run(&p, &ok);
                ws_ok &= ok;
                if (threads == 1) {
                    double e = problem_check_as(&p, C, 1), u = problem_check_as(&p, C, 0);
                    n_cases++;
                    if (u > unrounded) unrounded = u;
                    if (!(e <= worst)) {
                        worst = e;
                        snprintf(worst_case, sizeof worst_case, "M=%d N=%d K=%d flags=%d", s.M,
                                 s.N, s.K, flags);
                    }
                    ref_C = C;
                    continue;
                }
                if (same && memcmp(C, ref_C, ((size_t)p.ldc * s.M + 1) * sizeof(float)) != 0) {
                    same = 0;
                    snprintf(diff_case, sizeof diff_case, ": differs at M=%d N=%d K=%d flags=%d threads=%d",
                             s.M, s.N, s.K, flags, threads);
                }
                free(C);
            }
            free(ref_C);
            problem_free(&p);
        }
    }
    {
        enum { M = 35, N = 53, K = 5 };
        float A[M * K], B[K * N], C[M * N];
        for (int i = 0; i < M * K; i++) A[i] = (float)(i % 7) - 3.0f;
        for (int i = 0; i < K * N; i++) B[i] = (float)(i % 5) - 2.0f;
        A[0] = NAN, A[33 * K] = NAN;   // row 33: in the edge tile for MR 32
        guarded ws = guarded_new(gemm_workspace_size(M, N, K));
        gemm(C, N, A, K, B, N, NULL, M, N, K, GEMM_RELU, ws.p);
        int ok = guarded_intact(&ws);
        for (int j = 0; j < N && ok; j++)
            ok = isnan(C[j]) && isnan(C[33 * N + j]) && C[N + j] >= 0.0f;
        guarded_free(&ws);
        result(ok, "gemm bf16 %s: ReLU keeps NaN", name);
    }
    {   // denormal operands become zero (as VCVTNEPS2BF16 makes them): rows of A and columns
        // of B that are all denormal meet 1e30 on the other side, 1.6e-9 per term if kept
        enum { M = 35, N = 53, K = 37 };
        float A[M * K], B[K * N], At[K * M], Bt[N * K], C[M * N];
        for (int i = 0; i < M; i++)
            for (int k = 0; k < K; k++) A[i * K + k] = At[k * M + i] = i % 2 ? 1.0f : 1.6e-39f;
        for (int k = 0; k < K; k++)
            for (int j = 0; j < N; j++) B[k * N + j] = Bt[j * K + k] = j % 3 ? 1e30f : -1.6e-39f;
        float big = 0.0f;
        for (int k = 0; k < K; k++) big += bf16_ref(1e30f);
        guarded ws = guarded_new(gemm_workspace_size(M, N, K));
        int ok = 1;
        for (int tr = 0; tr < 2; tr++) {
            gemm(C, N, tr ? At : A, tr ? M : K, tr ? Bt : B, tr ? K : N, NULL, M, N, K,
                 tr ? GEMM_TRANS_A | GEMM_TRANS_B : 0, ws.p);
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++)
                    ok &= C[i * N + j] == (i % 2 && j % 3 ? big : 0.0f);
        }
        ok &= guarded_intact(&ws);
        guarded_free(&ws);
        result(ok, "gemm bf16 %s: denormal operands round to zero", name);
    }
    cpu_threads_set(2);
    cpu_bf16_set(0);
    cpu_amx_allow(1);
    result(on_amx == amx, "gemm bf16 %s: %s AMX", name, on_amx ? "runs on" : "does not use");
    result(worst <= TOL, "gemm bf16 %s vs double loop on rounded operands, %d cases (worst err %.2g at %s)",
           name, n_cases, worst, worst_case);
    result(unrounded > 1e-4, "gemm bf16 %s rounds: worst err vs unrounded operands %.2g", name,
           unrounded);
    result(same, "gemm bf16 %s bit-identical for 1, 2, 3 threads%s", name, diff_case);
    result(ws_ok, "gemm bf16 %s stays inside gemm_workspace_size()", name);
}

// Pre-packed A gives the same bits as gemm() packing A itself; the header is checked.
static void test_packed(cpu_isa_level level) {
    const char *name = cpu_isa_name(level);
    if (level > cpu_isa_detected() || cpu_isa_set(level) != 0) return;  // skip line printed above
    static const shape ps[] = {{1, 1, 1}, {9, 49, 17}, {600, 20, 30}, {64, 200, 800},
                               {1000, 30, 200}, {37, 1500, 100}};
    rng r;
    rng_seed(&r, 77 + level);
    int same = 1, checks = 1;
    char where[96] = "";
    for (size_t si = 0; si < sizeof ps / sizeof ps[0]; si++)
        for (int t = 0; t < 2; t++) {
            shape s = ps[si];
            int flags = GEMM_BIAS_ROW | GEMM_RELU | (t ? GEMM_TRANS_A | GEMM_ACCUMULATE : 0);
            problem p = problem_make(s, flags, &r);
            cpu_threads_set(1 + (int)si % 2);
            int ws_ok;
            float *want = problem_run(&p, &ws_ok);
            float *packed = malloc(gemm_pack_a_size(s.M, s.K) * sizeof(float));
            gemm_pack_a(packed, p.A, p.lda, flags, s.M, s.K);
            checks &= gemm_pack_a_check(packed, s.M, s.K) == 0 &&
                      gemm_pack_a_check(packed, s.M + 1, s.K) == -1 &&
                      gemm_pack_a_check(packed, s.M, s.K + 1) == -1;
            size_t cn = (size_t)p.ldc * s.M + 1;
            float *C = malloc(cn * sizeof(float));
            memcpy(C, p.C0, cn * sizeof(float));
            float *ws = malloc(gemm_workspace_size(s.M, s.N, s.K) * sizeof(float));
            gemm_output c = {.p = C, .ldc = p.ldc};
            gemm_operand a = {.kind = GEMM_PACKED, .p = packed};
            gemm_operand b = {.kind = GEMM_DENSE, .p = p.B, .rs = p.ldb, .cs = 1};
            gemm_ex(&c, &a, &b, p.bias, s.M, s.N, s.K, flags & ~GEMM_TRANS_A, ws);
            if (same && memcmp(C, want, cn * sizeof(float)) != 0) {
                same = 0;
                snprintf(where, sizeof where, ": differs at M=%d N=%d K=%d flags=%d", s.M, s.N,
                         s.K, flags);
            }
            if (level > CPU_ISA_SCALAR) {  // made for another level: refused
                cpu_isa_set(CPU_ISA_SCALAR);
                checks &= gemm_pack_a_check(packed, s.M, s.K) == -1;
                cpu_isa_set(level);
            }
            free(C), free(ws), free(packed), free(want);
            problem_free(&p);
        }
    cpu_threads_set(2);
    result(same, "gemm %s with pre-packed A bit-identical to gemm()%s", name, where);
    result(checks, "gemm %s: gemm_pack_a_check refuses other sizes and ISA levels", name);
}

// ---- row groups: one GEMM writing several tensors ----
// Each group's rows must hold exactly what a plain GEMM writes into those rows of one matrix,
// bit for bit: with folded columns (a batch of images), groups that are not multiples of the
// micro-kernel's rows (tiles straddling two groups), accumulation, bias and ReLU, a packed A.
static void test_groups(cpu_isa_level level, rng *r) {
    static const int cases[][6] = {   // M, images, pixels per image, K, groups (2 or 3), split
        {37, 3, 7, 33, 3, 0}, {64, 2, 49, 100, 3, 0}, {24, 1, 196, 70, 2, 0},
        {50, 4, 4, 17, 3, 1}, {448, 1, 196, 528, 3, 0}, {19, 5, 1, 8, 2, 1},
        {48, 3, 16, 40, 3, 0},   // 4x4 maps; AMX tiles cross images and groups at 16
    };
    int ok = 1;
    char where[128] = "";
    cpu_isa_set(level);
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0] && ok; ci++) {
        const int M = cases[ci][0], imgs = cases[ci][1], hw = cases[ci][2], K = cases[ci][3];
        const int ng = cases[ci][4], N = imgs * hw;
        int row0[4];   // group boundaries: odd ones when "split", else multiples of 8
        row0[0] = 0, row0[ng] = M;
        for (int g = 1; g < ng; g++)
            row0[g] = cases[ci][5] ? M * g / ng + (g % 2) : (M * g / ng) / 8 * 8;
        float *A = malloc((size_t)M * K * sizeof(float)), *B = malloc((size_t)K * N * sizeof(float));
        float *bias = malloc((size_t)M * sizeof(float));
        float *plain = malloc((size_t)M * N * sizeof(float)), *grouped = malloc((size_t)M * N * sizeof(float));
        float *packed = malloc(gemm_pack_a_size(M, K) * sizeof(float));
        fill(A, (size_t)M * K, r), fill(B, (size_t)K * N, r), fill(bias, (size_t)M, r);
        fill(plain, (size_t)M * N, r);
        gemm_pack_a(packed, A, K, 0, M, K);
        for (int threads = 1; threads <= 3 && ok; threads++)
            for (int variant = 0; variant < 3 && ok; variant++) {
                cpu_threads_set(threads);
                int flags = variant == 0 ? GEMM_BIAS_ROW | GEMM_RELU
                          : variant == 1 ? GEMM_ACCUMULATE : 0;
                // grouped: group g is [imgs][rows of g][hw], stored one group after another
                float *gp[4];
                size_t at = 0;
                for (int g = 0; g < ng; g++) {
                    gp[g] = grouped + at;
                    at += (size_t)imgs * (row0[g + 1] - row0[g]) * hw;
                }
                // the same starting values in both layouts (for GEMM_ACCUMULATE)
                float *ref = malloc((size_t)M * N * sizeof(float));
                memcpy(ref, plain, (size_t)M * N * sizeof(float));
                for (int g = 0; g < ng; g++)
                    for (int n = 0; n < imgs; n++)
                        for (int i = row0[g]; i < row0[g + 1]; i++)
                            memcpy(gp[g] + ((size_t)n * (row0[g + 1] - row0[g]) + i - row0[g]) * hw,
                                   ref + ((size_t)n * M + i) * hw, (size_t)hw * sizeof(float));
                gemm_operand a = {.kind = variant == 2 ? GEMM_PACKED : GEMM_DENSE,
                                  .p = variant == 2 ? packed : A, .rs = K, .cs = 1};
                gemm_operand b = {.kind = GEMM_DENSE, .p = B, .rs = N, .cs = 1};
                size_t wsn = gemm_workspace_size(M, N, K);
                float *ws = malloc(wsn * sizeof(float));
                gemm_output c1 = {.p = ref, .ldc = hw, .fold = hw, .fold_stride = (ptrdiff_t)M * hw};
                gemm_ex(&c1, &a, &b, bias, M, N, K, flags, ws);
                gemm_output c2 = {.ldc = hw, .fold = hw, .ngroups = ng};
                for (int g = 0; g < ng; g++) {
                    c2.row0[g] = row0[g];
                    c2.gp[g] = gp[g];
                    c2.gfs[g] = (ptrdiff_t)(row0[g + 1] - row0[g]) * hw;
                }
                c2.row0[ng] = M;
                gemm_ex(&c2, &a, &b, bias, M, N, K, flags, ws);
                for (int g = 0; g < ng && ok; g++)
                    for (int n = 0; n < imgs && ok; n++)
                        for (int i = row0[g]; i < row0[g + 1] && ok; i++)
                            if (memcmp(gp[g] + ((size_t)n * (row0[g + 1] - row0[g]) + i - row0[g]) * hw,
                                       ref + ((size_t)n * M + i) * hw, (size_t)hw * sizeof(float))) {
                                ok = 0;
                                snprintf(where, sizeof where, ": differs at M=%d imgs=%d hw=%d K=%d "
                                         "row %d, %d threads, variant %d", M, imgs, hw, K, i,
                                         threads, variant);
                            }
                free(ws), free(ref);
            }
        free(A), free(B), free(bias), free(plain), free(grouped), free(packed);
    }
    cpu_threads_set(2);
    result(ok, "gemm %s with row groups bit-identical to one matrix's rows%s", cpu_isa_name(level),
           where);
}

// ---- folded output ----
// C written image by image (a batch folded into the columns: fold, fold_stride) must hold
// exactly what the unfolded GEMM writes, bit for bit: folds that cut the kernel's tiles in
// halves (16, 48: AMX's split tiles), in runs (24) or into gathers (4, 8), with
// accumulation, bias and ReLU, on 1-3 threads.
static void test_folded(cpu_isa_level level, rng *r) {
    static const int folds[] = {16, 48, 24, 8, 4};
    enum { M = 70, IMGS = 5, K = 100 };
    int ok = 1;
    char where[128] = "";
    cpu_isa_set(level);
    for (size_t fi = 0; fi < sizeof folds / sizeof folds[0] && ok; fi++) {
        const int hw = folds[fi], N = IMGS * hw;
        float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * K * N);
        float *bias = malloc(sizeof(float) * M), *plain = malloc(sizeof(float) * M * N);
        float *folded = malloc(sizeof(float) * M * N);
        float *ws = malloc(gemm_workspace_size(M, N, K) * sizeof(float));
        fill(A, (size_t)M * K, r), fill(B, (size_t)K * N, r), fill(bias, M, r);
        for (int threads = 1; threads <= 3 && ok; threads++)
            for (int variant = 0; variant < 3 && ok; variant++) {
                cpu_threads_set(threads);
                int flags = variant == 0 ? GEMM_BIAS_ROW | GEMM_RELU : variant == 1 ? GEMM_ACCUMULATE : 0;
                fill(plain, (size_t)M * N, r);
                for (int n = 0; n < IMGS; n++)   // the same starting values, image by image
                    for (int i = 0; i < M; i++)
                        memcpy(folded + ((size_t)n * M + i) * hw, plain + (size_t)i * N + n * hw,
                               sizeof(float) * hw);
                gemm_operand a = {.kind = GEMM_DENSE, .p = A, .rs = K, .cs = 1};
                gemm_operand b = {.kind = GEMM_DENSE, .p = B, .rs = N, .cs = 1};
                gemm_output c1 = {.p = plain, .ldc = N};
                gemm_output c2 = {.p = folded, .ldc = hw, .fold = hw, .fold_stride = (ptrdiff_t)M * hw};
                gemm_ex(&c1, &a, &b, bias, M, N, K, flags, ws);
                gemm_ex(&c2, &a, &b, bias, M, N, K, flags, ws);
                for (int n = 0; n < IMGS && ok; n++)
                    for (int i = 0; i < M && ok; i++)
                        if (memcmp(folded + ((size_t)n * M + i) * hw, plain + (size_t)i * N + n * hw,
                                   sizeof(float) * hw)) {
                            ok = 0;
                            snprintf(where, sizeof where, ": differs at fold %d, image %d row %d, "
                                     "%d threads, variant %d", hw, n, i, threads, variant);
                        }
            }
        free(A), free(B), free(bias), free(plain), free(folded), free(ws);
    }
    cpu_threads_set(2);
    result(ok, "gemm %s%s: folded output bit-identical to the unfolded GEMM's%s", cpu_isa_name(level),
           cpu_bf16() ? (cpu_amx() ? " bf16 on AMX" : " bf16") : "", where);
}

// ---- thread pool ----

typedef struct {
    int calls[CPU_MAX_THREADS];
    int bad_n;
    int nested_ok;
} pool_probe;

static void probe_inner(void *ctx, int t, int n) {
    int *seen = ctx;
    if (t >= 0 && t < n) seen[t]++;
}

static void probe_inner_atomic(void *ctx, int t, int n) {
    int *seen = ctx;
    if (t >= 0 && t < n) __atomic_fetch_add(&seen[t], 1, __ATOMIC_RELAXED);
}

static void probe_task(void *ctx, int t, int n) {
    pool_probe *p = ctx;
    if (n != 3) p->bad_n = 1;
    __atomic_fetch_add(&p->calls[t], 1, __ATOMIC_RELAXED);
    if (t == 1) {  // a nested call runs its parts serially on this thread
        int seen[2] = {0, 0};
        cpu_parallel(probe_inner, seen, 2);
        p->nested_ok = seen[0] == 1 && seen[1] == 1;
    }
}

static void test_pool(void) {
    int ok = cpu_threads_set(3) == 0;
    pool_probe p;
    for (int rep = 0; rep < 50 && ok; rep++) {
        memset(&p, 0, sizeof p);
        cpu_parallel(probe_task, &p, 3);
        ok = p.calls[0] == 1 && p.calls[1] == 1 && p.calls[2] == 1 && !p.bad_n && p.nested_ok;
    }
    result(ok, "cpu_parallel runs each part once, nested calls serially");
    int e1 = cpu_threads_set(0), e2 = cpu_threads_set(CPU_MAX_THREADS + 1);
    result(e1 == -1 && e2 == -1 && cpu_threads() == 3, "cpu_threads_set rejects 0 and %d",
           CPU_MAX_THREADS + 1);
    ok = cpu_threads_set(1) == 0 && cpu_threads() == 1;
    memset(&p, 0, sizeof p);
    cpu_parallel(probe_task, &p, 3);  // clamped to 1 part
    ok = ok && p.calls[0] == 1 && p.calls[1] == 0;
    ok = ok && cpu_threads_set(2) == 0;
    result(ok, "cpu_threads_set shrinks and grows the pool");

    // Jobs of 1..4 parts on 4 threads (workers left out of a job must not run it or a later
    // one twice), back to back and after gaps longer than the workers' spin (so they sleep and
    // are woken), with a thread-count change in the middle.
    ok = cpu_threads_set(4) == 0;
    for (int rep = 0; rep < 400 && ok; rep++) {
        int n = 1 + rep % 4, seen[4] = {0, 0, 0, 0};
        if (rep == 200) ok = cpu_threads_set(3) == 0 && cpu_threads_set(4) == 0;
        if (rep % 7 == 0) {
            struct timespec gap = {0, 300000};   // 0.3 ms
            nanosleep(&gap, NULL);
        }
        cpu_parallel(probe_inner_atomic, seen, n);
        for (int t = 0; t < 4; t++) ok = ok && seen[t] == (t < n);
    }
    ok = ok && cpu_threads_set(2) == 0;
    result(ok, "cpu_parallel: 400 jobs of 1-4 parts on 4 threads, with sleeps between, each part once");
}

int main(void) {
    // A bad INCEPT_ISA is reported by cpu_init() (set before the first cpu_* call).
    setenv("INCEPT_ISA", "avx9000", 1);
    int rc = cpu_init();
    result(rc == -1 && strstr(err_msg(), "INCEPT_ISA") != NULL,
           "cpu_init reports a bad INCEPT_ISA (%s)", err_msg());
    cpu_isa_level l;
    result(cpu_isa_parse("avx2", &l) == 0 && l == CPU_ISA_AVX2 && cpu_isa_parse("AVX2", &l) == -1,
           "cpu_isa_parse");
    cpu_isa_level det = cpu_isa_detected();
    if (det < CPU_ISA_AVX512)
        result(cpu_isa_set(CPU_ISA_AVX512) == -1, "cpu_isa_set refuses avx512 on this CPU");
    printf("# detected ISA: %s, %d threads\n", cpu_isa_name(det), cpu_threads());
    double peak = cpu_fma_peak_gflops(det);
    result(peak > 0.1, "cpu_fma_peak_gflops(%s) = %.1f", cpu_isa_name(det), peak);

    test_pool();
    test_level(CPU_ISA_SCALAR);
    test_level(CPU_ISA_AVX2);
    test_level(CPU_ISA_AVX512);
    for (int l = CPU_ISA_SCALAR; l <= CPU_ISA_AVX512; l++) test_packed((cpu_isa_level)l);
    {
        rng r;
        rng_seed(&r, 7);
        for (int l = CPU_ISA_SCALAR; l <= (int)det; l++) test_groups((cpu_isa_level)l, &r);
        // the same in bfloat16 mode, on AMX where there is AMX
        test_folded(det, &r);
        cpu_bf16_set(1);
        test_groups(det, &r);
        test_folded(det, &r);
        cpu_bf16_set(0);
    }
    test_bf16(CPU_ISA_SCALAR, 0);
    test_bf16(CPU_ISA_AVX512, 0);
    test_bf16(CPU_ISA_AVX512, 1);
    cpu_isa_set(det);
    cpu_threads_set(1);  // joins the workers, so leak checkers see a clean exit
    return failed ? 1 : 0;
}
