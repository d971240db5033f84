#include "io/json.h"
#include "util/err.h"
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- UTF-8 ----

// Length of the well-formed UTF-8 sequence at s (1..4), or 0 if it is not one.
static size_t utf8_seq_len(const unsigned char *s, size_t len) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t n; unsigned lo = 0x80, hi = 0xBF;   // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c == 0xE0) { n = 3; lo = 0xA0; }   // no overlongs
    else if (c == 0xED) { n = 3; hi = 0x9F; }   // no UTF-16 surrogates
    else if (c >= 0xE1 && c <= 0xEF) n = 3;
    else if (c == 0xF0) { n = 4; lo = 0x90; }
    else if (c == 0xF4) { n = 4; hi = 0x8F; }   // nothing above U+10FFFF
    else if (c >= 0xF1 && c <= 0xF3) n = 4;
    else return 0;
    if (len < n || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return n;
}

int json_utf8_valid(const char *s, size_t len) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < len;) {
        if (u[i] < 0x80) { i++; continue; }
        size_t n = utf8_seq_len(u + i, len - i);
        if (!n) return 0;
        i += n;
    }
    return 1;
}

const char *json_printable(char *buf, size_t cap, const char *s, size_t len) {
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0;
    if (cap == 0) return buf;
    for (size_t i = 0; i < len;) {
        char piece[8]; size_t plen;
        size_t n = u[i] >= 0x80 ? utf8_seq_len(u + i, len - i) : 1;
        if (n > 1) { memcpy(piece, u + i, n); plen = n; }
        else if (n == 1 && u[i] >= 0x20 && u[i] != 0x7F && u[i] != '\'' && u[i] != '\\') {
            piece[0] = (char)u[i]; plen = 1;
        } else {
            snprintf(piece, sizeof piece, "\\x%02X", u[i]); plen = 4; n = 1;
        }
        if (o + plen + 4 > cap) {           // keep room for "..." and the terminator
            if (o + 4 <= cap) { memcpy(buf + o, "...", 3); o += 3; }
            break;
        }
        memcpy(buf + o, piece, plen); o += plen;
        i += n;
    }
    buf[o < cap ? o : cap - 1] = 0;
    return buf;
}

// ---- parser ----

typedef struct {
    const char *t;
    size_t len, pos;
    int depth;
} parser;

static int fail(const parser *p, const char *what) {
    return err_set("byte %zu: %s", p->pos, what);
}

static void skip_ws(parser *p) {
    while (p->pos < p->len) {
        char c = p->t[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

// "found 'x'" / "found byte 0x01" / "found end of input", for messages.
static int fail_found(const parser *p, const char *expected) {
    if (p->pos >= p->len) return err_set("byte %zu: %s, found end of input", p->pos, expected);
    unsigned char c = (unsigned char)p->t[p->pos];
    if (c > 0x20 && c < 0x7F)
        return err_set("byte %zu: %s, found '%c'", p->pos, expected, c);
    return err_set("byte %zu: %s, found byte 0x%02X", p->pos, expected, c);
}

static int parse_value(parser *p, json_value *out);

static int hex4(const parser *p, size_t at, unsigned *v) {
    *v = 0;
    if (p->len - at < 4) return -1;
    for (int k = 0; k < 4; k++) {
        char c = p->t[at + k];
        unsigned d;
        if (c >= '0' && c <= '9') d = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') d = (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') d = (unsigned)(c - 'A' + 10);
        else return -1;
        *v = *v * 16 + d;
    }
    return 0;
}

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F)); return 4;
}

// At the opening quote. Decodes into a fresh buffer: *s (NUL-terminated), *n bytes.
static int parse_string(parser *p, char **s, size_t *n) {
    size_t start = p->pos;
    // Find the closing quote first: the raw span bounds the decoded size (escapes only shrink).
    size_t end = start + 1;
    while (end < p->len && p->t[end] != '"') end += p->t[end] == '\\' ? 2 : 1;
    if (end >= p->len) return err_set("byte %zu: unterminated string", start);
    char *o = malloc(end - start);
    if (!o) return err_set("byte %zu: out of memory for a string", start);
    size_t k = 0;
    p->pos = start + 1;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->t[p->pos];
        if (c < 0x20) {
            free(o);
            return err_set("byte %zu: raw control character 0x%02X in string (must be escaped)",
                           p->pos, c);
        }
        if (c != '\\') { o[k++] = (char)c; p->pos++; continue; }
        char e = p->t[p->pos + 1];
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            static const char map[] = "\"\\/\b\f\n\r\t";
            o[k++] = map[simple - "\"\\/bfnrt"];
            p->pos += 2;
            continue;
        }
        if (e != 'u') {
            free(o);
            return fail_found(&(parser){p->t, p->len, p->pos + 1, 0}, "invalid escape in string");
        }
        unsigned cp;
        if (hex4(p, p->pos + 2, &cp)) {
            free(o);
            return err_set("byte %zu: \\u must be followed by 4 hex digits", p->pos);
        }
        size_t esc = p->pos;
        p->pos += 6;
        if (cp >= 0xDC00 && cp <= 0xDFFF) {
            free(o);
            return err_set("byte %zu: lone low surrogate \\u%04X in string", esc, cp);
        }
        if (cp >= 0xD800 && cp <= 0xDBFF) {   // a high surrogate must pair with a low one
            unsigned lo;
            if (p->pos + 1 >= end || p->t[p->pos] != '\\' || p->t[p->pos + 1] != 'u' ||
                hex4(p, p->pos + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
                free(o);
                return err_set("byte %zu: lone high surrogate \\u%04X in string", esc, cp);
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            p->pos += 6;
        }
        k += put_utf8(o + k, cp);
    }
    o[k] = 0;
    if (!json_utf8_valid(o, k)) {
        free(o);
        return err_set("byte %zu: string is not valid UTF-8", start);
    }
    p->pos = end + 1;
    *s = o; *n = k;
    return 0;
}

static int parse_number(parser *p, json_value *out) {
    size_t start = p->pos;
    const char *t = p->t;
    size_t i = p->pos;
    int neg = 0, is_int = 1;
    if (i < p->len && t[i] == '-') { neg = 1; i++; }
    if (i >= p->len || t[i] < '0' || t[i] > '9')
        return fail_found(&(parser){t, p->len, i, 0}, "expected a digit");
    if (t[i] == '0') {
        i++;
        if (i < p->len && t[i] >= '0' && t[i] <= '9')
            return err_set("byte %zu: leading zeros are not allowed in numbers", start);
    } else {
        while (i < p->len && t[i] >= '0' && t[i] <= '9') i++;
    }
    size_t int_end = i;
    if (i < p->len && t[i] == '.') {
        is_int = 0; i++;
        if (i >= p->len || t[i] < '0' || t[i] > '9')
            return fail_found(&(parser){t, p->len, i, 0}, "expected a digit after '.'");
        while (i < p->len && t[i] >= '0' && t[i] <= '9') i++;
    }
    if (i < p->len && (t[i] == 'e' || t[i] == 'E')) {
        is_int = 0; i++;
        if (i < p->len && (t[i] == '+' || t[i] == '-')) i++;
        if (i >= p->len || t[i] < '0' || t[i] > '9')
            return fail_found(&(parser){t, p->len, i, 0}, "expected a digit in exponent");
        while (i < p->len && t[i] >= '0' && t[i] <= '9') i++;
    }
    out->pos = start;
    if (is_int) {
        // Accumulate as a negative number so INT64_MIN fits; checked at every step.
        int64_t v = 0;
        for (size_t j = start + neg; j < int_end; j++) {
            int d = t[j] - '0';
            if (v < (INT64_MIN + d) / 10)
                return err_set("byte %zu: integer does not fit in 64 bits", start);
            v = v * 10 - d;
        }
        if (!neg) {
            if (v == INT64_MIN) return err_set("byte %zu: integer does not fit in 64 bits", start);
            v = -v;
        }
        out->type = JSON_INT; out->i = v; out->d = (double)v;
    } else {
        // strtod needs a terminated copy (the text is not NUL-terminated). It follows the C
        // locale's '.', which is the only locale incept runs in.
        char small[64], *buf = small;
        size_t n = i - start;
        if (n + 1 > sizeof small && !(buf = malloc(n + 1)))
            return err_set("byte %zu: out of memory for a number", start);
        memcpy(buf, t + start, n); buf[n] = 0;
        double d = strtod(buf, NULL);
        if (buf != small) free(buf);
        if (d - d != 0) return err_set("byte %zu: number out of double range", start);
        out->type = JSON_FLOAT; out->d = d;
    }
    p->pos = i;
    return 0;
}

static int parse_literal(parser *p, json_value *out) {
    static const struct { const char *word; json_type type; int v; } lits[] = {
        {"true", JSON_BOOL, 1}, {"false", JSON_BOOL, 0}, {"null", JSON_NULL, 0}};
    for (size_t k = 0; k < 3; k++) {
        size_t n = strlen(lits[k].word);
        if (p->len - p->pos >= n && !memcmp(p->t + p->pos, lits[k].word, n)) {
            out->type = lits[k].type; out->i = lits[k].v; out->pos = p->pos;
            p->pos += n;
            return 0;
        }
    }
    return fail_found(p, "expected a value");
}

static int parse_array(parser *p, json_value *out) {
    size_t start = p->pos, cap = 0, n = 0;
    json_value *items = NULL;
    p->pos++;
    skip_ws(p);
    if (p->pos < p->len && p->t[p->pos] == ']') { p->pos++; goto done; }
    for (;;) {
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 4;
            json_value *ni = realloc(items, nc * sizeof *ni);
            if (!ni) { err_set("byte %zu: out of memory for an array", p->pos); goto fail; }
            items = ni; cap = nc;
        }
        if (parse_value(p, &items[n])) goto fail;
        n++;
        skip_ws(p);
        if (p->pos < p->len && p->t[p->pos] == ',') { p->pos++; continue; }
        if (p->pos < p->len && p->t[p->pos] == ']') { p->pos++; break; }
        fail_found(p, "expected ',' or ']' in array");
        goto fail;
    }
done:
    out->type = JSON_ARRAY; out->items = items; out->n = n; out->pos = start;
    return 0;
fail:
    for (size_t k = 0; k < n; k++) json_free(&items[k]);
    free(items);
    return -1;
}

static int member_cmp(const void *a, const void *b) {
    const json_member *x = *(json_member *const *)a, *y = *(json_member *const *)b;
    if (x->key_len != y->key_len) return x->key_len < y->key_len ? -1 : 1;
    return memcmp(x->key, y->key, x->key_len);
}

// Sorting pointers keeps this O(n log n) for headers with many thousands of tensors.
static int check_duplicates(json_member *m, size_t n, size_t obj_pos) {
    if (n < 2) return 0;
    json_member **idx = malloc(n * sizeof *idx);
    if (!idx) return err_set("byte %zu: out of memory checking for duplicate keys", obj_pos);
    for (size_t k = 0; k < n; k++) idx[k] = &m[k];
    qsort(idx, n, sizeof *idx, member_cmp);
    int rc = 0;
    for (size_t k = 1; k < n && !rc; k++) {
        if (member_cmp(&idx[k - 1], &idx[k]) == 0) {
            char name[200];
            json_printable(name, sizeof name, idx[k]->key, idx[k]->key_len);
            rc = err_set("byte %zu: duplicate key '%s' in object", 
                         idx[k - 1] < idx[k] ? idx[k]->value.pos : idx[k - 1]->value.pos, name);
        }
    }
    free(idx);
    return rc;
}

static int parse_object(parser *p, json_value *out) {
    size_t start = p->pos, cap = 0, n = 0;
    json_member *m = NULL;
    p->pos++;
    skip_ws(p);
    if (p->pos < p->len && p->t[p->pos] == '}') { p->pos++; goto done; }
    for (;;) {
        skip_ws(p);
        if (p->pos >= p->len || p->t[p->pos] != '"') {
            fail_found(p, "expected a string key in object");
            goto fail;
        }
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 8;
            json_member *nm = realloc(m, nc * sizeof *nm);
            if (!nm) { err_set("byte %zu: out of memory for an object", p->pos); goto fail; }
            m = nm; cap = nc;
        }
        if (parse_string(p, &m[n].key, &m[n].key_len)) goto fail;
        skip_ws(p);
        if (p->pos >= p->len || p->t[p->pos] != ':') {
            fail_found(p, "expected ':' after object key");
            free(m[n].key);
            goto fail;
        }
        p->pos++;
        if (parse_value(p, &m[n].value)) { free(m[n].key); goto fail; }
        n++;
        skip_ws(p);
        if (p->pos < p->len && p->t[p->pos] == ',') { p->pos++; continue; }
        if (p->pos < p->len && p->t[p->pos] == '}') { p->pos++; break; }
        fail_found(p, "expected ',' or '}' after object member");
        goto fail;
    }
    if (check_duplicates(m, n, start)) goto fail;
done:
    out->type = JSON_OBJECT; out->members = m; out->n = n; out->pos = start;
    return 0;
fail:
    for (size_t k = 0; k < n; k++) { free(m[k].key); json_free(&m[k].value); }
    free(m);
    return -1;
}

static int parse_value(parser *p, json_value *out) {
    memset(out, 0, sizeof *out);
    skip_ws(p);
    if (p->pos >= p->len) return fail(p, "expected a value, found end of input");
    out->pos = p->pos;
    char c = p->t[p->pos];
    if (c == '"') {
        out->type = JSON_STRING;
        if (parse_string(p, &out->s, &out->len)) { out->type = JSON_NULL; return -1; }
        return 0;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number(p, out);
    if (c != '{' && c != '[') return parse_literal(p, out);
    if (++p->depth > JSON_MAX_DEPTH) {
        return err_set("byte %zu: nested deeper than %d levels", p->pos, JSON_MAX_DEPTH);
    }
    int rc = c == '{' ? parse_object(p, out) : parse_array(p, out);
    p->depth--;
    return rc;
}

int json_parse(json_value *out, const char *text, size_t len) {
    parser p = {text, len, 0, 0};
    if (parse_value(&p, out)) { memset(out, 0, sizeof *out); return -1; }
    skip_ws(&p);
    if (p.pos != len) {
        json_free(out);
        return fail_found(&p, "trailing characters after the JSON value");
    }
    return 0;
}

void json_free(json_value *v) {
    if (!v) return;
    if (v->type == JSON_STRING) free(v->s);
    if (v->type == JSON_ARRAY) {
        for (size_t k = 0; k < v->n; k++) json_free(&v->items[k]);
        free(v->items);
    }
    if (v->type == JSON_OBJECT) {
        for (size_t k = 0; k < v->n; k++) { free(v->members[k].key); json_free(&v->members[k].value); }
        free(v->members);
    }
    memset(v, 0, sizeof *v);
}

const json_value *json_get(const json_value *v, const char *key) {
    if (!v || v->type != JSON_OBJECT) return NULL;
    size_t n = strlen(key);
    for (size_t k = 0; k < v->n; k++)
        if (v->members[k].key_len == n && !memcmp(v->members[k].key, key, n))
            return &v->members[k].value;
    return NULL;
}

const char *json_type_name(json_type t) {
    static const char *names[] = {"null", "boolean", "integer", "number", "string", "array",
                                  "object"};
    return (unsigned)t < sizeof names / sizeof *names ? names[t] : "?";
}

// ---- writer ----

static int writer_reserve(json_writer *w, size_t add) {
    if (w->failed) return -1;
    if (add > SIZE_MAX / 2 - w->len) { w->failed = 1; return -1; }
    size_t need = w->len + add + 1;          // + terminator, so data is always a C string
    if (need <= w->cap) return 0;
    size_t nc = w->cap ? w->cap * 2 : 256;
    while (nc < need) nc *= 2;
    char *nd = realloc(w->data, nc);
    if (!nd) { w->failed = 1; return -1; }
    w->data = nd; w->cap = nc;
    return 0;
}

void json_write_raw(json_writer *w, const char *s, size_t len) {
    if (writer_reserve(w, len)) return;
    memcpy(w->data + w->len, s, len);
    w->len += len;
    w->data[w->len] = 0;
}

void json_write_str(json_writer *w, const char *s) { json_write_raw(w, s, strlen(s)); }

void json_write_string(json_writer *w, const char *s, size_t len) {
    json_write_raw(w, "\"", 1);
    size_t run = 0;                          // copy unescaped runs in one go
    for (size_t k = 0; k < len; k++) {
        unsigned char c = (unsigned char)s[k];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        json_write_raw(w, s + run, k - run);
        run = k + 1;
        char esc[8];
        switch (c) {
        case '"': json_write_raw(w, "\\\"", 2); break;
        case '\\': json_write_raw(w, "\\\\", 2); break;
        case '\b': json_write_raw(w, "\\b", 2); break;
        case '\f': json_write_raw(w, "\\f", 2); break;
        case '\n': json_write_raw(w, "\\n", 2); break;
        case '\r': json_write_raw(w, "\\r", 2); break;
        case '\t': json_write_raw(w, "\\t", 2); break;
        default:
            snprintf(esc, sizeof esc, "\\u%04x", c);
            json_write_raw(w, esc, 6);
        }
    }
    json_write_raw(w, s + run, len - run);
    json_write_raw(w, "\"", 1);
}

void json_write_int(json_writer *w, int64_t v) {
    char b[32];
    int n = snprintf(b, sizeof b, "%" PRId64, v);
    json_write_raw(w, b, (size_t)n);
}

void json_writer_free(json_writer *w) {
    free(w->data);
    memset(w, 0, sizeof *w);
}
