#include "util/err.h"
#include <stdio.h>
#include <string.h>

static _Thread_local char msg[1024];

int err_set(const char *fmt, ...) {
    char line[sizeof msg];   // formatted aside: an argument may be err_msg() itself
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    memcpy(msg, line, sizeof msg);
    return -1;
}

const char *err_msg(void) { return msg; }
