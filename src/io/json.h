// A small strict JSON parser (RFC 8259) and writer helpers, enough for safetensors headers and
// other metadata. Strict means: UTF-8 only, no comments, no trailing commas, no NaN/Infinity,
// no lone surrogates in \u escapes, no duplicate keys within an object, nothing but
// whitespace after the value, nesting at most JSON_MAX_DEPTH deep.
#pragma once
#include <stddef.h>
#include <stdint.h>

#define JSON_MAX_DEPTH 64

typedef enum { JSON_NULL, JSON_BOOL, JSON_INT, JSON_FLOAT, JSON_STRING, JSON_ARRAY,
               JSON_OBJECT } json_type;

typedef struct json_value json_value;
typedef struct json_member json_member;

struct json_value {
    json_type type;
    size_t pos;             // byte offset of the value in the parsed text (for messages)
    int64_t i;              // JSON_INT (a number without fraction/exponent), JSON_BOOL (0/1)
    double d;               // JSON_FLOAT (also set for JSON_INT)
    char *s; size_t len;    // JSON_STRING: decoded UTF-8, NUL-terminated; len excludes the
                            // terminator (the string itself may contain "\u0000")
    json_value *items;      // JSON_ARRAY: n items
    json_member *members;   // JSON_OBJECT: n members, in text order
    size_t n;
};

struct json_member {
    char *key; size_t key_len;   // decoded, NUL-terminated, may contain NUL like strings
    json_value value;
};

// Parses text[0..len). On failure returns -1 with err_msg() set to one line such as
// "byte 17: expected ',' or '}' after object member", and *out left as JSON_NULL (freeable).
int  json_parse(json_value *out, const char *text, size_t len);
void json_free(json_value *v);

// The member `key` of an object, NULL if absent or v is not an object. Linear search.
const json_value *json_get(const json_value *v, const char *key);
const char *json_type_name(json_type t);    // "object", "string", ...

// A printable, single-line rendering of s[0..len) for error messages: control bytes, '\'' and
// invalid UTF-8 shown as \xNN, cut with "..." to fit buf[cap]. Returns buf.
const char *json_printable(char *buf, size_t cap, const char *s, size_t len);

// 1 if s[0..len) is well-formed UTF-8 (no overlongs, surrogates or code points > U+10FFFF).
int json_utf8_valid(const char *s, size_t len);

// Growable output buffer for building JSON text. Appends never fail visibly: on out-of-memory
// `failed` is set and later appends do nothing; check it once at the end.
typedef struct { char *data; size_t len, cap; int failed; } json_writer;

void json_write_raw(json_writer *w, const char *s, size_t len);
void json_write_str(json_writer *w, const char *s);            // raw text, NUL-terminated
// A quoted string literal: '"' and '\\' and control characters escaped, other bytes (UTF-8)
// copied as they are.
void json_write_string(json_writer *w, const char *s, size_t len);
void json_write_int(json_writer *w, int64_t v);
void json_writer_free(json_writer *w);
