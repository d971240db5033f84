// A model is a list of nodes (one per layer, in execution order) plus one table of tensors
// {torchvision key, shape}. Both are produced by the network's builder (googlenet.c, vgg.c) and
// then drive everything else: allocation of the single parameter/gradient buffers, checkpoint
// keys, initialisation and the summary. Nothing about a network is written down twice.
//
// Memory: parameters and gradients live in one buffer each. Activations, activation gradients
// and max-pool argmaxes share one arena, laid out by a plan (plan.c) for the batch size and the
// kind of pass: a slot is kept only while something still reads it, and slots whose lifetimes
// do not overlap share memory. A node's output is [arena + node.act.off, N*C*H*W floats).
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include "io/safetensors.h"
#include "util/rng.h"

typedef struct {
    char name[32];          // "googlenet", "googlenet-paper", "googlenet-naive", "vgg16_bn", ...
    int num_classes;        // default 1000
    int in_channels;        // default 3
    float dropout;          // main-head dropout; <0 = the model's default
    float dropout_aux;      // GoogLeNet aux-head dropout; <0 = default (0.7)
    int aux;                // GoogLeNet: build the aux heads (default 1)
    int transform_input;    // GoogLeNet: torchvision's transform_input (default 0)
    int H, W;               // input size the graph is built for (default 224×224)
} model_config;

// Limits on the options (the CLI's and a checkpoint's alike; model_build checks them). The
// side keeps a plane's H*W within int (100000 a side overflowed it: a crash).
enum { MODEL_MAX_CLASSES = 1 << 20, MODEL_MAX_IN_CHANNELS = 4096, MODEL_MAX_SIDE = 16384 };

// The supported names, NULL-terminated.
extern const char *const model_names[];
// Fills cfg with the defaults for NAME. -1 (err_msg set) if the name is unknown.
int model_config_init(model_config *cfg, const char *name);

typedef enum { TK_PARAM, TK_BUFFER, TK_COUNTER } tensor_kind;   // trainable / running stat / I64

typedef struct {
    char key[96];           // torchvision state_dict key
    int ndim, shape[4];
    size_t numel;
    size_t off;             // into params/grads (F32) or counters (I64)
    tensor_kind kind;
    int node;               // the node that owns it
    int no_decay;           // bias or BatchNorm affine: optional exclusion from weight decay
} model_tensor;

typedef enum {
    OP_INPUT, OP_TRANSFORM_INPUT, OP_CONV, OP_BN, OP_RELU, OP_MAXPOOL, OP_AVGPOOL,
    OP_ADAPTIVE_AVGPOOL, OP_LRN, OP_LINEAR, OP_DROPOUT, OP_CONCAT, OP_FLATTEN, OP_COUNT
} op_kind;

// A piece of the arena: where it lies and the steps of the pass during which it holds data.
// Steps: forward of node i = i, backward of node i = 2*n_nodes - 1 - i (see plan.c).
typedef struct {
    size_t off, floats;     // floats = 0: no slot in the current plan
    int first, last;        // live from the start of step `first` to the end of step `last`
} model_slot;

#define NODE_MAX_IN 4
#define MODEL_MAX_MERGE 4   // convs in one merged GEMM (GEMM_MAX_GROUPS)
typedef struct {
    op_kind op;
    char path[80];          // torchvision module path ("inception3a.branch2.1.conv")
    int functional;         // no nn.Module of its own in torchvision (F.relu, F.adaptive_avg_pool2d)
    int head;               // 0 = main path; 1/2 = aux head (runs in training mode only)
    int in[NODE_MAX_IN], n_in;
    int C, H, W;            // output shape of one sample
    int k, stride, pad, ceil_mode, count_include_pad;   // conv / pools
    float eps, momentum;    // batchnorm
    float p;                // dropout
    int lrn_size; float lrn_alpha, lrn_beta, lrn_k;
    int weight, bias, running_mean, running_var, num_batches_tracked;   // tensor ids or -1
    long long macs;         // multiply-accumulates per sample
    // Arena slots in the current plan: output, its gradient, max pool's int32 argmax.
    model_slot act, dact, argmax;
    size_t save;            // offset of saved state (BN stats, dropout mask) in the save arena
    int fused_relu;         // BN whose ReLU (the next node, its only consumer) it computes
                            // (fast kernels; set by model_build)
    int fused_pool;         // such a BN whose ReLU feeds only the max pool after it: in
                            // training it computes that pool too (the ReLU output is never
                            // stored; set by model_build)
    // Inference with the fast kernels: a conv computes conv [-> BN] [-> ReLU] as one GEMM, BN
    // folded into its packed weights and bias, ReLU in the epilogue (set by model_build).
    int fold_to;            // conv: the last node of that chain (itself if nothing follows)
    int fold_conv;          // BN/ReLU in such a chain: its conv; else -1
    size_t folded;          // conv: offset of its packed weights, then its bias, in m->folded
    // Also at inference, 1x1 stride-1 convs that read the same input (GoogLeNet's three per
    // Inception module) run as one GEMM on their stacked folded weights, done by the first.
    int merge_lead;         // conv: the first conv of its group (itself if it leads), or -1
    // And a conv chain's last node whose only consumer is a concatenation (all of whose inputs
    // are such) has no slot of its own: the conv writes into its channels of the concat's
    // output, and the concat does nothing.
    int concat_into;        // that concat node, or -1
    int concat_c0;          // the first of its channels there
} model_node;

typedef struct {
    model_config cfg;
    model_node *nodes; int n_nodes, cap_nodes;
    model_tensor *tensors; int n_tensors, cap_tensors;
    float *params, *grads;  size_t n_floats;     // F32 tensors (params and buffers), same layout
    int64_t *counters;      int n_counters;      // num_batches_tracked
    int logits, aux1, aux2;                      // output node ids (-1 if absent)
    // Batch-dependent buffers: save and probs sized by model_prepare(), the arena by the plan of
    // the pass being run (model_forward), kept at the largest size needed so far.
    int N;
    float *save, *probs;
    size_t save_floats;
    float *arena; size_t arena_floats;
    int plan_flags;                              // MODEL_TRAIN|MODEL_GRAD of the plan; -1 none
    size_t plan_floats;                          // arena floats the current plan uses
    int arena_mode;                              // ARENA_SHARED / _SEPARATE / _POISON
    int ran_flags;                               // flags of the last forward; -1 none
    rng dropout_rng;
    // Kernels: the fast path (packed GEMM, cpu_isa()/cpu_threads()) unless reference is set
    // (INCEPT_REFERENCE=1 in the environment, or set by the caller): the plain loops of ops.h.
    int reference;
    // Training forwards average batch norm's running statistics over the batches since
    // model_bn_stats_reset (PyTorch's momentum=None) instead of the momentum's running average.
    int bn_average;
    float *ws; size_t ws_floats; int ws_threads;  // fast-kernel workspace for batch N
    int fold;                                    // fold BN into convs at inference (default 1;
                                                 // INCEPT_FOLD=0 at build turns it off)
    float *folded; int folded_isa;               // made at the first inference forward, for
                                                 // an ISA level (and plain for bf16 on AMX)
    // Per-node seconds, summed over passes, when the caller points these at n_nodes doubles
    // each (incept bench --layers); NULL: not timed.
    double *prof_fwd, *prof_bwd;
    const float *x;                              // the current pass's input (model_forward)
    int build_failed;                            // set by the builder on a shape error
    int cur_head;                                // builder state: head of new nodes
} model;

// Builds the graph and tensor table for cfg and allocates zeroed parameters.
// -1 with a clear message if the input size is too small or an option does not fit.
int  model_build(model *m, const model_config *cfg);
void model_free(model *m);
// torchvision's initialisation schemes, deterministic from seed; also seeds dropout.
void model_init(model *m, uint64_t seed);
// Sets the batch size (no-op if already set): sizes the small per-batch buffers; the arena
// follows at the next forward.
int  model_prepare(model *m, int N);

// Forward pass flags.
enum {
    MODEL_TRAIN = 1,   // batch-statistics BN (running stats updated), dropout on, aux heads run
    MODEL_GRAD = 2,    // keep what model_backward needs (else only what the forward needs)
};
// How the plan places slots: ARENA_SHARED (default) lets slots with disjoint lifetimes share
// memory; ARENA_SEPARATE gives every slot its own; ARENA_POISON shares and also fills each slot
// with NaN when its lifetime ends, so a read the plan did not foresee shows in the results.
// Set from INCEPT_ARENA=shared|separate|poison at build, or by the caller before model_prepare.
enum { ARENA_SHARED, ARENA_SEPARATE, ARENA_POISON };

// Forward pass on x [N,C,H,W] (model_prepare(N) first) with MODEL_* flags. -1 on a condition
// PyTorch also rejects, or out of memory for the arena. x is read in place, not copied: keep it
// unchanged until model_backward (after a MODEL_GRAD forward) has run.
int  model_forward(model *m, const float *x, int flags);
// A node's output for the current batch. After the forward: the outputs (logits/aux1/aux2) are
// kept until the next forward; other nodes' slots may already hold other data.
float *model_out(const model *m, int node);
float *model_dout(const model *m, int node);    // its gradient (after a MODEL_GRAD forward)
// Backward through the nodes that ran in the last forward, which must have had MODEL_GRAD
// (and in that forward's mode): expects the output gradients in model_dout(logits/aux1/aux2),
// written after the forward; zeroes every other activation gradient when it comes into use;
// parameter gradients ACCUMULATE into m->grads. -1 (err_set) without a MODEL_GRAD forward.
int  model_backward(model *m);
void model_zero_grad(model *m);
// Drops what was derived from the parameters (the folded inference weights): call after
// writing m->params directly. model_load, model_init and training forwards do it themselves.
void model_params_changed(model *m);
// Batch norm's running statistics back to their initial state (mean 0, var 1, no batches
// tracked), as PyTorch's reset_running_stats(); with bn_average set, the training forwards
// that follow make them the plain averages of their batches' (torch.optim.swa_utils.update_bn).
// Returns the number of batch norm layers (0: nothing to recompute).
int  model_bn_stats_reset(model *m);

// Training-mode forward + mean cross-entropy (+ 0.3 × each aux head's) + backward.
// Parameter gradients accumulate. loss_out gets the total loss. -1 if a target is out of range.
int model_loss_backward(model *m, const float *x, const int64_t *target, float smoothing,
                        float *loss_out);

// Parameter counts: trainable parameters, with or without the aux heads.
size_t model_param_count(const model *m, int with_aux);
long long model_macs(const model *m, int with_aux);
void model_summary(const model *m, FILE *out);
// The torchvision module type of a kind of node ("Conv2d", ...; a concatenation is the
// "Inception" module it completes), as `incept summary` and `incept bench --layers` print it.
const char *model_op_name(op_kind op);

// safetensors with torchvision's keys. Loading is strict (missing/extra/misshaped/mistyped
// tensor: -1 naming the key, expected and found); aux keys in a file are skipped when the model
// has no aux heads, and counted in *ignored_aux (may be NULL). Tensors whose key starts with
// MODEL_EXTRA_PREFIX ("incept.": training state in checkpoints) are not model tensors and are
// ignored by model_load; model_save writes `extra` (n_extra entries, may be NULL/0) after the
// model's own tensors. Writing is atomic (temp file, fsync, rename).
#define MODEL_EXTRA_PREFIX "incept."
int model_save(const model *m, const char *path, const char *const *meta_keys,
               const char *const *meta_vals, int n_meta, const st_entry *extra, int n_extra);
int model_load(model *m, const char *path, int *ignored_aux);
