// Weight gradient of a convolution whose input has few channels (a network's first layer:
// GoogLeNet's 7x7/2 conv1 on a grayscale or RGB image), without the GEMM.
//
// There dW [K x C*k*k] += dout [K x pixels] * im2col(in)^T has only C*k*k columns (49 or
// 147): the GEMM's 48-column slivers leave most of a last sliver idle (49 = 48 + 1 costs as much
// as 96) and its packing re-gathers the image for every block. Here each image is laid out once
// with its columns split by residue mod stride, so that any tap's values along an output row
// are contiguous, then copied into its im2col rows (T x OH*OW, in L2), and dot products run
// along those rows: 4 output channels x 5 taps of 16-lane partial sums in registers, 9 loads
// per 20 FMAs, the taps' rows staying in L1 while the gradient streams past.
//
// Sums: per fixed chunk of images, 16 lanes of float partial sums (over images, rows, columns
// in order), then the lanes, then the chunks in order: bit-identical for any thread count.
// AVX-512 only; conv_fast.c calls it when conv2d_smallc_use() says so.
#pragma once
#include <stddef.h>

// 1 if conv2d_fast_backward computes dW of this shape here (AVX-512 in use, float32 mode).
int conv2d_smallc_use(int C, int H, int W, int k, int stride, int pad);
// Floats of workspace for conv2d_smallc_weight_grad (0 for shapes it does not take), at the
// current thread count.
size_t conv2d_smallc_workspace_size(int N, int C, int H, int W, int K, int k, int stride,
                                    int pad);
// dw [K,C,k,k] += the weight gradient of in [N,C,H,W] and dout [N,K,OH,OW].
void conv2d_smallc_weight_grad(float *dw, const float *in, const float *dout, int N, int C,
                               int H, int W, int K, int k, int stride, int pad, float *ws);
