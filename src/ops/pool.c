// Max, average and adaptive average pooling, with PyTorch's (torch 1.13 CPU) window rules.
#include "ops/ops.h"
#include <math.h>

static int div_floor(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

int pool_out_size(int H, int k, int stride, int pad, int ceil_mode) {
    int out = div_floor(H + 2 * pad - k + (ceil_mode ? stride - 1 : 0), stride) + 1;
    // A ceil-mode window that would start entirely inside the right padding is dropped.
    if (ceil_mode && (out - 1) * stride >= H + pad) out--;
    return out;
}

// ---- max pool ----

// Index (within the H*W plane) of the window's maximum: the first maximum in row-major window
// order, except that any NaN replaces it (PyTorch: `val > max || isnan(val)`). Padding is -inf,
// i.e. simply outside the clipped window. -1 for a window only over padding, which PyTorch
// rules out (pad <= k/2) but which must not read out of bounds here.
static int maxpool_argmax(const float *x, int H, int W, int oh, int ow, int k, int stride, int pad) {
    int h0 = oh * stride - pad, w0 = ow * stride - pad;
    int h1 = h0 + k < H ? h0 + k : H, w1 = w0 + k < W ? w0 + k : W;
    if (h0 < 0) h0 = 0;
    if (w0 < 0) w0 = 0;
    if (h0 >= h1 || w0 >= w1) return -1;
    int best = h0 * W + w0;
    float m = -INFINITY;
    for (int h = h0; h < h1; h++)
        for (int w = w0; w < w1; w++) {
            float v = x[h * W + w];
            if (v > m || isnan(v)) {
                m = v;
                best = h * W + w;
            }
        }
    return best;
}

void maxpool2d_forward(float *out, const float *in, int N, int C, int H, int W,
                       int k, int stride, int pad, int ceil_mode) {
    const int OH = pool_out_size(H, k, stride, pad, ceil_mode);
    const int OW = pool_out_size(W, k, stride, pad, ceil_mode);
    for (size_t p = 0; p < (size_t)N * C; p++) {
        const float *x = in + p * H * W;
        float *o = out + p * OH * OW;
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                int i = maxpool_argmax(x, H, W, oh, ow, k, stride, pad);
                o[oh * OW + ow] = i >= 0 ? x[i] : -INFINITY;
            }
    }
}

void maxpool2d_backward(float *din, const float *dout, const float *in, int N, int C, int H, int W,
                        int k, int stride, int pad, int ceil_mode) {
    if (!din) return;
    const int OH = pool_out_size(H, k, stride, pad, ceil_mode);
    const int OW = pool_out_size(W, k, stride, pad, ceil_mode);
    for (size_t p = 0; p < (size_t)N * C; p++) {
        const float *x = in + p * H * W;
        const float *g = dout + p * OH * OW;
        float *dx = din + p * H * W;
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                int i = maxpool_argmax(x, H, W, oh, ow, k, stride, pad);
                if (i >= 0) dx[i] += g[oh * OW + ow];
            }
    }
}

// ---- average pool ----

// The clipped window [*h0,*h1) x [*w0,*w1) and its divisor. As PyTorch: the pad-inclusive size
// is taken before clipping to the input, but after clipping the end to input + padding, so a
// ceil-mode tail window reaching past the padding is not counted beyond it.
static int avg_window(int *h0, int *h1, int *w0, int *w1, int H, int W, int oh, int ow,
                      int k, int stride, int pad, int count_include_pad) {
    *h0 = oh * stride - pad;
    *w0 = ow * stride - pad;
    *h1 = *h0 + k < H + pad ? *h0 + k : H + pad;
    *w1 = *w0 + k < W + pad ? *w0 + k : W + pad;
    int pool_size = (*h1 - *h0) * (*w1 - *w0);
    if (*h0 < 0) *h0 = 0;
    if (*w0 < 0) *w0 = 0;
    if (*h1 > H) *h1 = H;
    if (*w1 > W) *w1 = W;
    return count_include_pad ? pool_size : (*h1 - *h0) * (*w1 - *w0);
}

void avgpool2d_forward(float *out, const float *in, int N, int C, int H, int W,
                       int k, int stride, int pad, int ceil_mode, int count_include_pad) {
    const int OH = pool_out_size(H, k, stride, pad, ceil_mode);
    const int OW = pool_out_size(W, k, stride, pad, ceil_mode);
    for (size_t p = 0; p < (size_t)N * C; p++) {
        const float *x = in + p * H * W;
        float *o = out + p * OH * OW;
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                int h0, h1, w0, w1;
                int div = avg_window(&h0, &h1, &w0, &w1, H, W, oh, ow, k, stride, pad,
                                     count_include_pad);
                if (h0 >= h1 || w0 >= w1) {  // window only over padding (PyTorch writes 0)
                    o[oh * OW + ow] = 0.0f;
                    continue;
                }
                float s = 0.0f;
                for (int h = h0; h < h1; h++)
                    for (int w = w0; w < w1; w++) s += x[h * W + w];
                o[oh * OW + ow] = s / (float)div;
            }
    }
}

void avgpool2d_backward(float *din, const float *dout, int N, int C, int H, int W,
                        int k, int stride, int pad, int ceil_mode, int count_include_pad) {
    if (!din) return;
    const int OH = pool_out_size(H, k, stride, pad, ceil_mode);
    const int OW = pool_out_size(W, k, stride, pad, ceil_mode);
    for (size_t p = 0; p < (size_t)N * C; p++) {
        const float *g = dout + p * OH * OW;
        float *dx = din + p * H * W;
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                int h0, h1, w0, w1;
                int div = avg_window(&h0, &h1, &w0, &w1, H, W, oh, ow, k, stride, pad,
                                     count_include_pad);
                const float gv = g[oh * OW + ow] / (float)div;
                for (int h = h0; h < h1; h++)
                    for (int w = w0; w < w1; w++) dx[h * W + w] += gv;
            }
    }
}

// ---- adaptive average pool ----

// Window of output i: [floor(i*H/OH), ceil((i+1)*H/OH)); overlapping when H % OH != 0 and
// repeating inputs when OH > H.
static int adaptive_start(int i, int H, int OH) { return (int)(((long long)i * H) / OH); }
static int adaptive_end(int i, int H, int OH) {
    return (int)(((long long)(i + 1) * H + OH - 1) / OH);
}

void adaptive_avgpool2d_forward(float *out, const float *in, int N, int C, int H, int W,
                                int OH, int OW) {
    for (size_t p = 0; p < (size_t)N * C; p++) {
        const float *x = in + p * H * W;
        float *o = out + p * OH * OW;
        for (int oh = 0; oh < OH; oh++) {
            const int h0 = adaptive_start(oh, H, OH), h1 = adaptive_end(oh, H, OH);
            for (int ow = 0; ow < OW; ow++) {
                const int w0 = adaptive_start(ow, W, OW), w1 = adaptive_end(ow, W, OW);
                float s = 0.0f;
                for (int h = h0; h < h1; h++)
                    for (int w = w0; w < w1; w++) s += x[h * W + w];
                o[oh * OW + ow] = s / (float)((h1 - h0) * (w1 - w0));
            }
        }
    }
}

void adaptive_avgpool2d_backward(float *din, const float *dout, int N, int C, int H, int W,
                                 int OH, int OW) {
    if (!din) return;
    for (size_t p = 0; p < (size_t)N * C; p++) {
        const float *g = dout + p * OH * OW;
        float *dx = din + p * H * W;
        for (int oh = 0; oh < OH; oh++) {
            const int h0 = adaptive_start(oh, H, OH), h1 = adaptive_end(oh, H, OH);
            for (int ow = 0; ow < OW; ow++) {
                const int w0 = adaptive_start(ow, W, OW), w1 = adaptive_end(ow, W, OW);
                const float gv = g[oh * OW + ow] / (float)((h1 - h0) * (w1 - w0));
                for (int h = h0; h < h1; h++)
                    for (int w = w0; w < w1; w++) dx[h * W + w] += gv;
            }
        }
    }
}
