// Helper for tests/test_data.py (not a test itself): runs the data library on inputs the Python
// tests generate and writes raw results for them to compare against numpy/torch/torchvision.
//   datacheck load SOURCE PREFIX [folder_size]     -> PREFIX.{train,test}.{pix,lab}, JSON info
//   datacheck resize IN OUT C H W OH OW AA         -> float32 OUT = resize(float32 IN)
//   datacheck batch SOURCE PREFIX key=value...     -> PREFIX.x (f32), .y (i64), .crops (i32 x5)
//   datacheck rrc H W SEED S0 S1 R0 R1 N           -> JSON: draws per attempt and boxes
//   datacheck decode PATH C OUT                    -> raw uint8 CHW, JSON {H, W}
//   datacheck image PATH OUT RESIZE imagenet | C H W m0 m1 m2 s0 s1 s2
//   datacheck bench [SOURCE [SIZE [OUT_C]]]        -> JSON timings
// Errors: "datacheck: <message>" on stderr, exit 1.
#include "data/data.h"
#include "util/err.h"
#include "util/rng.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int fail(void) {
    fprintf(stderr, "datacheck: %s\n", err_msg());
    return 1;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int write_file(const char *prefix, const char *ext, const void *data, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s%s", prefix, ext);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0) return err_set("%s: cannot write", path);
    return 0;
}

static void *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) { err_set("%s: cannot open", path); return NULL; }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(len > 0 ? (size_t)len : 1);
    if (!buf || fread(buf, 1, (size_t)len, f) != (size_t)len) { free(buf); fclose(f); err_set("%s: read failed", path); return NULL; }
    fclose(f);
    *n = (size_t)len;
    return buf;
}

static void json_str(const char *s) {
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20) printf("\\u%04x", *s);
        else putchar(*s);
    }
    putchar('"');
}

static void json_split(const char *key, const dataset *d) {
    printf("\"%s\": {\"n\": %d, \"C\": %d, \"H\": %d, \"W\": %d, \"n_classes\": %d, \"name\": ",
           key, d->n, d->C, d->H, d->W, d->n_classes);
    json_str(d->name);
    printf(", \"classes\": [");
    for (int i = 0; i < d->n_classes; i++) {
        if (i) printf(", ");
        json_str(d->class_names[i]);
    }
    printf("], \"mean\": [%.9g, %.9g, %.9g], \"std\": [%.9g, %.9g, %.9g]}", d->mean[0], d->mean[1],
           d->mean[2], d->std[0], d->std[1], d->std[2]);
}

static int cmd_load(int argc, char **argv) {
    if (argc < 4) return err_set("usage: load SOURCE PREFIX [folder_size]"), fail();
    int size = argc > 4 ? atoi(argv[4]) : 0;
    dataset tr, te;
    double t0 = now();
    if (dataset_load(&tr, &te, argv[2], size)) return fail();
    double secs = now() - t0;
    int rc = 0;
    if (strcmp(argv[3], "-")) {
        const dataset *ds[2] = {&tr, &te};
        const char *ext[2][2] = {{".train.pix", ".train.lab"}, {".test.pix", ".test.lab"}};
        for (int k = 0; k < 2 && !rc; k++)
            rc = write_file(argv[3], ext[k][0], ds[k]->pixels, (size_t)ds[k]->n * ds[k]->C * ds[k]->H * ds[k]->W) ||
                 write_file(argv[3], ext[k][1], ds[k]->labels, sizeof(int64_t) * ds[k]->n);
    }
    if (!rc) {
        printf("{");
        json_split("train", &tr);
        printf(", ");
        json_split("test", &te);
        printf(", \"load_s\": %.4f}\n", secs);
    }
    dataset_free(&tr);
    dataset_free(&te);
    return rc ? fail() : 0;
}

static int cmd_resize(int argc, char **argv) {
    if (argc < 9) return err_set("usage: resize IN OUT C H W OH OW AA"), fail();
    int C = atoi(argv[4]), H = atoi(argv[5]), W = atoi(argv[6]), OH = atoi(argv[7]), OW = atoi(argv[8]);
    int aa = argc > 9 && atoi(argv[9]);
    size_t n;
    float *in = read_file(argv[2], &n);
    if (!in) return fail();
    if (n != sizeof(float) * C * H * W) { free(in); return err_set("%s: size mismatch", argv[2]), fail(); }
    float *out = malloc(sizeof(float) * C * OH * OW), *tmp = malloc(sizeof(float) * C * H * OW);
    int rc = 0;
    if (aa) rc = image_resize_aa(out, tmp, in, C, H, W, OH, OW);
    else image_resize(out, in, C, H, W, OH, OW);
    rc = rc || write_file(argv[3], "", out, sizeof(float) * C * OH * OW);
    free(in); free(out); free(tmp);
    return rc ? fail() : 0;
}

// key=value option with a default.
static double opt(int argc, char **argv, int from, const char *key, double def) {
    size_t len = strlen(key);
    for (int i = from; i < argc; i++)
        if (!strncmp(argv[i], key, len) && argv[i][len] == '=') return atof(argv[i] + len + 1);
    return def;
}

static int cmd_batch(int argc, char **argv) {
    if (argc < 4) return err_set("usage: batch SOURCE PREFIX key=value..."), fail();
    dataset tr, te;
    if (dataset_load(&tr, &te, argv[2], (int)opt(argc, argv, 4, "folder_size", 0))) return fail();
    const dataset *d = opt(argc, argv, 4, "test", 0) ? &te : &tr;
    preprocess p;
    int rc = preprocess_default(&p, d, (int)opt(argc, argv, 4, "image_size", 0),
                                (int)opt(argc, argv, 4, "out_c", 0), (int)opt(argc, argv, 4, "augment", 1));
    p.pad_crop = (int)opt(argc, argv, 4, "pad", p.pad_crop);
    p.hflip = (int)opt(argc, argv, 4, "hflip", p.hflip);
    p.erase_p = (float)opt(argc, argv, 4, "erase", p.erase_p);
    p.rrc = (int)opt(argc, argv, 4, "rrc", p.rrc);
    p.eval_crop = (float)opt(argc, argv, 4, "eval_crop", p.eval_crop);
    p.rrc_scale[0] = (float)opt(argc, argv, 4, "scale0", p.rrc_scale[0]);
    if (!rc) rc = preprocess_check(&p, d->C);
    int B = (int)opt(argc, argv, 4, "b", 8), train = (int)opt(argc, argv, 4, "train", 1);
    int shuffle = (int)opt(argc, argv, 4, "shuffle", 0);
    if (!rc && (B < 1 || B > d->n)) rc = err_set("b=%d not in 1..%d", B, d->n);
    if (rc) { dataset_free(&tr); dataset_free(&te); return fail(); }
    rng r, r2;
    rng_seed(&r, (uint64_t)opt(argc, argv, 4, "seed", 1));
    int *idx = malloc(sizeof(int) * d->n);
    for (int i = 0; i < d->n; i++) idx[i] = i;
    if (shuffle) indices_shuffle(idx, d->n, &r);
    size_t per = (size_t)p.out_C * p.out_H * p.out_W;
    float *x = malloc(sizeof(float) * per * B);
    int64_t *y = malloc(sizeof(int64_t) * B);
    int32_t *crops = malloc(sizeof(int32_t) * 10 * B);
    // Record the crops batch_make will use by drawing them from a copy of the generator in
    // the documented order.
    r2 = r;
    for (int b = 0; b < B; b++) {
        crop c;
        crop_draw(&c, d->H, d->W, &p, &r2, train);
        int32_t v[10] = {c.top, c.left, c.h, c.w, c.flip, idx[b], c.etop, c.eleft, c.eh, c.ew};
        memcpy(crops + 10 * b, v, sizeof v);
    }
    batch_make(x, y, d, idx, B, &p, &r, train);
    rc = write_file(argv[3], ".x", x, sizeof(float) * per * B) ||
         write_file(argv[3], ".y", y, sizeof(int64_t) * B) ||
         write_file(argv[3], ".crops", crops, sizeof(int32_t) * 10 * B);
    if (!rc)
        printf("{\"out_C\": %d, \"out_H\": %d, \"out_W\": %d, \"mean\": [%.9g, %.9g, %.9g], "
               "\"std\": [%.9g, %.9g, %.9g], \"pad\": %d, \"hflip\": %d, \"rrc\": %d, \"erase\": %.9g, "
               "\"eval_crop\": %.9g, \"H\": %d, \"W\": %d, \"C\": %d, \"next\": %llu}\n",
               p.out_C, p.out_H, p.out_W, p.mean[0], p.mean[1], p.mean[2], p.std[0], p.std[1],
               p.std[2], p.pad_crop, p.hflip, p.rrc, p.erase_p, p.eval_crop, d->H, d->W, d->C,
               (unsigned long long)rng_u64(&r));
    free(idx); free(x); free(y); free(crops);
    dataset_free(&tr);
    dataset_free(&te);
    return rc ? fail() : 0;
}

// rrc and erase: N boxes of rrc_box / erase_box, each with the draws its 10 attempts would take.
static int cmd_rrc(int argc, char **argv) {
    if (argc < 10) return err_set("usage: rrc|erase H W SEED S0 S1 R0 R1 N"), fail();
    int erase = !strcmp(argv[1], "erase");
    int H = atoi(argv[2]), W = atoi(argv[3]), N = atoi(argv[9]);
    float scale[2] = {(float)atof(argv[5]), (float)atof(argv[6])};
    float ratio[2] = {(float)atof(argv[7]), (float)atof(argv[8])};
    rng r;
    rng_seed(&r, (uint64_t)atoll(argv[4]));
    float lr0 = logf(ratio[0]), lr1 = logf(ratio[1]);
    printf("{\"ratio\": [%.9g, %.9g], \"boxes\": [", ratio[0], ratio[1]);
    for (int k = 0; k < N; k++) {
        // The draws of all 10 possible attempts, from a copy: the accepted attempt is the first
        // one that draws nothing else, so torchvision fed these values must pick the same box.
        rng c = r;
        printf("%s{\"draws\": [", k ? ", " : "");
        for (int a = 0; a < 10; a++) {
            float s = scale[0] + (float)rng_uniform(&c) * (scale[1] - scale[0]);
            float lr = lr0 + (float)rng_uniform(&c) * (lr1 - lr0);
            printf("%s[%.9g, %.9g]", a ? ", " : "", s, lr);
        }
        crop b;
        if (erase) {
            erase_box(&b, H, W, scale, ratio, &r);
            printf("], \"box\": [%d, %d, %d, %d]}", b.etop, b.eleft, b.eh, b.ew);
        } else {
            rrc_box(&b, H, W, scale, ratio, &r);
            printf("], \"box\": [%d, %d, %d, %d]}", b.top, b.left, b.h, b.w);
        }
    }
    printf("]}\n");
    return 0;
}

static int cmd_decode(int argc, char **argv) {
    if (argc < 5) return err_set("usage: decode PATH C OUT"), fail();
    uint8_t *pix;
    int H, W, C = atoi(argv[3]);
    if (image_decode(&pix, &H, &W, argv[2], C)) return fail();
    int rc = write_file(argv[4], "", pix, (size_t)C * H * W);
    free(pix);
    if (rc) return fail();
    printf("{\"H\": %d, \"W\": %d}\n", H, W);
    return 0;
}

static int cmd_image(int argc, char **argv) {
    if (argc < 6) return err_set("usage: image PATH OUT RESIZE imagenet|C H W m0 m1 m2 s0 s1 s2"), fail();
    preprocess p;
    if (!strcmp(argv[5], "imagenet")) {
        preprocess_imagenet(&p);
    } else {
        if (argc < 14) return err_set("image: need C H W m0 m1 m2 s0 s1 s2"), fail();
        memset(&p, 0, sizeof p);
        p.out_C = atoi(argv[5]);
        p.out_H = atoi(argv[6]);
        p.out_W = atoi(argv[7]);
        for (int c = 0; c < 3; c++) p.mean[c] = (float)atof(argv[8 + c]), p.std[c] = (float)atof(argv[11 + c]);
        p.eval_crop = 1;
    }
    size_t n = (size_t)p.out_C * p.out_H * p.out_W;
    float *out = malloc(sizeof(float) * (n ? n : 1));
    int rc = image_load(out, argv[2], atoi(argv[4]), &p) || write_file(argv[3], "", out, sizeof(float) * n);
    free(out);
    return rc ? fail() : 0;
}

static int cmd_bench(int argc, char **argv) {
    const char *src = argc > 2 ? argv[2] : "fashion-mnist";
    dataset tr, te;
    double t0 = now();
    if (dataset_load(&tr, &te, src, 0)) return fail();
    double load = now() - t0;
    preprocess p;
    int size = argc > 3 ? atoi(argv[3]) : 32, out_c = argc > 4 ? atoi(argv[4]) : 0;
    if (preprocess_default(&p, &tr, size, out_c, 1)) return fail();
    int B = 128, reps = 20;
    float *x = malloc(sizeof(float) * B * p.out_C * p.out_H * p.out_W);
    int64_t *y = malloc(sizeof(int64_t) * B);
    int *idx = malloc(sizeof(int) * tr.n);
    for (int i = 0; i < tr.n; i++) idx[i] = i;
    rng r;
    rng_seed(&r, 7);
    indices_shuffle(idx, tr.n, &r);
    batch_make(x, y, &tr, idx, B, &p, &r, 1);   // warm up
    t0 = now();
    for (int k = 0; k < reps; k++) batch_make(x, y, &tr, idx + k * B, B, &p, &r, 1);
    double batch = (now() - t0) / reps;
    printf("{\"n_train\": %d, \"n_test\": %d, \"load_s\": %.4f, \"batch128_ms\": %.4f}\n", tr.n, te.n,
           load, batch * 1e3);
    free(x); free(y); free(idx);
    dataset_free(&tr);
    dataset_free(&te);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: datacheck load|resize|batch|rrc|decode|image|bench ...\n"); return 2; }
    const char *c = argv[1];
    if (!strcmp(c, "load")) return cmd_load(argc, argv);
    if (!strcmp(c, "resize")) return cmd_resize(argc, argv);
    if (!strcmp(c, "batch")) return cmd_batch(argc, argv);
    if (!strcmp(c, "rrc") || !strcmp(c, "erase")) return cmd_rrc(argc, argv);
    if (!strcmp(c, "decode")) return cmd_decode(argc, argv);
    if (!strcmp(c, "image")) return cmd_image(argc, argv);
    if (!strcmp(c, "bench")) return cmd_bench(argc, argv);
    fprintf(stderr, "datacheck: unknown command '%s'\n", c);
    return 2;
}
