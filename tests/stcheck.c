// Test helper for tests/test_safetensors.py (not run by the runner itself):
//   stcheck info IN                  one line per tensor: tensor "NAME" DTYPE [SHAPE] NBYTES,
//                                    then one per metadata pair: meta "KEY" "VALUE"
//                                    (names and strings JSON-quoted, so any byte is unambiguous)
//   stcheck copy IN OUT              read IN, write every tensor and the metadata to OUT
//   stcheck rename IN OUT OLD NEW    like copy, with tensor OLD written under the name NEW
//   stcheck json FILE                parse FILE with io/json and print it back as compact JSON
// On error: "stcheck: <message>" on stderr, exit 1.
#include "io/json.h"
#include "io/safetensors.h"
#include "util/err.h"
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(void) {
    fprintf(stderr, "stcheck: %s\n", err_msg());
    return 1;
}

static void print_json_string(const char *s, size_t len) {
    json_writer w = {0};
    json_write_string(&w, s, len);
    fputs(w.failed ? "\"?\"" : w.data, stdout);
    json_writer_free(&w);
}

static int cmd_info(const char *in) {
    st_file f;
    if (st_read(&f, in)) return fail();
    for (int k = 0; k < f.n; k++) {
        const st_tensor *t = &f.tensors[k];
        if (st_get(&f, t->name) != t) {
            err_set("%s: st_get('%s') did not find the tensor", in, t->name);
            st_free(&f);
            return fail();
        }
        printf("tensor ");
        print_json_string(t->name, strlen(t->name));
        printf(" %s [", st_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) printf("%s%" PRId64, d ? "," : "", t->shape[d]);
        printf("] %zu\n", t->nbytes);
    }
    for (int k = 0; k < f.n_meta; k++) {
        if (st_meta(&f, f.meta_keys[k]) != f.meta_vals[k]) {
            err_set("%s: st_meta('%s') did not find the value", in, f.meta_keys[k]);
            st_free(&f);
            return fail();
        }
        printf("meta ");
        print_json_string(f.meta_keys[k], strlen(f.meta_keys[k]));
        printf(" ");
        print_json_string(f.meta_vals[k], strlen(f.meta_vals[k]));
        printf("\n");
    }
    st_free(&f);
    return 0;
}

static int cmd_copy(const char *in, const char *out, const char *old, const char *new) {
    st_file f;
    if (st_read(&f, in)) return fail();
    st_entry *e = calloc((size_t)f.n + 1, sizeof *e);
    if (!e) { st_free(&f); err_set("out of memory"); return fail(); }
    for (int k = 0; k < f.n; k++) {
        const st_tensor *t = &f.tensors[k];
        e[k].name = old && !strcmp(t->name, old) ? new : t->name;
        e[k].dtype = t->dtype;
        e[k].ndim = t->ndim;
        memcpy(e[k].shape, t->shape, sizeof t->shape);
        e[k].data = t->data;
    }
    int rc = st_write(out, e, f.n, (const char *const *)f.meta_keys,
                      (const char *const *)f.meta_vals, f.n_meta);
    free(e);
    st_free(&f);
    return rc ? fail() : 0;
}

static void print_value(json_writer *w, const json_value *v) {
    char b[40];
    switch (v->type) {
    case JSON_NULL: json_write_str(w, "null"); break;
    case JSON_BOOL: json_write_str(w, v->i ? "true" : "false"); break;
    case JSON_INT: json_write_int(w, v->i); break;
    case JSON_FLOAT: snprintf(b, sizeof b, "%.17g", v->d); json_write_str(w, b); break;
    case JSON_STRING: json_write_string(w, v->s, v->len); break;
    case JSON_ARRAY:
        json_write_str(w, "[");
        for (size_t k = 0; k < v->n; k++) {
            if (k) json_write_str(w, ",");
            print_value(w, &v->items[k]);
        }
        json_write_str(w, "]");
        break;
    case JSON_OBJECT:
        json_write_str(w, "{");
        for (size_t k = 0; k < v->n; k++) {
            if (k) json_write_str(w, ",");
            json_write_string(w, v->members[k].key, v->members[k].key_len);
            json_write_str(w, ":");
            print_value(w, &v->members[k].value);
        }
        json_write_str(w, "}");
        break;
    }
}

static int cmd_json(const char *path) {
    FILE *fp = fopen(path, "rb");
    if (!fp) { err_set("%s: cannot open", path); return fail(); }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    size_t r;
    while (buf && (r = fread(buf + len, 1, cap - len, fp)) > 0) {
        len += r;
        if (len == cap) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) free(buf);
            buf = nb;
        }
    }
    fclose(fp);
    if (!buf) { err_set("out of memory"); return fail(); }
    json_value v;
    if (json_parse(&v, buf, len)) {
        char why[512];
        snprintf(why, sizeof why, "%s", err_msg());
        err_set("%s: %s", path, why);
        free(buf);
        return fail();
    }
    json_writer w = {0};
    print_value(&w, &v);
    fwrite(w.data, 1, w.len, stdout);
    putchar('\n');
    json_writer_free(&w);
    json_free(&v);
    free(buf);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "info")) return cmd_info(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "copy")) return cmd_copy(argv[2], argv[3], NULL, NULL);
    if (argc == 6 && !strcmp(argv[1], "rename"))
        return cmd_copy(argv[2], argv[3], argv[4], argv[5]);
    if (argc == 3 && !strcmp(argv[1], "json")) return cmd_json(argv[2]);
    fprintf(stderr, "usage: stcheck info IN | copy IN OUT | rename IN OUT OLD NEW | json FILE\n");
    return 2;
}
