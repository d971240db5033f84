// Monotonic wall-clock seconds, for timings (progress, benchmarks, the thread pool's spin).
#pragma once
#include <time.h>

static inline double clock_now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
