#include "util/err.h"
#include <stdio.h>

static _Thread_local char msg[1024];

int err_set(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return -1;
}

const char *err_msg(void) { return msg; }
