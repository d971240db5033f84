// Checkpoint metadata: the run's whole configuration as safetensors "__metadata__" strings,
// written and read through one table so that the two directions cannot drift apart.
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "io/json.h"
#include "train/train.h"
#include "util/err.h"

#define FORMAT_KEY "format"
#define FORMAT_VAL "incept-train-1"
#define CLASSES_KEY "classes"

typedef enum { M_INT, M_U64, M_FLOAT, M_DOUBLE, M_STR, M_FLOATS, M_OPTIM, M_SCHED } meta_type;
typedef struct {
    const char *key;
    meta_type type;
    size_t off;       // into ckpt_meta
    int n;            // M_STR: buffer size; M_FLOATS: element count
    int optional;     // added after format 1 was first written: missing in older files = 0
} meta_field;

#define FLD(key, type, member) {key, type, offsetof(ckpt_meta, member), 0, 0}
#define STR(key, member) {key, M_STR, offsetof(ckpt_meta, member), (int)sizeof(((ckpt_meta *)0)->member), 0}
#define ARR(key, member, n) {key, M_FLOATS, offsetof(ckpt_meta, member), n, 0}
#define OPT_FLD(key, type, member) {key, type, offsetof(ckpt_meta, member), 0, 1}
#define OPT_ARR(key, member, n) {key, M_FLOATS, offsetof(ckpt_meta, member), n, 1}

static const meta_field FIELDS[] = {
    STR("model", cfg.model.name),
    FLD("model.num_classes", M_INT, cfg.model.num_classes),
    FLD("model.in_channels", M_INT, cfg.model.in_channels),
    FLD("model.aux", M_INT, cfg.model.aux),
    FLD("model.dropout", M_FLOAT, cfg.model.dropout),
    FLD("model.dropout_aux", M_FLOAT, cfg.model.dropout_aux),
    FLD("model.transform_input", M_INT, cfg.model.transform_input),
    FLD("model.height", M_INT, cfg.model.H),
    FLD("model.width", M_INT, cfg.model.W),
    STR("data", cfg.data),
    STR("data.name", data_name),
    FLD("data.folder_size", M_INT, cfg.folder_size),
    FLD("data.limit_train", M_INT, cfg.limit_train),
    FLD("data.limit_test", M_INT, cfg.limit_test),
    FLD("data.augment", M_INT, cfg.augment),
    FLD("preprocess.channels", M_INT, pre.out_C),
    FLD("preprocess.height", M_INT, pre.out_H),
    FLD("preprocess.width", M_INT, pre.out_W),
    ARR("preprocess.mean", pre.mean, 3),
    ARR("preprocess.std", pre.std, 3),
    FLD("preprocess.eval_crop", M_FLOAT, pre.eval_crop),
    FLD("preprocess.augment", M_INT, pre.augment),
    FLD("preprocess.pad_crop", M_INT, pre.pad_crop),
    FLD("preprocess.hflip", M_INT, pre.hflip),
    FLD("preprocess.rrc", M_INT, pre.rrc),
    ARR("preprocess.rrc_scale", pre.rrc_scale, 2),
    ARR("preprocess.rrc_ratio", pre.rrc_ratio, 2),
    OPT_FLD("preprocess.erase_p", M_FLOAT, pre.erase_p),
    OPT_ARR("preprocess.erase_scale", pre.erase_scale, 2),
    OPT_ARR("preprocess.erase_ratio", pre.erase_ratio, 2),
    FLD("preprocess.resize", M_INT, resize),
    FLD("train.epochs", M_INT, cfg.epochs),
    FLD("train.batch_size", M_INT, cfg.batch_size),
    FLD("train.eval_batch_size", M_INT, cfg.eval_batch_size),
    FLD("train.label_smoothing", M_FLOAT, cfg.label_smoothing),
    OPT_FLD("train.bf16", M_INT, cfg.bf16),
    OPT_FLD("train.precise_bn", M_INT, cfg.precise_bn),
    OPT_FLD("train.time_budget", M_DOUBLE, cfg.time_budget),
    FLD("train.seed", M_U64, cfg.seed),
    FLD("optim", M_OPTIM, cfg.optim.kind),
    FLD("optim.momentum", M_DOUBLE, cfg.optim.momentum),
    FLD("optim.dampening", M_DOUBLE, cfg.optim.dampening),
    FLD("optim.weight_decay", M_DOUBLE, cfg.optim.weight_decay),
    FLD("optim.beta1", M_DOUBLE, cfg.optim.beta1),
    FLD("optim.beta2", M_DOUBLE, cfg.optim.beta2),
    FLD("optim.eps", M_DOUBLE, cfg.optim.eps),
    FLD("optim.nesterov", M_INT, cfg.optim.nesterov),
    FLD("optim.amsgrad", M_INT, cfg.optim.amsgrad),
    FLD("optim.decay_bn_bias", M_INT, cfg.optim.decay_bn_bias),
    FLD("schedule", M_SCHED, cfg.sched.kind),
    FLD("schedule.lr", M_DOUBLE, cfg.sched.base_lr),
    FLD("schedule.epochs", M_INT, cfg.sched.epochs),
    FLD("schedule.step_size", M_INT, cfg.sched.step_size),
    FLD("schedule.gamma", M_DOUBLE, cfg.sched.gamma),
    FLD("schedule.eta_min", M_DOUBLE, cfg.sched.eta_min),
    FLD("schedule.power", M_DOUBLE, cfg.sched.power),
    FLD("schedule.warmup", M_INT, cfg.sched.warmup),
    FLD("schedule.warmup_start_factor", M_DOUBLE, cfg.sched.warmup_start_factor),
    FLD("schedule.per_step", M_INT, cfg.sched.per_step),
};
#define N_FIELDS ((int)(sizeof FIELDS / sizeof *FIELDS))

static void *field_ptr(const ckpt_meta *m, const meta_field *f) { return (char *)m + f->off; }

// Formats one field; numbers with enough digits to read back the identical value.
static int field_format(char *buf, size_t cap, const ckpt_meta *m, const meta_field *f) {
    const void *p = field_ptr(m, f);
    int o = 0;
    switch (f->type) {
    case M_INT: o = snprintf(buf, cap, "%d", *(const int *)p); break;
    case M_U64: o = snprintf(buf, cap, "%llu", (unsigned long long)*(const uint64_t *)p); break;
    case M_FLOAT: o = snprintf(buf, cap, "%.9g", *(const float *)p); break;
    case M_DOUBLE: o = snprintf(buf, cap, "%.17g", *(const double *)p); break;
    case M_STR: o = snprintf(buf, cap, "%s", (const char *)p); break;
    case M_OPTIM: o = snprintf(buf, cap, "%s", optim_kind_name(*(const int *)p)); break;
    case M_SCHED: o = snprintf(buf, cap, "%s", schedule_kind_name(*(const int *)p)); break;
    case M_FLOATS:
        for (int i = 0; i < f->n && o < (int)cap; i++)
            o += snprintf(buf + o, cap - o, "%s%.9g", i ? "," : "", ((const float *)p)[i]);
        break;
    }
    return o >= 0 && o < (int)cap ? 0 : -1;
}

static int parse_double(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (!*s || *end || errno || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

// Parses one field from its string; -1 (err_set naming path and key) if malformed.
static int field_parse(ckpt_meta *m, const meta_field *f, const char *s, const char *path) {
    void *p = field_ptr(m, f);
    char *end;
    const char *want = "";
    switch (f->type) {
    case M_INT: {
        errno = 0;
        long v = strtol(s, &end, 10);
        if (*s && !*end && !errno && v >= -(1L << 30) && v <= (1L << 30)) { *(int *)p = (int)v; return 0; }
        want = "an integer";
        break;
    }
    case M_U64: {
        errno = 0;
        unsigned long long v = strtoull(s, &end, 10);
        if (*s && *s != '-' && !*end && !errno) { *(uint64_t *)p = v; return 0; }
        want = "a non-negative integer";
        break;
    }
    case M_FLOAT:
    case M_DOUBLE: {
        double v;
        if (!parse_double(s, &v)) {
            if (f->type == M_FLOAT) *(float *)p = (float)v;
            else *(double *)p = v;
            return 0;
        }
        want = "a finite number";
        break;
    }
    case M_STR:
        if (strlen(s) < (size_t)f->n) { strcpy(p, s); return 0; }
        want = "a shorter string";
        break;
    case M_OPTIM: {
        int k = optim_kind_parse(s);
        if (k >= 0) { *(int *)p = k; return 0; }
        want = "sgd, adam or adamw";
        break;
    }
    case M_SCHED: {
        int k = schedule_kind_parse(s);
        if (k >= 0) { *(int *)p = k; return 0; }
        want = "constant, step, cosine or poly";
        break;
    }
    case M_FLOATS: {
        char buf[256];
        snprintf(buf, sizeof buf, "%s", s);
        char *save = NULL, *tok = strtok_r(buf, ",", &save);
        int i = 0;
        for (; tok && i < f->n; i++, tok = strtok_r(NULL, ",", &save)) {
            double v;
            if (parse_double(tok, &v)) break;
            ((float *)p)[i] = (float)v;
        }
        if (i == f->n && !tok) return 0;
        want = f->n == 3 ? "3 comma-separated numbers" : "2 comma-separated numbers";
        break;
    }
    }
    char shown[80];
    json_printable(shown, sizeof shown, s, strlen(s));
    return err_set("%s: metadata '%s' is '%s', expected %s", path, f->key, shown, want);
}

void ckpt_meta_free(ckpt_meta *meta) {
    if (!meta) return;
    for (int i = 0; i < meta->n_classes; i++) free(meta->classes[i]);
    free(meta->classes);
    meta->classes = NULL;
    meta->n_classes = 0;
}

static int classes_parse(ckpt_meta *m, const char *s, const char *path) {
    json_value v;
    if (json_parse(&v, s, strlen(s)))
        return err_set("%s: metadata '" CLASSES_KEY "' is not valid JSON: %s", path, err_msg());
    int rc = 0;
    if (v.type != JSON_ARRAY || v.n < 1 || v.n > MODEL_MAX_CLASSES)
        rc = err_set("%s: metadata '" CLASSES_KEY "' must be a non-empty JSON array of strings", path);
    for (size_t i = 0; !rc && i < v.n; i++)
        if (v.items[i].type != JSON_STRING || strlen(v.items[i].s) != v.items[i].len)
            rc = err_set("%s: metadata '" CLASSES_KEY "' item %zu is not a string", path, i);
    if (!rc) {
        m->classes = calloc(v.n, sizeof *m->classes);
        if (!m->classes) rc = err_set("%s: out of memory", path);
        for (size_t i = 0; !rc && i < v.n; i++) {
            if (!(m->classes[i] = strdup(v.items[i].s))) rc = err_set("%s: out of memory", path);
            else m->n_classes = (int)i + 1;
        }
    }
    json_free(&v);
    return rc;
}

int ckpt_meta_read(ckpt_meta *meta, const st_file *f, const char *path) {
    const char *format = st_meta(f, FORMAT_KEY);
    if (!format) return 0;
    if (strcmp(format, FORMAT_VAL))
        return err_set("%s: metadata '" FORMAT_KEY "' is '%.40s', expected '" FORMAT_VAL "'", path, format);
    ckpt_meta m;
    memset(&m, 0, sizeof m);
    for (int i = 0; i < N_FIELDS; i++) {
        const char *s = st_meta(f, FIELDS[i].key);
        if (!s && FIELDS[i].optional) continue;
        if (!s) return err_set("%s: metadata '%s' is missing", path, FIELDS[i].key);
        if (field_parse(&m, &FIELDS[i], s, path)) return -1;
    }
    // The model's other options (those not stored) come from its name's defaults.
    model_config base;
    if (model_config_init(&base, m.cfg.model.name))
        return err_set("%s: metadata 'model': %s", path, err_msg());
    // eval and predict feed the stored preprocessing's images to the stored model as they are
    if (preprocess_check(&m.pre, m.pre.out_C))
        return err_set("%s: metadata: %s", path, err_msg());
    if (m.pre.out_C != m.cfg.model.in_channels || m.pre.out_H != m.cfg.model.H ||
        m.pre.out_W != m.cfg.model.W)
        return err_set("%s: metadata: the preprocessing makes %dx%dx%d images, the model "
                       "takes %dx%dx%d", path, m.pre.out_C, m.pre.out_H, m.pre.out_W,
                       m.cfg.model.in_channels, m.cfg.model.H, m.cfg.model.W);
    const char *classes = st_meta(f, CLASSES_KEY);
    if (!classes) return err_set("%s: metadata '" CLASSES_KEY "' is missing", path);
    if (classes_parse(&m, classes, path)) { ckpt_meta_free(&m); return -1; }
    if (m.n_classes != m.cfg.model.num_classes) {
        const int n = m.n_classes;   // (ckpt_meta_free clears it)
        ckpt_meta_free(&m);
        return err_set("%s: metadata lists %d class names for a model with %d classes", path, n,
                       m.cfg.model.num_classes);
    }
    *meta = m;
    return 1;
}

void ckpt_meta_strings_free(char **keys, char **vals, int n) {
    for (int i = 0; i < n; i++) {
        if (keys) free(keys[i]);
        if (vals) free(vals[i]);
    }
    free(keys);
    free(vals);
}

int ckpt_meta_strings(const ckpt_meta *meta, char ***keys_out, char ***vals_out, int *n_out) {
    int n = N_FIELDS + 2;
    char **keys = calloc(n, sizeof *keys), **vals = calloc(n, sizeof *vals);
    int rc = keys && vals ? 0 : err_set("out of memory");
    char buf[2048];
    for (int i = 0; !rc && i < N_FIELDS; i++) {
        if (field_format(buf, sizeof buf, meta, &FIELDS[i]))
            rc = err_set("metadata '%s' is too long", FIELDS[i].key);
        else if (!(keys[i] = strdup(FIELDS[i].key)) || !(vals[i] = strdup(buf)))
            rc = err_set("out of memory");
    }
    if (!rc) {
        json_writer w = {0};
        json_write_str(&w, "[");
        for (int c = 0; c < meta->n_classes; c++) {
            if (c) json_write_str(&w, ",");
            json_write_string(&w, meta->classes[c], strlen(meta->classes[c]));
        }
        json_write_str(&w, "]");
        json_write_raw(&w, "", 1);    // the terminating NUL
        if (w.failed) rc = err_set("out of memory");
        else if (!(keys[N_FIELDS] = strdup(CLASSES_KEY))) rc = err_set("out of memory");
        else { vals[N_FIELDS] = w.data; w.data = NULL; }
        json_writer_free(&w);
    }
    if (!rc && (!(keys[N_FIELDS + 1] = strdup(FORMAT_KEY)) || !(vals[N_FIELDS + 1] = strdup(FORMAT_VAL))))
        rc = err_set("out of memory");
    if (rc) {
        ckpt_meta_strings_free(keys, vals, keys ? n : 0);
        return -1;
    }
    *keys_out = keys;
    *vals_out = vals;
    *n_out = n;
    return 0;
}
