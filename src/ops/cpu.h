// What the CPU can do, and a small persistent thread pool for the fast kernels.
//
// ISA levels are detected from cpuid feature flags plus XGETBV (the OS must save the ymm/zmm
// state), never from the model name. INCEPT_ISA=scalar|avx2|avx512 lowers the level (tests
// use it to exercise every path); naming a level the CPU lacks is an error. INCEPT_THREADS=N
// sets the initial thread count (default: the number of online CPUs, at most CPU_MAX_THREADS).
#pragma once
#include <stdatomic.h>
#include <stddef.h>

typedef enum {
    CPU_ISA_SCALAR = 0,  // plain C (SSE2 at most, whatever the compiler makes of it)
    CPU_ISA_AVX2   = 1,  // AVX2 + FMA3 (256-bit)
    CPU_ISA_AVX512 = 2,  // AVX-512F (+ FMA); the kernels use only AVX-512F instructions
} cpu_isa_level;

#define CPU_MAX_THREADS 64

// Reads INCEPT_ISA and INCEPT_THREADS. Returns -1 (err_set) on an unknown value or a level the
// CPU lacks; the settings then stay at their defaults. Called lazily by cpu_isa() and
// cpu_threads(), so programs need not call it, but a CLI should, to report a bad variable.
int cpu_init(void);

// The best level this CPU and OS support (ignores INCEPT_ISA).
cpu_isa_level cpu_isa_detected(void);
// The level the kernels use now: INCEPT_ISA if set and valid, else the detected one.
cpu_isa_level cpu_isa(void);
// Forces a level (for tests and benchmarks). -1 (err_set) if the CPU lacks it.
int cpu_isa_set(cpu_isa_level level);
// "scalar", "avx2" or "avx512".
const char *cpu_isa_name(cpu_isa_level level);
// Parses a level name as above; -1 (err_set) if unknown.
int cpu_isa_parse(const char *name, cpu_isa_level *level);

// ---- bfloat16 products (opt-in mixed precision) ----
// Off by default. On, gemm_ex() (every convolution and linear layer of the fast path) rounds
// both operands to bfloat16 (to nearest even) and accumulates in float32, like PyTorch's
// torch.set_float32_matmul_precision("medium"); Winograd is then not used (its transforms would
// magnify bfloat16's error). Weights, gradients, activations and everything outside the
// products stay float32. The products run on AMX tiles where the CPU and the OS offer them
// (cpu_amx()), else on the float32 kernels fed the rounded operands: the same rounding of the
// inputs (sums may round differently), but no faster.
void cpu_bf16_set(int on);
int cpu_bf16(void);
// 1 if the bfloat16 products run on AMX now: cpu_amx_detected(), the ISA level is avx512 and
// AMX is allowed (the default; INCEPT_AMX=0 or cpu_amx_allow(0) forbid it, to exercise the
// fallback).
int cpu_amx(void);
// AMX-BF16 usable: cpuid, XCR0's tile state and the kernel's permission (arch_prctl
// ARCH_REQ_XCOMP_PERM, asked for on the first call).
int cpu_amx_detected(void);
void cpu_amx_allow(int on);

// Measures this CPU's single-core FMA peak in GFLOP/s (2 flops per FMA lane) at the given
// level, with a ~50 ms loop of independent FMAs; the best of a few short runs, so a briefly
// busy machine does not lower it much. For benchmarks that report % of peak.
double cpu_fma_peak_gflops(cpu_isa_level level);
// The same measurement of any loop: loop(iters) does iters x flops_per_iter flops and returns
// a value the caller sinks (so that the work is not optimised away).
double cpu_loop_peak_gflops(float (*loop)(long iters), double flops_per_iter);

// ---- thread pool ----
// Worker threads are created on demand and then persist, sleeping on a condition variable
// between jobs (no spinning while idle).
int cpu_threads(void);
// 1..CPU_MAX_THREADS; shrinking joins the surplus workers. -1 (err_set) if out of range or a
// thread cannot be created (the count then stays as it was).
int cpu_threads_set(int n);

// Runs fn(ctx, t, n) for t = 0..n-1, t = 0 on the calling thread, the others on pool workers,
// and returns when all are done. n is clamped to [1, cpu_threads()]. Callers split their work
// by t and n only, so the result does not depend on which thread runs which part. A call made
// while the pool is busy (from inside fn, or from a second application thread) runs the n
// parts one after another on the calling thread.
typedef void (*cpu_task_fn)(void *ctx, int t, int n);
void cpu_parallel(cpu_task_fn fn, void *ctx, int n);

// Threads worth waking for `work` units when each should get at least `min_per_thread` of them:
// 1..cpu_threads().
static inline int cpu_threads_for(size_t work, size_t min_per_thread) {
    size_t n = work / min_per_thread;
    int max = cpu_threads();
    if (n < 1) n = 1;
    return n < (size_t)max ? (int)n : max;
}

// Pieces claimed in turn. A part that cuts its work into pieces by a fixed rule (never by t or
// n) can take them from a shared counter instead of a fixed share: on a shared host one thread
// is often held up while the other runs, and then the one running takes the pieces left. Each
// piece must be computed the same way whoever takes it. Zero the counter before cpu_parallel.
typedef struct { _Atomic int next; } cpu_claims;
static inline int cpu_claim(cpu_claims *c) {
    return atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
}

// Part t of n of [0, total): [*lo, *hi).
static inline void cpu_part_range(size_t total, int t, int n, size_t *lo, size_t *hi) {
    *lo = total * (size_t)t / (size_t)n;
    *hi = total * (size_t)(t + 1) / (size_t)n;
}
