// Fast conv2d on the GEMM of gemm.h: the same semantics as conv2d_forward / conv2d_backward in
// ops.h (PyTorch's, to float32 rounding), plus a caller-given workspace.
//
// Forward:  out[n] = W[K x C*k*k] * im2col(in[n]) + b, with the batch folded into the GEMM's
//           columns and the im2col matrix packed straight from the image (no im2col buffer);
//           3x3 stride-1 convolutions go to Winograd F(2x2) or F(4x4) (winograd.h) where
//           winograd_tile() says it pays (enough channels and tiles), to a rounding error a few
//           times the direct one's.
// Backward: dW += dout * im2col(in)^T (batch folded into the GEMM's depth);
//           din += (for stride 1) a forward convolution of dout with the flipped, transposed
//           weights (again no buffer), else W^T * dout per image followed by col2im.
#pragma once
#include <stddef.h>

// Maps smaller than the kernel (H*W < k*k) are convolved as the dense layer they are (weights
// expanded per call into a [K*OH*OW x C*H*W] matrix in the workspace): fewer multiply-adds
// than im2col, whose taps mostly read padding there. 1 if conv2d_fast_forward/backward take
// that path for this map and kernel (conv2d_fast_forward_packed never does).
int conv2d_fast_dense(int H, int W, int k);

// Workspace in floats for conv2d_fast_forward and conv2d_fast_backward with these sizes, at
// the current thread count (cpu_threads()).
size_t conv2d_fast_workspace_size(int N, int C, int H, int W, int K, int k, int stride, int pad);

// in [N,C,H,W], w [K,C,k,k], b [K] or NULL -> out [N,K,OH,OW] (overwritten); relu != 0 applies
// max(x, 0) to the output (fusing a following ReLU).
void conv2d_fast_forward(float *out, const float *in, const float *w, const float *b, int N,
                         int C, int H, int W, int K, int k, int stride, int pad, int relu,
                         float *ws);

// As conv2d_fast_forward, but image n's output [K,OH,OW] at out + n*out_stride (0: K*OH*OW):
// e.g. straight into its channels of a concatenation.
void conv2d_fast_forward_into(float *out, ptrdiff_t out_stride, const float *in, const float *w,
                              const float *b, int N, int C, int H, int W, int K, int k,
                              int stride, int pad, int relu, float *ws);

// Inference with weights packed once (gemm_pack_a) instead of on every call: the same results
// bit for bit, except where conv2d_fast_forward takes the Winograd path: this one stays direct.
// The packing belongs to the ISA level in use when packing.
size_t conv2d_fast_pack_weights_size(int C, int K, int k);  // floats
void conv2d_fast_pack_weights(float *packed, const float *w, int C, int K, int k);
// As conv2d_fast_forward; -1 (err_set) if `packed` was made for other sizes or ISA level.
int conv2d_fast_forward_packed(float *out, const float *in, const float *packed, const float *b,
                               int N, int C, int H, int W, int K, int k, int stride, int pad,
                               int relu, float *ws);
int conv2d_fast_forward_packed_into(float *out, ptrdiff_t out_stride, const float *in,
                                    const float *packed, const float *b, int N, int C, int H,
                                    int W, int K, int k, int stride, int pad, int relu,
                                    float *ws);

// 1x1 stride-1 convolutions of one input with their weights packed as one matrix (the rows of
// conv 0, then conv 1, ...; conv2d_fast_pack_weights with K = the sum of Ks): one GEMM whose
// output channels 0..Ks[0]-1 go to outs[0] [N,Ks[0],H,W], the next Ks[1] to outs[1], ... (at
// most 4), image n's at outs[g] + n*out_strides[g] (out_strides NULL or 0: dense). b: the
// biases in the same order, or NULL. The bits of each output are those of
// conv2d_fast_forward_packed with the stacked weights. -1 (err_set) if `packed` does not fit.
int conv2d_fast_forward_packed_split(float *const *outs, const ptrdiff_t *out_strides,
                                     const int *Ks, int n_outs, const float *in,
                                     const float *packed, const float *b, int N, int C, int H,
                                     int W, int relu, float *ws);
// The same with the stacked weights plain ([sum of Ks, C], rows in that order): for bfloat16 on
// AMX, where the GEMM packs them into tiles itself (a float32 packing would send the product
// to the float32 kernels). The bits of conv2d_fast_forward with the stacked weights.
int conv2d_fast_forward_split(float *const *outs, const ptrdiff_t *out_strides, const int *Ks,
                              int n_outs, const float *in, const float *w, const float *b, int N,
                              int C, int H, int W, int relu, float *ws);

// Training's counterpart: 1x1 stride-1 convolutions of one input in [N,C,H,W] with weights
// w[g] [Ks[g],C] and biases b[g] (or NULL; b itself may be NULL), g < ng <= 4, as one GEMM on
// the stacked weights: one pass over the input and taller tiles than a narrow conv alone gets
// (an Inception module's 1x1, 3x3-reduce and 5x5-reduce: 16 to 48 rows for the last).
// Forward: outs[g] [N,Ks[g],H,W] overwritten, bit for bit conv2d_fast_forward's of each conv.
// Backward: dw[g] and db[g] (NULL: skipped) accumulate as conv2d_fast_backward's would, bit for
// bit; din (NULL: skipped) += the sum over the group in one GEMM of depth sum(Ks) (rounded
// differently from one conv at a time), or = it with din_overwrite.
// ws: conv2d_fast_1x1_group_workspace_size floats.
size_t conv2d_fast_1x1_group_workspace_size(int N, int C, int H, int W, int Ktot);
void conv2d_fast_1x1_group_forward(float *const *outs, const float *in, const float *const *w,
                                   const float *const *b, const int *Ks, int ng, int N, int C,
                                   int H, int W, float *ws);
void conv2d_fast_1x1_group_backward(float *din, float *const *dw, float *const *db,
                                    const float *const *douts, const float *in,
                                    const float *const *w, const int *Ks, int ng, int N, int C,
                                    int H, int W, int din_overwrite, float *ws);

// Accumulates (+=) into din [N,C,H,W], dw [K,C,k,k] and db [K]; any of them may be NULL.
// din_overwrite: din = its gradient instead (its old contents never read: no zeroing needed).
void conv2d_fast_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                          const float *w, int N, int C, int H, int W, int K, int k, int stride,
                          int pad, int din_overwrite, float *ws);
