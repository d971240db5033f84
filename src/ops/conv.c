// conv2d reference kernels (square kernel, symmetric zero padding), PyTorch semantics.
//
// Loop order: for every (image, output channel, input channel, kernel tap) the kernel weight is a
// scalar and the work is "output row += weight * input row", so the innermost loop runs over
// contiguous memory (stride 1) and the output plane stays in cache. The valid output range of
// each tap is computed up front, so padding costs no branches in the inner loop.
#include "ops/ops.h"

// Floor division that is correct for negative numerators (C's / truncates towards zero).
static int div_floor(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
static int div_ceil(int a, int b) { return -div_floor(-a, b); }

int conv2d_out_size(int H, int k, int stride, int pad) {
    return div_floor(H + 2 * pad - k, stride) + 1;
}

// Output positions o in [*lo, *hi] whose input position o*stride - pad + tap lies in [0, H).
// Empty when *lo > *hi.
static void tap_range(int *lo, int *hi, int H, int OH, int tap, int stride, int pad) {
    *lo = div_ceil(pad - tap, stride);
    *hi = div_floor(H - 1 + pad - tap, stride);
    if (*lo < 0) *lo = 0;
    if (*hi > OH - 1) *hi = OH - 1;
}

void conv2d_forward(float *out, const float *in, const float *w, const float *b,
                    int N, int C, int H, int W, int K, int k, int stride, int pad) {
    const int OH = conv2d_out_size(H, k, stride, pad), OW = conv2d_out_size(W, k, stride, pad);
    const size_t ihw = (size_t)H * W, ohw = (size_t)OH * OW;
    // A 1x1 stride-1 unpadded convolution maps whole planes onto whole planes: one long loop.
    const int pointwise = k == 1 && stride == 1 && pad == 0;
    for (int n = 0; n < N; n++) {
        for (int ko = 0; ko < K; ko++) {
            float *o = out + ((size_t)n * K + ko) * ohw;
            const float bias = b ? b[ko] : 0.0f;
            for (size_t i = 0; i < ohw; i++) o[i] = bias;
            for (int c = 0; c < C; c++) {
                const float *x = in + ((size_t)n * C + c) * ihw;
                const float *wk = w + ((size_t)ko * C + c) * k * k;
                if (pointwise) {
                    const float wv = wk[0];
                    for (size_t i = 0; i < ohw; i++) o[i] += wv * x[i];
                    continue;
                }
                for (int kh = 0; kh < k; kh++) {
                    int oh_lo, oh_hi;
                    tap_range(&oh_lo, &oh_hi, H, OH, kh, stride, pad);
                    for (int kw = 0; kw < k; kw++) {
                        int ow_lo, ow_hi;
                        tap_range(&ow_lo, &ow_hi, W, OW, kw, stride, pad);
                        const float wv = wk[kh * k + kw];
                        for (int oh = oh_lo; oh <= oh_hi; oh++) {
                            float *orow = o + (size_t)oh * OW;
                            const float *xrow = x + (size_t)(oh * stride - pad + kh) * W;
                            const int off = kw - pad;  // input column = ow*stride + off
                            if (stride == 1)
                                for (int ow = ow_lo; ow <= ow_hi; ow++) orow[ow] += wv * xrow[ow + off];
                            else
                                for (int ow = ow_lo; ow <= ow_hi; ow++)
                                    orow[ow] += wv * xrow[ow * stride + off];
                        }
                    }
                }
            }
        }
    }
}

void conv2d_backward(float *din, float *dw, float *db, const float *dout,
                     const float *in, const float *w,
                     int N, int C, int H, int W, int K, int k, int stride, int pad) {
    const int OH = conv2d_out_size(H, k, stride, pad), OW = conv2d_out_size(W, k, stride, pad);
    const size_t ihw = (size_t)H * W, ohw = (size_t)OH * OW;
    const int pointwise = k == 1 && stride == 1 && pad == 0;
    for (int n = 0; n < N; n++) {
        for (int ko = 0; ko < K; ko++) {
            const float *g = dout + ((size_t)n * K + ko) * ohw;
            if (db) {
                double s = 0.0;
                for (size_t i = 0; i < ohw; i++) s += g[i];
                db[ko] += (float)s;
            }
            if (!dw && !din) continue;
            for (int c = 0; c < C; c++) {
                const float *x = in + ((size_t)n * C + c) * ihw;
                float *dx = din ? din + ((size_t)n * C + c) * ihw : NULL;
                const float *wk = w + ((size_t)ko * C + c) * k * k;
                float *dwk = dw ? dw + ((size_t)ko * C + c) * k * k : NULL;
                if (pointwise) {
                    if (dwk) {
                        double acc = 0.0;  // weight gradients sum over many positions
                        for (size_t i = 0; i < ohw; i++) acc += (double)g[i] * x[i];
                        dwk[0] += (float)acc;
                    }
                    if (dx) {
                        const float wv = wk[0];
                        for (size_t i = 0; i < ohw; i++) dx[i] += wv * g[i];
                    }
                    continue;
                }
                for (int kh = 0; kh < k; kh++) {
                    int oh_lo, oh_hi;
                    tap_range(&oh_lo, &oh_hi, H, OH, kh, stride, pad);
                    for (int kw = 0; kw < k; kw++) {
                        int ow_lo, ow_hi;
                        tap_range(&ow_lo, &ow_hi, W, OW, kw, stride, pad);
                        const float wv = wk[kh * k + kw];
                        const int off = kw - pad;
                        double acc = 0.0;
                        for (int oh = oh_lo; oh <= oh_hi; oh++) {
                            const float *grow = g + (size_t)oh * OW;
                            const size_t ioff = (size_t)(oh * stride - pad + kh) * W;
                            if (dwk) {
                                const float *xrow = x + ioff;
                                for (int ow = ow_lo; ow <= ow_hi; ow++)
                                    acc += (double)grow[ow] * xrow[ow * stride + off];
                            }
                            if (dx) {
                                float *dxrow = dx + ioff;
                                if (stride == 1)
                                    for (int ow = ow_lo; ow <= ow_hi; ow++) dxrow[ow + off] += wv * grow[ow];
                                else
                                    for (int ow = ow_lo; ow <= ow_hi; ow++)
                                        dxrow[ow * stride + off] += wv * grow[ow];
                            }
                        }
                        if (dwk) dwk[kh * k + kw] += (float)acc;
                    }
                }
            }
        }
    }
}
