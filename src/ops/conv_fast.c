// Convolution through gemm_ex(): see conv_fast.h.
#include "ops/conv_fast.h"
#include "ops/gemm.h"
#include "ops/winograd.h"
#include <stdint.h>

static int out_size(int H, int k, int stride, int pad) {
    return H + 2 * pad < k ? 0 : (H + 2 * pad - k) / stride + 1;
}

// din of a stride-1 convolution is itself a convolution of dout (padding k-1-pad) with
// W'[c][o][dy][dx] = W[o][c][k-1-dy][k-1-dx]; this needs k-1-pad >= 0.
static int din_as_conv(int k, int stride, int pad) { return stride == 1 && pad <= k - 1; }

// A 1x1 image with a 1x1 output (e.g. a 3x3 pad-1 conv at the end of GoogLeNet on small
// inputs) meets only the tap dy = dx = pad: the others read padding. Its gradients are then
// plain matrix products with that tap's weights, 1/(k*k) of the im2col work.
static int single_tap(int H, int W, int k, int stride, int pad) {
    return H == 1 && W == 1 && pad < k && out_size(1, k, stride, pad) == 1;
}

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

size_t conv2d_fast_workspace_size(int N, int C, int H, int W, int K, int k, int stride, int pad) {
    int OH = out_size(H, k, stride, pad), OW = out_size(W, k, stride, pad);
    if (OH <= 0 || OW <= 0) return 0;
    int ckk = C * k * k, ohw = OH * OW;
    size_t fwd = gemm_workspace_size(K, N * ohw, ckk);
    size_t dw = gemm_workspace_size(K, ckk, N * ohw);
    size_t din;
    if (din_as_conv(k, stride, pad))
        din = round16((size_t)C * K * k * k) + gemm_workspace_size(C, N * H * W, K * k * k);
    else
        din = round16((size_t)ckk * ohw) + gemm_workspace_size(ckk, ohw, K);
    size_t s = fwd > dw ? fwd : dw;
    if (single_tap(H, W, k, stride, pad)) {  // backward's shortcut (conv2d_fast_backward)
        size_t dw1 = round16((size_t)K * C) + gemm_workspace_size(K, C, N);
        size_t din1 = gemm_workspace_size(N, C, K);
        if (dw1 > s) s = dw1;
        if (din1 > s) s = din1;
    }
    if (s < din) s = din;
    int m = k == 3 && stride == 1 ? winograd_tile(N, C, H, W, K, pad) : 0;
    if (m) {  // conv2d_fast_forward's Winograd path
        size_t wino = winograd_workspace_size(N, C, H, W, K, pad, m);
        if (wino > s) s = wino;
    }
    return s;
}

// The im2col view of an [N, C, H, W] tensor for a k x k window.
static gemm_operand im2col_of(gemm_operand_kind kind, const float *x, int C, int H, int W, int k,
                              int stride, int pad) {
    gemm_operand o = {.kind = kind, .p = x, .C = C, .H = H, .W = W, .k = k, .stride = stride,
                      .pad = pad, .OH = out_size(H, k, stride, pad),
                      .OW = out_size(W, k, stride, pad)};
    return o;
}

// [N, rows, hw] tensor as the matrix rows x (N*hw): the batch folded into the columns.
static gemm_operand batch_cols(const float *x, int rows, int hw) {
    gemm_operand o = {.kind = GEMM_DENSE, .p = x, .rs = hw, .cs = 1, .fold = hw,
                      .fold_stride = (ptrdiff_t)rows * hw};
    return o;
}

// Forward with the weights given as a GEMM operand (plain or packed).
static void forward(float *out, const float *in, const gemm_operand *a, const float *b, int N,
                    int C, int H, int W, int K, int k, int stride, int pad, int relu, float *ws) {
    int OH = out_size(H, k, stride, pad), OW = out_size(W, k, stride, pad);
    if (N <= 0 || K <= 0 || OH <= 0 || OW <= 0) return;
    int ckk = C * k * k, ohw = OH * OW;
    // 1x1, stride 1, no padding: im2col is the input itself
    gemm_operand bm = k == 1 && stride == 1 && pad == 0
                          ? batch_cols(in, C, H * W)
                          : im2col_of(GEMM_IM2COL, in, C, H, W, k, stride, pad);
    gemm_output c = {.p = out, .ldc = ohw, .fold = ohw, .fold_stride = (ptrdiff_t)K * ohw};
    int flags = (b ? GEMM_BIAS_ROW : 0) | (relu ? GEMM_RELU : 0);
    gemm_ex(&c, a, &bm, b, K, N * ohw, ckk, flags, ws);
}

void conv2d_fast_forward(float *out, const float *in, const float *w, const float *b, int N,
                         int C, int H, int W, int K, int k, int stride, int pad, int relu,
                         float *ws) {
    int m = k == 3 && stride == 1 ? winograd_tile(N, C, H, W, K, pad) : 0;
    if (m) {
        winograd_forward(out, in, w, b, N, C, H, W, K, pad, relu, m, ws);
        return;
    }
    gemm_operand a = {.kind = GEMM_DENSE, .p = w, .rs = (ptrdiff_t)C * k * k, .cs = 1};
    forward(out, in, &a, b, N, C, H, W, K, k, stride, pad, relu, ws);
}

size_t conv2d_fast_pack_weights_size(int C, int K, int k) { return gemm_pack_a_size(K, C * k * k); }

void conv2d_fast_pack_weights(float *packed, const float *w, int C, int K, int k) {
    gemm_pack_a(packed, w, C * k * k, 0, K, C * k * k);
}

int conv2d_fast_forward_packed(float *out, const float *in, const float *packed, const float *b,
                               int N, int C, int H, int W, int K, int k, int stride, int pad,
                               int relu, float *ws) {
    if (gemm_pack_a_check(packed, K, C * k * k) != 0) return -1;
    gemm_operand a = {.kind = GEMM_PACKED, .p = packed};
    forward(out, in, &a, b, N, C, H, W, K, k, stride, pad, relu, ws);
    return 0;
}

// db[o] += sum over images and pixels of dout: partial sums in float (8 lanes, short runs),
// totals in double, so the rounding error stays far below float32 resolution of the result.
static void bias_grad(float *db, const float *dout, int N, int K, int ohw) {
    for (int o = 0; o < K; o++) {
        double total = 0.0;
        for (int n = 0; n < N; n++) {
            const float *x = dout + ((size_t)n * K + o) * ohw;
            int p = 0;
            for (; p + 64 <= ohw; p += 64) {
                float s[8] = {0};
                for (int t = 0; t < 64; t += 8)
                    for (int l = 0; l < 8; l++) s[l] += x[p + t + l];
                total += (double)(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
            }
            for (; p < ohw; p++) total += x[p];
        }
        db[o] += (float)total;
    }
}

// din[n] += col2im(dcol): dcol rows (c, dy, dx), columns output pixels.
static void col2im_add(float *din, const float *dcol, int C, int H, int W, int k, int stride,
                       int pad, int OH, int OW) {
    for (int c = 0; c < C; c++)
        for (int dy = 0; dy < k; dy++)
            for (int dx = 0; dx < k; dx++) {
                const float *row = dcol + ((size_t)(c * k + dy) * k + dx) * OH * OW;
                for (int oy = 0; oy < OH; oy++) {
                    int y = oy * stride - pad + dy;
                    if (y < 0 || y >= H) continue;
                    float *drow = din + ((size_t)c * H + y) * W;
                    for (int ox = 0; ox < OW; ox++) {
                        int x = ox * stride - pad + dx;
                        if (x >= 0 && x < W) drow[x] += row[oy * OW + ox];
                    }
                }
            }
}

void conv2d_fast_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                          const float *w, int N, int C, int H, int W, int K, int k, int stride,
                          int pad, float *ws) {
    int OH = out_size(H, k, stride, pad), OW = out_size(W, k, stride, pad);
    if (N <= 0 || K <= 0 || OH <= 0 || OW <= 0) return;
    int ckk = C * k * k, ohw = OH * OW;

    if (db) bias_grad(db, dout, N, K, ohw);

    if (k > 1 && single_tap(H, W, k, stride, pad)) {  // dout [N x K], in [N x C]
        int kk = k * k, t = pad * k + pad;
        if (dw) {  // tmp[K x C] = dout^T * in, then dW[o][c][t] += tmp[o][c]
            float *tmp = ws;
            gemm_operand a = {.kind = GEMM_DENSE, .p = dout, .rs = 1, .cs = K};
            gemm_operand bm = {.kind = GEMM_DENSE, .p = in, .rs = C, .cs = 1};
            gemm_output c = {.p = tmp, .ldc = C};
            gemm_ex(&c, &a, &bm, NULL, K, C, N, 0, ws + round16((size_t)K * C));
            for (int o = 0; o < K; o++)
                for (int ch = 0; ch < C; ch++)
                    dw[((size_t)o * C + ch) * kk + t] += tmp[(size_t)o * C + ch];
        }
        if (din) {  // din[N x C] += dout * W[:, :, tap]
            gemm_operand a = {.kind = GEMM_DENSE, .p = dout, .rs = K, .cs = 1};
            gemm_operand bm = {.kind = GEMM_DENSE, .p = w + t, .rs = (ptrdiff_t)C * kk, .cs = kk};
            gemm_output c = {.p = din, .ldc = C};
            gemm_ex(&c, &a, &bm, NULL, N, C, K, GEMM_ACCUMULATE, ws);
        }
        return;
    }

    if (dw) {  // dW[K x ckk] += dout[K x (N*ohw)] * im2col(in)^T
        gemm_operand a = batch_cols(dout, K, ohw);
        gemm_operand bm = im2col_of(GEMM_IM2COL_T, in, C, H, W, k, stride, pad);
        gemm_output c = {.p = dw, .ldc = ckk};
        gemm_ex(&c, &a, &bm, NULL, K, ckk, N * ohw, GEMM_ACCUMULATE, ws);
    }

    if (!din) return;
    if (din_as_conv(k, stride, pad)) {
        // W'[c][o][dy][dx] = W[o][c][k-1-dy][k-1-dx]
        float *wt = ws;
        int kk = k * k;
        for (int o = 0; o < K; o++)
            for (int c = 0; c < C; c++)
                for (int t = 0; t < kk; t++)
                    wt[((size_t)c * K + o) * kk + t] = w[((size_t)o * C + c) * kk + (kk - 1 - t)];
        gemm_operand a = {.kind = GEMM_DENSE, .p = wt, .rs = (ptrdiff_t)K * kk, .cs = 1};
        gemm_operand bm = k == 1 ? batch_cols(dout, K, ohw)
                                 : im2col_of(GEMM_IM2COL, dout, K, OH, OW, k, 1, k - 1 - pad);
        gemm_output c = {.p = din, .ldc = H * W, .fold = H * W,
                         .fold_stride = (ptrdiff_t)C * H * W};
        gemm_ex(&c, &a, &bm, NULL, C, N * H * W, K * kk, GEMM_ACCUMULATE,
                ws + round16((size_t)C * K * kk));
    } else {  // per image: dcol = W^T * dout[n], then scatter-add
        float *dcol = ws;
        float *gws = ws + round16((size_t)ckk * ohw);
        for (int n = 0; n < N; n++) {
            gemm(dcol, ohw, w, ckk, dout + (size_t)n * K * ohw, ohw, NULL, ckk, ohw, K,
                 GEMM_TRANS_A, gws);
            col2im_add(din + (size_t)n * C * H * W, dcol, C, H, W, k, stride, pad, OH, OW);
        }
    }
}
