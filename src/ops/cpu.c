// ISA detection (cpuid + XGETBV), the INCEPT_ISA / INCEPT_THREADS settings, an FMA-peak probe
// and the persistent thread pool. See cpu.h.
#include "ops/cpu.h"
#include "util/err.h"
#include "util/clock.h"
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

// ---------------------------------------------------------------------------------------------
// ISA detection

// XCR0: which register states the OS saves on a context switch. Without the bits the CPU's
// AVX/AVX-512 instructions would fault or lose state, whatever cpuid says.
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static cpu_isa_level isa_probe(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return CPU_ISA_SCALAR;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx || !fma) return CPU_ISA_SCALAR;
    uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return CPU_ISA_SCALAR;  // SSE + AVX (ymm) state
    if (__get_cpuid_max(0, NULL) < 7) return CPU_ISA_SCALAR;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1;
    if (!avx2) return CPU_ISA_SCALAR;
    // opmask, upper halves of zmm0-15, zmm16-31
    if (avx512f && (xcr0 & 0xe0) == 0xe0) return CPU_ISA_AVX512;
    return CPU_ISA_AVX2;
}

static cpu_isa_level isa_detected;
static _Atomic int isa_current;
static _Atomic int threads_current;
static char init_error[256];  // from the environment, reported by every cpu_init() call
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static const char *const isa_names[] = {"scalar", "avx2", "avx512"};

const char *cpu_isa_name(cpu_isa_level level) {
    return (unsigned)level < 3 ? isa_names[level] : "?";
}

int cpu_isa_parse(const char *name, cpu_isa_level *level) {
    for (int i = 0; i < 3; i++)
        if (strcmp(name, isa_names[i]) == 0) {
            *level = (cpu_isa_level)i;
            return 0;
        }
    return err_set("unknown ISA level '%s' (expected scalar, avx2 or avx512)", name);
}

static int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    return n > CPU_MAX_THREADS ? CPU_MAX_THREADS : (int)n;
}

static void init_from_env(void) {
    isa_detected = isa_probe();
    atomic_store(&isa_current, isa_detected);
    atomic_store(&threads_current, online_cpus());
    const char *s = getenv("INCEPT_ISA");
    if (s && *s) {
        cpu_isa_level l = CPU_ISA_SCALAR;
        if (cpu_isa_parse(s, &l) != 0)
            snprintf(init_error, sizeof init_error, "INCEPT_ISA: %s", err_msg());
        else if (l > isa_detected)
            snprintf(init_error, sizeof init_error,
                     "INCEPT_ISA=%s: this CPU supports only up to %s", s, isa_names[isa_detected]);
        else
            atomic_store(&isa_current, l);
    }
    s = getenv("INCEPT_THREADS");
    if (s && *s) {
        char *end;
        long n = strtol(s, &end, 10);
        if (*end || n < 1 || n > CPU_MAX_THREADS) {
            if (!init_error[0])
                snprintf(init_error, sizeof init_error,
                         "INCEPT_THREADS='%s': expected an integer from 1 to %d", s,
                         CPU_MAX_THREADS);
        } else {
            atomic_store(&threads_current, (int)n);
        }
    }
}

int cpu_init(void) {
    pthread_once(&init_once, init_from_env);
    return init_error[0] ? err_set("%s", init_error) : 0;
}

cpu_isa_level cpu_isa_detected(void) {
    pthread_once(&init_once, init_from_env);
    return isa_detected;
}

cpu_isa_level cpu_isa(void) {
    pthread_once(&init_once, init_from_env);
    return (cpu_isa_level)atomic_load(&isa_current);
}

int cpu_isa_set(cpu_isa_level level) {
    pthread_once(&init_once, init_from_env);
    if ((unsigned)level > CPU_ISA_AVX512) return err_set("cpu_isa_set: invalid level %d", level);
    if (level > isa_detected)
        return err_set("ISA level %s requested, but this CPU supports only up to %s",
                       isa_names[level], isa_names[isa_detected]);
    atomic_store(&isa_current, level);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// bfloat16 mode and AMX

static _Atomic int bf16_on;

void cpu_bf16_set(int on) { atomic_store(&bf16_on, on != 0); }
int cpu_bf16(void) { return atomic_load(&bf16_on); }

static int amx_usable;
static _Atomic int amx_allowed = 1;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

// cpuid leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE, and (subleaf 1) EAX bit 5 AVX512_BF16
// for the conversions that feed the tiles; XCR0 bits 17-18 the tile state. Linux
// also wants each process to ask for the (large) tile data state before using it.
static void amx_probe(void) {
    const char *s = getenv("INCEPT_AMX");
    if (s && !strcmp(s, "0")) atomic_store(&amx_allowed, 0);
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return;
    __cpuid_count(7, 1, a, b, c, d);
    if (!((a >> 5) & 1)) return;
    if ((xgetbv0() & 0x60000) != 0x60000) return;
    enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return;
    amx_usable = 1;
}

int cpu_amx(void) {
    pthread_once(&amx_once, amx_probe);
    return amx_usable && atomic_load(&amx_allowed) && cpu_isa() == CPU_ISA_AVX512;
}

int cpu_amx_detected(void) {
    pthread_once(&amx_once, amx_probe);
    return amx_usable;
}

void cpu_amx_allow(int on) {
    pthread_once(&amx_once, amx_probe);
    atomic_store(&amx_allowed, on != 0);
}

// ---------------------------------------------------------------------------------------------
// FMA peak: many independent accumulators, so the loop is limited by FMA throughput, not by
// FMA latency (16 zmm chains cover 2 pipes x 4+ cycles of latency).

__attribute__((target("avx512f,fma"))) static float peak_avx512(long iters) {
    __m512 x = _mm512_set1_ps(0.9999f), y = _mm512_set1_ps(1e-4f);
    __m512 a0 = _mm512_set1_ps(0.f), a1 = _mm512_set1_ps(1.f), a2 = _mm512_set1_ps(2.f),
           a3 = _mm512_set1_ps(3.f), a4 = _mm512_set1_ps(4.f), a5 = _mm512_set1_ps(5.f),
           a6 = _mm512_set1_ps(6.f), a7 = _mm512_set1_ps(7.f), a8 = _mm512_set1_ps(8.f),
           a9 = _mm512_set1_ps(9.f), a10 = _mm512_set1_ps(10.f), a11 = _mm512_set1_ps(11.f),
           a12 = _mm512_set1_ps(12.f), a13 = _mm512_set1_ps(13.f), a14 = _mm512_set1_ps(14.f),
           a15 = _mm512_set1_ps(15.f);
    for (long i = 0; i < iters; i++) {
        a0 = _mm512_fmadd_ps(a0, x, y);   a1 = _mm512_fmadd_ps(a1, x, y);
        a2 = _mm512_fmadd_ps(a2, x, y);   a3 = _mm512_fmadd_ps(a3, x, y);
        a4 = _mm512_fmadd_ps(a4, x, y);   a5 = _mm512_fmadd_ps(a5, x, y);
        a6 = _mm512_fmadd_ps(a6, x, y);   a7 = _mm512_fmadd_ps(a7, x, y);
        a8 = _mm512_fmadd_ps(a8, x, y);   a9 = _mm512_fmadd_ps(a9, x, y);
        a10 = _mm512_fmadd_ps(a10, x, y); a11 = _mm512_fmadd_ps(a11, x, y);
        a12 = _mm512_fmadd_ps(a12, x, y); a13 = _mm512_fmadd_ps(a13, x, y);
        a14 = _mm512_fmadd_ps(a14, x, y); a15 = _mm512_fmadd_ps(a15, x, y);
        // Opaque to the optimiser (no instruction): keeps all 16 chains as written.
        __asm__("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7));
        __asm__("" : "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11), "+v"(a12), "+v"(a13), "+v"(a14), "+v"(a15));
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)),
                                       _mm512_add_ps(_mm512_add_ps(a12, a13), _mm512_add_ps(a14, a15))));
    return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) static float peak_avx2(long iters) {
    __m256 x = _mm256_set1_ps(0.9999f), y = _mm256_set1_ps(1e-4f);
    __m256 a0 = _mm256_set1_ps(0.f), a1 = _mm256_set1_ps(1.f), a2 = _mm256_set1_ps(2.f),
           a3 = _mm256_set1_ps(3.f), a4 = _mm256_set1_ps(4.f), a5 = _mm256_set1_ps(5.f),
           a6 = _mm256_set1_ps(6.f), a7 = _mm256_set1_ps(7.f), a8 = _mm256_set1_ps(8.f),
           a9 = _mm256_set1_ps(9.f), a10 = _mm256_set1_ps(10.f), a11 = _mm256_set1_ps(11.f);
    for (long i = 0; i < iters; i++) {
        a0 = _mm256_fmadd_ps(a0, x, y);   a1 = _mm256_fmadd_ps(a1, x, y);
        a2 = _mm256_fmadd_ps(a2, x, y);   a3 = _mm256_fmadd_ps(a3, x, y);
        a4 = _mm256_fmadd_ps(a4, x, y);   a5 = _mm256_fmadd_ps(a5, x, y);
        a6 = _mm256_fmadd_ps(a6, x, y);   a7 = _mm256_fmadd_ps(a7, x, y);
        a8 = _mm256_fmadd_ps(a8, x, y);   a9 = _mm256_fmadd_ps(a9, x, y);
        a10 = _mm256_fmadd_ps(a10, x, y); a11 = _mm256_fmadd_ps(a11, x, y);
        __asm__("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5));
        __asm__("" : "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    float o[8];
    _mm256_storeu_ps(o, s);
    return o[0] + o[1] + o[2] + o[3] + o[4] + o[5] + o[6] + o[7];
}

// Plain C: a multiply and an add per "FMA" (ISO C mode does not contract them).
static float peak_scalar(long iters) {
    float x = 0.9999f, y = 1e-4f;
    float a[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    for (long i = 0; i < iters; i++) {
        for (int j = 0; j < 8; j++) a[j] = a[j] * x + y;
        __asm__("" : "+m"(a));
    }
    return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

double cpu_loop_peak_gflops(float (*loop)(long iters), double flops_per_iter) {
    volatile float sink = 0;
    long iters = 100;
    double t;
    for (;;) {  // calibrate to ~10 ms per run
        double t0 = clock_now_s();
        sink += loop(iters);
        t = clock_now_s() - t0;
        if (t > 2e-3 || iters > (1L << 40)) break;
        iters *= 4;
    }
    iters = (long)((double)iters * 0.01 / (t > 0 ? t : 1e-3)) + 1;
    double best = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = clock_now_s();
        sink += loop(iters);
        t = clock_now_s() - t0;
        double g = flops_per_iter * (double)iters / t * 1e-9;
        if (g > best) best = g;
    }
    (void)sink;
    return best;
}

double cpu_fma_peak_gflops(cpu_isa_level level) {
    if (level > cpu_isa_detected()) level = cpu_isa_detected();
    // flops per loop iteration: chains x lanes x 2
    if (level == CPU_ISA_AVX512) return cpu_loop_peak_gflops(peak_avx512, 16 * 16 * 2);
    if (level == CPU_ISA_AVX2) return cpu_loop_peak_gflops(peak_avx2, 12 * 8 * 2);
    return cpu_loop_peak_gflops(peak_scalar, 8 * 2);
}

// ---------------------------------------------------------------------------------------------
// Thread pool. Worker i (1..n-1) runs part i of each job; the caller runs part 0. Each worker
// has a mailbox: the caller writes the job into the mailboxes of the workers it needs, then
// bumps their sequence numbers; it posts the next job only after all of them finished, so a
// mailbox is never rewritten while its worker reads it.
// Between the jobs of a forward pass the gaps are microseconds, less than a futex wake-up
// takes, so a worker that finished a part watches its sequence number for a short while
// (SPIN_S) before it sleeps on `wake`, and the caller likewise watches `pending` before it
// sleeps on `done`. A sleeper announces itself (asleep, caller_sleeps) before it checks the
// condition, and the other side checks the announcement after changing the condition (both
// sequentially consistent), so one of them always sees the other and no wake-up is lost.

enum { SPIN_CHECK = 64 };         // pause instructions between clock reads
static const double SPIN_S = 100e-6;

typedef struct {
    _Atomic unsigned long seq;  // bumped for each job this worker takes part in
    _Atomic int asleep;         // on `wake` (or about to be)
    unsigned long born;         // seq when the worker was created
    cpu_task_fn fn;
    void *ctx;
    int n;
} mailbox;

static struct {
    pthread_mutex_t mu;    // taken only to sleep or to wake a sleeper
    pthread_cond_t wake;   // a new job in some mailbox, or a request to exit
    pthread_cond_t done;   // the last worker finished its part
    int nworkers;          // workers 1..nworkers exist (changed only with pool_busy held)
    _Atomic int quit_from; // workers with index >= quit_from exit
    _Atomic int pending;   // worker parts of the current job not yet finished
    _Atomic int caller_sleeps;  // the caller is on `done` (or about to be)
    pthread_t tid[CPU_MAX_THREADS];
    mailbox box[CPU_MAX_THREADS];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          0, CPU_MAX_THREADS + 1, 0, 0, {0}, {{0}}};

// Held by the one caller that owns the pool during a job (and by cpu_threads_set).
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;

static int spin_while(int (*busy)(void *), void *arg) {
    double t0 = 0;
    for (int i = 1;; i++) {
        if (!busy(arg)) return 1;
        if (i % SPIN_CHECK) { _mm_pause(); continue; }
        if (t0 == 0) t0 = clock_now_s();
        else if (clock_now_s() - t0 > SPIN_S) return 0;
    }
}

typedef struct { int idx; unsigned long seen; } wait_arg;

static int no_job(void *v) {
    const wait_arg *w = v;
    return atomic_load(&pool.box[w->idx].seq) == w->seen && w->idx < atomic_load(&pool.quit_from);
}

static int parts_pending(void *v) { (void)v; return atomic_load(&pool.pending) > 0; }

static void *worker_main(void *arg) {
    wait_arg w = {(int)(intptr_t)arg, 0};
    mailbox *b = &pool.box[w.idx];
    w.seen = b->born;   // not seq: a job may have been posted since pthread_create
    for (;;) {
        if (!spin_while(no_job, &w)) {
            pthread_mutex_lock(&pool.mu);
            atomic_store(&b->asleep, 1);
            while (no_job(&w)) pthread_cond_wait(&pool.wake, &pool.mu);
            atomic_store(&b->asleep, 0);
            pthread_mutex_unlock(&pool.mu);
        }
        if (w.idx >= atomic_load(&pool.quit_from)) break;
        w.seen = atomic_load(&b->seq);
        b->fn(b->ctx, w.idx, b->n);
        if (atomic_fetch_sub(&pool.pending, 1) == 1 && atomic_load(&pool.caller_sleeps)) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.mu);
        }
    }
    return NULL;
}

// Starts workers up to index want-1. Called with pool_busy held. Returns how many exist.
static int workers_start(int want) {
    pthread_mutex_lock(&pool.mu);
    while (pool.nworkers < want - 1 && pool.nworkers < CPU_MAX_THREADS - 1) {
        int idx = pool.nworkers + 1;
        pool.box[idx].born = atomic_load(&pool.box[idx].seq);
        if (pthread_create(&pool.tid[idx], NULL, worker_main, (void *)(intptr_t)idx) != 0) break;
        pool.nworkers = idx;
    }
    int have = pool.nworkers;
    pthread_mutex_unlock(&pool.mu);
    return have;
}

// Keeps workers 1..keep-1 and joins the others. Called with pool_busy held.
static void workers_stop(int keep) {
    pthread_mutex_lock(&pool.mu);
    int old = pool.nworkers;
    if (old < keep) {
        pthread_mutex_unlock(&pool.mu);
        return;
    }
    atomic_store(&pool.quit_from, keep);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    for (int i = keep; i <= old; i++) pthread_join(pool.tid[i], NULL);
    pthread_mutex_lock(&pool.mu);
    pool.nworkers = keep - 1;
    atomic_store(&pool.quit_from, CPU_MAX_THREADS + 1);
    pthread_mutex_unlock(&pool.mu);
}

int cpu_threads(void) {
    pthread_once(&init_once, init_from_env);
    return atomic_load(&threads_current);
}

int cpu_threads_set(int n) {
    pthread_once(&init_once, init_from_env);
    if (n < 1 || n > CPU_MAX_THREADS)
        return err_set("thread count %d out of range 1..%d", n, CPU_MAX_THREADS);
    pthread_mutex_lock(&pool_busy);
    int rc = 0;
    if (n - 1 < pool.nworkers) {
        workers_stop(n);
    } else if (workers_start(n) < n - 1) {
        rc = err_set("cannot start %d worker threads (pthread_create failed)", n - 1);
    }
    if (rc == 0) atomic_store(&threads_current, n);
    pthread_mutex_unlock(&pool_busy);
    return rc;
}

void cpu_parallel(cpu_task_fn fn, void *ctx, int n) {
    int max = cpu_threads();
    if (n > max) n = max;
    if (n <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    if (pthread_mutex_trylock(&pool_busy) != 0) {  // nested or concurrent use: run serially
        for (int t = 0; t < n; t++) fn(ctx, t, n);
        return;
    }
    // Workers start lazily, for the default thread count.
    int have = pool.nworkers >= n - 1 ? pool.nworkers : workers_start(n);
    int on_workers = have < n - 1 ? have : n - 1, wake = 0;
    atomic_store(&pool.pending, on_workers);
    for (int i = 1; i <= on_workers; i++) {
        mailbox *b = &pool.box[i];
        b->fn = fn;
        b->ctx = ctx;
        b->n = n;
        atomic_fetch_add(&b->seq, 1);   // publishes the fields above
        wake |= atomic_load(&b->asleep);
    }
    if (wake) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mu);
    }
    fn(ctx, 0, n);
    for (int t = on_workers + 1; t < n; t++) fn(ctx, t, n);  // parts no worker could take
    if (!spin_while(parts_pending, NULL)) {
        pthread_mutex_lock(&pool.mu);
        atomic_store(&pool.caller_sleeps, 1);
        while (parts_pending(NULL)) pthread_cond_wait(&pool.done, &pool.mu);
        atomic_store(&pool.caller_sleeps, 0);
        pthread_mutex_unlock(&pool.mu);
    }
    pthread_mutex_unlock(&pool_busy);
}
