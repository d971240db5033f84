// Preprocessing, augmentation and batch assembly (see data.h for the pipeline).
#include "data/data.h"
#include "util/err.h"
#include <math.h>
#include <string.h>

#define MAX_SIDE 4096

int preprocess_check(const preprocess *p, int C) {
    if (p->out_C != 1 && p->out_C != 3) return err_set("preprocess: %d output channels (1 or 3)", p->out_C);
    if (C != 1 && C != 3) return err_set("preprocess: data with %d channels (1 or 3)", C);
    if (C == 3 && p->out_C == 1) return err_set("preprocess: colour images cannot be fed to a 1-channel input");
    if (p->out_H < 1 || p->out_H > MAX_SIDE || p->out_W < 1 || p->out_W > MAX_SIDE)
        return err_set("preprocess: image size %dx%d out of range 1..%d", p->out_H, p->out_W, MAX_SIDE);
    for (int c = 0; c < p->out_C; c++)
        if (!(p->std[c] > 0) || !isfinite(p->std[c]) || !isfinite(p->mean[c]))
            return err_set("preprocess: channel %d has mean %g std %g (std must be > 0)", c,
                           p->mean[c], p->std[c]);
    if (!(p->eval_crop > 0 && p->eval_crop <= 1))
        return err_set("preprocess: eval crop fraction %g not in (0, 1]", p->eval_crop);
    if (p->pad_crop < 0 || p->pad_crop > 1024)
        return err_set("preprocess: crop padding %d out of range 0..1024", p->pad_crop);
    if (p->rrc && !(p->rrc_scale[0] > 0 && p->rrc_scale[0] <= p->rrc_scale[1] && p->rrc_scale[1] <= 1 &&
                    p->rrc_ratio[0] > 0 && p->rrc_ratio[0] <= p->rrc_ratio[1] && isfinite(p->rrc_ratio[1])))
        return err_set("preprocess: random resized crop scale (%g, %g) / ratio (%g, %g) invalid "
                       "(need 0 < scale lo <= hi <= 1, 0 < ratio lo <= hi)", p->rrc_scale[0],
                       p->rrc_scale[1], p->rrc_ratio[0], p->rrc_ratio[1]);
    if (!(p->erase_p >= 0 && p->erase_p <= 1))
        return err_set("preprocess: random erasing probability %g not in [0, 1]", p->erase_p);
    if (p->erase_p > 0 && !(p->erase_scale[0] > 0 && p->erase_scale[0] <= p->erase_scale[1] &&
                            p->erase_scale[1] <= 1 && p->erase_ratio[0] > 0 &&
                            p->erase_ratio[0] <= p->erase_ratio[1] && isfinite(p->erase_ratio[1])))
        return err_set("preprocess: random erasing scale (%g, %g) / ratio (%g, %g) invalid "
                       "(need 0 < scale lo <= hi <= 1, 0 < ratio lo <= hi)", p->erase_scale[0],
                       p->erase_scale[1], p->erase_ratio[0], p->erase_ratio[1]);
    return 0;
}

int preprocess_default(preprocess *p, const dataset *d, int image_size, int out_C, int augment) {
    memset(p, 0, sizeof *p);
    p->out_C = out_C > 0 ? out_C : d->C;
    p->out_H = image_size > 0 ? image_size : d->H;
    p->out_W = image_size > 0 ? image_size : d->W;
    for (int c = 0; c < 3; c++) {
        int src = d->C == 1 ? 0 : c;   // grey replicated to 3 channels keeps its statistics
        p->mean[c] = d->mean[src];
        p->std[c] = d->std[src];
    }
    p->eval_crop = 1.0f;
    p->augment = augment;
    if (!strcmp(d->name, "mnist")) {
        p->pad_crop = 2;                       // digits must not be mirrored
    } else if (!strcmp(d->name, "fashion-mnist")) {
        p->pad_crop = 2;
        p->hflip = 1;
    } else if (!strcmp(d->name, "cifar10")) {
        p->pad_crop = 4;
        p->hflip = 1;
    } else {
        p->rrc = 1;
        p->hflip = 1;
        p->eval_crop = 0.875f;                 // Resize(256) + CenterCrop(224)
    }
    p->rrc_scale[0] = 0.08f;
    p->rrc_scale[1] = 1.0f;
    p->rrc_ratio[0] = 3.0f / 4.0f;
    p->rrc_ratio[1] = 4.0f / 3.0f;
    p->erase_scale[0] = 0.02f;                 // torchvision RandomErasing's defaults
    p->erase_scale[1] = 0.33f;
    p->erase_ratio[0] = 0.3f;
    p->erase_ratio[1] = 3.3f;
    return preprocess_check(p, d->C);
}

void preprocess_imagenet(preprocess *p) {
    static const float mean[3] = {0.485f, 0.456f, 0.406f}, std[3] = {0.229f, 0.224f, 0.225f};
    memset(p, 0, sizeof *p);
    p->out_C = 3;
    p->out_H = p->out_W = 224;
    memcpy(p->mean, mean, sizeof mean);
    memcpy(p->std, std, sizeof std);
    p->eval_crop = 1.0f;
}

void indices_shuffle(int *idx, int n, rng *r) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)rng_below(r, (uint32_t)i + 1);
        int t = idx[i];
        idx[i] = idx[j];
        idx[j] = t;
    }
}

// Python's round(): half to even (the default rounding mode of nearbyint).
static int py_round(double x) { return (int)nearbyint(x); }

void rrc_box(crop *c, int H, int W, const float scale[2], const float ratio[2], rng *r) {
    double area = (double)H * W;
    // torchvision does these draws in float32 tensors; mirror that.
    float lr0 = logf(ratio[0]), lr1 = logf(ratio[1]);
    c->flip = 0;
    for (int attempt = 0; attempt < 10; attempt++) {
        float s = scale[0] + (float)rng_uniform(r) * (scale[1] - scale[0]);
        float lr = lr0 + (float)rng_uniform(r) * (lr1 - lr0);
        double target = area * s, ar = expf(lr);
        int w = py_round(sqrt(target * ar)), h = py_round(sqrt(target / ar));
        if (0 < w && w <= W && 0 < h && h <= H) {
            c->top = (int)rng_below(r, (uint32_t)(H - h + 1));
            c->left = (int)rng_below(r, (uint32_t)(W - w + 1));
            c->h = h;
            c->w = w;
            return;
        }
    }
    // Fallback: centre crop, clamped to the ratio range.
    double in_ratio = (double)W / H;
    int w, h;
    if (in_ratio < ratio[0]) { w = W; h = py_round(w / (double)ratio[0]); }
    else if (in_ratio > ratio[1]) { h = H; w = py_round(h * (double)ratio[1]); }
    else { w = W; h = H; }
    c->top = (H - h) / 2;
    c->left = (W - w) / 2;
    c->h = h;
    c->w = w;
}

void erase_box(crop *c, int H, int W, const float scale[2], const float ratio[2], rng *r) {
    double area = (double)H * W;
    float lr0 = logf(ratio[0]), lr1 = logf(ratio[1]);   // float32 draws, as rrc_box
    c->etop = c->eleft = c->eh = c->ew = 0;
    for (int attempt = 0; attempt < 10; attempt++) {
        float s = scale[0] + (float)rng_uniform(r) * (scale[1] - scale[0]);
        float lr = lr0 + (float)rng_uniform(r) * (lr1 - lr0);
        double target = area * s, ar = expf(lr);
        // Unlike RandomResizedCrop, torchvision's erasing takes the ratio as h / w.
        int h = py_round(sqrt(target * ar)), w = py_round(sqrt(target / ar));
        if (h < H && w < W) {
            c->etop = (int)rng_below(r, (uint32_t)(H - h + 1));
            c->eleft = (int)rng_below(r, (uint32_t)(W - w + 1));
            c->eh = h;
            c->ew = w;
            return;
        }
    }
}

void crop_draw(crop *c, int H, int W, const preprocess *p, rng *r, int train) {
    c->etop = c->eleft = c->eh = c->ew = 0;
    if (train && p->augment && r) {
        if (p->rrc) {
            rrc_box(c, H, W, p->rrc_scale, p->rrc_ratio, r);
        } else {
            int pad = p->pad_crop;
            // RandomCrop((H, W), padding=pad): offsets 0..2*pad into the padded image.
            c->top = pad ? (int)rng_below(r, 2 * (uint32_t)pad + 1) - pad : 0;
            c->left = pad ? (int)rng_below(r, 2 * (uint32_t)pad + 1) - pad : 0;
            c->h = H;
            c->w = W;
        }
        c->flip = p->hflip ? rng_uniform(r) < 0.5 : 0;
        if (p->erase_p > 0 && rng_uniform(r) < p->erase_p)
            erase_box(c, p->out_H, p->out_W, p->erase_scale, p->erase_ratio, r);
        return;
    }
    // CenterCrop(round(f*H), round(f*W)): offsets as torchvision (round half to even).
    c->h = p->eval_crop < 1 ? py_round(H * (double)p->eval_crop) : H;
    c->w = p->eval_crop < 1 ? py_round(W * (double)p->eval_crop) : W;
    if (c->h < 1) c->h = 1;
    if (c->w < 1) c->w = 1;
    c->top = py_round((H - c->h) / 2.0);
    c->left = py_round((W - c->w) / 2.0);
    c->flip = 0;
}

// Source position of output index o when `len` crop pixels starting at `start` are resized
// to `out` (PyTorch's arithmetic, align_corners=False). Indices are into a row padded
// with one zero on each side: 0 = outside the image, k+1 = pixel k.
static void tap(int *i0, int *i1, float *l0, float *l1, int o, int start, int len, int out,
                int size) {
    int x0, x1;
    float lam;
    if (len == out) {
        x0 = x1 = o;
        lam = 0.0f;
    } else {
        float scale = (float)len / (float)out;
        double src = (double)scale * (o + 0.5) - 0.5;   // as image.c: PyTorch's promotions
        if (src < 0.0) src = 0.0;
        x0 = (int)src;
        if (x0 > len - 1) x0 = len - 1;
        lam = (float)(src - x0);
        if (lam > 1.0f) lam = 1.0f;
        x1 = x0 + (x0 < len - 1);
    }
    x0 += start;
    x1 += start;
    *i0 = (x0 >= 0 && x0 < size) ? x0 + 1 : 0;
    *i1 = (x1 >= 0 && x1 < size) ? x1 + 1 : 0;
    *l0 = 1.0f - lam;
    *l1 = lam;
}

// Converts source row y of plane `plane` into padded floats in [0,1] as ToTensor (v / 255.0f) (zeros at 0 and W+1; all zeros
// when the row is outside the image).
static void row_load(float *dst, const uint8_t *plane, int y, int H, int W) {
    dst[0] = dst[W + 1] = 0.0f;
    if (y < 0 || y >= H) { memset(dst + 1, 0, sizeof(float) * W); return; }
    const uint8_t *s = plane + (size_t)y * W;
    for (int x = 0; x < W; x++) dst[x + 1] = (float)s[x] / 255.0f;
}

void crop_render(float *out, const uint8_t *img, int C, int H, int W, const crop *c,
                 const preprocess *p) {
    int OH = p->out_H, OW = p->out_W;
    int xi0[MAX_SIDE], xi1[MAX_SIDE];
    float xl0[MAX_SIDE], xl1[MAX_SIDE], ra[MAX_SIDE + 2], rb[MAX_SIDE + 2];
    for (int ox = 0; ox < OW; ox++) {
        int k = c->flip ? OW - 1 - ox : ox;   // mirrored output reads the mirrored column
        tap(&xi0[ox], &xi1[ox], &xl0[ox], &xl1[ox], k, c->left, c->w, OW, W);
    }
    int planes = C;
    for (int ch = 0; ch < planes; ch++) {
        const uint8_t *plane = img + (size_t)ch * H * W;
        float *o = out + (size_t)ch * OH * OW;
        int ya = -2, yb = -2;   // rows currently held in ra, rb (as tap indices)
        for (int oy = 0; oy < OH; oy++) {
            int y0, y1;
            float h0, h1;
            tap(&y0, &y1, &h0, &h1, oy, c->top, c->h, OH, H);
            // Tap index 0 is "outside": load a zero row for it (row -1).
            if (y0 != ya) {
                if (y0 == yb) { memcpy(ra, rb, sizeof(float) * (W + 2)); }
                else row_load(ra, plane, y0 - 1, H, W);
                ya = y0;
            }
            if (y1 != yb) { row_load(rb, plane, y1 - 1, H, W); yb = y1; }
            float *row = o + (size_t)oy * OW;
            for (int ox = 0; ox < OW; ox++) {
                float t0 = ra[xi0[ox]] * xl0[ox] + ra[xi1[ox]] * xl1[ox];
                float t1 = rb[xi0[ox]] * xl0[ox] + rb[xi1[ox]] * xl1[ox];
                row[ox] = t0 * h0 + t1 * h1;
            }
        }
    }
    // Grey replicated to three channels, then Normalize per channel.
    for (int ch = planes; ch < p->out_C; ch++)
        memcpy(out + (size_t)ch * OH * OW, out, sizeof(float) * OH * OW);
    for (int ch = 0; ch < p->out_C; ch++) {
        float m = p->mean[ch], s = p->std[ch], *o = out + (size_t)ch * OH * OW;
        for (int i = 0; i < OH * OW; i++) o[i] = (o[i] - m) / s;
        for (int y = c->etop; y < c->etop + c->eh; y++)   // RandomErasing, value 0
            memset(o + (size_t)y * OW + c->eleft, 0, sizeof(float) * c->ew);
    }
}

void batch_make(float *x, int64_t *y, const dataset *d, const int *idx, int B,
                const preprocess *p, rng *r, int train) {
    size_t in_sz = (size_t)d->C * d->H * d->W, out_sz = (size_t)p->out_C * p->out_H * p->out_W;
    for (int b = 0; b < B; b++) {
        crop c;
        crop_draw(&c, d->H, d->W, p, r, train);
        crop_render(x + b * out_sz, d->pixels + (size_t)idx[b] * in_sz, d->C, d->H, d->W, &c, p);
        if (y) y[b] = d->labels[idx[b]];
    }
}
