// src/util/mem.c: large buffers are 2 MiB-aligned, whole, zeroed by mem_calloc, and advised
// onto transparent huge pages where the kernel offers them; sizes that overflow give NULL.
#include "util/mem.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tap.h"

// The kernel's THP mode ("always", "madvise" or "never"), or "" where it has none.
static const char *thp_mode(char *buf, size_t cap) {
    buf[0] = 0;
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) return buf;
    char line[128];
    if (fgets(line, sizeof line, f)) {
        const char *a = strchr(line, '['), *b = a ? strchr(a, ']') : NULL;
        if (a && b && (size_t)(b - a - 1) < cap) {
            memcpy(buf, a + 1, (size_t)(b - a - 1));
            buf[b - a - 1] = 0;
        }
    }
    fclose(f);
    return buf;
}

// The THPeligible field of the mapping that holds p in /proc/self/smaps, or -1.
static int thp_eligible(const void *p) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    char line[512];
    int inside = 0, v = -1;
    const uintptr_t a = (uintptr_t)p;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) {   // a mapping's header line
            inside = a >= lo && a < hi;
        } else if (inside && sscanf(line, "THPeligible: %d", &v) == 1) {
            break;
        }
    }
    fclose(f);
    return v;
}

int main(void) {
    const size_t big = (size_t)3 << 20 | 123;  // not a whole number of huge pages
    unsigned char *p = mem_alloc(big);
    result(p && (uintptr_t)p % ((size_t)2 << 20) == 0, "mem_alloc(3 MiB + 123) is 2 MiB-aligned");
    if (p) {
        memset(p, 0xab, big);
        result(p[0] == 0xab && p[big - 1] == 0xab, "mem_alloc's buffer is writable to its end");
        char mode[32];
        thp_mode(mode, sizeof mode);
        if (!strcmp(mode, "madvise") || !strcmp(mode, "always")) {
            const int e = thp_eligible(p);
            result(e == 1, "THP mode [%s]: the buffer's mapping is THPeligible (got %d)", mode, e);
        } else {
            printf("# THP mode '%s': huge pages not offered, eligibility not checked\n", mode);
        }
        free(p);
    }

    float *z = mem_calloc((size_t)1 << 20, sizeof(float));  // 4 MiB
    int zero = z != NULL;
    for (size_t i = 0; z && i < (size_t)1 << 20; i++) zero &= z[i] == 0.0f;
    result(zero, "mem_calloc(1M floats) is all zeros");
    free(z);

    float *s = mem_calloc(10, sizeof(float));
    result(s && s[0] == 0.0f && s[9] == 0.0f, "mem_calloc(10 floats) (malloc path) is zeroed");
    free(s);

    void *e = mem_calloc(0, sizeof(float)), *e2 = mem_alloc(0);
    result(e && e2, "zero-size requests give freeable non-NULL buffers");
    free(e);
    free(e2);

    result(mem_calloc(SIZE_MAX / 2, 4) == NULL, "mem_calloc whose size overflows gives NULL");
    result(mem_alloc(SIZE_MAX - 1000) == NULL, "mem_alloc of ~SIZE_MAX gives NULL");
    return failed != 0;
}
