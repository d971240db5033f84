// Fast, threaded versions of the memory-bound ops of ops.h (batchnorm, relu, max pool,
// adaptive average pool, concat, dropout) plus a fused BatchNorm+ReLU.
//
// Same conventions and semantics as ops.h (PyTorch's, incl. NaN and tie rules): forward
// overwrites, backward accumulates (+=), gradient pointers may be NULL. Work is split over
// cpu_threads() threads by channel or by plane, each output written by one thread in a fixed
// order, so results are bit-identical for every thread count and every ISA level.
//
// Accuracy against the reference ops:
// - exact (bit-identical): relu, max pool (values and argmax), adaptive average pool, concat,
//   dropout, batchnorm eval forward;
// - batchnorm in training mode and batchnorm backward: the per-channel double sums are taken in
//   a different order (partial sums per position, then over positions), so results may differ
//   from the reference in the last float bit (tests/test_fast_ops.c: relative error <= 1e-6).
// - batchnorm eval backward: din exact, dgamma/dbeta as training mode.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "util/rng.h"

// ---- batchnorm2d, optionally fused with the ReLU that follows it ----
// relu = 0: exactly batchnorm2d_forward_train of ops.h (out = BN output).
// relu = 1: out = relu(BN output); the BN output itself is not written anywhere. Backward then
// takes the gradient w.r.t. the ReLU output and recomputes both x-hat and the ReLU's mask (zero
// where the output is <= 0; a NaN output passes, as relu_backward) from the input: the mask from
// the per-channel affine out = in * a + b that the forward applied, bit for bit. So backward
// needs neither output.
// save_affine (2*C floats: a, then b; may be NULL) gets that affine; backward with relu = 1
// needs it (unused with relu = 0, may be NULL).
// os: floats from one image's out to the next's (its dout's, in backward), 0 for dense (C*HW);
// larger when out is this BN's channels of a concatenation, which it then writes in place.
void batchnorm2d_fast_forward_train(float *out, ptrdiff_t os, float *save_mean, float *save_invstd,
                                    float *save_affine, float *running_mean, float *running_var,
                                    const float *in, const float *gamma, const float *beta,
                                    int N, int C, int HW, float eps, float momentum, int relu);
// flags: BN_FUSED_RELU as relu above; BN_DIN_OVERWRITE: din = the gradient instead of
// din += it (din's old contents are never read: the caller need not zero it).
enum { BN_FUSED_RELU = 1, BN_DIN_OVERWRITE = 2 };
void batchnorm2d_fast_backward_train(float *din, float *dgamma, float *dbeta, const float *dout,
                                     ptrdiff_t os, const float *in, const float *gamma,
                                     const float *save_mean, const float *save_invstd,
                                     const float *save_affine, int N, int C, int HW, int flags);
// Eval mode (running statistics): an affine map per channel, then the optional ReLU, whose
// mask backward recomputes from the input (hence beta).
void batchnorm2d_fast_forward_eval(float *out, ptrdiff_t os, const float *in,
                                   const float *gamma, const float *beta,
                                   const float *running_mean, const float *running_var, int N,
                                   int C, int HW, float eps, int relu);
void batchnorm2d_fast_backward_eval(float *din, float *dgamma, float *dbeta, const float *dout,
                                    ptrdiff_t os, const float *in, const float *gamma,
                                    const float *beta, const float *running_mean,
                                    const float *running_var, int N, int C, int HW, float eps,
                                    int relu);

// Training forward of a BN whose ReLU feeds a max pool (GoogLeNet's and VGG's stems), in one
// pass over each plane: as batchnorm2d_fast_forward_train with relu = 1 then
// maxpool2d_fast_forward on its output, bit for bit (pool_out, argmax, saved and running
// statistics), but the ReLU's output is never stored. Planes of at most BN_POOL_MAX_HW.
// Backward: maxpool2d_fast_backward into the ReLU's gradient, then
// batchnorm2d_fast_backward_train with BN_FUSED_RELU, as after the separate passes.
enum { BN_POOL_MAX_HW = 4096 };
void batchnorm2d_relu_maxpool_fast_forward_train(
    float *pool_out, int32_t *argmax, float *save_mean, float *save_invstd, float *save_affine,
    float *running_mean, float *running_var, const float *in, const float *gamma,
    const float *beta, int N, int C, int H, int W, float eps, float momentum, int k, int stride,
    int pad, int ceil_mode);

// ---- relu (as relu_forward / relu_backward) ----
void relu_fast_forward(float *out, const float *in, size_t n);
void relu_fast_backward(float *din, const float *dout, const float *out, size_t n);

// ---- max pool that remembers where each maximum came from ----
// out [N,C,OH,OW] as maxpool2d_forward. argmax (same size as out, may be NULL for inference)
// gets the index of each maximum within its input plane (h*W + w; -1 for a window that lies
// entirely in the padding, where out is -inf), chosen by PyTorch's rule (first maximum in
// window order; a NaN wins).
void maxpool2d_fast_forward(float *out, int32_t *argmax, const float *in, int N, int C, int H,
                            int W, int k, int stride, int pad, int ceil_mode);
// din[plane][argmax] += dout, in output order per plane: the same sums as maxpool2d_backward
// without recomputing the argmax. overwrite: din = those sums (each plane zeroed first: the
// caller need not zero din).
void maxpool2d_fast_backward(float *din, const float *dout, const int32_t *argmax, int N, int C,
                             int H, int W, int k, int stride, int pad, int ceil_mode,
                             int overwrite);

// ---- adaptive average pool (as adaptive_avgpool2d_forward / _backward) ----
void adaptive_avgpool2d_fast_forward(float *out, const float *in, int N, int C, int H, int W,
                                     int OH, int OW);
void adaptive_avgpool2d_fast_backward(float *din, const float *dout, int N, int C, int H, int W,
                                      int OH, int OW);

// ---- channel concat (as concat_forward / concat_backward) ----
void concat_fast_forward(float *out, const float *const *ins, const int *Cs, int n_in, int N,
                         int HW);
// Bit i of overwrite: dins[i] = its slice of dout instead of += (a copy; NULL dins skipped).
void concat_fast_backward(float *const *dins, const float *dout, const int *Cs, int n_in, int N,
                          int HW, unsigned overwrite);

// ---- dropout ----
// The mask is drawn in element order from one rng stream (as dropout_forward, so the same rng
// state gives the same mask); only the multiply is threaded. Backward as dropout_backward.
void dropout_fast_forward(float *out, float *mask, const float *in, size_t n, float p, rng *r);
void dropout_fast_backward(float *din, const float *dout, const float *mask, size_t n);

// ---- plain buffers, threaded ----
void tensor_fast_zero(float *x, size_t n);                      // x = 0
void tensor_fast_copy(float *dst, const float *src, size_t n);  // dst = src
void tensor_fast_add(float *dst, const float *src, size_t n);   // dst += src
