// Deterministic random numbers (xoshiro256** seeded by splitmix64). Every random choice in
// incept (init, dropout, augmentation, shuffling) draws from an explicit rng: same seed, same run.
#pragma once
#include <stdint.h>

typedef struct { uint64_t s[4]; } rng;

void     rng_seed(rng *r, uint64_t seed);
static inline uint64_t rng_u64(rng *r);     // xoshiro256**: inline, for per-element loops
double   rng_uniform(rng *r);                 // [0, 1)
double   rng_normal(rng *r);                  // N(0, 1), Box-Muller
uint32_t rng_below(rng *r, uint32_t n);       // uniform integer in [0, n), unbiased

static inline uint64_t rng_rotl_(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t rng_u64(rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rng_rotl_(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t; s[3] = rng_rotl_(s[3], 45);
    return result;
}
