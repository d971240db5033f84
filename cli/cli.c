#include "cli/cli.h"
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ops/cpu.h"
#include "util/err.h"

const char *const CLI_MODEL_OPTIONS =
    "model options: --num-classes N  --in-channels C  --dropout P  --dropout-aux P  --no-aux\n"
    "               --transform-input\n";

int cli_usage(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "incept: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (run 'incept --help' for usage)\n");
    va_end(ap);
    return 2;
}

int cli_fail(void) {
    fprintf(stderr, "incept: %s\n", err_msg());
    return 1;
}

const char *cli_bf16_note(void) {
    return !cpu_bf16() ? "" : cpu_amx() ? ", bfloat16 products on AMX" : ", bfloat16 products (float32 kernels)";
}

int cli_int(const char *flag, const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi)
        return cli_usage("%s needs an integer in [%ld, %ld], not '%s'", flag, lo, hi, s);
    *out = (int)v;
    return 0;
}

int cli_float(const char *flag, const char *s, double lo, double hi, float *out) {
    char *end;
    double v = strtod(s, &end);
    if (!*s || *end || !(v >= lo && v <= hi))
        return cli_usage("%s needs a number in [%g, %g], not '%s'", flag, lo, hi, s);
    *out = (float)v;
    return 0;
}

int cli_u64(const char *flag, const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (!*s || *end || errno || s[0] == '-')
        return cli_usage("%s needs a non-negative integer, not '%s'", flag, s);
    *out = v;
    return 0;
}

int cli_model_name(model_config *cfg, int argc, char **argv) {
    if (argc < 3 || argv[2][0] == '-') return cli_usage("'%s' needs a MODEL name", argv[1]);
    if (model_config_init(cfg, argv[2])) {
        fprintf(stderr, "incept: %s\n", err_msg());
        return 2;
    }
    return 0;
}

int cli_model_option(model_config *cfg, int argc, char **argv, int *i, int *set_in_channels) {
    const char *a = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    if (!strcmp(a, "--no-aux")) { cfg->aux = 0; return 1; }
    if (!strcmp(a, "--transform-input")) { cfg->transform_input = 1; return 1; }
    int rc;
    if (!strcmp(a, "--num-classes")) {
        if (!v) return cli_usage("%s needs a value", a);
        rc = cli_int(a, v, 1, MODEL_MAX_CLASSES, &cfg->num_classes);
    } else if (!strcmp(a, "--in-channels")) {
        if (!v) return cli_usage("%s needs a value", a);
        rc = cli_int(a, v, 1, MODEL_MAX_IN_CHANNELS, &cfg->in_channels);
        if (set_in_channels) *set_in_channels = 1;
    } else if (!strcmp(a, "--dropout")) {
        if (!v) return cli_usage("%s needs a value", a);
        rc = cli_float(a, v, 0, 1, &cfg->dropout);
    } else if (!strcmp(a, "--dropout-aux")) {
        if (!v) return cli_usage("%s needs a value", a);
        rc = cli_float(a, v, 0, 1, &cfg->dropout_aux);
    } else {
        return 0;
    }
    if (rc) return rc;
    (*i)++;
    return 1;
}
