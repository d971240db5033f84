// Data set loaders: IDX (MNIST, Fashion-MNIST), CIFAR-10 binary, image folders. Every input is
// validated; each failure is one err_set line naming the file.
#include "data/data.h"
#include "util/err.h"
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <zlib.h>

static const char *const FASHION_NAMES[10] = {"T-shirt/top", "Trouser", "Pullover", "Dress",
    "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};
static const char *const DIGIT_NAMES[10] = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
static const char *const CIFAR_NAMES[10] = {"airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck"};

void dataset_free(dataset *d) {
    if (!d) return;
    if (d->class_names)
        for (int i = 0; i < d->n_classes; i++) free(d->class_names[i]);
    free(d->class_names);
    free(d->pixels);
    free(d->labels);
    memset(d, 0, sizeof *d);
}

static int names_set(dataset *d, const char *const *names, int n) {
    d->class_names = calloc(n, sizeof *d->class_names);
    if (!d->class_names) return err_set("out of memory");
    d->n_classes = n;
    for (int i = 0; i < n; i++)
        if (!(d->class_names[i] = strdup(names[i]))) return err_set("out of memory");
    return 0;
}

#define PATH_CAP 4096

// out = a/b; fails (naming the path) rather than truncating.
static int path_join(char *out, const char *a, const char *b) {
    int n = snprintf(out, PATH_CAP, "%s/%s", a, b);
    if (n < 0 || n >= PATH_CAP) return err_set("%s/%s: path too long", a, b);
    return 0;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int dir_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

// ---------------------------------------------------------------- IDX (MNIST family)

static uint32_t be32(const unsigned char *b) {
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

// Reads exactly n bytes; 0 on success, else -1 with the message naming path.
static int gz_read_all(gzFile f, void *dst, size_t n, const char *path, const char *what) {
    size_t got = 0;
    while (got < n) {
        size_t chunk = n - got > (1u << 30) ? (1u << 30) : n - got;
        int r = gzread(f, (char *)dst + got, (unsigned)chunk);
        if (r < 0) {
            int e;
            const char *m = gzerror(f, &e);
            return err_set("%s: read error in %s: %s", path, what, e == Z_ERRNO ? strerror(errno) : m);
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    if (got < n) {
        int e;
        const char *m = gzerror(f, &e);
        if (e != Z_OK && e != Z_BUF_ERROR)
            return err_set("%s: read error in %s: %s", path, what, m);
        return err_set("%s: truncated: %s has %zu of %zu bytes", path, what, got, n);
    }
    return 0;
}

// One IDX file of unsigned bytes with `ndims` dimensions (3: images, 1: labels). dims[0] is the
// item count. *data gets the payload (malloc'd).
static int idx_read(uint8_t **data, uint32_t dims[3], const char *path, int ndims) {
    *data = NULL;
    gzFile f = gzopen(path, "rb");
    if (!f) return err_set("%s: cannot open: %s", path, errno ? strerror(errno) : "out of memory");
    gzbuffer(f, 1 << 18);
    unsigned char hdr[16];
    size_t hlen = 4 + 4 * (size_t)ndims;
    if (gz_read_all(f, hdr, hlen, path, "the header")) goto fail;
    uint32_t magic = be32(hdr), want = 0x800u | (uint32_t)ndims;
    if (magic != want) {
        err_set("%s: not an IDX %s file: magic number 0x%08x, expected 0x%08x", path,
                ndims == 3 ? "image" : "label", magic, want);
        goto fail;
    }
    size_t total = 1;
    for (int i = 0; i < ndims; i++) {
        dims[i] = be32(hdr + 4 + 4 * i);
        // Items up to 2^31 (int indices); rows/cols up to 4096 keep n*H*W sane.
        uint32_t lim = i == 0 ? (uint32_t)INT_MAX : 4096u;
        if (dims[i] == 0 || dims[i] > lim) {
            err_set("%s: bad dimension %d in the header: %u (expected 1..%u)", path, i, dims[i], lim);
            goto fail;
        }
        total *= dims[i];
    }
    if (total > ((size_t)1 << 36)) { err_set("%s: %zu bytes of data is implausibly large", path, total); goto fail; }
    *data = malloc(total);
    if (!*data) { err_set("%s: out of memory for %zu bytes", path, total); goto fail; }
    if (gz_read_all(f, *data, total, path, ndims == 3 ? "the pixel data" : "the label data")) goto fail;
    char extra;
    int r = gzread(f, &extra, 1);
    if (r != 0) {
        if (r > 0) err_set("%s: unexpected data after the %zu bytes the header declares", path, total);
        else err_set("%s: read error after the data: %s", path, gzerror(f, &r));
        goto fail;
    }
    gzclose(f);
    return 0;
fail:
    free(*data);
    *data = NULL;
    gzclose(f);
    return -1;
}

// DIR/BASE.gz or DIR/BASE (or the "train-images.idx3-ubyte" spelling) into path.
static int idx_find(char *path, const char *dir, const char *base) {
    char alt[64], name[80];
    snprintf(alt, sizeof alt, "%s", base);
    char *dash = strstr(alt, "-idx");
    if (dash) *dash = '.';
    const char *names[2] = {base, alt};
    for (int k = 0; k < 2; k++)
        for (int gz = 1; gz >= 0; gz--) {
            snprintf(name, sizeof name, "%s%s", names[k], gz ? ".gz" : "");
            if (path_join(path, dir, name)) return -1;
            if (file_exists(path)) return 0;
        }
    if (!dir_exists(dir)) return err_set("%s: data set directory not found", dir);
    return err_set("%s/%s: not found (also tried .gz)", dir, base);
}

static int idx_split(dataset *d, const char *dir, const char *prefix) {
    char ipath[PATH_CAP], lpath[PATH_CAP], base[64];
    snprintf(base, sizeof base, "%s-images-idx3-ubyte", prefix);
    if (idx_find(ipath, dir, base)) return -1;
    snprintf(base, sizeof base, "%s-labels-idx1-ubyte", prefix);
    if (idx_find(lpath, dir, base)) return -1;
    uint32_t idims[3] = {0}, ldims[3] = {0};
    uint8_t *lab;
    if (idx_read(&d->pixels, idims, ipath, 3)) return -1;
    if (idx_read(&lab, ldims, lpath, 1)) return -1;
    if (ldims[0] != idims[0]) {
        free(lab);
        return err_set("%s has %u labels but %s has %u images", lpath, ldims[0], ipath, idims[0]);
    }
    d->n = (int)idims[0];
    d->C = 1;
    d->H = (int)idims[1];
    d->W = (int)idims[2];
    d->labels = malloc(sizeof(int64_t) * d->n);
    if (!d->labels) { free(lab); return err_set("%s: out of memory", lpath); }
    for (int i = 0; i < d->n; i++) {
        if (lab[i] >= d->n_classes) {
            int v = lab[i];
            free(lab);
            return err_set("%s: label %d of item %d is out of range 0..%d", lpath, v, i, d->n_classes - 1);
        }
        d->labels[i] = lab[i];
    }
    free(lab);
    return 0;
}

// ---------------------------------------------------------------- CIFAR-10 binary

#define CIFAR_REC 3073

static int cifar_file_size(long *size, const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) return err_set("%s: cannot open: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return err_set("%s: not a regular file", path);
    if (st.st_size == 0 || st.st_size % CIFAR_REC != 0)
        return err_set("%s: size %lld is not a positive multiple of %d (1 label + 3072 pixel "
                       "bytes per record)", path, (long long)st.st_size, CIFAR_REC);
    *size = (long)st.st_size;
    return 0;
}

// Appends the records of `path` (n of them) at image index `at` of d.
static int cifar_read(dataset *d, int at, int n, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return err_set("%s: cannot open: %s", path, strerror(errno));
    unsigned char *rec = malloc(CIFAR_REC * 1024);
    if (!rec) { fclose(f); return err_set("%s: out of memory", path); }
    int rc = 0;
    for (int i = 0; i < n && !rc;) {
        int m = n - i < 1024 ? n - i : 1024;
        if (fread(rec, CIFAR_REC, (size_t)m, f) != (size_t)m) {
            rc = err_set("%s: %s while reading record %d", path, ferror(f) ? strerror(errno) : "truncated", i);
            break;
        }
        for (int k = 0; k < m; k++, i++) {
            const unsigned char *r = rec + (size_t)k * CIFAR_REC;
            if (r[0] >= 10) { rc = err_set("%s: record %d has label %d (expected 0..9)", path, i, r[0]); break; }
            d->labels[at + i] = r[0];
            // Records are already planar: 1024 red, 1024 green, 1024 blue, rows top first.
            memcpy(d->pixels + (size_t)(at + i) * 3072, r + 1, 3072);
        }
    }
    free(rec);
    fclose(f);
    return rc;
}

static int cifar_split(dataset *d, const char *dir, const char *const *files, int nfiles) {
    char path[PATH_CAP];
    long sizes[8];
    long total = 0;
    for (int k = 0; k < nfiles; k++) {
        if (path_join(path, dir, files[k])) return -1;
        if (cifar_file_size(&sizes[k], path)) return -1;
        total += sizes[k] / CIFAR_REC;
    }
    if (total > INT_MAX / 2) return err_set("%s: too many records", dir);
    d->n = (int)total;
    d->C = 3;
    d->H = d->W = 32;
    d->pixels = malloc((size_t)d->n * 3072);
    d->labels = malloc(sizeof(int64_t) * d->n);
    if (!d->pixels || !d->labels) return err_set("%s: out of memory for %d images", dir, d->n);
    int at = 0;
    for (int k = 0; k < nfiles; k++) {
        if (path_join(path, dir, files[k])) return -1;
        int n = (int)(sizes[k] / CIFAR_REC);
        if (cifar_read(d, at, n, path)) return -1;
        at += n;
    }
    return 0;
}

// Class names from batches.meta.txt (one per line, blank lines ignored), or the standard ones.
static int cifar_names(dataset *d, const char *dir) {
    char path[PATH_CAP];
    if (path_join(path, dir, "batches.meta.txt")) return -1;
    FILE *f = fopen(path, "r");
    if (!f) return names_set(d, CIFAR_NAMES, 10);
    char line[256], names[10][256];
    int n = 0;
    while (n < 10 && fgets(line, sizeof line, f)) {
        size_t len = strlen(line);
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' ' ||
                       line[len - 1] == '\t'))
            line[--len] = 0;
        if (len) memcpy(names[n++], line, len + 1);
    }
    fclose(f);
    if (n < 10) return err_set("%s: has %d class names, expected 10", path, n);
    const char *p[10];
    for (int i = 0; i < 10; i++) p[i] = names[i];
    return names_set(d, p, 10);
}

// ---------------------------------------------------------------- image folders

typedef struct { char **v; int n, cap; } strlist;

static int strlist_add(strlist *l, const char *s) {
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 16;
        char **v = realloc(l->v, sizeof *v * cap);
        if (!v) return err_set("out of memory");
        l->v = v;
        l->cap = cap;
    }
    if (!(l->v[l->n] = strdup(s))) return err_set("out of memory");
    l->n++;
    return 0;
}

static void strlist_free(strlist *l) {
    for (int i = 0; i < l->n; i++) free(l->v[i]);
    free(l->v);
    memset(l, 0, sizeof *l);
}

static int str_cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int image_ext(const char *name) {
    const char *dot = strrchr(name, '.');
    if (!dot) return 0;
    return !strcasecmp(dot, ".jpg") || !strcasecmp(dot, ".jpeg") || !strcasecmp(dot, ".png") ||
           !strcasecmp(dot, ".bmp");
}

// Sorted names in dir: subdirectories (want_dirs) or image files. Hidden entries skipped.
static int dir_list(strlist *out, const char *dir, int want_dirs) {
    DIR *d = opendir(dir);
    if (!d) return err_set("%s: cannot open directory: %s", dir, strerror(errno));
    struct dirent *e;
    char path[PATH_CAP];
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        if (path_join(path, dir, e->d_name)) { closedir(d); return -1; }
        int is_dir = dir_exists(path);
        if (want_dirs ? !is_dir : (is_dir || !image_ext(e->d_name) || !file_exists(path))) continue;
        if (strlist_add(out, e->d_name)) { closedir(d); return -1; }
    }
    closedir(d);
    if (out->n > 1) qsort(out->v, out->n, sizeof *out->v, str_cmp);
    return 0;
}

typedef struct {
    dataset *d;
    char **paths;
    int size, next, failed;
    pthread_mutex_t mu;
    char err[1024];
} folder_job;

static void *folder_worker(void *arg) {
    folder_job *j = arg;
    size_t stride = (size_t)3 * j->size * j->size;
    for (;;) {
        pthread_mutex_lock(&j->mu);
        int i = j->failed ? j->d->n : j->next++;
        pthread_mutex_unlock(&j->mu);
        if (i >= j->d->n) break;
        uint8_t *pix;
        int H, W, rc = image_decode(&pix, &H, &W, j->paths[i], 3);
        if (!rc) {
            rc = image_resize_square(j->d->pixels + (size_t)i * stride, pix, 3, H, W, j->size);
            if (rc) err_set("%s: %s", j->paths[i], err_msg());
            free(pix);
        }
        if (rc) {
            // Report the failure of the lowest index, so the message does not depend on timing.
            pthread_mutex_lock(&j->mu);
            if (!j->failed || i < j->failed - 1) {
                j->failed = i + 1;
                snprintf(j->err, sizeof j->err, "%s", err_msg());
            }
            pthread_mutex_unlock(&j->mu);
        }
    }
    return NULL;
}

// Decodes paths[0..n) into d (labels already set), two threads.
static int folder_decode(dataset *d, char **paths, int size) {
    folder_job j = {.d = d, .paths = paths, .size = size};
    pthread_mutex_init(&j.mu, NULL);
    pthread_t t;
    int threaded = d->n > 1 && pthread_create(&t, NULL, folder_worker, &j) == 0;
    folder_worker(&j);
    if (threaded) pthread_join(t, NULL);
    pthread_mutex_destroy(&j.mu);
    if (j.failed) return err_set("%s", j.err);
    return 0;
}

// One split: root/<class>/<image>; classes must be among `classes` (the training ones).
static int folder_split(dataset *d, const char *root, const strlist *classes, int size) {
    strlist sub = {0}, paths = {0};
    int rc = -1, nlab = 0;
    int64_t *lab = NULL;
    if (dir_list(&sub, root, 1)) goto done;
    if (sub.n == 0) { err_set("%s: no class subfolders", root); goto done; }
    for (int c = 0; c < sub.n; c++) {
        char **hit = bsearch(&sub.v[c], classes->v, classes->n, sizeof *classes->v, str_cmp);
        if (!hit) {
            err_set("%s/%s: class '%s' is not among the %d training classes", root, sub.v[c],
                    sub.v[c], classes->n);
            goto done;
        }
        char dir[PATH_CAP];
        if (path_join(dir, root, sub.v[c])) goto done;
        strlist files = {0};
        if (dir_list(&files, dir, 0)) { strlist_free(&files); goto done; }
        if (files.n == 0) {
            strlist_free(&files);
            err_set("%s: no images (.jpg .jpeg .png .bmp) in this class folder", dir);
            goto done;
        }
        int64_t *nl = realloc(lab, sizeof *lab * (nlab + files.n));
        if (!nl) { strlist_free(&files); err_set("out of memory"); goto done; }
        lab = nl;
        for (int k = 0; k < files.n; k++) {
            char path[PATH_CAP];
            if (path_join(path, dir, files.v[k]) || strlist_add(&paths, path)) { strlist_free(&files); goto done; }
            lab[nlab++] = hit - classes->v;
        }
        strlist_free(&files);
    }
    d->labels = lab;
    lab = NULL;
    d->n = nlab;
    d->C = 3;
    d->H = d->W = size;
    d->pixels = malloc((size_t)nlab * 3 * size * size);
    if (!d->pixels) { err_set("%s: out of memory for %d images of %dx%d", root, nlab, size, size); goto done; }
    rc = folder_decode(d, paths.v, size);
done:
    free(lab);
    strlist_free(&sub);
    strlist_free(&paths);
    return rc;
}

// ---------------------------------------------------------------- dispatch

void dataset_stats(const dataset *d, float mean[3], float std[3]) {
    size_t hw = (size_t)d->H * d->W;
    for (int c = 0; c < d->C && c < 3; c++) {
        uint64_t hist[256] = {0};
        for (int i = 0; i < d->n; i++) {
            const uint8_t *p = d->pixels + ((size_t)i * d->C + c) * hw;
            for (size_t k = 0; k < hw; k++) hist[p[k]]++;
        }
        // From the histogram: exact sums, no float accumulation drift over millions of pixels.
        double n = 0, s = 0, s2 = 0;
        for (int v = 0; v < 256; v++) {
            double x = v / 255.0;
            n += hist[v];
            s += hist[v] * x;
            s2 += hist[v] * x * x;
        }
        double m = n > 0 ? s / n : 0, var = n > 0 ? s2 / n - m * m : 0;
        mean[c] = (float)m;
        std[c] = (float)sqrt(var > 0 ? var : 0);
    }
}

typedef struct {
    const char *name;       // source prefix
    int kind;               // 0 idx, 1 cifar, 2 folder
    const char *default_dir;
    const char *const *classes;
    float mean[3], std[3];
} source_kind;

static const source_kind KINDS[] = {
    {"fashion-mnist", 0, "/usr/share/datasets/fashion-mnist", FASHION_NAMES, {0.2860f}, {0.3530f}},
    {"mnist", 0, "/usr/share/datasets/mnist", DIGIT_NAMES, {0.1307f}, {0.3081f}},
    {"cifar10", 1, NULL, CIFAR_NAMES, {0.4914f, 0.4822f, 0.4465f}, {0.2470f, 0.2435f, 0.2616f}},
    {"folder", 2, NULL, NULL, {0}, {0}},
};

static int load_one(dataset *d, const source_kind *k, const char *dir, int train, int size,
                    const strlist *classes) {
    memset(d, 0, sizeof *d);
    snprintf(d->name, sizeof d->name, "%s", k->name);
    memcpy(d->mean, k->mean, sizeof d->mean);
    memcpy(d->std, k->std, sizeof d->std);
    if (k->kind == 0) {
        if (names_set(d, k->classes, 10)) return -1;
        return idx_split(d, dir, train ? "train" : "t10k");
    }
    if (k->kind == 1) {
        static const char *const tr[] = {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin",
                                         "data_batch_4.bin", "data_batch_5.bin"};
        static const char *const te[] = {"test_batch.bin"};
        char sub[PATH_CAP], probe[PATH_CAP];
        if (path_join(sub, dir, "cifar-10-batches-bin") || path_join(probe, dir, "data_batch_1.bin"))
            return -1;
        const char *root = (!file_exists(probe) && dir_exists(sub)) ? sub : dir;
        if (!dir_exists(root)) return err_set("%s: data set directory not found", dir);
        if (cifar_names(d, root)) return -1;
        return train ? cifar_split(d, root, tr, 5) : cifar_split(d, root, te, 1);
    }
    d->class_names = calloc(classes->n, sizeof *d->class_names);
    if (!d->class_names) return err_set("out of memory");
    d->n_classes = classes->n;
    for (int i = 0; i < classes->n; i++)
        if (!(d->class_names[i] = strdup(classes->v[i]))) return err_set("out of memory");
    char root[PATH_CAP];
    if (path_join(root, dir, train ? "train" : "val")) return -1;
    if (!train && !dir_exists(root)) {
        if (path_join(root, dir, "test")) return -1;
        if (!dir_exists(root)) return err_set("%s: has no val/ (or test/) folder", dir);
    }
    return folder_split(d, root, classes, size);
}

int dataset_load(dataset *train, dataset *test, const char *source, int folder_size) {
    if (train) memset(train, 0, sizeof *train);
    if (test) memset(test, 0, sizeof *test);
    const source_kind *k = NULL;
    const char *dir = NULL;
    for (size_t i = 0; i < sizeof KINDS / sizeof *KINDS; i++) {
        size_t len = strlen(KINDS[i].name);
        if (!strncmp(source, KINDS[i].name, len) && (source[len] == 0 || source[len] == ':')) {
            k = &KINDS[i];
            dir = source[len] ? source + len + 1 : k->default_dir;
            break;
        }
    }
    if (!k) return err_set("data set '%s': unknown (fashion-mnist[:DIR], mnist[:DIR], cifar10:DIR, folder:DIR)", source);
    if (!dir || !*dir) return err_set("data set '%s': needs a directory (%s:DIR)", source, k->name);
    if (folder_size <= 0) folder_size = DATASET_FOLDER_SIZE;
    if (folder_size > 4096) return err_set("folder image size %d is too large (max 4096)", folder_size);
    strlist classes = {0};
    if (k->kind == 2) {
        char root[PATH_CAP];
        if (path_join(root, dir, "train")) return -1;
        if (!dir_exists(dir)) return err_set("%s: data set directory not found", dir);
        if (!dir_exists(root)) return err_set("%s: has no train/ folder", dir);
        if (dir_list(&classes, root, 1)) return -1;
        if (classes.n == 0) { strlist_free(&classes); return err_set("%s: no class subfolders", root); }
    }
    // The training split is needed for a folder's classes and statistics even if not wanted.
    dataset tmp;
    dataset *tr = train ? train : (k->kind == 2 ? &tmp : NULL);
    int rc = 0;
    if (tr) rc = load_one(tr, k, dir, 1, folder_size, &classes);
    if (!rc && test) rc = load_one(test, k, dir, 0, folder_size, &classes);
    strlist_free(&classes);
    if (!rc && k->kind == 2) {
        float m[3], s[3];
        dataset_stats(tr, m, s);
        for (int c = 0; c < 3; c++) if (s[c] <= 0) s[c] = 1;   // a constant-colour set
        memcpy(tr->mean, m, sizeof m); memcpy(tr->std, s, sizeof s);
        if (test) { memcpy(test->mean, m, sizeof m); memcpy(test->std, s, sizeof s); }
    }
    if (tr == &tmp) dataset_free(&tmp);
    if (rc) {
        if (train) dataset_free(train);
        if (test) dataset_free(test);
    }
    return rc;
}
