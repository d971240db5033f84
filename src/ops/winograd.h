// Winograd convolution F(m x m, 3 x 3) (Lavin & Gray, 2015) for 3x3 stride-1 convolutions,
// m = 2 or 4: the same semantics as conv2d_forward (ops.h) with k = 3, stride = 1, to a
// somewhat larger float32 rounding error than the direct GEMM convolution (the transforms
// add and scale terms before the products; F(4x4) more than F(2x2)).
//
// Each m x m output tile needs an (m+2) x (m+2) input patch d. With V = B^T d B (per input
// channel) and U = G g G^T (per filter), the tile is Y = A^T M A where M = sum over input
// channels of U .* V: for each of the (m+2)^2 positions one GEMM over the channels,
//     M[pos] (K x tiles) = U[pos] (K x C) * V[pos] (C x tiles),
// with (m+2)^2 / m^2 multiply-adds per output and input channel instead of 9 (4 for F(2x2),
// 2.25 for F(4x4)). The GEMMs run on gemm.h's micro-kernels with U and V written straight
// into their packed layouts by the transforms.
//
// Results are bit-identical for any thread count and differ between ISA levels.
// conv_fast.c chooses this path (conv2d_fast_forward) where it pays; the functions here are
// for that and for tests.
#pragma once
#include <stddef.h>

// The tile size m (2 or 4) that conv2d_fast_forward uses for this 3x3 stride-1 convolution,
// or 0 where the direct GEMM convolution is as fast or Winograd is not applicable.
int winograd_tile(int N, int C, int H, int W, int K, int pad);

// Workspace in floats for winograd_forward with tile m at the current thread count, enough
// for every ISA level.
size_t winograd_workspace_size(int N, int C, int H, int W, int K, int pad, int m);

// in [N,C,H,W], w [K,C,3,3], b [K] or NULL -> out [N,K,OH,OW] (overwritten), OH = H + 2*pad - 2
// (>= 1), likewise OW; relu != 0 applies max(x, 0) (NaN stays). m = 2 or 4.
void winograd_forward(float *out, const float *in, const float *w, const float *b, int N, int C,
                      int H, int W, int K, int pad, int relu, int m, float *ws);
// As winograd_forward, but image n's output at out + n*out_stride (0: K*OH*OW, dense), and with
// accumulate != 0 added to out (b must be NULL and relu 0 then): the input gradient of a 3x3
// stride-1 convolution (conv_fast.c's backward), or outputs written into a concatenation.
void winograd_forward_ex(float *out, ptrdiff_t out_stride, const float *in, const float *w,
                         const float *b, int N, int C, int H, int W, int K, int pad, int relu,
                         int accumulate, int m, float *ws);

// The weight gradient of the same convolution: dw [K,C,3,3] += the gradient for dout [N,K,OH,OW]
// and in [N,C,H,W], with Winograd's transforms (AVX-512 only: call it where cpu_isa() is
// CPU_ISA_AVX512 and winograd_weight_grad_tile() gives m != 0; that tile is the forward's,
// where the map's rows hold at most 8 tiles). Bit-identical for any thread count.
int winograd_weight_grad_tile(int N, int C, int H, int W, int K, int pad);
size_t winograd_weight_grad_workspace_size(int N, int C, int H, int W, int K, int pad, int m);
void winograd_weight_grad(float *dw, const float *in, const float *dout, int N, int C, int H,
                          int W, int K, int pad, int m, float *ws);
