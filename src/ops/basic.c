// Element-wise and small layers: relu, linear, dropout, concat, GoogLeNet's transform_input,
// softmax and cross-entropy.
#include "ops/ops.h"
#include <math.h>
#include <string.h>

// ---- relu ----

void relu_forward(float *out, const float *in, size_t n) {
    // PyTorch's relu propagates NaN; `x <= 0 ? 0 : x` does too (fmaxf would drop it).
    for (size_t i = 0; i < n; i++) out[i] = in[i] <= 0.0f ? 0.0f : in[i];
}

void relu_backward(float *din, const float *dout, const float *out, size_t n) {
    if (!din) return;
    // PyTorch's threshold_backward zeroes where out <= 0, so a NaN output passes its gradient.
    for (size_t i = 0; i < n; i++)
        if (!(out[i] <= 0.0f)) din[i] += dout[i];
}

// ---- linear ----

void linear_forward(float *out, const float *in, const float *w, const float *b,
                    int N, int IN, int OUT) {
    for (int n = 0; n < N; n++) {
        const float *x = in + (size_t)n * IN;
        for (int o = 0; o < OUT; o++) {
            const float *wo = w + (size_t)o * IN;
            double s = b ? b[o] : 0.0f;
            for (int i = 0; i < IN; i++) s += (double)x[i] * wo[i];
            out[(size_t)n * OUT + o] = (float)s;
        }
    }
}

void linear_backward(float *din, float *dw, float *db, const float *dout,
                     const float *in, const float *w, int N, int IN, int OUT) {
    for (int n = 0; n < N; n++) {
        const float *x = in + (size_t)n * IN;
        const float *g = dout + (size_t)n * OUT;
        float *dx = din ? din + (size_t)n * IN : NULL;
        for (int o = 0; o < OUT; o++) {
            const float go = g[o];
            if (db) db[o] += go;
            if (dw) {  // dw[o,:] += dout[n,o] * in[n,:]
                float *dwo = dw + (size_t)o * IN;
                for (int i = 0; i < IN; i++) dwo[i] += go * x[i];
            }
            if (dx) {  // din[n,:] += dout[n,o] * w[o,:]
                const float *wo = w + (size_t)o * IN;
                for (int i = 0; i < IN; i++) dx[i] += go * wo[i];
            }
        }
    }
}

// ---- dropout ----

void dropout_forward(float *out, float *mask, const float *in, size_t n, float p, rng *r) {
    // p = 0 is the identity and p = 1 drops everything; neither draws random numbers.
    // Otherwise one uniform draw per element, in order: the same rng state gives the same mask.
    const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;  // PyTorch: bernoulli(1-p) / (1-p)
    for (size_t i = 0; i < n; i++) {
        float m;
        if (p <= 0.0f) m = 1.0f;
        else if (p >= 1.0f) m = 0.0f;
        else m = rng_uniform(r) < p ? 0.0f : scale;
        mask[i] = m;
        out[i] = in[i] * m;
    }
}

void dropout_backward(float *din, const float *dout, const float *mask, size_t n) {
    if (!din) return;
    for (size_t i = 0; i < n; i++) din[i] += dout[i] * mask[i];
}

// ---- concat along channels ----

void concat_forward(float *out, const float *const *ins, const int *Cs, int n_in, int N, int HW) {
    int Ctot = 0;
    for (int j = 0; j < n_in; j++) Ctot += Cs[j];
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * Ctot * HW;
        for (int j = 0; j < n_in; j++) {
            const size_t len = (size_t)Cs[j] * HW;
            memcpy(o, ins[j] + (size_t)n * len, len * sizeof(float));
            o += len;
        }
    }
}

void concat_backward(float *const *dins, const float *dout, const int *Cs, int n_in, int N, int HW) {
    int Ctot = 0;
    for (int j = 0; j < n_in; j++) Ctot += Cs[j];
    for (int n = 0; n < N; n++) {
        const float *g = dout + (size_t)n * Ctot * HW;
        for (int j = 0; j < n_in; j++) {
            const size_t len = (size_t)Cs[j] * HW;
            if (dins[j]) {
                float *dx = dins[j] + (size_t)n * len;
                for (size_t i = 0; i < len; i++) dx[i] += g[i];
            }
            g += len;
        }
    }
}

// ---- torchvision GoogLeNet transform_input ----
// torchvision computes x * (std/0.5) + (mean-0.5)/0.5 with the Python (double) constants, which
// the float tensor op rounds to float; a multiply then a separate add, as here.

static const double TI_MEAN[3] = {0.485, 0.456, 0.406}, TI_STD[3] = {0.229, 0.224, 0.225};

void transform_input_forward(float *out, const float *in, int N, int HW) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < 3; c++) {
            const float a = (float)(TI_STD[c] / 0.5), b = (float)((TI_MEAN[c] - 0.5) / 0.5);
            const float *x = in + ((size_t)n * 3 + c) * HW;
            float *o = out + ((size_t)n * 3 + c) * HW;
            for (int i = 0; i < HW; i++) o[i] = x[i] * a + b;
        }
}

void transform_input_backward(float *din, const float *dout, int N, int HW) {
    if (!din) return;
    for (int n = 0; n < N; n++)
        for (int c = 0; c < 3; c++) {
            const float a = (float)(TI_STD[c] / 0.5);
            const float *g = dout + ((size_t)n * 3 + c) * HW;
            float *dx = din + ((size_t)n * 3 + c) * HW;
            for (int i = 0; i < HW; i++) dx[i] += g[i] * a;
        }
}

// ---- softmax and cross-entropy ----

// Softmax of one row; returns log(sum exp(x - max)) + max, i.e. logsumexp, in double.
static double softmax_row(float *p, const float *x, int K) {
    float m = x[0];
    for (int j = 1; j < K; j++)
        if (x[j] > m || isnan(x[j])) m = x[j];
    double s = 0.0;
    for (int j = 0; j < K; j++) s += exp((double)x[j] - m);
    for (int j = 0; j < K; j++) p[j] = (float)(exp((double)x[j] - m) / s);
    return m + log(s);
}

void softmax_forward(float *probs, const float *logits, int N, int K) {
    for (int n = 0; n < N; n++) softmax_row(probs + (size_t)n * K, logits + (size_t)n * K, K);
}

float cross_entropy_forward(float *probs, const float *logits, const int64_t *target,
                            int N, int K, float smoothing) {
    double total = 0.0;
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * K;
        const double lse = softmax_row(probs + (size_t)n * K, x, K);
        // -log p_k = lse - x_k
        const double nll = lse - x[target[n]];
        double mean_nll = 0.0;
        if (smoothing != 0.0f) {
            for (int j = 0; j < K; j++) mean_nll += lse - x[j];
            mean_nll /= K;
        }
        total += (1.0 - smoothing) * nll + (double)smoothing * mean_nll;
    }
    return (float)(total / N);
}

void cross_entropy_backward(float *dlogits, const float *probs, const int64_t *target,
                            int N, int K, float smoothing, float dloss) {
    if (!dlogits) return;
    const float scale = dloss / (float)N, off = smoothing / (float)K;
    for (int n = 0; n < N; n++) {
        const float *p = probs + (size_t)n * K;
        float *d = dlogits + (size_t)n * K;
        for (int j = 0; j < K; j++) {
            const float tgt = (j == target[n] ? 1.0f - smoothing : 0.0f) + off;
            d[j] += scale * (p[j] - tgt);
        }
    }
}
