// Error reporting without exit(): library functions that can fail return non-zero and leave
// one human-readable line here; the CLI prints it ("incept: <line>") and exits 1.
#pragma once
#include <stdarg.h>

// Sets the message (printf-style). Always returns -1 so callers can `return err_set(...)`.
// An argument may be err_msg() itself: `return err_set("%s: %s", path, err_msg())` puts the
// file's name before the message a callee left.
int err_set(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
// The last message set ("" if none).
const char *err_msg(void);
