#include "models/build.h"
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ops/ops.h"
#include "util/err.h"

int b_fail(model *m, const char *fmt, ...) {
    if (!m->build_failed) {
        char buf[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        err_set("%s", buf);
        m->build_failed = 1;
    }
    return -1;
}

void b_head(model *m, int h) { m->cur_head = h; }

// Grows an array by doubling; aborts only on out-of-memory at build time (tiny tables).
static void *grow(void *p, int *cap, int need, size_t elem) {
    if (need <= *cap) return p;
    int nc = *cap ? *cap * 2 : 64;
    while (nc < need) nc *= 2;
    void *q = realloc(p, (size_t)nc * elem);
    if (!q) { fprintf(stderr, "incept: out of memory\n"); abort(); }
    memset((char *)q + (size_t)*cap * elem, 0, (size_t)(nc - *cap) * elem);
    *cap = nc;
    return q;
}

static int node_new(model *m, op_kind op, const char *path, int in) {
    m->nodes = grow(m->nodes, &m->cap_nodes, m->n_nodes + 1, sizeof(model_node));
    int id = m->n_nodes++;
    model_node *n = &m->nodes[id];
    n->op = op;
    snprintf(n->path, sizeof n->path, "%s", path ? path : "");
    n->head = m->cur_head;
    n->n_in = in >= 0 ? 1 : 0;
    n->in[0] = in;
    n->weight = n->bias = n->running_mean = n->running_var = n->num_batches_tracked = -1;
    if (in >= 0) {
        n->C = m->nodes[in].C; n->H = m->nodes[in].H; n->W = m->nodes[in].W;
    }
    return id;
}

static int tensor_new(model *m, int node, const char *path, const char *suffix, tensor_kind kind,
                      int no_decay, int ndim, int d0, int d1, int d2, int d3) {
    m->tensors = grow(m->tensors, &m->cap_tensors, m->n_tensors + 1, sizeof(model_tensor));
    int id = m->n_tensors++;
    model_tensor *t = &m->tensors[id];
    snprintf(t->key, sizeof t->key, "%s.%s", path, suffix);
    t->ndim = ndim;
    int d[4] = {d0, d1, d2, d3};
    t->numel = 1;
    for (int i = 0; i < ndim; i++) { t->shape[i] = d[i]; t->numel *= (size_t)d[i]; }
    t->kind = kind;
    t->node = node;
    t->no_decay = no_decay;
    if (kind == TK_COUNTER) t->off = (size_t)m->n_counters++;
    else { t->off = m->n_floats; m->n_floats += t->numel; }
    return id;
}

static void check_size(model *m, int id) {
    model_node *n = &m->nodes[id];
    if (n->H < 1 || n->W < 1)
        b_fail(m, "input %dx%d is too small for %s: %s would have output %dx%d",
               m->cfg.H, m->cfg.W, m->cfg.name, n->path, n->H, n->W);
}

int b_input(model *m, int C, int H, int W) {
    int id = node_new(m, OP_INPUT, "input", -1);
    m->nodes[id].C = C; m->nodes[id].H = H; m->nodes[id].W = W;
    return id;
}

int b_transform_input(model *m, int in) {
    int id = node_new(m, OP_TRANSFORM_INPUT, "transform_input", in);
    m->nodes[id].functional = 1;
    if (m->nodes[in].C != 3) b_fail(m, "--transform-input needs 3 input channels, not %d", m->nodes[in].C);
    return id;
}

int b_conv(model *m, const char *path, int in, int K, int k, int stride, int pad, int bias) {
    int id = node_new(m, OP_CONV, path, in);
    model_node *n = &m->nodes[id];
    int C = n->C;
    n->k = k; n->stride = stride; n->pad = pad;
    n->C = K;
    n->H = conv2d_out_size(n->H, k, stride, pad);
    n->W = conv2d_out_size(n->W, k, stride, pad);
    n->macs = (long long)K * C * k * k * n->H * n->W;
    int w = tensor_new(m, id, path, "weight", TK_PARAM, 0, 4, K, C, k, k);
    int b = bias ? tensor_new(m, id, path, "bias", TK_PARAM, 1, 1, K, 0, 0, 0) : -1;
    n = &m->nodes[id];
    n->weight = w; n->bias = b;
    check_size(m, id);
    return id;
}

int b_bn(model *m, const char *path, int in, float eps) {
    int id = node_new(m, OP_BN, path, in);
    int C = m->nodes[id].C;
    int w = tensor_new(m, id, path, "weight", TK_PARAM, 1, 1, C, 0, 0, 0);
    int b = tensor_new(m, id, path, "bias", TK_PARAM, 1, 1, C, 0, 0, 0);
    int rm = tensor_new(m, id, path, "running_mean", TK_BUFFER, 0, 1, C, 0, 0, 0);
    int rv = tensor_new(m, id, path, "running_var", TK_BUFFER, 0, 1, C, 0, 0, 0);
    int nb = tensor_new(m, id, path, "num_batches_tracked", TK_COUNTER, 0, 0, 0, 0, 0, 0);
    model_node *n = &m->nodes[id];
    n->weight = w; n->bias = b; n->running_mean = rm; n->running_var = rv;
    n->num_batches_tracked = nb;
    n->eps = eps; n->momentum = 0.1f;
    return id;
}

int b_relu(model *m, const char *path, int in, int functional) {
    int id = node_new(m, OP_RELU, path, in);
    m->nodes[id].functional = functional;
    return id;
}

static int pool_node(model *m, op_kind op, const char *path, int in, int k, int stride, int pad,
                     int ceil_mode) {
    int id = node_new(m, op, path, in);
    model_node *n = &m->nodes[id];
    n->k = k; n->stride = stride; n->pad = pad; n->ceil_mode = ceil_mode;
    n->H = pool_out_size(n->H, k, stride, pad, ceil_mode);
    n->W = pool_out_size(n->W, k, stride, pad, ceil_mode);
    check_size(m, id);
    return id;
}

int b_maxpool(model *m, const char *path, int in, int k, int stride, int pad, int ceil_mode) {
    return pool_node(m, OP_MAXPOOL, path, in, k, stride, pad, ceil_mode);
}

int b_avgpool(model *m, const char *path, int in, int k, int stride, int pad, int ceil_mode,
              int count_include_pad) {
    int id = pool_node(m, OP_AVGPOOL, path, in, k, stride, pad, ceil_mode);
    m->nodes[id].count_include_pad = count_include_pad;
    return id;
}

int b_adaptive_avgpool(model *m, const char *path, int in, int OH, int OW, int functional) {
    int id = node_new(m, OP_ADAPTIVE_AVGPOOL, path, in);
    m->nodes[id].H = OH; m->nodes[id].W = OW;
    m->nodes[id].functional = functional;
    return id;
}

int b_lrn(model *m, const char *path, int in, int size, float alpha, float beta, float k) {
    int id = node_new(m, OP_LRN, path, in);
    model_node *n = &m->nodes[id];
    n->lrn_size = size; n->lrn_alpha = alpha; n->lrn_beta = beta; n->lrn_k = k;
    return id;
}

int b_linear(model *m, const char *path, int in, int out, int bias) {
    int id = node_new(m, OP_LINEAR, path, in);
    model_node *n = &m->nodes[id];
    int IN = n->C * n->H * n->W;
    n->C = out; n->H = 1; n->W = 1;
    n->macs = (long long)IN * out;
    int w = tensor_new(m, id, path, "weight", TK_PARAM, 0, 2, out, IN, 0, 0);
    int b = bias ? tensor_new(m, id, path, "bias", TK_PARAM, 1, 1, out, 0, 0, 0) : -1;
    m->nodes[id].weight = w; m->nodes[id].bias = b;
    return id;
}

int b_dropout(model *m, const char *path, int in, float p) {
    int id = node_new(m, OP_DROPOUT, path, in);
    m->nodes[id].p = p;
    if (!(p >= 0 && p <= 1)) b_fail(m, "dropout probability %g for %s is outside [0, 1]", p, path);
    return id;
}

int b_concat(model *m, const char *path, const int *ins, int n_in) {
    int id = node_new(m, OP_CONCAT, path, ins[0]);
    model_node *n = &m->nodes[id];
    n->n_in = n_in;
    n->C = 0;
    for (int i = 0; i < n_in; i++) {
        n->in[i] = ins[i];
        n->C += m->nodes[ins[i]].C;
        if (m->nodes[ins[i]].H != n->H || m->nodes[ins[i]].W != n->W)
            b_fail(m, "%s: branch outputs differ in size (%dx%d vs %dx%d)", path,
                   m->nodes[ins[i]].H, m->nodes[ins[i]].W, n->H, n->W);
    }
    return id;
}

int b_flatten(model *m, const char *path, int in) {
    int id = node_new(m, OP_FLATTEN, path, in);
    model_node *n = &m->nodes[id];
    n->C = n->C * n->H * n->W; n->H = n->W = 1;
    n->functional = 1;
    return id;
}
