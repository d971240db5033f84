// The layers of incept, one function per layer and direction (llm.c style): outputs first,
// inputs next, sizes last. All tensors are float32, contiguous, NCHW. Ops never allocate.
//
// Conventions every op follows:
// - Forward overwrites its output.
// - Backward ACCUMULATES (+=) into every gradient it produces: input gradients (so branches that
//   meet add up, as autograd does) and parameter gradients alike. Callers zero them first.
//   Any gradient pointer may be NULL when it is not wanted (e.g. din of the first layer).
// - Semantics are PyTorch's (torch 1.13): the same output sizes, padding rules, tie-breaking
//   and statistics, so that each op matches torch.nn.functional to float32 rounding.
//
// These are the reference kernels: plain loops, the tested oracle for the fast paths.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "util/rng.h"

// ---- output sizes ----
// Convolution (PyTorch): floor((H + 2*pad - k) / stride) + 1.
int conv2d_out_size(int H, int k, int stride, int pad);
// Pooling (PyTorch): floor or ceil of (H + 2*pad - k) / stride, + 1; in ceil mode the last
// window must start inside the input or the left padding, else it is dropped.
int pool_out_size(int H, int k, int stride, int pad, int ceil_mode);

// ---- conv2d ----
// in [N,C,H,W], w [K,C,k,k], b [K] or NULL -> out [N,K,OH,OW] with OH = conv2d_out_size(H,...).
void conv2d_forward(float *out, const float *in, const float *w, const float *b,
                    int N, int C, int H, int W, int K, int k, int stride, int pad);
void conv2d_backward(float *din, float *dw, float *db, const float *dout,
                     const float *in, const float *w,
                     int N, int C, int H, int W, int K, int k, int stride, int pad);

// ---- batchnorm2d ----
// Training: normalise with the batch mean and biased variance; save mean and 1/sqrt(var+eps)
// per channel for backward; if running_mean/var are non-NULL update them with momentum and
// the UNBIASED variance (PyTorch: running = (1-momentum)*running + momentum*stat).
void batchnorm2d_forward_train(float *out, float *save_mean, float *save_invstd,
                               float *running_mean, float *running_var,
                               const float *in, const float *gamma, const float *beta,
                               int N, int C, int HW, float eps, float momentum);
void batchnorm2d_backward_train(float *din, float *dgamma, float *dbeta, const float *dout,
                                const float *in, const float *gamma,
                                const float *save_mean, const float *save_invstd,
                                int N, int C, int HW);
// Eval: normalise with the running statistics (an affine map per channel).
void batchnorm2d_forward_eval(float *out, const float *in, const float *gamma, const float *beta,
                              const float *running_mean, const float *running_var,
                              int N, int C, int HW, float eps);
void batchnorm2d_backward_eval(float *din, float *dgamma, float *dbeta, const float *dout,
                               const float *in, const float *gamma,
                               const float *running_mean, const float *running_var,
                               int N, int C, int HW, float eps);

// ---- relu ----
void relu_forward(float *out, const float *in, size_t n);
// Uses the forward OUTPUT (out > 0), so the input need not be kept.
void relu_backward(float *din, const float *dout, const float *out, size_t n);

// ---- max pool (square window, symmetric padding with -inf) ----
// Ties and NaN as PyTorch: the first maximum in window order wins; a NaN wins.
void maxpool2d_forward(float *out, const float *in, int N, int C, int H, int W,
                       int k, int stride, int pad, int ceil_mode);
// Recomputes the argmax from the input.
void maxpool2d_backward(float *din, const float *dout, const float *in, int N, int C, int H, int W,
                        int k, int stride, int pad, int ceil_mode);

// ---- average pool (PyTorch avg_pool2d semantics incl. ceil-mode tails) ----
void avgpool2d_forward(float *out, const float *in, int N, int C, int H, int W,
                       int k, int stride, int pad, int ceil_mode, int count_include_pad);
void avgpool2d_backward(float *din, const float *dout, int N, int C, int H, int W,
                        int k, int stride, int pad, int ceil_mode, int count_include_pad);

// ---- adaptive average pool: window [floor(i*H/OH), ceil((i+1)*H/OH)), also for OH > H ----
void adaptive_avgpool2d_forward(float *out, const float *in, int N, int C, int H, int W,
                                int OH, int OW);
void adaptive_avgpool2d_backward(float *din, const float *dout, int N, int C, int H, int W,
                                 int OH, int OW);

// ---- local response norm across channels (torch.nn.LocalResponseNorm) ----
// out = in / (k + alpha/size * sum_{c' in window} in[c']^2)^beta, window [c-size/2, c+(size-1)/2]
// clipped to the channels (zero padding).
void lrn_forward(float *out, const float *in, int N, int C, int HW,
                 int size, float alpha, float beta, float k);
// Recomputes the denominators from the input.
void lrn_backward(float *din, const float *dout, const float *in, int N, int C, int HW,
                  int size, float alpha, float beta, float k);

// ---- linear: in [N,IN], w [OUT,IN] (PyTorch layout), b [OUT] or NULL -> out [N,OUT] ----
void linear_forward(float *out, const float *in, const float *w, const float *b,
                    int N, int IN, int OUT);
void linear_backward(float *din, float *dw, float *db, const float *dout,
                     const float *in, const float *w, int N, int IN, int OUT);

// ---- dropout (inverted): mask[i] = 0 with probability p, else 1/(1-p); out = in * mask ----
void dropout_forward(float *out, float *mask, const float *in, size_t n, float p, rng *r);
void dropout_backward(float *din, const float *dout, const float *mask, size_t n);

// ---- channel concat: ins[i] [N,Cs[i],HW] -> out [N,sum Cs,HW] ----
void concat_forward(float *out, const float *const *ins, const int *Cs, int n_in, int N, int HW);
void concat_backward(float *const *dins, const float *dout, const int *Cs, int n_in, int N, int HW);

// ---- torchvision GoogLeNet transform_input: re-maps ImageNet-normalised RGB to [-1,1] scaling ----
// out[:,c] = in[:,c] * (std[c]/0.5) + (mean[c]-0.5)/0.5 with ImageNet mean/std; C must be 3.
void transform_input_forward(float *out, const float *in, int N, int HW);
void transform_input_backward(float *din, const float *dout, int N, int HW);

// ---- softmax and cross-entropy ----
void softmax_forward(float *probs, const float *logits, int N, int K);
// Mean over the batch of cross-entropy with PyTorch's label smoothing:
// loss_n = (1-s) * -log p[n,t_n] + s * mean_k(-log p[n,k]). Writes softmax probs [N,K] for
// backward. Returns the mean loss. Targets must lie in [0,K) (checked by the caller).
float cross_entropy_forward(float *probs, const float *logits, const int64_t *target,
                            int N, int K, float smoothing);
// dlogits += dloss * d(mean loss)/dlogits = dloss/N * (probs - ((1-s)*onehot + s/K)).
void cross_entropy_backward(float *dlogits, const float *probs, const int64_t *target,
                            int N, int K, float smoothing, float dloss);
