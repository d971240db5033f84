// SGD / Adam / AdamW as torch/optim/{sgd,adam,adamw}.py (_single_tensor_* in torch 1.13).
// Every tensor op there is an elementwise float32 op whose scalar argument is a Python float
// (double) rounded to float; the loops below do the same ops in the same order, so results
// agree with PyTorch to float rounding (PyTorch's vectorised kernels use FMA, we do not).
#include "train/optim.h"
#include "ops/cpu.h"
#include "util/err.h"
#include "util/mem.h"
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void optim_config_default(optim_config *cfg, int kind) {
    memset(cfg, 0, sizeof *cfg);
    cfg->kind = kind;
    cfg->beta1 = 0.9;
    cfg->beta2 = 0.999;
    cfg->eps = 1e-8;
    cfg->weight_decay = kind == OPT_ADAMW ? 1e-2 : 0.0;
}

int optim_kind_parse(const char *s) {
    if (!strcmp(s, "sgd")) return OPT_SGD;
    if (!strcmp(s, "adam")) return OPT_ADAM;
    if (!strcmp(s, "adamw")) return OPT_ADAMW;
    return err_set("unknown optimiser '%s' (expected sgd, adam or adamw)", s);
}

const char *optim_kind_name(int kind) {
    switch (kind) {
    case OPT_SGD: return "sgd";
    case OPT_ADAM: return "adam";
    case OPT_ADAMW: return "adamw";
    default: return "?";
    }
}

// PyTorch's constructor checks, with the same meaning.
static int config_check(const optim_config *c) {
    if (c->kind != OPT_SGD && c->kind != OPT_ADAM && c->kind != OPT_ADAMW)
        return err_set("optimiser: unknown kind %d", c->kind);
    if (!(c->weight_decay >= 0)) return err_set("optimiser: weight decay %g < 0", c->weight_decay);
    if (c->kind == OPT_SGD) {
        if (!(c->momentum >= 0)) return err_set("sgd: momentum %g < 0", c->momentum);
        if (!(c->dampening >= 0 && c->dampening <= 1))
            return err_set("sgd: dampening %g outside [0, 1]", c->dampening);
        if (c->nesterov && (c->momentum <= 0 || c->dampening != 0))
            return err_set("sgd: nesterov momentum requires momentum > 0 and zero dampening");
    } else {
        if (!(c->eps >= 0)) return err_set("%s: eps %g < 0", optim_kind_name(c->kind), c->eps);
        if (!(c->beta1 >= 0 && c->beta1 < 1))
            return err_set("%s: beta1 %g outside [0, 1)", optim_kind_name(c->kind), c->beta1);
        if (!(c->beta2 >= 0 && c->beta2 < 1))
            return err_set("%s: beta2 %g outside [0, 1)", optim_kind_name(c->kind), c->beta2);
    }
    return 0;
}

int optim_init(optim *o, const optim_config *cfg, size_t n_floats) {
    memset(o, 0, sizeof *o);
    if (config_check(cfg)) return -1;
    o->cfg = *cfg;
    o->n = n_floats;
    int nbuf = cfg->kind == OPT_SGD ? (cfg->momentum != 0) : 2 + (cfg->amsgrad != 0);
    float **bufs[3] = {&o->buf1, &o->buf2, &o->buf3};
    for (int i = 0; i < nbuf; i++) {
        *bufs[i] = mem_calloc(n_floats, sizeof(float));
        if (!*bufs[i]) {
            optim_free(o);
            return err_set("optimiser: out of memory for %zu-float state", n_floats);
        }
    }
    return 0;
}

void optim_free(optim *o) {
    free(o->buf1);
    free(o->buf2);
    free(o->buf3);
    o->buf1 = o->buf2 = o->buf3 = NULL;
}

int optim_check_spans(const optim *o, const param_span *spans, int n_spans) {
    for (int i = 0; i < n_spans; i++) {
        if (spans[i].off > o->n || spans[i].n > o->n - spans[i].off)
            return err_set("optimiser: span %d [%zu, +%zu) outside the %zu parameters", i,
                           spans[i].off, spans[i].n, o->n);
        for (int j = 0; j < i; j++)
            if (spans[i].off < spans[j].off + spans[j].n && spans[j].off < spans[i].off + spans[i].n)
                return err_set("optimiser: spans %d and %d overlap", j, i);
    }
    return 0;
}

float *optim_buffer(optim *o, int i) {
    return i == 0 ? o->buf1 : i == 1 ? o->buf2 : i == 2 ? o->buf3 : NULL;
}

const char *optim_buffer_name(const optim *o, int i) {
    const float *b = i == 0 ? o->buf1 : i == 1 ? o->buf2 : i == 2 ? o->buf3 : NULL;
    if (!b) return NULL;
    if (o->cfg.kind == OPT_SGD) return "optim.momentum_buffer";
    return i == 0 ? "optim.exp_avg" : i == 1 ? "optim.exp_avg_sq" : "optim.max_exp_avg_sq";
}

// torch.optim.SGD: d_p = g + wd*p; buf = d_p (first step) or momentum*buf + (1-dampening)*d_p;
// d_p = nesterov ? d_p + momentum*buf : buf; p -= lr*d_p.
static void sgd_span(const optim_config *c, int first, float *restrict p, const float *restrict g,
                     float *restrict buf, size_t n, double wd, double lr) {
    const float wdf = (float)wd, mom = (float)c->momentum, keep = (float)(1.0 - c->dampening);
    const float neg_lr = (float)-lr;
    for (size_t i = 0; i < n; i++) {
        float d = g[i];
        if (wd != 0) d = d + wdf * p[i];
        if (buf) {
            buf[i] = first ? d : buf[i] * mom + keep * d;
            d = c->nesterov ? d + mom * buf[i] : buf[i];
        }
        p[i] = p[i] + neg_lr * d;
    }
}

// torch.optim.Adam / AdamW (step already incremented): m = b1*m + (1-b1)*g;
// v = b2*v + (1-b2)*g*g; denom = sqrt(v or vmax) / sqrt(1-b2^t) + eps;
// p += -(lr / (1-b1^t)) * m / denom. Adam adds wd*p to g; AdamW first does p *= 1 - lr*wd.
typedef struct {
    int decoupled;
    float wdf, shrink, b1, one_b1, b2, one_b2, neg_step_size, bc2_sqrt, eps;
} adam_consts;

static adam_consts adam_consts_of(const optim_config *c, int64_t step, double wd, double lr) {
    const double t = (double)(float)step;   // PyTorch keeps the step count in a float tensor
    const double bc1 = 1.0 - pow(c->beta1, t), bc2 = 1.0 - pow(c->beta2, t);
    return (adam_consts){c->kind == OPT_ADAMW, (float)wd, (float)(1.0 - lr * wd), (float)c->beta1,
                         (float)(1.0 - c->beta1), (float)c->beta2, (float)(1.0 - c->beta2),
                         (float)-(lr / bc1), (float)sqrt(bc2), (float)c->eps};
}

static void adam_span(const adam_consts *k, float *restrict p, const float *restrict g,
                      float *restrict m, float *restrict v, float *restrict vmax, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float gi = g[i];
        if (k->decoupled) p[i] = p[i] * k->shrink;
        else if (k->wdf != 0) gi = gi + k->wdf * p[i];
        m[i] = m[i] * k->b1 + k->one_b1 * gi;
        v[i] = v[i] * k->b2 + k->one_b2 * gi * gi;
        float s = v[i];
        if (vmax) {
            // torch.maximum: a NaN on either side wins
            vmax[i] = isnan(vmax[i]) || vmax[i] >= s ? vmax[i] : s;
            s = vmax[i];
        }
        const float denom = sqrtf(s) / k->bc2_sqrt + k->eps;
        p[i] = p[i] + k->neg_step_size * m[i] / denom;
    }
}

// The same loops on 16 floats at a time: the same operations in the same order (separate
// multiplies and adds, correctly rounded sqrt and division), so not a bit changes; the scalar
// loops above ran at a quarter of memory speed (~42 ms for GoogLeNet's 10 M parameters).
#define AVX512 __attribute__((target("avx512f")))

static AVX512 void sgd_span_avx512(const optim_config *c, int first, float *p, const float *g,
                                   float *buf, size_t n, double wd, double lr) {
    const __m512 wdf = _mm512_set1_ps((float)wd), mom = _mm512_set1_ps((float)c->momentum);
    const __m512 keep = _mm512_set1_ps((float)(1.0 - c->dampening));
    const __m512 neg_lr = _mm512_set1_ps((float)-lr);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 pi = _mm512_maskz_loadu_ps(k, p + i), d = _mm512_maskz_loadu_ps(k, g + i);
        if (wd != 0) d = _mm512_add_ps(d, _mm512_mul_ps(wdf, pi));
        if (buf) {
            __m512 b = first ? d
                             : _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, buf + i), mom),
                                             _mm512_mul_ps(keep, d));
            _mm512_mask_storeu_ps(buf + i, k, b);
            d = c->nesterov ? _mm512_add_ps(d, _mm512_mul_ps(mom, b)) : b;
        }
        _mm512_mask_storeu_ps(p + i, k, _mm512_add_ps(pi, _mm512_mul_ps(neg_lr, d)));
    }
}

static AVX512 void adam_span_avx512(const adam_consts *c, float *p, const float *g, float *m,
                                    float *v, float *vmax, size_t n) {
    const __m512 wdf = _mm512_set1_ps(c->wdf), shrink = _mm512_set1_ps(c->shrink);
    const __m512 b1 = _mm512_set1_ps(c->b1), one_b1 = _mm512_set1_ps(c->one_b1);
    const __m512 b2 = _mm512_set1_ps(c->b2), one_b2 = _mm512_set1_ps(c->one_b2);
    const __m512 neg_step = _mm512_set1_ps(c->neg_step_size), bc2 = _mm512_set1_ps(c->bc2_sqrt);
    const __m512 eps = _mm512_set1_ps(c->eps);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 pi = _mm512_maskz_loadu_ps(k, p + i), gi = _mm512_maskz_loadu_ps(k, g + i);
        if (c->decoupled) pi = _mm512_mul_ps(pi, shrink);
        else if (c->wdf != 0) gi = _mm512_add_ps(gi, _mm512_mul_ps(wdf, pi));
        __m512 mi = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, m + i), b1),
                                  _mm512_mul_ps(one_b1, gi));
        __m512 s = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + i), b2),
                                 _mm512_mul_ps(_mm512_mul_ps(one_b2, gi), gi));
        _mm512_mask_storeu_ps(m + i, k, mi);
        _mm512_mask_storeu_ps(v + i, k, s);
        if (vmax) {
            __m512 x = _mm512_maskz_loadu_ps(k, vmax + i);
            __mmask16 keep_x = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x, s, _CMP_GE_OQ);
            s = _mm512_mask_blend_ps(keep_x, s, x);
            _mm512_mask_storeu_ps(vmax + i, k, s);
        }
        __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(s), bc2), eps);
        pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(neg_step, mi), denom));
        _mm512_mask_storeu_ps(p + i, k, pi);
    }
}

// One step's work, split over the pool by position in the concatenation of the spans: every
// update is elementwise, so the split changes no bit.
typedef struct {
    const optim *o;
    float *params;
    const float *grads;
    const param_span *spans;
    int n_spans, first;
    double lr;
    size_t total;
} step_job;

static void step_task(void *ctx, int t, int nt) {
    const step_job *j = ctx;
    const optim *o = j->o;
    const optim_config *c = &o->cfg;
    const int avx512 = cpu_isa() == CPU_ISA_AVX512;
    size_t lo, hi, base = 0;
    cpu_part_range(j->total, t, nt, &lo, &hi);
    for (int s = 0; s < j->n_spans && base < hi; base += j->spans[s++].n) {
        const size_t n = j->spans[s].n;
        const size_t a = lo > base ? lo - base : 0, b = hi - base < n ? hi - base : n;
        if (a >= b) continue;
        const size_t off = j->spans[s].off + a;
        const double wd = j->spans[s].no_decay && !c->decay_bn_bias ? 0.0 : c->weight_decay;
        float *p = j->params + off;
        const float *g = j->grads + off;
        if (c->kind == OPT_SGD) {
            float *buf = o->buf1 ? o->buf1 + off : NULL;
            if (avx512) sgd_span_avx512(c, j->first, p, g, buf, b - a, wd, j->lr);
            else sgd_span(c, j->first, p, g, buf, b - a, wd, j->lr);
        } else {
            const adam_consts k = adam_consts_of(c, o->step, wd, j->lr);
            float *vmax = o->buf3 ? o->buf3 + off : NULL;
            if (avx512) adam_span_avx512(&k, p, g, o->buf1 + off, o->buf2 + off, vmax, b - a);
            else adam_span(&k, p, g, o->buf1 + off, o->buf2 + off, vmax, b - a);
        }
    }
}

void optim_step(optim *o, float *params, const float *grads, const param_span *spans,
                int n_spans, double lr) {
    const int first = o->step == 0;
    o->step++;
    step_job j = {o, params, grads, spans, n_spans, first, lr, 0};
    for (int s = 0; s < n_spans; s++) j.total += spans[s].n;
    // Memory-bound: a second thread pays from about a hundred thousand parameters.
    cpu_parallel(step_task, &j, cpu_threads_for(j.total, (size_t)1 << 16));
}
