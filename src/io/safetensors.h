// safetensors (https://huggingface.co/docs/safetensors): 8-byte little-endian header length,
// a JSON header {"name": {"dtype","shape","data_offsets":[begin,end]}, "__metadata__": {...}},
// then the raw little-endian tensor bytes. Reading validates everything and never trusts the
// file: every failure is one err_set() line naming the file and the problem.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef enum { ST_F32, ST_I64, ST_F64, ST_F16, ST_BF16, ST_I32, ST_I16, ST_I8, ST_U8, ST_BOOL,
               ST_U16, ST_U32, ST_U64, ST_DTYPE_COUNT } st_dtype;

#define ST_MAX_DIMS 8

typedef struct {
    char *name;
    st_dtype dtype;
    int ndim;                       // 0 for a scalar
    int64_t shape[ST_MAX_DIMS];
    size_t numel;
    size_t nbytes;
    const void *data;               // raw bytes inside the file buffer; may be unaligned: memcpy
} st_tensor;

typedef struct {
    st_tensor *tensors; int n;
    char **meta_keys, **meta_vals; int n_meta;   // "__metadata__" string pairs
    unsigned char *buf; size_t len;              // the whole file
} st_file;

const char *st_dtype_name(st_dtype d);          // "F32", "I64", ...
size_t      st_dtype_size(st_dtype d);

// Reads and validates a whole file. On failure returns -1 with err_msg() set, *f left empty.
int  st_read(st_file *f, const char *path);
void st_free(st_file *f);
const st_tensor *st_get(const st_file *f, const char *name);     // NULL if absent
const char *st_meta(const st_file *f, const char *key);          // NULL if absent

// What to write: data points at numel * st_dtype_size(dtype) little-endian bytes.
typedef struct {
    const char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
} st_entry;

// Writes atomically: PATH.tmp.<pid>, fflush + fsync, rename. Metadata may be NULL/0.
int st_write(const char *path, const st_entry *e, int n,
             const char *const *meta_keys, const char *const *meta_vals, int n_meta);
