// Optimisers with PyTorch 1.13's exact update rules (torch.optim.SGD / Adam / AdamW, the
// single-tensor "foreach=False" path), computed in float32 like PyTorch so that a run matches
// torch.optim to float rounding.
//
// A model keeps every parameter in ONE float buffer `params` and its gradients in a buffer
// `grads` of the same layout. The optimiser only touches the spans it is given (running BN
// statistics, which also live in `params`, are simply left out of the spans). A span marked
// no_decay (biases, BN weights/biases) gets no weight decay unless cfg.decay_bn_bias is set:
// that is PyTorch's two-param-group recipe, one group with weight_decay and one with 0.
//
// State (for exact resume from a checkpoint): the step count `step` and up to three float
// buffers of n floats each, named by optim_buffer_name():
//   SGD:        buf1 = momentum_buffer (only when momentum != 0)
//   Adam/AdamW: buf1 = exp_avg, buf2 = exp_avg_sq, buf3 = max_exp_avg_sq (only with amsgrad)
// Save `step` and each non-NULL buffer; to resume, optim_init() with the same config and size,
// then copy them back. Buffers have the layout of `params` (entries outside spans stay 0).
// SGD counts steps too: at step 0 the momentum buffer starts as the gradient (PyTorch's
// "buf is None" case), so a restored momentum run must restore `step` as well.
#pragma once
#include <stddef.h>
#include <stdint.h>

enum { OPT_SGD, OPT_ADAM, OPT_ADAMW };

typedef struct { size_t off, n; int no_decay; } param_span;

typedef struct {
    int kind;              // OPT_SGD, OPT_ADAM or OPT_ADAMW
    // Hyper-parameters are doubles because PyTorch keeps them as Python floats and derives its
    // scalar factors (1 - beta2, bias corrections, ...) in double before rounding to float.
    double momentum;       // SGD
    double dampening;      // SGD
    double weight_decay;   // SGD/Adam: added to the gradient; AdamW: decoupled (param *= 1-lr*wd)
    double beta1, beta2;   // Adam/AdamW
    double eps;            // Adam/AdamW: added to sqrt(v_hat), outside the square root
    int nesterov;          // SGD (needs momentum > 0 and dampening == 0, as PyTorch)
    int amsgrad;           // Adam/AdamW
    int decay_bn_bias;     // 1: weight decay on no_decay spans too (PyTorch's single group)
} optim_config;

typedef struct {
    optim_config cfg;
    size_t n;                    // floats per buffer (= size of params)
    float *buf1, *buf2, *buf3;   // see the header comment; NULL when unused
    int64_t step;                // optimiser steps taken so far (PyTorch's state['step'])
} optim;

// PyTorch's defaults for a kind: SGD momentum 0, dampening 0, wd 0; Adam betas (0.9, 0.999),
// eps 1e-8, wd 0; AdamW the same with wd 0.01. decay_bn_bias = 0.
void optim_config_default(optim_config *cfg, int kind);
// "sgd", "adam", "adamw" -> OPT_*; -1 with err_set() otherwise.
int optim_kind_parse(const char *s);
const char *optim_kind_name(int kind);

// Validates cfg (PyTorch's checks) and allocates zeroed state for n_floats parameters.
// Returns 0, or -1 with err_set() (o is then empty and optim_free() is harmless).
int  optim_init(optim *o, const optim_config *cfg, size_t n_floats);
// Checks that spans lie inside [0, n) and do not overlap; -1 with err_set() if not.
int  optim_check_spans(const optim *o, const param_span *spans, int n_spans);
// One update of params[span] from grads[span] for every span, with learning rate lr (a double,
// as PyTorch's group['lr']; passing a float is fine). Spans must pass optim_check_spans() and
// be the same at every step. Runs on the thread pool (ops/cpu.h) for large models; every update
// is elementwise, so the result does not depend on the thread count.
void optim_step(optim *o, float *params, const float *grads, const param_span *spans,
                int n_spans, double lr);
void optim_free(optim *o);

// The state buffers for checkpointing: buffer i (0..2) and its tensor name ("optim.exp_avg",
// ...), or NULL when that buffer is unused by this config.
float      *optim_buffer(optim *o, int i);
const char *optim_buffer_name(const optim *o, int i);
