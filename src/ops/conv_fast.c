// Convolution through gemm_ex(): see conv_fast.h.
#include "ops/conv_fast.h"
#include "ops/conv_smallc.h"
#include "ops/cpu.h"
#include "ops/fast_ops.h"
#include "ops/gemm.h"
#include "ops/winograd.h"
#include "util/err.h"
#include <stdint.h>
#include <string.h>

static int out_size(int H, int k, int stride, int pad) {
    return H + 2 * pad < k ? 0 : (H + 2 * pad - k) / stride + 1;
}

// din of a stride-1 convolution is itself a convolution of dout (padding k-1-pad) with
// W'[c][o][dy][dx] = W[o][c][k-1-dy][k-1-dx]; this needs k-1-pad >= 0.
static int din_as_conv(int k, int stride, int pad) { return stride == 1 && pad <= k - 1; }

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

// The Winograd tile to run with (0: the GEMM). Workspaces are sized with winograd_tile()
// alone, so they fit whether bfloat16 mode, which keeps to the GEMM, is on or off.
static int winograd_use(int N, int C, int H, int W, int K, int pad) {
    return cpu_bf16() ? 0 : winograd_tile(N, C, H, W, K, pad);
}

// ---- maps smaller than the kernel ----
// GoogLeNet's 3x3 convolutions meet 2x2 and 1x1 maps on 32x32 inputs (4a-5b). There most
// im2col taps read padding: an output pixel sees at most H*W < k*k inputs per channel. The
// convolution of one image is then better done as the dense layer it is, from the C*H*W inputs
// to the K*OH*OW outputs, with weights Weff expanded from W on each call (zeros where a tap
// falls outside the kernel): H*W instead of k*k multiply-adds per output and input channel,
// and plain matrix operands instead of im2col ones.
int conv2d_fast_dense(int H, int W, int k) { return (long long)H * W < (long long)k * k; }

typedef struct {
    float *weff;            // Weff (dense_weights) or its gradient (dense_weights_grad_task)
    const float *w;         // W to expand
    float *dw;              // dW to accumulate into
    int C, H, W, K, k, stride, pad, OH, OW;
} dense_ctx;

// Rows (o, oy, ox) of Weff [K*OH*OW x C*H*W], split by output channel. Column (c, y, x) is
// tap (y - oy*stride + pad, x - ox*stride + pad) of W[o][c] where that lies in the kernel, else
// 0: which one depends on (oy, ox, y, x) only, so the channels go in the inner loop.
static void dense_weights_task(void *vctx, int t, int nt) {
    const dense_ctx *d = vctx;
    const int kk = d->k * d->k, hw = d->H * d->W, ci = d->C * hw;
    for (int o = (int)((long long)d->K * t / nt); o < (int)((long long)d->K * (t + 1) / nt); o++)
        for (int oy = 0; oy < d->OH; oy++)
            for (int ox = 0; ox < d->OW; ox++) {
                float *row = d->weff + ((size_t)(o * d->OH + oy) * d->OW + ox) * ci;
                for (int y = 0; y < d->H; y++)
                    for (int x = 0; x < d->W; x++) {
                        const int dy = y - oy * d->stride + d->pad, dx = x - ox * d->stride + d->pad;
                        float *dst = row + y * d->W + x;   // channel c at dst[c*hw]
                        if (dy < 0 || dy >= d->k || dx < 0 || dx >= d->k) {
                            for (int c = 0; c < d->C; c++) dst[(size_t)c * hw] = 0.0f;
                            continue;
                        }
                        const float *src = d->w + (size_t)o * d->C * kk + dy * d->k + dx;
                        for (int c = 0; c < d->C; c++) dst[(size_t)c * hw] = src[(size_t)c * kk];
                    }
            }
}

static void dense_weights(float *weff, const float *w, int C, int H, int W, int K, int k,
                          int stride, int pad) {
    dense_ctx d = {weff, w, NULL, C, H, W, K, k, stride, pad, out_size(H, k, stride, pad),
                   out_size(W, k, stride, pad)};
    cpu_parallel(dense_weights_task, &d, K);
}

// dw[o][c][dy][dx] += sum over (oy, ox) of g[(o, oy, ox)][(c, y, x)], the taps Weff spread
// (in (oy, ox) order; only taps some output reaches). Channels in blocks, innermost.
enum { DENSE_CBLOCK = 256 };
static void dense_weights_grad_task(void *vctx, int t, int nt) {
    const dense_ctx *d = vctx;
    const int kk = d->k * d->k, hw = d->H * d->W, ci = d->C * hw;
    float acc[DENSE_CBLOCK];
    for (int o = (int)((long long)d->K * t / nt); o < (int)((long long)d->K * (t + 1) / nt); o++)
        for (int c0 = 0; c0 < d->C; c0 += DENSE_CBLOCK) {
            const int nc = d->C - c0 < DENSE_CBLOCK ? d->C - c0 : DENSE_CBLOCK;
            for (int dy = 0; dy < d->k; dy++)
                for (int dx = 0; dx < d->k; dx++) {
                    int any = 0;
                    for (int c = 0; c < nc; c++) acc[c] = 0.0f;
                    for (int oy = 0; oy < d->OH; oy++) {
                        const int y = oy * d->stride - d->pad + dy;
                        if (y < 0 || y >= d->H) continue;
                        for (int ox = 0; ox < d->OW; ox++) {
                            const int x = ox * d->stride - d->pad + dx;
                            if (x < 0 || x >= d->W) continue;
                            const float *g = d->weff +
                                             ((size_t)(o * d->OH + oy) * d->OW + ox) * ci +
                                             (size_t)c0 * hw + y * d->W + x;
                            for (int c = 0; c < nc; c++) acc[c] += g[(size_t)c * hw];
                            any = 1;
                        }
                    }
                    if (!any) continue;
                    float *dw = d->dw + ((size_t)o * d->C + c0) * kk + dy * d->k + dx;
                    for (int c = 0; c < nc; c++) dw[(size_t)c * kk] += acc[c];
                }
        }
}

size_t conv2d_fast_workspace_size(int N, int C, int H, int W, int K, int k, int stride, int pad) {
    int OH = out_size(H, k, stride, pad), OW = out_size(W, k, stride, pad);
    if (OH <= 0 || OW <= 0) return 0;
    int ckk = C * k * k, ohw = OH * OW;
    size_t fwd = gemm_workspace_size(K, N * ohw, ckk);
    size_t dw = gemm_workspace_size(K, ckk, N * ohw);
    int mw = k == 3 && stride == 1 ? winograd_weight_grad_tile(N, C, H, W, K, pad) : 0;
    if (mw) {
        size_t wg = winograd_weight_grad_workspace_size(N, C, H, W, K, pad, mw);
        if (wg > dw) dw = wg;
    }
    size_t sc = conv2d_smallc_workspace_size(N, C, H, W, K, k, stride, pad);
    if (sc > dw) dw = sc;
    size_t din;
    if (din_as_conv(k, stride, pad)) {
        din = round16((size_t)C * K * k * k) + gemm_workspace_size(C, N * H * W, K * k * k);
        int mb = k == 3 ? winograd_tile(N, K, OH, OW, C, k - 1 - pad) : 0;
        if (mb) {   // the backward's Winograd path for din
            size_t wb = round16((size_t)C * K * k * k) +
                        winograd_workspace_size(N, K, OH, OW, C, k - 1 - pad, mb);
            if (wb > din) din = wb;
        }
    }
    else
        din = round16((size_t)ckk * ohw) + gemm_workspace_size(ckk, ohw, K);
    size_t s = fwd > dw ? fwd : dw;
    if (conv2d_fast_dense(H, W, k)) {   // Weff (+ the bias per output) and the GEMMs on it
        int ko = K * ohw, ci = C * H * W;
        size_t g = gemm_workspace_size(N, ko, ci), g2 = gemm_workspace_size(ko, ci, N),
               g3 = gemm_workspace_size(N, ci, ko);
        if (g2 > g) g = g2;
        if (g3 > g) g = g3;
        size_t d = round16((size_t)ko * ci) + round16((size_t)ko) + g;
        if (d > s) s = d;
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

// Forward with the weights given as a GEMM operand (plain or packed); image n's output at
// out + n*ostride (0: K*OH*OW).
static void forward(float *out, ptrdiff_t ostride, const float *in, const gemm_operand *a,
                    const float *b, int N, int C, int H, int W, int K, int k, int stride, int pad,
                    int relu, float *ws) {
    int OH = out_size(H, k, stride, pad), OW = out_size(W, k, stride, pad);
    if (N <= 0 || K <= 0 || OH <= 0 || OW <= 0) return;
    int ckk = C * k * k, ohw = OH * OW;
    // 1x1, stride 1, no padding: im2col is the input itself
    gemm_operand bm = k == 1 && stride == 1 && pad == 0
                          ? batch_cols(in, C, H * W)
                          : im2col_of(GEMM_IM2COL, in, C, H, W, k, stride, pad);
    gemm_output c = {.p = out, .ldc = ohw, .fold = ohw,
                     .fold_stride = ostride ? ostride : (ptrdiff_t)K * ohw};
    int flags = (b ? GEMM_BIAS_ROW : 0) | (relu ? GEMM_RELU : 0);
    gemm_ex(&c, a, &bm, b, K, N * ohw, ckk, flags, ws);
}

// out [N x K*OH*OW] (rows ostride apart; 0: K*OH*OW) = in [N x C*H*W] * Weff^T (+ b per
// output channel, repeated per pixel).
static void dense_forward(float *out, ptrdiff_t ostride, const float *in, const float *w,
                          const float *b, int N, int C, int H, int W, int K, int k, int stride,
                          int pad, int relu, float *ws) {
    int OH = out_size(H, k, stride, pad), OW = out_size(W, k, stride, pad);
    int ohw = OH * OW, ko = K * ohw, ci = C * H * W;
    float *weff = ws, *bias = ws + round16((size_t)ko * ci), *gws = bias + round16((size_t)ko);
    dense_weights(weff, w, C, H, W, K, k, stride, pad);
    if (b)
        for (int j = 0; j < ko; j++) bias[j] = b[j / ohw];
    gemm(out, ostride ? (int)ostride : ko, in, ci, weff, ci, b ? bias : NULL, N, ko, ci,
         GEMM_TRANS_B | (b ? GEMM_BIAS_COL : 0) | (relu ? GEMM_RELU : 0), gws);
}

void conv2d_fast_forward(float *out, const float *in, const float *w, const float *b, int N,
                         int C, int H, int W, int K, int k, int stride, int pad, int relu,
                         float *ws) {
    conv2d_fast_forward_into(out, 0, in, w, b, N, C, H, W, K, k, stride, pad, relu, ws);
}

void conv2d_fast_forward_into(float *out, ptrdiff_t out_stride, const float *in, const float *w,
                              const float *b, int N, int C, int H, int W, int K, int k,
                              int stride, int pad, int relu, float *ws) {
    int OH = out_size(H, k, stride, pad), OW = out_size(W, k, stride, pad);
    if (N <= 0 || K <= 0 || OH <= 0 || OW <= 0) return;
    if (conv2d_fast_dense(H, W, k)) {   // tiny maps first: no transforms at all
        dense_forward(out, out_stride, in, w, b, N, C, H, W, K, k, stride, pad, relu, ws);
        return;
    }
    int m = k == 3 && stride == 1 ? winograd_use(N, C, H, W, K, pad) : 0;
    if (m) {
        winograd_forward_ex(out, out_stride, in, w, b, N, C, H, W, K, pad, relu, 0, m, ws);
        return;
    }
    gemm_operand a = {.kind = GEMM_DENSE, .p = w, .rs = (ptrdiff_t)C * k * k, .cs = 1};
    forward(out, out_stride, in, &a, b, N, C, H, W, K, k, stride, pad, relu, ws);
}

size_t conv2d_fast_pack_weights_size(int C, int K, int k) { return gemm_pack_a_size(K, C * k * k); }

void conv2d_fast_pack_weights(float *packed, const float *w, int C, int K, int k) {
    gemm_pack_a(packed, w, C * k * k, 0, K, C * k * k);
}

int conv2d_fast_forward_packed(float *out, const float *in, const float *packed, const float *b,
                               int N, int C, int H, int W, int K, int k, int stride, int pad,
                               int relu, float *ws) {
    return conv2d_fast_forward_packed_into(out, 0, in, packed, b, N, C, H, W, K, k, stride, pad,
                                           relu, ws);
}

int conv2d_fast_forward_packed_into(float *out, ptrdiff_t out_stride, const float *in,
                                    const float *packed, const float *b, int N, int C, int H,
                                    int W, int K, int k, int stride, int pad, int relu,
                                    float *ws) {
    if (gemm_pack_a_check(packed, K, C * k * k) != 0) return -1;
    gemm_operand a = {.kind = GEMM_PACKED, .p = packed};
    forward(out, out_stride, in, &a, b, N, C, H, W, K, k, stride, pad, relu, ws);
    return 0;
}

// Output rows of the stacked GEMM: group g's start at row0[g] of gp[g], fold stride gfs[g].
static gemm_output group_rows(float *const *ps, const int *Ks, int ng, ptrdiff_t ldc, int fold,
                              int hw) {
    gemm_output c = {.ldc = ldc, .fold = fold, .ngroups = ng};
    int K = 0;
    for (int g = 0; g < ng; g++) {
        c.row0[g] = K;
        c.gp[g] = ps[g];
        c.gfs[g] = fold ? (ptrdiff_t)Ks[g] * hw : 0;
        K += Ks[g];
    }
    c.row0[ng] = K;
    return c;
}

// The stacked 1x1 convolutions' GEMM, A given as an operand (packed or plain).
static void forward_split(float *const *outs, const ptrdiff_t *out_strides, const int *Ks,
                          int n_outs, const float *in, const gemm_operand *a, const float *b,
                          int N, int C, int H, int W, int relu, float *ws) {
    const int hw = H * W;
    gemm_output c = group_rows(outs, Ks, n_outs, hw, hw, hw);
    for (int g = 0; out_strides && g < n_outs; g++)
        if (out_strides[g]) c.gfs[g] = out_strides[g];
    const int K = c.row0[n_outs];
    if (N <= 0 || K <= 0 || hw <= 0) return;
    gemm_operand bm = batch_cols(in, C, hw);
    gemm_ex(&c, a, &bm, b, K, N * hw, C, (b ? GEMM_BIAS_ROW : 0) | (relu ? GEMM_RELU : 0), ws);
}

static int split_count_ok(int n_outs, const char *fn) {
    if (n_outs >= 1 && n_outs <= GEMM_MAX_GROUPS) return 1;
    err_set("%s: %d outputs (1 to %d)", fn, n_outs, GEMM_MAX_GROUPS);
    return 0;
}

int conv2d_fast_forward_packed_split(float *const *outs, const ptrdiff_t *out_strides,
                                     const int *Ks, int n_outs, const float *in,
                                     const float *packed, const float *b, int N, int C, int H,
                                     int W, int relu, float *ws) {
    if (!split_count_ok(n_outs, "conv2d_fast_forward_packed_split")) return -1;
    int K = 0;
    for (int g = 0; g < n_outs; g++) K += Ks[g];
    if (gemm_pack_a_check(packed, K, C) != 0) return -1;
    gemm_operand a = {.kind = GEMM_PACKED, .p = packed};
    forward_split(outs, out_strides, Ks, n_outs, in, &a, b, N, C, H, W, relu, ws);
    return 0;
}

int conv2d_fast_forward_split(float *const *outs, const ptrdiff_t *out_strides, const int *Ks,
                              int n_outs, const float *in, const float *w, const float *b, int N,
                              int C, int H, int W, int relu, float *ws) {
    if (!split_count_ok(n_outs, "conv2d_fast_forward_split")) return -1;
    gemm_operand a = {.kind = GEMM_DENSE, .p = w, .rs = C, .cs = 1};
    forward_split(outs, out_strides, Ks, n_outs, in, &a, b, N, C, H, W, relu, ws);
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

// wt[c][o][t] = w[o][c][kk-1-t]: the transposed and flipped weights that din of a k x k
// convolution takes as A, split over threads by c so that each writes whole rows of its own.
typedef struct {
    float *wt;
    const float *w;
    int K, C, kk;
} wt_job;

static void flip_weights_task(void *vctx, int t, int nt) {
    const wt_job *j = vctx;
    size_t c0, c1;
    cpu_part_range((size_t)j->C, t, nt, &c0, &c1);
    for (size_t c = c0; c < c1; c++)
        for (int o = 0; o < j->K; o++) {
            const float *src = j->w + ((size_t)o * j->C + c) * j->kk;
            float *dst = j->wt + (c * j->K + o) * j->kk;
            for (int q = 0; q < j->kk; q++) dst[q] = src[j->kk - 1 - q];
        }
}

static void flip_weights(float *wt, const float *w, int K, int C, int kk) {
    wt_job j = {wt, w, K, C, kk};
    cpu_parallel(flip_weights_task, &j, cpu_threads_for((size_t)K * C * kk, 16384));
}

// ---- 1x1 convolutions of one input as one GEMM (training) ----
// Workspace: the stacked weights (read transposed for din), the stacked biases, the stacked
// output gradient [N, Ktot, H*W], then the GEMM's packing space.

size_t conv2d_fast_1x1_group_workspace_size(int N, int C, int H, int W, int Ktot) {
    const int cols = N * H * W;
    size_t g = gemm_workspace_size(Ktot, cols, C), g2 = gemm_workspace_size(Ktot, C, cols),
           g3 = gemm_workspace_size(C, cols, Ktot);
    if (g2 > g) g = g2;
    if (g3 > g) g = g3;
    return round16((size_t)Ktot * C) + round16((size_t)Ktot) + round16((size_t)Ktot * cols) + g;
}

void conv2d_fast_1x1_group_forward(float *const *outs, const float *in, const float *const *w,
                                   const float *const *b, const int *Ks, int ng, int N, int C,
                                   int H, int W, float *ws) {
    const int hw = H * W;
    int K = 0, any_bias = 0;
    for (int g = 0; g < ng; g++) K += Ks[g], any_bias |= b && b[g];
    if (N <= 0 || K <= 0 || hw <= 0) return;
    float *wst = ws, *bias = ws + round16((size_t)K * C);
    float *gws = bias + round16((size_t)K) + round16((size_t)K * N * hw);
    for (int g = 0, k0 = 0; g < ng; k0 += Ks[g], g++) {   // (conv2d_fast_forward: + b, none + 0)
        memcpy(wst + (size_t)k0 * C, w[g], sizeof(float) * Ks[g] * C);
        for (int k = 0; any_bias && k < Ks[g]; k++) bias[k0 + k] = b[g] ? b[g][k] : 0.0f;
    }
    gemm_output c = group_rows(outs, Ks, ng, hw, hw, hw);
    gemm_operand a = {.kind = GEMM_DENSE, .p = wst, .rs = C, .cs = 1};
    gemm_operand bm = batch_cols(in, C, hw);
    gemm_ex(&c, &a, &bm, any_bias ? bias : NULL, K, N * hw, C, any_bias ? GEMM_BIAS_ROW : 0, gws);
}

void conv2d_fast_1x1_group_backward(float *din, float *const *dw, float *const *db,
                                    const float *const *douts, const float *in,
                                    const float *const *w, const int *Ks, int ng, int N, int C,
                                    int H, int W, int din_overwrite, float *ws) {
    const int hw = H * W;
    int K = 0;
    for (int g = 0; g < ng; g++) K += Ks[g];
    if (N <= 0 || K <= 0 || hw <= 0) return;
    for (int g = 0; db && g < ng; g++)
        if (db[g]) bias_grad(db[g], douts[g], N, Ks[g], hw);
    int any_dw = 0;
    for (int g = 0; dw && g < ng; g++) any_dw |= dw[g] != NULL;
    if (!any_dw && !din) return;
    float *wt = ws, *dys = ws + round16((size_t)K * C) + round16((size_t)K);
    float *gws = dys + round16((size_t)K * N * hw);
    concat_fast_forward(dys, douts, Ks, ng, N, hw);   // the gradients stacked per image
    gemm_operand dy = batch_cols(dys, K, hw);
    if (any_dw) {   // dW[g] += dY[g] * in^T: the stacked rows, each group into its own tensor
        float *dst[GEMM_MAX_GROUPS];
        // (a group without a gradient still takes its rows: into zeroed scratch, wt's rows)
        for (int g = 0, k0 = 0; g < ng; k0 += Ks[g], g++) {
            dst[g] = dw[g] ? dw[g] : wt + (size_t)k0 * C;
            if (!dw[g]) memset(dst[g], 0, sizeof(float) * Ks[g] * C);
        }
        gemm_output c = group_rows(dst, Ks, ng, C, 0, 0);
        gemm_operand bm = im2col_of(GEMM_IM2COL_T, in, C, H, W, 1, 1, 0);
        gemm_ex(&c, &dy, &bm, NULL, K, C, N * hw, GEMM_ACCUMULATE, gws);
    }
    if (!din) return;
    // din += Ws^T dY: the stacked weights Ws [Ktot x C], read as the transposed A (copying
    // them is quicker than writing Ws^T out: a strided scalar transpose was 1.8 % of the step)
    for (int g = 0, k0 = 0; g < ng; k0 += Ks[g], g++)
        memcpy(wt + (size_t)k0 * C, w[g], sizeof(float) * Ks[g] * C);
    gemm_operand a = {.kind = GEMM_DENSE, .p = wt, .rs = 1, .cs = C};
    gemm_output c = {.p = din, .ldc = hw, .fold = hw, .fold_stride = (ptrdiff_t)C * hw};
    gemm_ex(&c, &a, &dy, NULL, C, N * hw, K, din_overwrite ? 0 : GEMM_ACCUMULATE, gws);
}

void conv2d_fast_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                          const float *w, int N, int C, int H, int W, int K, int k, int stride,
                          int pad, int din_overwrite, float *ws) {
    int OH = out_size(H, k, stride, pad), OW = out_size(W, k, stride, pad);
    if (N <= 0 || K <= 0 || OH <= 0 || OW <= 0) return;
    int ckk = C * k * k, ohw = OH * OW;
    const int din_acc = din_overwrite ? 0 : GEMM_ACCUMULATE;

    if (db) bias_grad(db, dout, N, K, ohw);

    if (conv2d_fast_dense(H, W, k)) {   // dout [N x K*ohw], in and din [N x C*H*W]
        int ko = K * ohw, ci = C * H * W;
        float *g = ws, *gws = ws + round16((size_t)ko * ci) + round16((size_t)ko);
        if (dw) {   // dWeff = dout^T * in, folded back onto the taps it was spread from
            gemm(g, ci, dout, ko, in, ci, NULL, ko, ci, N, GEMM_TRANS_A, gws);
            dense_ctx d = {g, NULL, dw, C, H, W, K, k, stride, pad, OH, OW};
            cpu_parallel(dense_weights_grad_task, &d, K);
        }
        if (din) {  // din += dout * Weff
            dense_weights(g, w, C, H, W, K, k, stride, pad);
            gemm(din, ci, dout, ko, g, ci, NULL, N, ci, ko, din_acc, gws);
        }
        return;
    }

    // A 3x3 stride-1 one with small maps: Winograd's transforms (a quarter of the products
    // with F(4x4)); bfloat16 mode keeps to the GEMM, as the forward does.
    int mw = dw && k == 3 && stride == 1 && !cpu_bf16() && cpu_isa() == CPU_ISA_AVX512
                 ? winograd_weight_grad_tile(N, C, H, W, K, pad)
                 : 0;
    if (mw) {
        winograd_weight_grad(dw, in, dout, N, C, H, W, K, pad, mw, ws);
    } else if (dw && conv2d_smallc_use(C, H, W, k, stride, pad)) {   // few input channels
        conv2d_smallc_weight_grad(dw, in, dout, N, C, H, W, K, k, stride, pad, ws);
    } else if (dw) {  // dW[K x ckk] += dout[K x (N*ohw)] * im2col(in)^T
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
        flip_weights(wt, w, K, C, kk);
        // A 3x3 one may go to Winograd like a forward convolution, into din.
        int m = k == 3 ? winograd_use(N, K, OH, OW, C, k - 1 - pad) : 0;
        if (m) {
            winograd_forward_ex(din, 0, dout, wt, NULL, N, K, OH, OW, C, k - 1 - pad, 0,
                                !din_overwrite, m, ws + round16((size_t)C * K * kk));
            return;
        }
        gemm_operand a = {.kind = GEMM_DENSE, .p = wt, .rs = (ptrdiff_t)K * kk, .cs = 1};
        gemm_operand bm = k == 1 ? batch_cols(dout, K, ohw)
                                 : im2col_of(GEMM_IM2COL, dout, K, OH, OW, k, 1, k - 1 - pad);
        gemm_output c = {.p = din, .ldc = H * W, .fold = H * W,
                         .fold_stride = (ptrdiff_t)C * H * W};
        gemm_ex(&c, &a, &bm, NULL, C, N * H * W, K * kk, din_acc,
                ws + round16((size_t)C * K * kk));
    } else {  // per image: dcol = W^T * dout[n], then scatter-add
        float *dcol = ws;
        float *gws = ws + round16((size_t)ckk * ohw);
        if (din_overwrite) memset(din, 0, sizeof(float) * N * C * H * W);
        for (int n = 0; n < N; n++) {
            gemm(dcol, ohw, w, ckk, dout + (size_t)n * K * ohw, ohw, NULL, ckk, ohw, K,
                 GEMM_TRANS_A, gws);
            col2im_add(din + (size_t)n * C * H * W, dcol, C, H, W, k, stride, pad, OH, OW);
        }
    }
}
