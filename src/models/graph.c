// The executor: the one place where model code calls ops. Forward walks the nodes in order,
// backward in reverse; nodes of the aux heads run only in training mode. Convolutions and
// linear layers go to the fast kernels (ops/conv_fast.h, ops/gemm.h) unless m->reference is
// set; every other op is the reference loop of ops.h. Another backend (CUDA) plugs in here
// without touching the network definitions.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "models/model.h"
#include "models/plan.h"
#include "ops/conv_fast.h"
#include "ops/cpu.h"
#include "ops/fast_ops.h"
#include "ops/gemm.h"
#include "ops/ops.h"
#include "util/err.h"
#include "util/mem.h"
#include "util/clock.h"

#define P(t) (m->params + m->tensors[t].off)
#define G(t) (m->grads + m->tensors[t].off)

static size_t numel(const model_node *n) { return (size_t)n->C * n->H * n->W; }

static int runs(const model_node *n, int training) { return training || n->head == 0; }

// Inference with the fast kernels: conv [-> BN] [-> ReLU] as one GEMM on folded weights.
static int folding(const model *m, int flags) {
    return !m->reference && m->fold && !(flags & (MODEL_TRAIN | MODEL_GRAD));
}

static size_t round16(size_t n) { return (n + 15) & ~(size_t)15; }

// The BN folded into conv i, or NULL.
static const model_node *folded_bn(const model *m, int i) {
    const int t = m->nodes[i].fold_to;
    return t > i && m->nodes[i + 1].op == OP_BN ? &m->nodes[i + 1] : NULL;
}

// Makes m->folded: per conv (of the main path), its weights times the BN's per-channel scale
// gamma / sqrt(running_var + eps), packed for the GEMM, then its bias
// beta + (conv bias - running_mean) * scale; without a BN, the conv's own weights and bias.
// Convolutions that conv2d_fast_forward may run as Winograd (3x3 stride 1) or as a dense layer
// (maps smaller than the kernel) keep their folded weights unpacked: those paths transform the
// plain weights, and the packed forward is always direct im2col.
static int fold_unpacked(const model *m, const model_node *n) {
    const model_node *a = &m->nodes[n->in[0]];
    return (n->k == 3 && n->stride == 1) || conv2d_fast_dense(a->H, a->W, n->k);
}

// With bfloat16 products on AMX the GEMM packs A into tiles itself, and a float32 packing would
// send it to the float32 kernels (~2x slower in the per-epoch test pass): the other convs'
// folded weights stay plain too (a merged group's stacked).
static int fold_plain(void) { return cpu_bf16() && cpu_amx(); }

_Static_assert(MODEL_MAX_MERGE <= GEMM_MAX_GROUPS, "a merged group is one GEMM's row groups");

// Merged 1x1 convs (model_node.merge_lead): node i is computed by an earlier conv's GEMM.
static int merged_member(const model *m, int i) {
    return m->nodes[i].merge_lead >= 0 && m->nodes[i].merge_lead != i;
}

// The convs of the group that conv `lead` leads, in node order (lead first); 1 if none.
static int merge_group(const model *m, int lead, int *ids) {
    int n = 0;
    ids[n++] = lead;
    if (m->nodes[lead].merge_lead != lead) return n;
    for (int j = lead + 1; j < m->n_nodes && n < MODEL_MAX_MERGE; j++)
        if (m->nodes[j].merge_lead == lead) ids[n++] = j;
    return n;
}

// Where conv chain tail j's output goes at inference: its concat's slot if it is written in
// place there (model_node.concat_into), else its own.
static int slot_of(const model *m, int j) {
    return m->nodes[j].concat_into >= 0 ? m->nodes[j].concat_into : j;
}

// A concat whose inputs write into it (at inference): it has nothing to do.
static int concat_in_place(const model *m, const model_node *n) {
    return n->op == OP_CONCAT && m->nodes[n->in[0]].concat_into >= 0;
}

// Outside folding, the same concat when every input is a ReLU computed by its BN (fast kernels):
// each BN writes its channels of the concat's output, and in backward reads its gradient from
// the concat's, so the concat copies nothing either way.
static int concat_bn_in_place(const model *m, const model_node *n) {
    if (m->reference || !concat_in_place(m, n)) return 0;
    for (int k = 0; k < n->n_in; k++) {
        const model_node *t = &m->nodes[n->in[k]];
        if (t->op != OP_RELU || !m->nodes[t->in[0]].fused_relu) return 0;
    }
    return 1;
}

// Where BN i, fused with its ReLU (node i + 1), keeps that ReLU's output and gradient: the
// ReLU's own slots, or its concat's (concat_bn_in_place).
static int fused_slot(const model *m, int i) {
    const int c = m->nodes[i + 1].concat_into;
    return c >= 0 && concat_bn_in_place(m, &m->nodes[c]) ? c : i + 1;
}

// At inference, node i does nothing itself: its conv computes it (BN/ReLU folded into a
// conv, a conv merged into another's GEMM) or its inputs wrote into it (a concat).
static int fold_skips(const model *m, int i) {
    return m->nodes[i].fold_conv >= 0 || merged_member(m, i) || concat_in_place(m, &m->nodes[i]);
}

// Output channels of the GEMM that conv node i runs at inference (its group's, if it leads one).
static int fold_rows(const model *m, int i) {
    int ids[MODEL_MAX_MERGE], K = 0;
    for (int g = 0, ng = merge_group(m, i, ids); g < ng; g++) K += m->nodes[ids[g]].C;
    return K;
}

// Floats of conv node n's folded weights (packed or not; a group's stacked ones if it leads).
static size_t fold_weights_size(const model *m, const model_node *n, int C) {
    const int K = fold_rows(m, (int)(n - m->nodes));
    if (fold_unpacked(m, n) || fold_plain()) return (size_t)K * C * n->k * n->k;
    return conv2d_fast_pack_weights_size(C, K, n->k);
}

// Writes conv i's weights times its BN's scale (K rows of C*k*k) and its bias.
static void fold_conv(const model *m, int i, float *dst, float *bias) {
    const model_node *n = &m->nodes[i];
    const model_tensor *w = &m->tensors[n->weight];
    const int K = n->C;
    const size_t row = w->numel / (size_t)K;
    const float *src = P(n->weight), *cb = n->bias >= 0 ? P(n->bias) : NULL;
    const model_node *bn = folded_bn(m, i);
    for (int k = 0; k < K; k++) {
        double scale = 1.0, shift = cb ? cb[k] : 0.0;
        if (bn) {   // as batchnorm2d_forward_eval's per-channel scale, in double
            scale = P(bn->weight)[k] / sqrt((double)P(bn->running_var)[k] + bn->eps);
            shift = P(bn->bias)[k] + (shift - P(bn->running_mean)[k]) * scale;
        }
        for (size_t e = 0; e < row; e++) dst[k * row + e] = (float)(src[k * row + e] * scale);
        bias[k] = (float)shift;
    }
}

static int fold_ready(model *m) {
    const int layout = (int)cpu_isa() | fold_plain() << 8;   // what the packing depends on
    if (m->folded && m->folded_isa == layout) return 0;
    model_params_changed(m);
    size_t total = 0, tmp = 1;
    for (int i = 0; i < m->n_nodes; i++) {
        model_node *n = &m->nodes[i];
        if (n->op != OP_CONV || !runs(n, 0) || merged_member(m, i)) continue;
        const model_tensor *w = &m->tensors[n->weight];
        const int K = fold_rows(m, i);
        n->folded = total;
        total += round16(fold_weights_size(m, n, w->shape[1])) + round16(K);
        const size_t rows = (size_t)K * (w->numel / (size_t)n->C);
        if (rows > tmp) tmp = rows;
    }
    float *f = mem_alloc(total * sizeof(float)), *wf = malloc(tmp * sizeof(float));
    if (!f || !wf) {
        free(f); free(wf);
        return err_set("out of memory: %.1f MiB of folded inference weights", total * 4.0 / 1048576);
    }
    for (int i = 0; i < m->n_nodes; i++) {
        const model_node *n = &m->nodes[i];
        if (n->op != OP_CONV || !runs(n, 0) || merged_member(m, i)) continue;
        const int C = m->tensors[n->weight].shape[1];
        float *bias = f + n->folded + round16(fold_weights_size(m, n, C));
        if (fold_unpacked(m, n)) {
            fold_conv(m, i, f + n->folded, bias);
            continue;
        }
        int ids[MODEL_MAX_MERGE], ng = merge_group(m, i, ids), K = 0;
        float *rows = fold_plain() ? f + n->folded : wf;
        for (int g = 0; g < ng; g++) {   // a group's rows stacked in node order
            const model_node *o = &m->nodes[ids[g]];
            fold_conv(m, ids[g], rows + (size_t)K * C * n->k * n->k, bias + K);
            K += o->C;
        }
        if (!fold_plain()) conv2d_fast_pack_weights(f + n->folded, wf, C, K, n->k);
    }
    free(wf);
    m->folded = f;
    m->folded_isa = layout;
    return 0;
}

#define OUT(j) (m->arena + m->nodes[j].act.off)
#define DOUT(j) (m->arena + m->nodes[j].dact.off)
// A node's output for reading: the network input is the caller's x itself.
#define IN(j) (m->nodes[j].op == OP_INPUT ? m->x : (const float *)OUT(j))
#define OUT_ARGMAX(n) (m->arena + (n)->argmax.off)

// Node j that writes into its concat (concat_into): its channels of the concat's output
// (grad = 0) or of its gradient (grad = 1), images *stride floats apart.
static float *concat_slice(model *m, int j, int grad, ptrdiff_t *stride) {
    const model_node *t = &m->nodes[j], *c = &m->nodes[t->concat_into];
    *stride = (ptrdiff_t)c->C * c->H * c->W;
    float *base = grad ? DOUT(t->concat_into) : OUT(t->concat_into);
    return base + (size_t)t->concat_c0 * c->H * c->W;
}

// At inference, conv chain tail j's output: its channels of its concat's output or its own
// slot (*stride 0: dense).
static float *fold_out(model *m, int j, ptrdiff_t *stride) {
    if (m->nodes[j].concat_into >= 0) return concat_slice(m, j, 0, stride);
    *stride = 0;
    return OUT(j);
}

// BN i fused with its ReLU: where it writes the ReLU's output (grad = 0) or reads its gradient
// (grad = 1): the ReLU's own slot (*stride 0: dense) or its channels of the concat's.
static float *fused_at(model *m, int i, int grad, ptrdiff_t *stride) {
    if (fused_slot(m, i) != i + 1) return concat_slice(m, i + 1, grad, stride);
    *stride = 0;
    return grad ? DOUT(i + 1) : OUT(i + 1);
}

// Training with the fast kernels: BN i computes its ReLU and the max pool after that (node
// i + 2), whose forward then does nothing.
static int bn_pools(const model *m, int i, int training) {
    return training && !m->reference && m->nodes[i].fused_pool;
}

static int pooled_by_bn(const model *m, const model_node *n, int training) {
    if (n->op != OP_MAXPOOL || m->nodes[n->in[0]].op != OP_RELU) return 0;
    return bn_pools(m, m->nodes[n->in[0]].in[0], training);
}

// What the executor below touches, for the planner: keep the two in step. (INCEPT_ARENA=poison
// makes a read that this misses show up as NaN in the results.)
static void node_uses_raw(const model *m, int i, int flags, node_uses *u) {
    const model_node *n = &m->nodes[i];
    const int ref = m->reference;
    memset(u, 0, sizeof *u);
    u->fwd_out = u->bwd_dout = u->fwd_argmax = -1;
    u->runs = runs(n, flags & MODEL_TRAIN);
    if (!u->runs) return;
    if (folding(m, flags)) {   // the conv computes its chain, the rest of which does nothing
        if (fold_skips(m, i)) return;
        for (int j = 0; j < n->n_in; j++) u->fwd_in[u->n_fwd_in++] = n->in[j];
        u->fwd_out = n->op == OP_CONV ? slot_of(m, n->fold_to) : i;
        int ids[MODEL_MAX_MERGE], ng = n->op == OP_CONV ? merge_group(m, i, ids) : 1;
        for (int g = 1; g < ng; g++)
            u->fwd_extra[u->n_fwd_extra++] = slot_of(m, m->nodes[ids[g]].fold_to);
        return;
    }
    // Fast kernels: a merged 1x1 conv is computed, forward and backward, by its group's lead.
    if (!ref && merged_member(m, i)) return;
    // A BN fused with its ReLU writes the ReLU's output and, in backward, reads the ReLU's
    // gradient (and recomputes its mask from the BN input); the ReLU does nothing.
    const int fused_bn = !ref && n->fused_relu;
    const int fused_relu = !ref && n->op == OP_RELU && m->nodes[n->in[0]].fused_relu;
    if (concat_bn_in_place(m, n)) return;   // its inputs' BNs do its work
    const int training = flags & MODEL_TRAIN;
    if (bn_pools(m, i, training)) {   // writes the pool's output (and argmax), not the ReLU's
        u->fwd_in[u->n_fwd_in++] = n->in[0];
        u->fwd_out = i + 2;
        if (flags & MODEL_GRAD) u->fwd_argmax = i + 2;
    } else if (!fused_relu && !pooled_by_bn(m, n, training)) {
        for (int j = 0; j < n->n_in; j++) u->fwd_in[u->n_fwd_in++] = n->in[j];
        u->fwd_out = fused_bn ? fused_slot(m, i) : i;
    }
    int ids[MODEL_MAX_MERGE], ng = !ref && n->op == OP_CONV ? merge_group(m, i, ids) : 1;
    for (int k = 1; k < ng; k++) u->fwd_extra[u->n_fwd_extra++] = ids[k];
    if (!(flags & MODEL_GRAD) || n->op == OP_INPUT || fused_relu) return;
    u->argmax = n->op == OP_MAXPOOL && !ref;
    u->bwd_dout = fused_bn ? fused_slot(m, i) : i;
    for (int k = 1; k < ng; k++) u->bwd_dout_extra[u->n_bwd_dout_extra++] = ids[k];
    for (int j = 0; j < n->n_in; j++)   // the network input needs no gradient
        if (m->nodes[n->in[j]].op != OP_INPUT) u->bwd_din[u->n_bwd_din++] = n->in[j];
    switch (n->op) {
    case OP_CONV: case OP_LINEAR: case OP_LRN: case OP_BN:
        u->bwd_act[u->n_bwd_act++] = n->in[0];
        break;
    case OP_RELU:
        u->bwd_act[u->n_bwd_act++] = i;
        break;
    case OP_MAXPOOL:
        if (ref) u->bwd_act[u->n_bwd_act++] = n->in[0];
        break;
    default:
        break;
    }
}

// The network input is read where the caller keeps it (model_forward's x): it has no slot.
void node_uses_of(const model *m, int i, int flags, node_uses *u) {
    node_uses_raw(m, i, flags, u);
    if (m->nodes[i].op == OP_INPUT) u->fwd_out = -1;
    int k = 0;
    for (int j = 0; j < u->n_fwd_in; j++)
        if (m->nodes[u->fwd_in[j]].op != OP_INPUT) u->fwd_in[k++] = u->fwd_in[j];
    u->n_fwd_in = k;
    k = 0;
    for (int j = 0; j < u->n_bwd_act; j++)
        if (m->nodes[u->bwd_act[j]].op != OP_INPUT) u->bwd_act[k++] = u->bwd_act[j];
    u->n_bwd_act = k;
}

// ARENA_POISON: NaN into every slot whose lifetime ends with this step.
static void poison(model *m, int step) {
    if (m->arena_mode != ARENA_POISON) return;
    for (int j = 0; j < m->n_nodes; j++) {
        model_slot *s3[3] = {&m->nodes[j].act, &m->nodes[j].dact, &m->nodes[j].argmax};
        for (int k = 0; k < 3; k++)
            if (s3[k]->floats && s3[k]->last == step)
                for (size_t e = 0; e < s3[k]->floats; e++) m->arena[s3[k]->off + e] = NAN;
    }
}

// Sizes the fast kernels' workspace for the current batch and thread count.
static int workspace_ready(model *m) {
    if (m->reference) return 0;
    if (m->ws && m->ws_threads == cpu_threads()) return 0;
    size_t need = 1;
    for (int i = 0; i < m->n_nodes; i++) {
        const model_node *n = &m->nodes[i], *a = n->n_in ? &m->nodes[n->in[0]] : NULL;
        size_t s = 0;
        if (n->op == OP_CONV) {
            s = conv2d_fast_workspace_size(m->N, a->C, a->H, a->W, n->C, n->k, n->stride, n->pad);
            if (n->merge_lead == i) {   // the merged GEMM: inference's, training's
                const int K = fold_rows(m, i);
                size_t g = gemm_workspace_size(K, m->N * a->H * a->W, a->C);
                size_t t = conv2d_fast_1x1_group_workspace_size(m->N, a->C, a->H, a->W, K);
                if (g > s) s = g;
                if (t > s) s = t;
            }
        }
        else if (n->op == OP_LINEAR) {
            int IN = a->C * a->H * a->W, OUT = n->C, N = m->N;
            s = gemm_workspace_size(N, OUT, IN);                   // forward
            size_t s2 = gemm_workspace_size(OUT, IN, N);           // weight gradient
            size_t s3 = gemm_workspace_size(N, IN, OUT);           // input gradient
            s = s > s2 ? s : s2;
            s = s > s3 ? s : s3;
        }
        if (s > need) need = s;
    }
    free(m->ws);
    m->ws = mem_alloc(need * sizeof(float));
    m->ws_floats = need;
    m->ws_threads = m->ws ? cpu_threads() : 0;
    return m->ws ? 0 : err_set("out of memory: %.1f MiB of kernel workspace", need * 4.0 / 1048576);
}

static void conv_forward(model *m, const model_node *n, float *out, const float *in, int C, int H,
                         int W) {
    const float *w = P(n->weight), *b = n->bias >= 0 ? P(n->bias) : NULL;
    if (m->reference) conv2d_forward(out, in, w, b, m->N, C, H, W, n->C, n->k, n->stride, n->pad);
    else conv2d_fast_forward(out, in, w, b, m->N, C, H, W, n->C, n->k, n->stride, n->pad, 0, m->ws);
}

static void conv_backward(model *m, const model_node *n, float *din, const float *dout,
                          const float *in, int C, int H, int W, int din_overwrite) {
    float *db = n->bias >= 0 ? G(n->bias) : NULL;
    if (m->reference)
        conv2d_backward(din, G(n->weight), db, dout, in, P(n->weight), m->N, C, H, W, n->C, n->k,
                        n->stride, n->pad);
    else
        conv2d_fast_backward(din, G(n->weight), db, dout, in, P(n->weight), m->N, C, H, W, n->C,
                             n->k, n->stride, n->pad, din_overwrite, m->ws);
}

// A merged group of 1x1 convs (model_node.merge_lead) led by conv `lead`, outside inference's
// folding: one GEMM on the stacked weights computes every member's output (forward) and, in
// the lead's backward (after every member's gradient is in), all their gradients.
typedef struct {
    int ng, Ks[MODEL_MAX_MERGE];
    float *outs[MODEL_MAX_MERGE], *dw[MODEL_MAX_MERGE], *db[MODEL_MAX_MERGE];
    const float *w[MODEL_MAX_MERGE], *b[MODEL_MAX_MERGE], *douts[MODEL_MAX_MERGE];
} conv_group;

static conv_group conv_group_of(model *m, int lead) {
    conv_group g;
    int ids[MODEL_MAX_MERGE];
    g.ng = merge_group(m, lead, ids);
    for (int k = 0; k < g.ng; k++) {
        const model_node *o = &m->nodes[ids[k]];
        g.Ks[k] = o->C;
        g.outs[k] = OUT(ids[k]);
        g.douts[k] = DOUT(ids[k]);
        g.w[k] = P(o->weight);
        g.dw[k] = G(o->weight);
        g.b[k] = o->bias >= 0 ? P(o->bias) : NULL;
        g.db[k] = o->bias >= 0 ? G(o->bias) : NULL;
    }
    return g;
}

static void conv_group_forward(model *m, int lead, const float *in, int C, int H, int W) {
    conv_group g = conv_group_of(m, lead);
    conv2d_fast_1x1_group_forward(g.outs, in, g.w, g.b, g.Ks, g.ng, m->N, C, H, W, m->ws);
}

static void conv_group_backward(model *m, int lead, float *din, const float *in, int C, int H,
                                int W, int din_overwrite) {
    conv_group g = conv_group_of(m, lead);
    conv2d_fast_1x1_group_backward(din, g.dw, g.db, g.douts, in, g.w, g.Ks, g.ng, m->N, C, H, W,
                                   din_overwrite, m->ws);
}

// out [N,OUT] = in [N,IN] * w[OUT,IN]^T + b
static void linear_fwd(model *m, const model_node *n, float *out, const float *in, int IN) {
    const float *w = P(n->weight), *b = n->bias >= 0 ? P(n->bias) : NULL;
    if (m->reference) { linear_forward(out, in, w, b, m->N, IN, n->C); return; }
    gemm(out, n->C, in, IN, w, IN, b, m->N, n->C, IN, GEMM_TRANS_B | (b ? GEMM_BIAS_COL : 0), m->ws);
}

static void linear_bwd(model *m, const model_node *n, float *din, const float *dout,
                       const float *in, int IN) {
    const int N = m->N, OUT = n->C;
    float *db = n->bias >= 0 ? G(n->bias) : NULL;
    if (m->reference) { linear_backward(din, G(n->weight), db, dout, in, P(n->weight), N, IN, OUT); return; }
    if (db)
        for (int o = 0; o < OUT; o++) {
            double s = 0;
            for (int i = 0; i < N; i++) s += dout[(size_t)i * OUT + o];
            db[o] += (float)s;
        }
    // dW [OUT,IN] += dout^T [OUT,N] * in [N,IN];  din [N,IN] += dout [N,OUT] * W [OUT,IN]
    gemm(G(n->weight), IN, dout, OUT, in, IN, NULL, OUT, IN, N, GEMM_TRANS_A | GEMM_ACCUMULATE, m->ws);
    if (din) gemm(din, IN, dout, OUT, P(n->weight), IN, NULL, N, IN, OUT, GEMM_ACCUMULATE, m->ws);
}

int model_forward(model *m, const float *x, int flags) {
    const int N = m->N, ref = m->reference, training = flags & MODEL_TRAIN;
    const int fold = folding(m, flags);
    m->ran_flags = -1;
    if (!fold) model_params_changed(m);   // training changes them; inference keeps the folding
    if (workspace_ready(m) || model_plan(m, flags) || (fold && fold_ready(m))) return -1;
    m->x = x;
    for (int i = 0; i < m->n_nodes; i++) {
        model_node *n = &m->nodes[i];
        if (!runs(n, training) || (fold && fold_skips(m, i))) continue;
        const double t0 = m->prof_fwd ? clock_now_s() : 0;
        float *out = OUT(i);
        const model_node *a = n->n_in ? &m->nodes[n->in[0]] : NULL;
        const float *in = a ? IN(n->in[0]) : NULL;
        int C = a ? a->C : 0, H = a ? a->H : 0, W = a ? a->W : 0;
        size_t cnt = (size_t)N * numel(n);
        switch (n->op) {
        case OP_INPUT:   // read in place (IN)
            break;
        case OP_TRANSFORM_INPUT:
            transform_input_forward(out, in, N, H * W);
            break;
        case OP_CONV:
            if (fold) {
                const float *pw = m->folded + n->folded;
                const float *b = pw + round16(fold_weights_size(m, n, C));
                const int has_bias = n->bias >= 0 || folded_bn(m, i);   // or the BN's shift
                const int relu = m->nodes[n->fold_to].op == OP_RELU;
                int ids[MODEL_MAX_MERGE], ng = merge_group(m, i, ids);
                ptrdiff_t os;
                float *o = fold_out(m, n->fold_to, &os);
                if (fold_unpacked(m, n) || (fold_plain() && ng == 1)) {
                    conv2d_fast_forward_into(o, os, in, pw, has_bias ? b : NULL, N, C, H, W, n->C,
                                             n->k, n->stride, n->pad, relu, m->ws);
                } else if (ng > 1) {   // the group's GEMM
                    float *outs[MODEL_MAX_MERGE];
                    ptrdiff_t strides[MODEL_MAX_MERGE];
                    int Ks[MODEL_MAX_MERGE], any_bias = 0;
                    for (int g = 0; g < ng; g++) {
                        const model_node *mb = &m->nodes[ids[g]];
                        outs[g] = fold_out(m, mb->fold_to, &strides[g]);
                        Ks[g] = mb->C;
                        any_bias |= mb->bias >= 0 || folded_bn(m, ids[g]) != NULL;
                    }
                    // (a member without bias or BN then gets + 0 from the stacked bias)
                    if ((fold_plain() ? conv2d_fast_forward_split : conv2d_fast_forward_packed_split)(
                            outs, strides, Ks, ng, in, pw, any_bias ? b : NULL, N, C, H, W, relu,
                            m->ws))
                        return -1;
                } else if (conv2d_fast_forward_packed_into(o, os, in, pw, has_bias ? b : NULL, N,
                                                         C, H, W, n->C, n->k, n->stride, n->pad,
                                                         relu, m->ws))
                    return -1;
            } else if (!ref && merged_member(m, i)) {
                break;   // its group's lead computed it
            } else if (!ref && n->merge_lead == i) {
                conv_group_forward(m, i, in, C, H, W);
            } else {
                conv_forward(m, n, out, in, C, H, W);
            }
            break;
        case OP_BN: {
            const float *g = P(n->weight), *b = P(n->bias);
            float *rm = P(n->running_mean), *rv = P(n->running_var);
            // Fused with its ReLU, the BN writes the ReLU's output (its own is never stored).
            const int relu = !ref && n->fused_relu;
            ptrdiff_t os = 0;
            float *o = relu ? fused_at(m, i, 0, &os) : out;
            if (training) {
                if ((long long)N * H * W < 2)
                    return err_set("%s: batch norm in training mode needs more than one value per "
                                   "channel (batch %d, %dx%d)", n->path, N, H, W);
                // Saved for backward: mean, invstd and (fast kernels) the affine it applied.
                float *mean = m->save + n->save, *invstd = mean + n->C, *affine = invstd + n->C;
                int64_t *tracked = &m->counters[m->tensors[n->num_batches_tracked].off];
                // momentum=None in PyTorch: the k-th batch since the reset weighs 1/k
                const float mom = m->bn_average ? (float)(1.0 / (double)(*tracked + 1)) : n->momentum;
                if (ref) {
                    batchnorm2d_forward_train(o, mean, invstd, rm, rv, in, g, b, N, C, H * W,
                                              n->eps, mom);
                } else if (bn_pools(m, i, training)) {   // and the max pool after its ReLU
                    const model_node *p = &m->nodes[i + 2];
                    batchnorm2d_relu_maxpool_fast_forward_train(
                        OUT(i + 2), p->argmax.floats ? (int32_t *)OUT_ARGMAX(p) : NULL, mean,
                        invstd, affine, rm, rv, in, g, b, N, C, H, W, n->eps, mom, p->k,
                        p->stride, p->pad, p->ceil_mode);
                } else {
                    batchnorm2d_fast_forward_train(o, os, mean, invstd, affine, rm, rv, in, g, b, N,
                                                   C, H * W, n->eps, mom, relu);
                }
                (*tracked)++;
            } else if (ref) {
                batchnorm2d_forward_eval(o, in, g, b, rm, rv, N, C, H * W, n->eps);
            } else {
                batchnorm2d_fast_forward_eval(o, os, in, g, b, rm, rv, N, C, H * W, n->eps, relu);
            }
            break;
        }
        case OP_RELU:
            if (ref) relu_forward(out, in, cnt);
            else if (!a->fused_relu) relu_fast_forward(out, in, cnt);
            break;
        case OP_MAXPOOL:
            if (ref)
                maxpool2d_forward(out, in, N, C, H, W, n->k, n->stride, n->pad, n->ceil_mode);
            else if (!pooled_by_bn(m, n, training))   // (else its input's BN pooled)
                maxpool2d_fast_forward(out, n->argmax.floats ? (int32_t *)OUT_ARGMAX(n) : NULL,
                                       in, N, C, H, W, n->k, n->stride, n->pad, n->ceil_mode);
            break;
        case OP_AVGPOOL:
            avgpool2d_forward(out, in, N, C, H, W, n->k, n->stride, n->pad, n->ceil_mode,
                              n->count_include_pad);
            break;
        case OP_ADAPTIVE_AVGPOOL:
            if (ref) adaptive_avgpool2d_forward(out, in, N, C, H, W, n->H, n->W);
            else adaptive_avgpool2d_fast_forward(out, in, N, C, H, W, n->H, n->W);
            break;
        case OP_LRN:
            lrn_forward(out, in, N, C, H * W, n->lrn_size, n->lrn_alpha, n->lrn_beta, n->lrn_k);
            break;
        case OP_LINEAR:
            linear_fwd(m, n, out, in, C * H * W);
            break;
        case OP_DROPOUT:
            if (!training) memcpy(out, in, cnt * sizeof(float));
            else if (ref) dropout_forward(out, m->save + n->save, in, cnt, n->p, &m->dropout_rng);
            else dropout_fast_forward(out, m->save + n->save, in, cnt, n->p, &m->dropout_rng);
            break;
        case OP_CONCAT: {
            const float *ins[NODE_MAX_IN];
            int Cs[NODE_MAX_IN];
            for (int j = 0; j < n->n_in; j++) {
                ins[j] = IN(n->in[j]);
                Cs[j] = m->nodes[n->in[j]].C;
            }
            if (ref) concat_forward(out, ins, Cs, n->n_in, N, n->H * n->W);
            else if (!concat_bn_in_place(m, n))   // (else its BNs wrote it)
                concat_fast_forward(out, ins, Cs, n->n_in, N, n->H * n->W);
            break;
        }
        case OP_FLATTEN:
            if (ref) memcpy(out, in, cnt * sizeof(float));
            else tensor_fast_copy(out, in, cnt);
            break;
        case OP_COUNT:
            break;
        }
        if (m->prof_fwd) m->prof_fwd[i] += clock_now_s() - t0;
        poison(m, plan_fwd_step(i));
    }
    m->ran_flags = flags;
    return 0;
}

static int is_output(const model *m, int i) { return i == m->logits || i == m->aux1 || i == m->aux2; }

// Whether node i's backward writes the gradient of its input j whole and is the first to write
// it (the plan starts that gradient's slot at i's step): then i overwrites it (the fast kernels'
// overwrite flags) and nothing zeroes it first; consumers that run later add to it. Saves a
// pass over nearly every activation gradient, and the GEMMs' read of C.
static int din_overwrites(const model *m, int i, int j, int training) {
    const model_node *n = &m->nodes[i];
    const model_slot *s = &m->nodes[j].dact;
    if (m->reference || is_output(m, j) || !s->floats || s->first != plan_bwd_step(m, i))
        return 0;
    int reads = 0;   // (an input taken twice gets two gradients: the second must add)
    for (int t = 0; t < n->n_in; t++) reads += n->in[t] == j;
    if (reads != 1) return 0;
    switch (n->op) {
    case OP_BN: return training;   // (eval mode's backward adds)
    case OP_CONV: case OP_CONCAT: case OP_MAXPOOL: return 1;
    default: return 0;
    }
}

// Backward of node i (the caller checked that it runs and is not the input).
static void backward_node(model *m, int i, int training) {
    const int N = m->N, ref = m->reference;
    model_node *n = &m->nodes[i];
    const float *out = OUT(i), *dout = DOUT(i);
    const model_node *a = &m->nodes[n->in[0]];
    const float *in = IN(n->in[0]);
    // The network input needs no gradient.
    float *din = a->op == OP_INPUT ? NULL : DOUT(n->in[0]);
    const int overwrite = din && din_overwrites(m, i, n->in[0], training);
    int C = a->C, H = a->H, W = a->W;
    size_t cnt = (size_t)N * numel(n);
    switch (n->op) {
    case OP_CONV:
        if (!ref && merged_member(m, i)) break;   // its group's lead does it
        if (!ref && n->merge_lead == i) conv_group_backward(m, i, din, in, C, H, W, overwrite);
        else conv_backward(m, n, din, dout, in, C, H, W, overwrite);
        break;
    case OP_BN: {
        const float *g = P(n->weight);
        const int relu = !ref && n->fused_relu;
        // Fused: the gradient is the ReLU's (its mask is recomputed from the input).
        ptrdiff_t ds = 0;
        const float *d = relu ? fused_at(m, i, 1, &ds) : dout;
        if (training) {
            const float *mean = m->save + n->save, *invstd = mean + n->C, *affine = invstd + n->C;
            if (ref)
                batchnorm2d_backward_train(din, G(n->weight), G(n->bias), d, in, g, mean,
                                           invstd, N, C, H * W);
            else
                batchnorm2d_fast_backward_train(
                    din, G(n->weight), G(n->bias), d, ds, in, g, mean, invstd, affine, N, C, H * W,
                    (relu ? BN_FUSED_RELU : 0) | (overwrite ? BN_DIN_OVERWRITE : 0));
        } else if (ref) {
            batchnorm2d_backward_eval(din, G(n->weight), G(n->bias), d, in, g,
                                      P(n->running_mean), P(n->running_var), N, C, H * W,
                                      n->eps);
        } else {
            batchnorm2d_fast_backward_eval(din, G(n->weight), G(n->bias), d, ds, in, g, P(n->bias),
                                           P(n->running_mean), P(n->running_var), N, C,
                                           H * W, n->eps, relu);
        }
        break;
    }
    case OP_LINEAR:
        linear_bwd(m, n, din, dout, in, C * H * W);
        break;
    case OP_CONCAT: {
        if (concat_bn_in_place(m, n)) break;   // its BNs read their gradients from dout
        float *dins[NODE_MAX_IN];
        int Cs[NODE_MAX_IN];
        unsigned ow = 0;
        for (int j = 0; j < n->n_in; j++) {
            const model_node *b = &m->nodes[n->in[j]];
            dins[j] = b->op == OP_INPUT ? NULL : DOUT(n->in[j]);
            Cs[j] = b->C;
            if (dins[j] && din_overwrites(m, i, n->in[j], training)) ow |= 1u << j;
        }
        if (ref) concat_backward(dins, dout, Cs, n->n_in, N, n->H * n->W);
        else concat_fast_backward(dins, dout, Cs, n->n_in, N, n->H * n->W, ow);
        break;
    }
    default:
        if (!din) break;   // parameter-free op right after the input: nothing to do
        switch (n->op) {
        case OP_TRANSFORM_INPUT: transform_input_backward(din, dout, N, H * W); break;
        case OP_RELU:
            if (ref) relu_backward(din, dout, out, cnt);
            else if (!a->fused_relu) relu_fast_backward(din, dout, out, cnt);
            break;
        case OP_MAXPOOL:
            if (ref)
                maxpool2d_backward(din, dout, in, N, C, H, W, n->k, n->stride, n->pad, n->ceil_mode);
            else
                maxpool2d_fast_backward(din, dout, (const int32_t *)OUT_ARGMAX(n), N, C, H, W,
                                        n->k, n->stride, n->pad, n->ceil_mode, overwrite);
            break;
        case OP_AVGPOOL:
            avgpool2d_backward(din, dout, N, C, H, W, n->k, n->stride, n->pad, n->ceil_mode,
                               n->count_include_pad);
            break;
        case OP_ADAPTIVE_AVGPOOL:
            if (ref) adaptive_avgpool2d_backward(din, dout, N, C, H, W, n->H, n->W);
            else adaptive_avgpool2d_fast_backward(din, dout, N, C, H, W, n->H, n->W);
            break;
        case OP_LRN:
            lrn_backward(din, dout, in, N, C, H * W, n->lrn_size, n->lrn_alpha, n->lrn_beta,
                         n->lrn_k);
            break;
        case OP_DROPOUT:
        case OP_FLATTEN:    // dropout in eval mode is the identity, like flatten
            if (n->op == OP_DROPOUT && training) {
                if (ref) dropout_backward(din, dout, m->save + n->save, cnt);
                else dropout_fast_backward(din, dout, m->save + n->save, cnt);
            } else if (ref) {
                for (size_t j = 0; j < cnt; j++) din[j] += dout[j];
            } else {
                tensor_fast_add(din, dout, cnt);
            }
            break;
        default:
            break;
        }
    }
}

int model_backward(model *m) {
    if (m->ran_flags < 0 || !(m->ran_flags & MODEL_GRAD))
        return err_set("model_backward: the last forward did not keep what backward needs");
    const int training = m->ran_flags & MODEL_TRAIN;
    for (int i = m->n_nodes - 1; i >= 0; i--) {
        const int step = plan_bwd_step(m, i);
        // Gradients coming into use now start at zero (the outputs' hold the caller's), unless
        // this node writes them whole.
        for (int j = 0; j < m->n_nodes; j++) {
            const model_slot *s = &m->nodes[j].dact;
            if (!s->floats || s->first != step || is_output(m, j) ||
                din_overwrites(m, i, j, training))
                continue;
            if (m->reference) memset(m->arena + s->off, 0, s->floats * sizeof(float));
            else tensor_fast_zero(m->arena + s->off, s->floats);
        }
        if (runs(&m->nodes[i], training) && m->nodes[i].op != OP_INPUT) {
            const double t0 = m->prof_bwd ? clock_now_s() : 0;
            backward_node(m, i, training);
            if (m->prof_bwd) m->prof_bwd[i] += clock_now_s() - t0;
        }
        poison(m, step);
    }
    m->ran_flags = -1;   // the gradients' slots now hold other data
    return 0;
}

int model_loss_backward(model *m, const float *x, const int64_t *target, float smoothing,
                        float *loss_out) {
    const int N = m->N, K = m->cfg.num_classes;
    for (int i = 0; i < N; i++)
        if (target[i] < 0 || target[i] >= K)
            return err_set("target %lld of sample %d is outside [0, %d)", (long long)target[i], i, K);
    if (model_forward(m, x, MODEL_TRAIN | MODEL_GRAD)) return -1;
    // Main loss + 0.3 × each aux head's loss (GoogLeNet paper, torchvision's training recipe).
    const int outs[3] = {m->logits, m->aux1, m->aux2};
    const float weight[3] = {1.0f, 0.3f, 0.3f};
    double loss = 0;
    for (int h = 0; h < 3; h++) {
        if (outs[h] < 0) continue;
        float *probs = m->probs + (size_t)h * N * K;
        loss += weight[h] * cross_entropy_forward(probs, model_out(m, outs[h]), target, N, K, smoothing);
        float *d = model_dout(m, outs[h]);
        memset(d, 0, (size_t)N * K * sizeof(float));
        cross_entropy_backward(d, probs, target, N, K, smoothing, weight[h]);
    }
    if (model_backward(m)) return -1;
    *loss_out = (float)loss;
    return 0;
}
