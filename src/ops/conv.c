// conv2d reference kernels (square kernel, symmetric zero padding), PyTorch semantics.
//
// Loop order: for every output row, (input channel, kernel tap) pairs add "weight * input row"
// into a row of double accumulators, so the innermost loop runs over contiguous memory. The
// valid output range of each tap is computed up front, so padding costs no branches inside.
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

// Sums are kept in double and rounded once per output, so the reference is accurate to float32
// rounding (PyTorch's own float32 kernels drift further): deep networks amplify per-layer error,
// and a reference this exact keeps whole-model tests meaningful. Rows are processed in column
// chunks of ROW_CHUNK so the accumulators live on the stack (ops never allocate).
#define ROW_CHUNK 1024

void conv2d_forward(float *out, const float *in, const float *w, const float *b,
                    int N, int C, int H, int W, int K, int k, int stride, int pad) {
    // in [N,C,H,W], w [K,C,k,k] -> out [N,K,OH,OW]
    const int OH = conv2d_out_size(H, k, stride, pad), OW = conv2d_out_size(W, k, stride, pad);
    const size_t ihw = (size_t)H * W, ohw = (size_t)OH * OW;
    double acc[ROW_CHUNK];
    for (int n = 0; n < N; n++) {
        for (int ko = 0; ko < K; ko++) {
            float *o = out + ((size_t)n * K + ko) * ohw;
            const double bias = b ? b[ko] : 0.0;
            for (int oh = 0; oh < OH; oh++) {
                for (int c0 = 0; c0 < OW; c0 += ROW_CHUNK) {
                    const int c1 = c0 + ROW_CHUNK < OW ? c0 + ROW_CHUNK : OW;
                    for (int ow = c0; ow < c1; ow++) acc[ow - c0] = bias;
                    for (int c = 0; c < C; c++) {
                        const float *x = in + ((size_t)n * C + c) * ihw;
                        const float *wk = w + ((size_t)ko * C + c) * k * k;
                        for (int kh = 0; kh < k; kh++) {
                            const int ih = oh * stride - pad + kh;
                            if (ih < 0 || ih >= H) continue;
                            const float *xrow = x + (size_t)ih * W;
                            for (int kw = 0; kw < k; kw++) {
                                int ow_lo, ow_hi;
                                tap_range(&ow_lo, &ow_hi, W, OW, kw, stride, pad);
                                if (ow_lo < c0) ow_lo = c0;
                                if (ow_hi > c1 - 1) ow_hi = c1 - 1;
                                const double wv = wk[kh * k + kw];
                                const int off = kw - pad;  // input column = ow*stride + off
                                double *a = acc - c0;
                                if (stride == 1)
                                    for (int ow = ow_lo; ow <= ow_hi; ow++) a[ow] += wv * xrow[ow + off];
                                else
                                    for (int ow = ow_lo; ow <= ow_hi; ow++) a[ow] += wv * xrow[ow * stride + off];
                            }
                        }
                    }
                    for (int ow = c0; ow < c1; ow++) o[(size_t)oh * OW + ow] = (float)acc[ow - c0];
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
    // Bias and weight gradients: per (image, channel, tap) sums in double.
    for (int n = 0; n < N; n++) {
        for (int ko = 0; ko < K; ko++) {
            const float *g = dout + ((size_t)n * K + ko) * ohw;
            if (db) {
                double s = 0.0;
                for (size_t i = 0; i < ohw; i++) s += g[i];
                db[ko] += (float)s;
            }
            if (!dw) continue;
            for (int c = 0; c < C; c++) {
                const float *x = in + ((size_t)n * C + c) * ihw;
                float *dwk = dw + ((size_t)ko * C + c) * k * k;
                for (int kh = 0; kh < k; kh++) {
                    int oh_lo, oh_hi;
                    tap_range(&oh_lo, &oh_hi, H, OH, kh, stride, pad);
                    for (int kw = 0; kw < k; kw++) {
                        int ow_lo, ow_hi;
                        tap_range(&ow_lo, &ow_hi, W, OW, kw, stride, pad);
                        const int off = kw - pad;
                        double acc = 0.0;
                        for (int oh = oh_lo; oh <= oh_hi; oh++) {
                            const float *grow = g + (size_t)oh * OW;
                            const float *xrow = x + (size_t)(oh * stride - pad + kh) * W;
                            for (int ow = ow_lo; ow <= ow_hi; ow++)
                                acc += (double)grow[ow] * xrow[ow * stride + off];
                        }
                        dwk[kh * k + kw] += (float)acc;
                    }
                }
            }
        }
    }
    if (!din) return;
    // Input gradients: each input row gathers from every (output channel, tap) in double.
    double acc[ROW_CHUNK];
    for (int n = 0; n < N; n++) {
        for (int c = 0; c < C; c++) {
            float *dx = din + ((size_t)n * C + c) * ihw;
            for (int ih = 0; ih < H; ih++) {
                for (int c0 = 0; c0 < W; c0 += ROW_CHUNK) {
                    const int c1 = c0 + ROW_CHUNK < W ? c0 + ROW_CHUNK : W;
                    for (int iw = c0; iw < c1; iw++) acc[iw - c0] = 0.0;
                    double *a = acc - c0;
                    for (int ko = 0; ko < K; ko++) {
                        const float *g = dout + ((size_t)n * K + ko) * ohw;
                        const float *wk = w + ((size_t)ko * C + c) * k * k;
                        for (int kh = 0; kh < k; kh++) {
                            const int t = ih + pad - kh;   // = oh * stride
                            if (t < 0 || t % stride) continue;
                            const int oh = t / stride;
                            if (oh >= OH) continue;
                            const float *grow = g + (size_t)oh * OW;
                            for (int kw = 0; kw < k; kw++) {
                                int ow_lo, ow_hi;
                                tap_range(&ow_lo, &ow_hi, W, OW, kw, stride, pad);
                                const int off = kw - pad;   // input column = ow*stride + off
                                // keep iw = ow*stride + off inside [c0, c1)
                                while (ow_lo <= ow_hi && ow_lo * stride + off < c0) ow_lo++;
                                while (ow_hi >= ow_lo && ow_hi * stride + off >= c1) ow_hi--;
                                const double wv = wk[kh * k + kw];
                                if (stride == 1)
                                    for (int ow = ow_lo; ow <= ow_hi; ow++) a[ow + off] += wv * grow[ow];
                                else
                                    for (int ow = ow_lo; ow <= ow_hi; ow++) a[ow * stride + off] += wv * grow[ow];
                            }
                        }
                    }
                    for (int iw = c0; iw < c1; iw++) dx[(size_t)ih * W + iw] += (float)acc[iw - c0];
                }
            }
        }
    }
}
