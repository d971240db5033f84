// Helpers shared by the C kernel tests: workspaces with a canary after them, random buffers.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "util/rng.h"

enum { GUARD_FLOATS = 64 };
#define GUARD_VALUE (-12345.0f)

// A kernel workspace of n floats, deliberately one float off 64-byte alignment (kernels must
// cope with any alignment), followed by GUARD_FLOATS canaries.
typedef struct {
    float *raw, *p;
    size_t n;
} guarded;

static inline guarded guarded_new(size_t n) {
    guarded g = {malloc((n + 1 + GUARD_FLOATS) * sizeof(float)), NULL, n};
    g.p = g.raw + 1;
    for (int i = 0; i < GUARD_FLOATS; i++) g.p[n + i] = GUARD_VALUE;
    return g;
}

// 1 if nothing was written past the n floats.
static inline int guarded_intact(const guarded *g) {
    for (int i = 0; i < GUARD_FLOATS; i++)
        if (g->p[g->n + i] != GUARD_VALUE) return 0;
    return 1;
}

static inline void guarded_free(guarded *g) { free(g->raw); }

// n uniform values in [-1, 1), plus one more (element n: room for a caller's canary).
static inline float *rand_buf(size_t n, rng *r) {
    float *x = malloc((n + 1) * sizeof(float));
    for (size_t i = 0; i < n + 1; i++) x[i] = (float)(2.0 * rng_uniform(r) - 1.0);
    return x;
}

// A copy of x's n + 1 floats.
static inline float *copy_buf(const float *x, size_t n) {
    float *y = malloc((n + 1) * sizeof(float));
    memcpy(y, x, (n + 1) * sizeof(float));
    return y;
}

// x rounded to bfloat16 (nearest, ties to even; denormals to zero of their sign, as the CPU's
// VCVTNEPS2BF16 does; no NaN among the test inputs), written here independently of the
// library's gemm_amx.c.
static inline float bf16_ref(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if (fpclassify(x) == FP_SUBNORMAL) u &= 0x80000000u;
    else u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, sizeof x);
    return x;
}
