#include "util/mem.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#define HUGE_PAGE ((size_t)2 << 20)

void *mem_alloc(size_t bytes) {
    if (bytes < HUGE_PAGE) return malloc(bytes ? bytes : 1);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Whole huge pages, so that the advice covers this buffer only.
    const size_t rounded = (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    void *p = NULL;
    if (rounded < bytes || posix_memalign(&p, HUGE_PAGE, rounded)) return NULL;
    // Advice only: where huge pages are off or none are free, the buffer keeps 4 KiB pages.
    (void)madvise(p, rounded, MADV_HUGEPAGE);
    return p;
#else
    return malloc(bytes);
#endif
}

void *mem_calloc(size_t n, size_t size) {
    if (size && n > SIZE_MAX / size) return NULL;
    if (n * size < HUGE_PAGE) return calloc(n ? n : 1, size ? size : 1);
    void *p = mem_alloc(n * size);
    if (p) memset(p, 0, n * size);
    return p;
}
