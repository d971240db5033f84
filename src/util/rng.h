// Deterministic random numbers (xoshiro256** seeded by splitmix64). Every random choice in
// incept (init, dropout, augmentation, shuffling) draws from an explicit rng: same seed, same run.
#pragma once
#include <stdint.h>

typedef struct { uint64_t s[4]; } rng;

void     rng_seed(rng *r, uint64_t seed);
uint64_t rng_u64(rng *r);
double   rng_uniform(rng *r);                 // [0, 1)
double   rng_normal(rng *r);                  // N(0, 1), Box-Muller
uint32_t rng_below(rng *r, uint32_t n);       // uniform integer in [0, n), unbiased
