// Batch normalisation (per channel over N and HW) and local response normalisation (across
// channels), PyTorch semantics. Statistics and window sums are accumulated in double.
#include "ops/ops.h"
#include <math.h>

// ---- batchnorm2d ----

void batchnorm2d_forward_train(float *out, float *save_mean, float *save_invstd,
                               float *running_mean, float *running_var,
                               const float *in, const float *gamma, const float *beta,
                               int N, int C, int HW, float eps, float momentum) {
    const size_t M = (size_t)N * HW;  // values per channel
    for (int c = 0; c < C; c++) {
        double sum = 0.0;
        for (int n = 0; n < N; n++) {
            const float *x = in + ((size_t)n * C + c) * HW;
            for (int i = 0; i < HW; i++) sum += x[i];
        }
        const double mean = sum / (double)M;
        // Two passes (sum of squared deviations) rather than E[x^2]-E[x]^2, which cancels.
        double ssd = 0.0;
        for (int n = 0; n < N; n++) {
            const float *x = in + ((size_t)n * C + c) * HW;
            for (int i = 0; i < HW; i++) {
                double d = x[i] - mean;
                ssd += d * d;
            }
        }
        const double var = ssd / (double)M;  // biased: used to normalise
        const double invstd = 1.0 / sqrt(var + eps);
        if (save_mean) save_mean[c] = (float)mean;
        if (save_invstd) save_invstd[c] = (float)invstd;
        if (running_mean) running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mean);
        if (running_var) {
            // Unbiased, as PyTorch. Undefined for one value per channel (PyTorch raises; the
            // caller must reject that case): NaN rather than a silently wrong number.
            const double uvar = M > 1 ? ssd / (double)(M - 1) : NAN;
            running_var[c] = (float)((1.0 - momentum) * running_var[c] + momentum * uvar);
        }
        // out = (x - mean) * invstd * gamma + beta, as one affine map per channel.
        const double scale = invstd * (gamma ? gamma[c] : 1.0f);
        const float a = (float)scale, b = (float)((beta ? beta[c] : 0.0f) - mean * scale);
        for (int n = 0; n < N; n++) {
            const float *x = in + ((size_t)n * C + c) * HW;
            float *o = out + ((size_t)n * C + c) * HW;
            for (int i = 0; i < HW; i++) o[i] = x[i] * a + b;
        }
    }
}

void batchnorm2d_backward_train(float *din, float *dgamma, float *dbeta, const float *dout,
                                const float *in, const float *gamma,
                                const float *save_mean, const float *save_invstd,
                                int N, int C, int HW) {
    const size_t M = (size_t)N * HW;
    for (int c = 0; c < C; c++) {
        const float mean = save_mean[c], invstd = save_invstd[c];
        double sum_dy = 0.0, sum_dy_xm = 0.0;  // sum(dy), sum(dy * (x - mean))
        for (int n = 0; n < N; n++) {
            const float *x = in + ((size_t)n * C + c) * HW;
            const float *g = dout + ((size_t)n * C + c) * HW;
            for (int i = 0; i < HW; i++) {
                sum_dy += g[i];
                sum_dy_xm += (double)g[i] * (x[i] - mean);
            }
        }
        if (dbeta) dbeta[c] += (float)sum_dy;
        if (dgamma) dgamma[c] += (float)(sum_dy_xm * invstd);
        if (!din) continue;
        // dx = gamma*invstd * (dy - mean(dy) - xhat * mean(dy*xhat)), xhat = (x-mean)*invstd.
        const float gmean = (float)(sum_dy / (double)M);
        const float proj = (float)(sum_dy_xm * invstd * invstd / (double)M);
        const float a = invstd * (gamma ? gamma[c] : 1.0f);
        for (int n = 0; n < N; n++) {
            const float *x = in + ((size_t)n * C + c) * HW;
            const float *g = dout + ((size_t)n * C + c) * HW;
            float *dx = din + ((size_t)n * C + c) * HW;
            for (int i = 0; i < HW; i++) dx[i] += (g[i] - gmean - (x[i] - mean) * proj) * a;
        }
    }
}

void batchnorm2d_forward_eval(float *out, const float *in, const float *gamma, const float *beta,
                              const float *running_mean, const float *running_var,
                              int N, int C, int HW, float eps) {
    for (int c = 0; c < C; c++) {
        const double scale = (gamma ? gamma[c] : 1.0f) / sqrt((double)running_var[c] + eps);
        const float a = (float)scale;
        const float b = (float)((beta ? beta[c] : 0.0f) - running_mean[c] * scale);
        for (int n = 0; n < N; n++) {
            const float *x = in + ((size_t)n * C + c) * HW;
            float *o = out + ((size_t)n * C + c) * HW;
            for (int i = 0; i < HW; i++) o[i] = x[i] * a + b;
        }
    }
}

void batchnorm2d_backward_eval(float *din, float *dgamma, float *dbeta, const float *dout,
                               const float *in, const float *gamma,
                               const float *running_mean, const float *running_var,
                               int N, int C, int HW, float eps) {
    for (int c = 0; c < C; c++) {
        const double invstd = 1.0 / sqrt((double)running_var[c] + eps);
        const float mean = running_mean[c];
        const float a = (float)(invstd * (gamma ? gamma[c] : 1.0f));
        double sum_dy = 0.0, sum_dy_xm = 0.0;
        for (int n = 0; n < N; n++) {
            const float *x = in + ((size_t)n * C + c) * HW;
            const float *g = dout + ((size_t)n * C + c) * HW;
            float *dx = din ? din + ((size_t)n * C + c) * HW : NULL;
            for (int i = 0; i < HW; i++) {
                sum_dy += g[i];
                sum_dy_xm += (double)g[i] * (x[i] - mean);
            }
            if (dx)
                for (int i = 0; i < HW; i++) dx[i] += g[i] * a;
        }
        if (dbeta) dbeta[c] += (float)sum_dy;
        if (dgamma) dgamma[c] += (float)(sum_dy_xm * invstd);
    }
}

// ---- local response norm ----
// Channel c is divided by d_c^beta with d_c = k + alpha/size * sum of x[c']^2 over
// c' in [c - size/2, c + (size-1)/2] (clipped). Work goes in blocks of positions so that the
// inner loops run over contiguous memory with double accumulators on the stack.

enum { LRN_BLOCK = 64 };

// d[i] for channel c of image plane base `x` (channel stride HW), positions [p0, p0+len).
static void lrn_denom(double *d, const float *x, int C, int HW, int c, int p0, int len,
                      int size, float alpha, float k) {
    int c0 = c - size / 2, c1 = c + (size - 1) / 2;
    if (c0 < 0) c0 = 0;
    if (c1 > C - 1) c1 = C - 1;
    for (int i = 0; i < len; i++) d[i] = 0.0;
    for (int cc = c0; cc <= c1; cc++) {
        const float *xc = x + (size_t)cc * HW + p0;
        for (int i = 0; i < len; i++) d[i] += (double)xc[i] * xc[i];
    }
    for (int i = 0; i < len; i++) d[i] = k + (double)alpha / size * d[i];
}

void lrn_forward(float *out, const float *in, int N, int C, int HW,
                 int size, float alpha, float beta, float k) {
    double d[LRN_BLOCK];
    for (int n = 0; n < N; n++) {
        const float *x = in + (size_t)n * C * HW;
        float *o = out + (size_t)n * C * HW;
        for (int p0 = 0; p0 < HW; p0 += LRN_BLOCK) {
            const int len = HW - p0 < LRN_BLOCK ? HW - p0 : LRN_BLOCK;
            for (int c = 0; c < C; c++) {
                lrn_denom(d, x, C, HW, c, p0, len, size, alpha, k);
                const size_t at = (size_t)c * HW + p0;
                for (int i = 0; i < len; i++) o[at + i] = (float)(x[at + i] * pow(d[i], -beta));
            }
        }
    }
}

// dx_j = dy_j * d_j^-beta - 2*alpha*beta/size * x_j * sum_c dy_c * x_c * d_c^(-beta-1), the sum
// over the channels c whose window contains j: c in [j - (size-1)/2, j + size/2]. Each d_c is
// recomputed per use: plain and obviously right; LRN is a tiny part of the network's cost.
void lrn_backward(float *din, const float *dout, const float *in, int N, int C, int HW,
                  int size, float alpha, float beta, float k) {
    if (!din) return;
    double d[LRN_BLOCK], t[LRN_BLOCK];
    const double coef = 2.0 * alpha * beta / size;
    for (int n = 0; n < N; n++) {
        const float *x = in + (size_t)n * C * HW;
        const float *g = dout + (size_t)n * C * HW;
        float *dx = din + (size_t)n * C * HW;
        for (int p0 = 0; p0 < HW; p0 += LRN_BLOCK) {
            const int len = HW - p0 < LRN_BLOCK ? HW - p0 : LRN_BLOCK;
            for (int j = 0; j < C; j++) {
                int c0 = j - (size - 1) / 2, c1 = j + size / 2;
                if (c0 < 0) c0 = 0;
                if (c1 > C - 1) c1 = C - 1;
                for (int i = 0; i < len; i++) t[i] = 0.0;
                for (int c = c0; c <= c1; c++) {
                    lrn_denom(d, x, C, HW, c, p0, len, size, alpha, k);
                    const size_t at = (size_t)c * HW + p0;
                    for (int i = 0; i < len; i++)
                        t[i] += (double)g[at + i] * x[at + i] * pow(d[i], -beta) / d[i];
                }
                lrn_denom(d, x, C, HW, j, p0, len, size, alpha, k);
                const size_t at = (size_t)j * HW + p0;
                for (int i = 0; i < len; i++)
                    dx[at + i] += (float)(g[at + i] * pow(d[i], -beta) - coef * x[at + i] * t[i]);
            }
        }
    }
}
