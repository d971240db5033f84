// TAP-like result lines for the C test programs: "ok - name" / "not ok - name: why", which
// tests/run.py counts. A program exits non-zero when `failed` is set.
#pragma once
#include <stdarg.h>
#include <stdio.h>

static int failed;

static void result(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf(ok ? "ok - " : "not ok - ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    if (!ok) failed++;
}
