// Training-curves PNG: a tiny software rasteriser (anti-aliased lines and discs, stb_easy_font
// glyphs drawn as filled rectangles) and stb_image_write for the PNG, deflated with zlib.
#include "train/plot.h"
#include "util/err.h"
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

// zlib compresses much better than stb's own deflate; stb frees the result with STBIW_FREE.
static unsigned char *png_deflate(unsigned char *data, int len, int *out_len, int quality) {
    (void)quality;
    uLongf n = compressBound((uLong)len);
    unsigned char *out = malloc(n);
    if (!out || compress2(out, &n, data, (uLong)len, 9) != Z_OK) {
        free(out);
        return NULL;
    }
    *out_len = (int)n;
    return out;
}

// Third-party headers: static (no clash with another copy elsewhere), their warnings silenced.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wmissing-braces"
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBIW_ZLIB_COMPRESS png_deflate
#include <stb_image_write.h>
#include <stb_easy_font.h>
#pragma GCC diagnostic pop

typedef struct { unsigned char r, g, b; } rgb;
typedef struct { int x0, y0, x1, y1; } rect;   // pixels [x0, x1) x [y0, y1)

static const rgb C_TRAIN = {PLOT_TRAIN_RGB}, C_TEST = {PLOT_TEST_RGB};
static const rgb C_TEXT = {34, 34, 34}, C_FRAME = {90, 90, 90}, C_GRID = {228, 228, 228};

typedef struct {
    int w, h;
    unsigned char *px;   // RGB rows
    float *cov;          // coverage scratch, one float per pixel
} canvas;

static void blend(canvas *c, int x, int y, rgb col, float a) {
    if (x < 0 || y < 0 || x >= c->w || y >= c->h || a <= 0) return;
    if (a > 1) a = 1;
    unsigned char *p = c->px + 3 * ((size_t)y * c->w + x);
    p[0] = (unsigned char)lroundf(p[0] + (col.r - p[0]) * a);
    p[1] = (unsigned char)lroundf(p[1] + (col.g - p[1]) * a);
    p[2] = (unsigned char)lroundf(p[2] + (col.b - p[2]) * a);
}

// A filled rectangle with fractional edges (area coverage at the border pixels).
static void fill_rectf(canvas *c, float x0, float y0, float x1, float y1, rgb col) {
    for (int y = (int)floorf(y0); y < (int)ceilf(y1); y++) {
        float cy = fminf(y + 1, y1) - fmaxf(y, y0);
        for (int x = (int)floorf(x0); x < (int)ceilf(x1); x++)
            blend(c, x, y, col, cy * (fminf(x + 1, x1) - fmaxf(x, x0)));
    }
}

static void fill_rect(canvas *c, rect r, rgb col) {
    fill_rectf(c, (float)r.x0, (float)r.y0, (float)r.x1, (float)r.y1, col);
}

// ---- text: stb_easy_font emits axis-aligned unit quads; we scale and fill them ----

#define GLYPH_H 7.0f   // height of capitals and digits in font units

// Copies s into buf with anything outside printable ASCII replaced (the font has 95 glyphs).
static char *text_clean(char *buf, size_t size, const char *s) {
    size_t i = 0;
    for (; s[i] && i + 1 < size; i++) buf[i] = s[i] >= 32 && s[i] < 127 ? s[i] : '?';
    buf[i] = 0;
    return buf;
}

static float text_width(const char *s, float scale) {
    char buf[256];
    return stb_easy_font_width(text_clean(buf, sizeof buf, s)) * scale;
}

// Draws s with its top-left at (x, y); rotated 90 degrees counter-clockwise when `up`
// (then it reads bottom to top, starting at (x, y) which becomes its bottom-left).
static void text_draw(canvas *c, const char *s, float x, float y, float scale, rgb col, int up) {
    char buf[256];
    float quads[256 * 80];   // 64 bytes per quad, ~270 bytes per glyph: room for 256 glyphs
    int nq = stb_easy_font_print(0, 0, text_clean(buf, sizeof buf, s), NULL, quads, sizeof quads);
    for (int q = 0; q < nq; q++) {
        const float *v = quads + 16 * q;          // 4 vertices of x, y, z, colour
        float qx0 = v[0], qy0 = v[1], qx1 = v[8], qy1 = v[9];
        if (!up)
            fill_rectf(c, x + qx0 * scale, y + qy0 * scale, x + qx1 * scale, y + qy1 * scale, col);
        else
            fill_rectf(c, x + qy0 * scale, y - qx1 * scale, x + qy1 * scale, y - qx0 * scale, col);
    }
}

// align: 0 left, 1 centre, 2 right of x; y is the vertical centre of the glyphs.
static void text_at(canvas *c, const char *s, float x, float y, float scale, rgb col, int align) {
    float w = text_width(s, scale);
    text_draw(c, s, x - w * align / 2, y - GLYPH_H * scale / 2, scale, col, 0);
}

// ---- anti-aliased curves: coverage = max over primitives, then one blend per pixel ----

static void cov_clear(canvas *c) { memset(c->cov, 0, sizeof(float) * c->w * c->h); }

static void cov_put(canvas *c, rect clip, int x, int y, float a) {
    if (x < clip.x0 || y < clip.y0 || x >= clip.x1 || y >= clip.y1 || a <= 0) return;
    float *p = c->cov + (size_t)y * c->w + x;
    if (a > *p) *p = a > 1 ? 1 : a;
}

static void cov_segment(canvas *c, rect clip, float x0, float y0, float x1, float y1, float hw) {
    float dx = x1 - x0, dy = y1 - y0, len2 = dx * dx + dy * dy;
    int bx0 = (int)floorf(fminf(x0, x1) - hw - 1), bx1 = (int)ceilf(fmaxf(x0, x1) + hw + 1);
    int by0 = (int)floorf(fminf(y0, y1) - hw - 1), by1 = (int)ceilf(fmaxf(y0, y1) + hw + 1);
    for (int y = by0; y <= by1; y++)
        for (int x = bx0; x <= bx1; x++) {
            float px = x + 0.5f - x0, py = y + 0.5f - y0;
            float t = len2 > 0 ? (px * dx + py * dy) / len2 : 0;
            t = t < 0 ? 0 : t > 1 ? 1 : t;
            float ex = px - t * dx, ey = py - t * dy;
            cov_put(c, clip, x, y, hw + 0.5f - sqrtf(ex * ex + ey * ey));
        }
}

static void cov_disc(canvas *c, rect clip, float cx, float cy, float r) {
    for (int y = (int)floorf(cy - r - 1); y <= (int)ceilf(cy + r + 1); y++)
        for (int x = (int)floorf(cx - r - 1); x <= (int)ceilf(cx + r + 1); x++)
            cov_put(c, clip, x, y, r + 0.5f - hypotf(x + 0.5f - cx, y + 0.5f - cy));
}

static void cov_paint(canvas *c, rect clip, rgb col) {
    for (int y = clip.y0; y < clip.y1; y++)
        for (int x = clip.x0; x < clip.x1; x++) blend(c, x, y, col, c->cov[(size_t)y * c->w + x]);
}

// ---- axes ----

typedef struct {
    rect area;             // the plot area inside the frame
    double x_lo, x_hi, y_lo, y_hi;
} axes;

static float ax_x(const axes *a, double v) {
    return (float)(a->area.x0 + (v - a->x_lo) / (a->x_hi - a->x_lo) * (a->area.x1 - a->area.x0));
}
static float ax_y(const axes *a, double v) {
    return (float)(a->area.y1 - (v - a->y_lo) / (a->y_hi - a->y_lo) * (a->area.y1 - a->area.y0));
}

// A "nice" tick spacing (1, 2 or 5 times a power of ten) giving about `want` intervals.
static double tick_step(double span, int want) {
    double raw = span / want, mag = pow(10, floor(log10(raw))), f = raw / mag;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

static void tick_label(char *buf, size_t n, double v, double step) {
    int dec = step >= 1 ? 0 : (int)ceil(-log10(step) - 1e-9);
    if (fabs(v) < step * 1e-6) v = 0;   // no "-0.00"
    if (fabs(v) >= 1e6 || dec > 6) snprintf(buf, n, "%.3g", v);
    else snprintf(buf, n, "%.*f", dec, v);
}

// Data range of the finite values of up to two series; returns 0 when there are none.
static int series_range(const float *a, const float *b, int n, double *lo, double *hi) {
    int any = 0;
    const float *s[2] = {a, b};
    for (int k = 0; k < 2; k++)
        for (int i = 0; s[k] && i < n; i++)
            if (isfinite(s[k][i])) {
                if (!any || s[k][i] < *lo) *lo = s[k][i];
                if (!any || s[k][i] > *hi) *hi = s[k][i];
                any = 1;
            }
    return any;
}

typedef struct {
    const char *title, *ylabel;
    const float *series[2];
    int is_acc;
} panel;

static const char *const SERIES_NAME[2] = {"train", "test"};

static void draw_series(canvas *c, const axes *a, const float *v, int n, rgb col) {
    // curves may run a few pixels past the frame so that a value on the limit stays visible
    rect clip = {a->area.x0 - 3, a->area.y0 - 3, a->area.x1 + 3, a->area.y1 + 3};
    const float hw = 1.4f, r = n <= 40 ? 3.5f : 0;   // markers only while they do not crowd
    cov_clear(c);
    for (int i = 0; i < n; i++) {
        if (!isfinite(v[i])) continue;
        float x = ax_x(a, i + 1), y = ax_y(a, v[i]);
        if (i + 1 < n && isfinite(v[i + 1]))
            cov_segment(c, clip, x, y, ax_x(a, i + 2), ax_y(a, v[i + 1]), hw);
        if ((i == 0 || !isfinite(v[i - 1])) && (i + 1 == n || !isfinite(v[i + 1])))
            cov_disc(c, clip, x, y, 4.5f);   // an isolated point must still show
        else if (r > 0)
            cov_disc(c, clip, x, y, r);
    }
    cov_paint(c, clip, col);
}

// Counts curve pixels (non-background) inside r, to place the legend where it hides least.
static long busy_pixels(const canvas *c, rect r) {
    long n = 0;
    for (int y = r.y0; y < r.y1; y++)
        for (int x = r.x0; x < r.x1; x++) {
            const unsigned char *p = c->px + 3 * ((size_t)y * c->w + x);
            n += !(p[0] == p[1] && p[1] == p[2]);   // curves are coloured, the rest is grey
        }
    return n;
}

static void draw_legend(canvas *c, const axes *a, const panel *p) {
    const float s = 2;
    int n = 0, w = 0;
    for (int k = 0; k < 2; k++)
        if (p->series[k]) {
            n++;
            int tw = (int)text_width(SERIES_NAME[k], s);
            if (tw > w) w = tw;
        }
    if (!n) return;
    const int row = 24, bw = 14 + 36 + 10 + w + 14, bh = 10 + n * row + 4, m = 12;
    // candidate places, in order of preference: the four corners, then the edge middles
    const int L = a->area.x0 + m, R = a->area.x1 - m - bw, T = a->area.y0 + m,
              B = a->area.y1 - m - bh, MX = (a->area.x0 + a->area.x1 - bw) / 2,
              MY = (a->area.y0 + a->area.y1 - bh) / 2;
    const int at[8][2] = {{R, T}, {R, B}, {L, T}, {L, B}, {R, MY}, {L, MY}, {MX, T}, {MX, B}};
    int best = 0;
    long best_n = -1;
    for (int i = 0; i < 8; i++) {
        long k = busy_pixels(c, (rect){at[i][0], at[i][1], at[i][0] + bw, at[i][1] + bh});
        if (best_n < 0 || k < best_n) best = i, best_n = k;
    }
    rect b = {at[best][0], at[best][1], at[best][0] + bw, at[best][1] + bh};
    fill_rect(c, b, (rgb){200, 200, 200});
    fill_rect(c, (rect){b.x0 + 1, b.y0 + 1, b.x1 - 1, b.y1 - 1}, (rgb){255, 255, 255});
    int y = b.y0 + 10 + row / 2 - 2;
    for (int k = 0; k < 2; k++) {
        if (!p->series[k]) continue;
        rgb col = k ? C_TEST : C_TRAIN;
        rect clip = {b.x0, b.y0, b.x1, b.y1};
        cov_clear(c);
        cov_segment(c, clip, b.x0 + 14.0f, y + 0.5f, b.x0 + 50.0f, y + 0.5f, 1.4f);
        cov_disc(c, clip, b.x0 + 32.0f, y + 0.5f, 3.5f);
        cov_paint(c, clip, col);
        text_at(c, SERIES_NAME[k], b.x0 + 60.0f, y + 0.5f, s, C_TEXT, 0);
        y += row;
    }
}

static void draw_panel(canvas *c, rect area, const panel *p, int n_epochs) {
    axes a = {.area = area};
    // x: epochs 1..n with a little room on both sides
    double xpad = n_epochs > 1 ? (n_epochs - 1) * 0.04 : 0.5;
    a.x_lo = 1 - xpad, a.x_hi = n_epochs + xpad;
    // y: the data range plus 6% (a flat or empty curve gets a unit-sized range around it)
    double lo = 0, hi = 1;
    if (!series_range(p->series[0], p->series[1], n_epochs, &lo, &hi)) lo = 0, hi = p->is_acc ? 100 : 1;
    if (hi - lo <= 1e-9 * fmax(fabs(lo), fabs(hi))) {
        double d = fmax(fabs(lo) * 0.1, p->is_acc ? 5 : 0.5);
        lo -= d, hi += d;
    }
    double ypad = (hi - lo) * 0.06;
    a.y_lo = lo - ypad, a.y_hi = hi + ypad;
    if (p->is_acc) {   // never show much beyond 0..100 %
        a.y_lo = fmax(a.y_lo, fmin(lo, 0) - 3);
        a.y_hi = fmin(a.y_hi, fmax(hi, 100) + 3);
    }

    // grid and ticks
    char buf[64];
    float label_w = 0;   // widest y tick label, to keep the axis label clear of them
    double ys = tick_step(a.y_hi - a.y_lo, 6);
    for (long i = (long)ceil(a.y_lo / ys); i * ys <= a.y_hi; i++) {
        double v = i * ys;
        if (p->is_acc && (v < -1e-9 || v > 100 + 1e-9)) continue;
        int y = (int)floorf(ax_y(&a, v));
        fill_rect(c, (rect){area.x0, y, area.x1, y + 1}, C_GRID);
        fill_rect(c, (rect){area.x0 - 6, y, area.x0, y + 1}, C_FRAME);
        tick_label(buf, sizeof buf, v, ys);
        text_at(c, buf, area.x0 - 10.0f, y + 0.5f, 2, C_TEXT, 2);
        label_w = fmaxf(label_w, text_width(buf, 2));
    }
    double xs = fmax(1, tick_step(a.x_hi - a.x_lo, 8));
    for (long i = (long)fmax(1, ceil(a.x_lo / xs)); i * xs <= a.x_hi; i++) {
        double v = i * xs;
        int x = (int)floorf(ax_x(&a, v));
        fill_rect(c, (rect){x, area.y0, x + 1, area.y1}, C_GRID);
        fill_rect(c, (rect){x, area.y1, x + 1, area.y1 + 6}, C_FRAME);
        tick_label(buf, sizeof buf, v, xs);
        text_at(c, buf, x + 0.5f, area.y1 + 20.0f, 2, C_TEXT, 1);
    }
    // frame
    fill_rect(c, (rect){area.x0 - 1, area.y0 - 1, area.x1 + 1, area.y0}, C_FRAME);
    fill_rect(c, (rect){area.x0 - 1, area.y1, area.x1 + 1, area.y1 + 1}, C_FRAME);
    fill_rect(c, (rect){area.x0 - 1, area.y0, area.x0, area.y1}, C_FRAME);
    fill_rect(c, (rect){area.x1, area.y0, area.x1 + 1, area.y1}, C_FRAME);

    for (int k = 0; k < 2; k++)
        if (p->series[k]) draw_series(c, &a, p->series[k], n_epochs, k ? C_TEST : C_TRAIN);
    draw_legend(c, &a, p);

    // titles and axis labels
    float cx = (area.x0 + area.x1) / 2.0f, cy = (area.y0 + area.y1) / 2.0f;
    text_at(c, p->title, cx, area.y0 - 22.0f, 2.5f, C_TEXT, 1);
    text_at(c, "epoch", cx, area.y1 + 50.0f, 2, C_TEXT, 1);
    float lw = text_width(p->ylabel, 2);
    text_draw(c, p->ylabel, area.x0 - 10 - label_w - 14 - GLYPH_H * 2, cy + lw / 2, 2, C_TEXT, 1);
}

// stb_image_write's output callback: fwrite into the temp file, remembering a failure.
typedef struct { FILE *f; int failed; } png_sink;
static void png_write(void *ctx, void *data, int size) {
    png_sink *s = ctx;
    if (!s->failed && fwrite(data, 1, (size_t)size, s->f) != (size_t)size) s->failed = 1;
}

static int png_save(const char *path, const canvas *c) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return err_set("%s: path too long", path);
    png_sink s = {fopen(tmp, "wb"), 0};
    if (!s.f) return err_set("%s: cannot create: %s", tmp, strerror(errno));
    int ok = stbi_write_png_to_func(png_write, &s, c->w, c->h, 3, c->px, 3 * c->w);
    ok = ok && !s.failed && fflush(s.f) == 0 && fsync(fileno(s.f)) == 0;
    int saved_errno = errno;
    if (fclose(s.f) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        if (ok) saved_errno = errno;
        remove(tmp);
        return err_set("%s: cannot write the PNG: %s", path,
                       saved_errno ? strerror(saved_errno) : "encoding failed");
    }
    return 0;
}

int plot_curves(const char *png_path, const curve_data *d) {
    if (d->n_epochs < 1) return err_set("%s: no epochs to plot", png_path);
    canvas c = {PLOT_WIDTH, PLOT_HEIGHT, NULL, NULL};
    c.px = malloc((size_t)c.w * c.h * 3);
    c.cov = malloc(sizeof(float) * c.w * c.h);
    if (!c.px || !c.cov) {
        free(c.px);
        free(c.cov);
        return err_set("%s: out of memory for the plot", png_path);
    }
    memset(c.px, 255, (size_t)c.w * c.h * 3);

    const char *title = d->title ? d->title : "Training curves";
    text_at(&c, title, c.w / 2.0f, 26, 3, C_TEXT, 1);
    panel loss = {"Loss", "loss", {d->train_loss, d->test_loss}, 0};
    panel acc = {"Accuracy", "accuracy (%)", {d->train_acc, d->test_acc}, 1};
    const int half = c.w / 2, top = 100, bottom = c.h - 80;
    draw_panel(&c, (rect){115, top, half - 30, bottom}, &loss, d->n_epochs);
    draw_panel(&c, (rect){half + 115, top, c.w - 30, bottom}, &acc, d->n_epochs);

    int rc = png_save(png_path, &c);
    free(c.px);
    free(c.cov);
    return rc;
}
