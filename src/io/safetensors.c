#include "io/safetensors.h"
#include "io/json.h"
#include "util/err.h"
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

// The reference (Rust) implementation refuses headers above this size; so do we, so that a
// corrupt length cannot make us parse hundreds of megabytes of tensor data as JSON.
#define ST_MAX_HEADER 100000000u

static const struct { const char *name; size_t size; } dtype_info[ST_DTYPE_COUNT] = {
    [ST_F32] = {"F32", 4},  [ST_I64] = {"I64", 8},   [ST_F64] = {"F64", 8},
    [ST_F16] = {"F16", 2},  [ST_BF16] = {"BF16", 2}, [ST_I32] = {"I32", 4},
    [ST_I16] = {"I16", 2},  [ST_I8] = {"I8", 1},     [ST_U8] = {"U8", 1},
    [ST_BOOL] = {"BOOL", 1}, [ST_U16] = {"U16", 2},  [ST_U32] = {"U32", 4},
    [ST_U64] = {"U64", 8},
};

const char *st_dtype_name(st_dtype d) {
    return (unsigned)d < ST_DTYPE_COUNT ? dtype_info[d].name : "?";
}

size_t st_dtype_size(st_dtype d) {
    return (unsigned)d < ST_DTYPE_COUNT ? dtype_info[d].size : 0;
}

// numel and byte size of a shape, with every multiplication checked. -1 on overflow.
static int shape_size(const int64_t *shape, int ndim, size_t elem, size_t *numel, size_t *nbytes) {
    size_t n = 1;
    for (int k = 0; k < ndim; k++) {
        uint64_t d = (uint64_t)shape[k];
        if (d > SIZE_MAX || (d && n > SIZE_MAX / d)) return -1;
        n *= (size_t)d;
    }
    if (elem && n > SIZE_MAX / elem) return -1;
    *numel = n;
    *nbytes = n * elem;
    return 0;
}

// "[3,64,7,7]" into buf, for messages.
static const char *shape_str(char *buf, size_t cap, const int64_t *shape, int ndim) {
    size_t o = 0;
    buf[0] = 0;
    o += (size_t)snprintf(buf, cap, "[");
    for (int k = 0; k < ndim && o < cap; k++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%" PRId64, k ? "," : "", shape[k]);
    if (o < cap) snprintf(buf + o, cap - o, "]");
    return buf;
}

// ---- reading ----

static int read_whole(const char *path, unsigned char **out, size_t *out_len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_set("%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return err_set("%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return err_set("%s: not a regular file", path);
    }
    size_t len = (size_t)sb.st_size;
    unsigned char *buf = malloc(len ? len : 1);
    if (!buf) {
        close(fd);
        return err_set("%s: out of memory reading %zu bytes", path, len);
    }
    // One pass of large reads: no per-byte work, so 550 MB files load at disk/cache speed.
    size_t got = 0;
    while (got < len) {
        size_t want = len - got > (1u << 30) ? (1u << 30) : len - got;
        ssize_t r = read(fd, buf + got, want);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            int e = errno;
            free(buf);
            close(fd);
            if (r == 0) return err_set("%s: file shrank while being read (%zu of %zu bytes)",
                                       path, got, len);
            return err_set("%s: read error: %s", path, strerror(e));
        }
        got += (size_t)r;
    }
    close(fd);
    *out = buf;
    *out_len = len;
    return 0;
}

// A non-negative JSON integer, or -1.
static int64_t json_uint(const json_value *v) {
    return v && v->type == JSON_INT && v->i >= 0 ? v->i : -1;
}

static const char *json_found(char *buf, size_t cap, const json_value *v) {
    if (v->type == JSON_INT) snprintf(buf, cap, "%" PRId64, v->i);
    else if (v->type == JSON_STRING) {
        char p[80];
        snprintf(buf, cap, "string '%s'", json_printable(p, sizeof p, v->s, v->len));
    } else snprintf(buf, cap, "%s", json_type_name(v->type));
    return buf;
}

typedef struct { uint64_t begin, end; int index; } span;

static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

// Parses one tensor entry {"dtype","shape","data_offsets"} into t (name not set here).
// `name` is the printable key for messages.
static int parse_entry(st_tensor *t, span *sp, const json_value *v, const char *path,
                       const char *name, size_t data_len) {
    char found[128];
    if (v->type != JSON_OBJECT)
        return err_set("%s: tensor '%s': entry must be an object with dtype, shape and "
                       "data_offsets, found %s", path, name, json_found(found, sizeof found, v));
    for (size_t k = 0; k < v->n; k++) {
        const char *key = v->members[k].key;
        if (strcmp(key, "dtype") && strcmp(key, "shape") && strcmp(key, "data_offsets")) {
            char p[80];
            return err_set("%s: tensor '%s': unexpected field '%s' (expected exactly dtype, "
                           "shape and data_offsets)", path, name,
                           json_printable(p, sizeof p, key, v->members[k].key_len));
        }
    }
    const json_value *dt = json_get(v, "dtype"), *sh = json_get(v, "shape"),
                     *off = json_get(v, "data_offsets");
    const char *missing = !dt ? "dtype" : !sh ? "shape" : !off ? "data_offsets" : NULL;
    if (missing) return err_set("%s: tensor '%s': missing field '%s'", path, name, missing);

    // dtype
    if (dt->type != JSON_STRING)
        return err_set("%s: tensor '%s': dtype must be a string, found %s", path, name,
                       json_found(found, sizeof found, dt));
    int d = -1;
    for (int k = 0; k < ST_DTYPE_COUNT; k++)
        if (!strcmp(dt->s, dtype_info[k].name) && strlen(dt->s) == dt->len) d = k;
    if (d < 0) {
        char known[128] = "";
        for (int k = 0; k < ST_DTYPE_COUNT; k++)
            snprintf(known + strlen(known), sizeof known - strlen(known), "%s%s", k ? " " : "",
                     dtype_info[k].name);
        return err_set("%s: tensor '%s': unknown dtype %s (known: %s)", path, name,
                       json_found(found, sizeof found, dt), known);
    }
    t->dtype = (st_dtype)d;

    // shape
    if (sh->type != JSON_ARRAY)
        return err_set("%s: tensor '%s': shape must be an array of integers, found %s", path,
                       name, json_found(found, sizeof found, sh));
    if (sh->n > ST_MAX_DIMS)
        return err_set("%s: tensor '%s': shape has %zu dimensions, at most %d are supported",
                       path, name, sh->n, ST_MAX_DIMS);
    t->ndim = (int)sh->n;
    for (int k = 0; k < t->ndim; k++) {
        if (json_uint(&sh->items[k]) < 0)
            return err_set("%s: tensor '%s': shape[%d] must be a non-negative integer, found %s",
                           path, name, k, json_found(found, sizeof found, &sh->items[k]));
        t->shape[k] = sh->items[k].i;
    }
    char ss[200];
    shape_str(ss, sizeof ss, t->shape, t->ndim);
    if (shape_size(t->shape, t->ndim, st_dtype_size(t->dtype), &t->numel, &t->nbytes))
        return err_set("%s: tensor '%s': shape %s overflows: its byte size does not fit in "
                       "64 bits", path, name, ss);

    // data_offsets
    if (off->type != JSON_ARRAY || off->n != 2 || json_uint(&off->items[0]) < 0 ||
        json_uint(&off->items[1]) < 0)
        return err_set("%s: tensor '%s': data_offsets must be [begin, end] with non-negative "
                       "integers", path, name);
    uint64_t b = (uint64_t)off->items[0].i, e = (uint64_t)off->items[1].i;
    if (b > e)
        return err_set("%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "]: begin is "
                       "after end", path, name, b, e);
    if (e - b != t->nbytes)
        return err_set("%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] hold %" PRIu64
                       " bytes but %s %s needs %zu", path, name, b, e, e - b,
                       st_dtype_name(t->dtype), ss, t->nbytes);
    if (e > data_len)
        return err_set("%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] run past the "
                       "end of the data section (%zu bytes); truncated file?", path, name, b, e,
                       data_len);
    sp->begin = b;
    sp->end = e;
    return 0;
}

static int parse_metadata(st_file *f, const json_value *v, const char *path) {
    char found[128], p[80];
    if (v->type != JSON_OBJECT)
        return err_set("%s: __metadata__ must be an object of strings, found %s", path,
                       json_found(found, sizeof found, v));
    if (v->n == 0) return 0;
    f->meta_keys = calloc(v->n, sizeof *f->meta_keys);
    f->meta_vals = calloc(v->n, sizeof *f->meta_vals);
    if (!f->meta_keys || !f->meta_vals) return err_set("%s: out of memory", path);
    for (size_t k = 0; k < v->n; k++) {
        const json_member *m = &v->members[k];
        json_printable(p, sizeof p, m->key, m->key_len);
        if (m->value.type != JSON_STRING)
            return err_set("%s: __metadata__ key '%s': value must be a string, found %s", path,
                           p, json_found(found, sizeof found, &m->value));
        // C strings cannot hold NUL: refuse rather than silently truncate.
        if (strlen(m->key) != m->key_len || strlen(m->value.s) != m->value.len)
            return err_set("%s: __metadata__ key '%s': contains a NUL character", path, p);
        f->meta_keys[k] = strdup(m->key);
        f->meta_vals[k] = strdup(m->value.s);
        f->n_meta++;
        if (!f->meta_keys[k] || !f->meta_vals[k]) return err_set("%s: out of memory", path);
    }
    return 0;
}

// Validates and indexes the header of f->buf (already read). -1 with err set on any problem.
static int parse_file(st_file *f, const char *path) {
    size_t len = f->len;
    const unsigned char *buf = f->buf;
    if (len == 0) return err_set("%s: empty file (0 bytes), not a safetensors file", path);
    if (len < 8)
        return err_set("%s: file is %zu bytes, too short for the 8-byte header length of a "
                       "safetensors file", path, len);
    uint64_t n = 0;
    for (int k = 7; k >= 0; k--) n = n << 8 | buf[k];
    if (n > ST_MAX_HEADER)
        return err_set("%s: header length %" PRIu64 " is absurd (limit %u bytes); not a "
                       "safetensors file?", path, n, ST_MAX_HEADER);
    if (n > len - 8)
        return err_set("%s: header length %" PRIu64 " runs past the end of the file (%zu bytes "
                       "after the 8-byte length); truncated file?", path, n, len - 8);
    const char *text = (const char *)buf + 8;
    size_t data_len = len - 8 - (size_t)n;
    const unsigned char *data = buf + 8 + n;

    json_value root;
    if (json_parse(&root, text, (size_t)n))
        return err_set("%s: header is not valid JSON: %s", path, err_msg());
    int rc = -1;
    span *spans = NULL;
    if (root.type != JSON_OBJECT) {
        err_set("%s: header must be a JSON object, found %s", path, json_type_name(root.type));
        goto done;
    }
    f->tensors = calloc(root.n ? root.n : 1, sizeof *f->tensors);
    spans = calloc(root.n ? root.n : 1, sizeof *spans);
    if (!f->tensors || !spans) { err_set("%s: out of memory", path); goto done; }

    for (size_t k = 0; k < root.n; k++) {
        const json_member *m = &root.members[k];
        if (!strcmp(m->key, "__metadata__") && m->key_len == 12) {
            if (parse_metadata(f, &m->value, path)) goto done;
            continue;
        }
        char name[200];
        json_printable(name, sizeof name, m->key, m->key_len);
        if (strlen(m->key) != m->key_len) {
            err_set("%s: tensor '%s': name contains a NUL character", path, name);
            goto done;
        }
        st_tensor *t = &f->tensors[f->n];
        span *sp = &spans[f->n];
        if (parse_entry(t, sp, &m->value, path, name, data_len)) goto done;
        if (!(t->name = strdup(m->key))) { err_set("%s: out of memory", path); goto done; }
        t->data = data + sp->begin;
        sp->index = f->n++;
    }

    // The tensors must tile the data section exactly: sorted by offset, each starts where the
    // previous one ended, the first at 0, the last at the end (as the reference library checks).
    qsort(spans, (size_t)f->n, sizeof *spans, span_cmp);
    uint64_t at = 0;
    for (int k = 0; k < f->n; k++) {
        const span *s = &spans[k];
        char a[200], b[200];
        json_printable(a, sizeof a, f->tensors[s->index].name, strlen(f->tensors[s->index].name));
        if (s->begin < at) {
            const span *prev = &spans[k - 1];
            json_printable(b, sizeof b, f->tensors[prev->index].name,
                           strlen(f->tensors[prev->index].name));
            err_set("%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] overlap tensor "
                    "'%s' [%" PRIu64 ", %" PRIu64 "]", path, a, s->begin, s->end, b,
                    prev->begin, prev->end);
            goto done;
        }
        if (s->begin > at) {
            err_set("%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] leave bytes [%"
                    PRIu64 ", %" PRIu64 ") of the data section unused (gaps are not allowed)",
                    path, a, s->begin, s->end, at, s->begin);
            goto done;
        }
        at = s->end;
    }
    if (at != data_len) {
        err_set("%s: the data section has %zu bytes but the tensors cover only %" PRIu64
                " (trailing bytes are not allowed)", path, data_len, at);
        goto done;
    }
    rc = 0;
done:
    free(spans);
    json_free(&root);
    return rc;
}

int st_read(st_file *f, const char *path) {
    memset(f, 0, sizeof *f);
    if (read_whole(path, &f->buf, &f->len)) return -1;
    if (parse_file(f, path)) {
        st_free(f);
        return -1;
    }
    return 0;
}

void st_free(st_file *f) {
    if (!f) return;
    for (int k = 0; k < f->n; k++) free(f->tensors[k].name);
    free(f->tensors);
    for (int k = 0; k < f->n_meta; k++) { free(f->meta_keys[k]); free(f->meta_vals[k]); }
    free(f->meta_keys);
    free(f->meta_vals);
    free(f->buf);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_get(const st_file *f, const char *name) {
    for (int k = 0; k < f->n; k++)
        if (!strcmp(f->tensors[k].name, name)) return &f->tensors[k];
    return NULL;
}

const char *st_meta(const st_file *f, const char *key) {
    for (int k = 0; k < f->n_meta; k++)
        if (!strcmp(f->meta_keys[k], key)) return f->meta_vals[k];
    return NULL;
}

// ---- writing ----

static int str_ptr_cmp(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

// The first name that occurs twice in names[0..n), or NULL. *oom set on allocation failure.
static const char *find_duplicate(const char *const *names, int n, int *oom) {
    *oom = 0;
    if (n < 2) return NULL;
    const char **s = malloc((size_t)n * sizeof *s);
    if (!s) { *oom = 1; return NULL; }
    memcpy(s, names, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, str_ptr_cmp);
    const char *dup = NULL;
    for (int k = 1; k < n && !dup; k++)
        if (!strcmp(s[k - 1], s[k])) dup = s[k];
    free(s);
    return dup;
}

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        size_t chunk = n > (1u << 30) ? (1u << 30) : n;
        ssize_t w = write(fd, c, chunk);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) { if (w == 0) errno = EIO; return -1; }
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

// Checks the arguments and builds the padded header. -1 with err set.
static int build_header(json_writer *w, const char *path, const st_entry *e, int n,
                        const char *const *mk, const char *const *mv, int n_meta) {
    char p[200];
    if (n < 0 || n_meta < 0 || (n > 0 && !e) || (n_meta > 0 && (!mk || !mv)))
        return err_set("%s: st_write: invalid arguments (n=%d, n_meta=%d)", path, n, n_meta);
    const char **names = malloc(((size_t)n + 1) * sizeof *names);
    if (!names) return err_set("%s: out of memory", path);
    for (int k = 0; k < n; k++) names[k] = e[k].name;

    json_write_str(w, "{");
    if (n_meta > 0) {
        json_write_str(w, "\"__metadata__\":{");
        for (int k = 0; k < n_meta; k++) {
            if (!mk[k] || !mv[k]) {
                free(names);
                return err_set("%s: metadata entry %d has a NULL key or value", path, k);
            }
            if (!json_utf8_valid(mk[k], strlen(mk[k])) || !json_utf8_valid(mv[k], strlen(mv[k]))) {
                free(names);
                return err_set("%s: metadata key '%s': key or value is not valid UTF-8", path,
                               json_printable(p, sizeof p, mk[k], strlen(mk[k])));
            }
            if (k) json_write_str(w, ",");
            json_write_string(w, mk[k], strlen(mk[k]));
            json_write_str(w, ":");
            json_write_string(w, mv[k], strlen(mv[k]));
        }
        json_write_str(w, "}");
        int oom;
        const char *dup = find_duplicate(mk, n_meta, &oom);
        if (dup || oom) {
            free(names);
            if (oom) return err_set("%s: out of memory", path);
            return err_set("%s: metadata key '%s' given twice", path,
                           json_printable(p, sizeof p, dup, strlen(dup)));
        }
    }
    uint64_t off = 0;
    for (int k = 0; k < n; k++) {
        const st_entry *t = &e[k];
        if (!t->name) { free(names); return err_set("%s: tensor %d has no name", path, k); }
        json_printable(p, sizeof p, t->name, strlen(t->name));
        const char *bad = NULL;
        size_t numel, nbytes;
        if (!json_utf8_valid(t->name, strlen(t->name))) bad = "name is not valid UTF-8";
        else if (!strcmp(t->name, "__metadata__")) bad = "name is reserved for metadata";
        else if ((unsigned)t->dtype >= ST_DTYPE_COUNT) bad = "unknown dtype";
        else if (t->ndim < 0 || t->ndim > ST_MAX_DIMS) bad = "ndim out of range 0..8";
        for (int d = 0; !bad && d < t->ndim; d++)
            if (t->shape[d] < 0) bad = "negative dimension";
        if (!bad && shape_size(t->shape, t->ndim, st_dtype_size(t->dtype), &numel, &nbytes))
            bad = "shape too large (size overflows)";
        if (!bad && nbytes && !t->data) bad = "data is NULL";
        if (!bad && nbytes > UINT64_MAX - off) bad = "total size overflows";
        if (bad) { free(names); return err_set("%s: tensor '%s': %s", path, p, bad); }
        json_write_str(w, k || n_meta > 0 ? ",": "");
        json_write_string(w, t->name, strlen(t->name));
        json_write_str(w, ":{\"dtype\":\"");
        json_write_str(w, st_dtype_name(t->dtype));
        json_write_str(w, "\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) {
            if (d) json_write_str(w, ",");
            json_write_int(w, t->shape[d]);
        }
        json_write_str(w, "],\"data_offsets\":[");
        json_write_int(w, (int64_t)off);
        json_write_str(w, ",");
        json_write_int(w, (int64_t)(off + nbytes));
        json_write_str(w, "]}");
        off += nbytes;
    }
    json_write_str(w, "}");
    int oom;
    const char *dup = find_duplicate(names, n, &oom);
    if (dup || oom) {
        int rc = oom ? err_set("%s: out of memory", path)
                     : err_set("%s: tensor '%s' given twice", path,
                               json_printable(p, sizeof p, dup, strlen(dup)));
        free(names);
        return rc;
    }
    free(names);
    // Spaces up to a multiple of 8, so the data section (and F64/I64 tensors) start aligned.
    while (w->len % 8) json_write_str(w, " ");
    if (w->failed) return err_set("%s: out of memory building the header", path);
    return 0;
}

int st_write(const char *path, const st_entry *e, int n,
             const char *const *meta_keys, const char *const *meta_vals, int n_meta) {
    json_writer w = {0};
    if (build_header(&w, path, e, n, meta_keys, meta_vals, n_meta)) {
        json_writer_free(&w);
        return -1;
    }
    size_t tlen = strlen(path) + 32;
    char *tmp = malloc(tlen);
    if (!tmp) { json_writer_free(&w); return err_set("%s: out of memory", path); }
    snprintf(tmp, tlen, "%s.tmp.%ld", path, (long)getpid());

    int rc = -1;
    const char *step = "cannot create temporary file", *step_end = "";
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) goto fail;
    unsigned char len8[8];
    for (int k = 0; k < 8; k++) len8[k] = (unsigned char)((uint64_t)w.len >> (8 * k));
    step = "write error on temporary file";
    if (write_all(fd, len8, 8) || write_all(fd, w.data, w.len)) goto fail;
    for (int k = 0; k < n; k++) {
        size_t numel = 0, nbytes = 0;     // already checked by build_header
        shape_size(e[k].shape, e[k].ndim, st_dtype_size(e[k].dtype), &numel, &nbytes);
        if (nbytes && write_all(fd, e[k].data, nbytes)) goto fail;
    }
    step = "fsync failed on temporary file";
    if (fsync(fd) != 0) goto fail;
    step = "close failed on temporary file";
    int c = close(fd);
    fd = -1;
    if (c != 0) goto fail;
    step = "cannot rename temporary file";
    step_end = " into place";
    if (rename(tmp, path) != 0) goto fail;

    // Make the rename itself durable (best effort: the file is already complete and in place).
    char *dir = strdup(path);
    if (dir) {
        char *slash = strrchr(dir, '/');
        if (!slash) strcpy(dir, ".");
        else if (slash == dir) dir[1] = 0;
        else *slash = 0;
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) { fsync(dfd); close(dfd); }
        free(dir);
    }
    rc = 0;
    goto out;
fail: {
        int err = errno;
        if (fd >= 0) close(fd);
        unlink(tmp);     // harmless if it was never created
        err_set("%s: %s %s%s: %s (%s left unchanged)", path, step, tmp, step_end, strerror(err),
                path);
    }
out:
    free(tmp);
    json_writer_free(&w);
    return rc;
}
