// Image decoding (stb_image) and the bilinear resizes that match torch.nn.functional.interpolate.
#include "data/data.h"
#include "util/err.h"
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STBI_ONLY_JPEG
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#define STBI_NO_STDIO
#include <stb_image.h>   // implementation compiled in stb_image.c

// Prefixes the current error message with "path: ".
static int err_prefix(const char *path) { return err_set("%s: %s", path, err_msg()); }

// The whole file in memory (stb reads from memory so that I/O errors get their own message).
static int file_slurp(unsigned char **buf, size_t *len, const char *path) {
    *buf = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return err_set("%s: cannot open: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    unsigned char *b = malloc(cap);
    while (b) {
        size_t got = fread(b + n, 1, cap - n, f);
        n += got;
        if (n < cap) break;
        if (cap >= (size_t)INT_MAX) { free(b); fclose(f); return err_set("%s: file too large", path); }
        unsigned char *nb = realloc(b, cap * 2);
        if (!nb) { free(b); b = NULL; break; }
        b = nb;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!b) return err_set("%s: out of memory", path);
    if (bad) { free(b); return err_set("%s: read error", path); }
    *buf = b;
    *len = n;
    return 0;
}

// Debian's stb_image (2022-09 snapshot) trusts a JPEG Huffman table's code counts: counts
// summing past 256 make it write past its tables (fixed upstream by stb PR 1297). Walk the
// file's marker segments as stb does, and refuse such a table before stb reads it. Where stb would
// scan byte by byte (entropy-coded data, junk between segments) this looks at every marker, a
// superset of the ones stb processes; where stb skips a segment by its length, so does this.
static int jpeg_huffman_ok(const unsigned char *p, size_t n) {
    if (n < 2 || p[0] != 0xFF || p[1] != 0xD8) return 1;     // not a JPEG
    size_t i = 2;
    while (i < n) {
        if (p[i] != 0xFF) { i++; continue; }
        while (i < n && p[i] == 0xFF) i++;                     // fill bytes
        if (i + 2 >= n) break;
        const unsigned m = p[i++];
        if (m == 0x00 || m == 0x01 || (m >= 0xD0 && m <= 0xD8)) continue;  // no length
        if (m == 0xD9) break;                                  // EOI: stb stops
        size_t end = i + ((size_t)p[i] << 8 | p[i + 1]);       // the length counts itself
        if (m == 0xC4) {
            // stb reads each table's 16 counts (0 past the end of the file), then as many
            // values as they add up to, and only then compares what it read with the
            // segment's length
            size_t t = i + 2;
            while (t < end && t < n) {
                unsigned sum = 0;
                for (size_t k = t + 1; k <= t + 16 && k < n; k++) sum += p[k];
                if (sum > 256) return 0;
                t += 17 + sum;
            }
        }
        i = end;
    }
    return 1;
}

// stb's failure reason, with any byte it copied from the file (an unknown PNG chunk's name)
// made printable: the message stays one line.
static const char *stb_reason(char *buf, size_t size) {
    snprintf(buf, size, "%s", stbi_failure_reason() ? stbi_failure_reason() : "unknown error");
    for (char *c = buf; *c; c++)
        if ((unsigned char)*c < 0x20 || (unsigned char)*c > 0x7e) *c = '?';
    return buf;
}

int image_decode(uint8_t **pix, int *H, int *W, const char *path, int C) {
    *pix = NULL;
    if (C != 1 && C != 3) return err_set("%s: cannot decode to %d channels (1 or 3)", path, C);
    unsigned char *buf;
    size_t len;
    if (file_slurp(&buf, &len, path)) return -1;
    if (len == 0) { free(buf); return err_set("%s: empty file, not an image", path); }
    if (!jpeg_huffman_ok(buf, len)) {
        free(buf);
        return err_set("%s: cannot decode image (corrupt JPEG: a Huffman table of over 256 codes)",
                       path);
    }
    int w, h, comp;
    // Colour to grey is done below with PIL's weights, so ask stb for RGB unless the file is grey.
    int ok = stbi_info_from_memory(buf, (int)len, &w, &h, &comp);
    int want = (C == 3 || (ok && comp >= 3)) ? 3 : 1;
    unsigned char *img = ok ? stbi_load_from_memory(buf, (int)len, &w, &h, &comp, want) : NULL;
    free(buf);
    char why[128];
    if (!img) return err_set("%s: cannot decode image (%s)", path, stb_reason(why, sizeof why));
    size_t hw = (size_t)w * h;
    uint8_t *out = malloc(hw * C);
    if (!out) { stbi_image_free(img); return err_set("%s: out of memory (%dx%d)", path, w, h); }
    if (want == C) {
        for (int c = 0; c < C; c++)
            for (size_t i = 0; i < hw; i++) out[c * hw + i] = img[i * C + c];
    } else {
        // PIL ImagingConvert RGB->L: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
        for (size_t i = 0; i < hw; i++) {
            const unsigned char *p = img + 3 * i;
            out[i] = (uint8_t)((p[0] * 19595u + p[1] * 38470u + p[2] * 7471u + 0x8000u) >> 16);
        }
    }
    stbi_image_free(img);
    *pix = out;
    *H = h;
    *W = w;
    return 0;
}

// Source index and weights of one output coordinate exactly as PyTorch's CPU
// upsample_bilinear2d computes them (align_corners=False): the scale in float, the source
// position in double (int + 0.5 promotes), the weight rounded to float.
static void linear_coord(int *i0, int *i1, float *l0, float *l1, int o, int in, int out) {
    if (in == out) { *i0 = *i1 = o; *l0 = 1.0f; *l1 = 0.0f; return; }
    float scale = (float)in / (float)out;
    double src = (double)scale * (o + 0.5) - 0.5;
    if (src < 0.0) src = 0.0;
    int x0 = (int)src;
    if (x0 > in - 1) x0 = in - 1;
    float lam = (float)(src - x0);
    if (lam > 1.0f) lam = 1.0f;
    *i0 = x0;
    *i1 = x0 + (x0 < in - 1);
    *l1 = lam;
    *l0 = 1.0f - lam;
}

void image_resize(float *out, const float *in, int C, int H, int W, int OH, int OW) {
    enum { MAXW = 4096 };
    int xs0[MAXW], xs1[MAXW];
    float xl0[MAXW], xl1[MAXW];
    if (OW > MAXW) {
        // Rare huge outputs: compute the column weights per pixel instead of caching them.
        for (int c = 0; c < C; c++)
            for (int oy = 0; oy < OH; oy++) {
                int y0, y1; float h0, h1;
                linear_coord(&y0, &y1, &h0, &h1, oy, H, OH);
                const float *r0 = in + ((size_t)c * H + y0) * W, *r1 = in + ((size_t)c * H + y1) * W;
                float *o = out + ((size_t)c * OH + oy) * OW;
                for (int ox = 0; ox < OW; ox++) {
                    int x0, x1; float w0, w1;
                    linear_coord(&x0, &x1, &w0, &w1, ox, W, OW);
                    float t0 = r0[x0] * w0 + r0[x1] * w1, t1 = r1[x0] * w0 + r1[x1] * w1;
                    o[ox] = t0 * h0 + t1 * h1;
                }
            }
        return;
    }
    for (int ox = 0; ox < OW; ox++) linear_coord(&xs0[ox], &xs1[ox], &xl0[ox], &xl1[ox], ox, W, OW);
    for (int c = 0; c < C; c++)
        for (int oy = 0; oy < OH; oy++) {
            int y0, y1; float h0, h1;
            linear_coord(&y0, &y1, &h0, &h1, oy, H, OH);
            const float *r0 = in + ((size_t)c * H + y0) * W, *r1 = in + ((size_t)c * H + y1) * W;
            float *o = out + ((size_t)c * OH + oy) * OW;
            // Width first, then height, in PyTorch's order of float operations.
            for (int ox = 0; ox < OW; ox++) {
                float t0 = r0[xs0[ox]] * xl0[ox] + r0[xs1[ox]] * xl1[ox];
                float t1 = r1[xs0[ox]] * xl0[ox] + r1[xs1[ox]] * xl1[ox];
                o[ox] = t0 * h0 + t1 * h1;
            }
        }
}

// Antialiased weights of output index o (PyTorch _compute_indices_weights_aa, bilinear =
// triangle filter of support 1, widened by the scale when shrinking). wt gets *n weights.
static void aa_weights(int *start, int *n, float *wt, int o, int in, int out) {
    // Mixed float/double arithmetic on purpose: it is what the C++ promotions in PyTorch do.
    float scale = (float)in / (float)out;
    float support = scale >= 1.0f ? scale : 1.0f;
    float invscale = scale >= 1.0f ? 1.0f / scale : 1.0f;
    float center = (float)((double)scale * (o + 0.5));
    int xmin = (int)((double)center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = (int)((double)center + support + 0.5);
    if (xmax > in) xmax = in;
    float total = 0.0f;
    for (int j = 0; j < xmax - xmin; j++) {
        float x = (float)(((double)(j + xmin) - center + 0.5) * invscale);
        float w = fabsf(x) < 1.0f ? 1.0f - fabsf(x) : 0.0f;
        wt[j] = w;
        total += w;
    }
    for (int j = 0; j < xmax - xmin; j++)
        if (total != 0.0f) wt[j] /= total;
    *start = xmin;
    *n = xmax - xmin;
}

// One separable pass: resample `len` samples spaced `stride` apart, for `lines` lines.
// wt holds in_len + 2 floats (the widest support).
static void aa_pass(float *out, float *wt, const float *in, int lines, size_t line_in,
                    size_t line_out, size_t stride, int in_len, int out_len) {
    for (int o = 0; o < out_len; o++) {
        int s, n;
        aa_weights(&s, &n, wt, o, in_len, out_len);
        for (int l = 0; l < lines; l++) {
            for (size_t k = 0; k < stride; k++) {
                const float *src = in + l * line_in + (size_t)s * stride + k;
                float acc = n > 0 ? src[0] * wt[0] : 0.0f;
                for (int j = 1; j < n; j++) acc += src[(size_t)j * stride] * wt[j];
                out[l * line_out + (size_t)o * stride + k] = acc;
            }
        }
    }
}

int image_resize_aa(float *out, float *tmp, const float *in, int C, int H, int W, int OH, int OW) {
    float *wt = malloc(sizeof(float) * ((size_t)(H > W ? H : W) + 2));
    if (!wt) return err_set("out of memory resizing a %dx%d image", W, H);
    // PyTorch resamples the contiguous (width) dimension first, skipping unchanged ones.
    const float *src = in;
    if (OW != W) {
        float *dst = (OH != H) ? tmp : out;
        aa_pass(dst, wt, in, C * H, W, OW, 1, W, OW);
        src = dst;
    }
    if (OH != H) {
        aa_pass(out, wt, src, C, (size_t)H * OW, (size_t)OH * OW, OW, H, OH);
        src = out;
    }
    if (src != out) memcpy(out, in, sizeof(float) * C * H * W);
    free(wt);
    return 0;
}

// Python's round() on the ratio x/2 (half to even), as torchvision's center_crop offsets.
static int half_round(int x) { return (int)nearbyint(x / 2.0); }

// Shorter side -> size as torchvision Resize(int): the longer side is int(size * long / short).
static void shorter_side(int *OH, int *OW, int H, int W, int size) {
    if (H <= W) { *OH = size; *OW = (int)((double)size * W / H); }
    else        { *OW = size; *OH = (int)((double)size * H / W); }
    if (*OH < 1) *OH = 1;
    if (*OW < 1) *OW = 1;
}

// Resizes (shorter side) then centre-crops to OH x OW floats; both in the [0,255] scale.
static int resize_center(float *out, const uint8_t *in, int C, int H, int W, int size,
                         int OH, int OW) {
    int RH, RW;
    shorter_side(&RH, &RW, H, W, size);
    if (OH > RH || OW > RW) return err_set("crop %dx%d is larger than the resized image %dx%d", OH, OW, RH, RW);
    size_t n_in = (size_t)C * H * W;
    float *f = malloc(sizeof(float) * (n_in + (size_t)C * H * RW + (size_t)C * RH * RW));
    if (!f) return err_set("out of memory resizing a %dx%d image", H, W);
    float *tmp = f + n_in, *res = tmp + (size_t)C * H * RW;
    for (size_t i = 0; i < n_in; i++) f[i] = in[i];
    if (image_resize_aa(res, tmp, f, C, H, W, RH, RW)) { free(f); return -1; }
    int top = half_round(RH - OH), left = half_round(RW - OW);
    for (int c = 0; c < C; c++)
        for (int y = 0; y < OH; y++)
            memcpy(out + ((size_t)c * OH + y) * OW, res + ((size_t)c * RH + top + y) * RW + left,
                   sizeof(float) * OW);
    free(f);
    return 0;
}

static float pixel_round(float v) {
    v = floorf(v + 0.5f);
    return v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v;
}

int image_resize_square(uint8_t *out, const uint8_t *in, int C, int H, int W, int size) {
    float *f = malloc(sizeof(float) * C * size * size);
    if (!f) return err_set("out of memory resizing a %dx%d image", H, W);
    if (resize_center(f, in, C, H, W, size, size, size)) { free(f); return -1; }
    for (size_t i = 0; i < (size_t)C * size * size; i++) out[i] = (uint8_t)pixel_round(f[i]);
    free(f);
    return 0;
}

int image_load(float *out, const char *path, int resize, const preprocess *p) {
    if (preprocess_check(p, p->out_C)) return err_prefix(path);
    uint8_t *pix;
    int H, W, C = p->out_C, OH = p->out_H, OW = p->out_W;
    if (image_decode(&pix, &H, &W, path, C)) return -1;
    int rc;
    if (resize > 0) {
        rc = resize_center(out, pix, C, H, W, resize, OH, OW);
        if (rc) err_prefix(path);
        // Rounded to 8 bits like PIL's Resize and like stored folder images, so a folder
        // model's val pipeline and this agree exactly.
        else for (size_t i = 0; i < (size_t)C * OH * OW; i++) out[i] = pixel_round(out[i]);
    } else {
        size_t n_in = (size_t)C * H * W;
        float *f = malloc(sizeof(float) * (n_in + (size_t)C * H * OW));
        rc = f ? 0 : err_set("%s: out of memory (%dx%d)", path, W, H);
        if (f) {
            for (size_t i = 0; i < n_in; i++) f[i] = pix[i];
            rc = image_resize_aa(out, f + n_in, f, C, H, W, OH, OW);
            free(f);
            if (rc) err_prefix(path);
        }
    }
    free(pix);
    if (rc) return -1;
    // [0,255] -> [0,1] -> normalised, as ToTensor + Normalize (resizing commutes with /255 up
    // to float rounding).
    for (int c = 0; c < C; c++) {
        float *o = out + (size_t)c * OH * OW;
        for (int i = 0; i < OH * OW; i++) o[i] = (o[i] / 255.0f - p->mean[c]) / p->std[c];
    }
    return 0;
}
