// Model lifecycle around the node list and tensor table: build, initialise, size the arenas,
// count, summarise, save and load. The forward/backward executor is in graph.c.
#include "models/model.h"
#include "ops/fast_ops.h"
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "io/safetensors.h"
#include "models/build.h"
#include "util/err.h"
#include "util/mem.h"

const char *const model_names[] = {
    "googlenet", "googlenet-paper", "googlenet-naive",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", NULL,
};

static int is_vgg(const model_config *c) { return !strncmp(c->name, "vgg", 3); }

int model_config_init(model_config *cfg, const char *name) {
    memset(cfg, 0, sizeof *cfg);
    for (int i = 0; model_names[i]; i++) {
        if (strcmp(model_names[i], name)) continue;
        snprintf(cfg->name, sizeof cfg->name, "%s", name);
        cfg->num_classes = 1000;
        cfg->in_channels = 3;
        cfg->dropout = -1;
        cfg->dropout_aux = -1;
        cfg->aux = !is_vgg(cfg);
        cfg->H = cfg->W = 224;
        return 0;
    }
    return err_set("unknown model '%s' (see 'incept models')", name);
}

// How many inputs of later nodes are node i.
static int consumers(const model *m, int i) {
    int uses = 0;
    for (int j = i + 1; j < m->n_nodes; j++)
        for (int k = 0; k < m->nodes[j].n_in; k++) uses += m->nodes[j].in[k] == i;
    return uses;
}

// Node i's only consumer is the next node, of kind op.
static int only_next(const model *m, int i, op_kind op) {
    return consumers(m, i) == 1 && i + 1 < m->n_nodes && m->nodes[i + 1].op == op &&
           m->nodes[i + 1].in[0] == i;
}

int model_build(model *m, const model_config *cfg) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->logits = m->aux1 = m->aux2 = -1;
    model_config *c = &m->cfg;
    int vgg = is_vgg(c);
    if (c->dropout < 0) c->dropout = vgg ? 0.5f : !strcmp(c->name, "googlenet-paper") ? 0.4f : 0.2f;
    if (c->dropout_aux < 0) c->dropout_aux = 0.7f;
    if (vgg) c->aux = 0;
    // (checked here too for the options a checkpoint's metadata gives)
    if (c->num_classes < 1 || c->num_classes > MODEL_MAX_CLASSES)
        return err_set("--num-classes must be 1..%d, not %d", MODEL_MAX_CLASSES, c->num_classes);
    if (c->in_channels < 1 || c->in_channels > MODEL_MAX_IN_CHANNELS)
        return err_set("--in-channels must be 1..%d, not %d", MODEL_MAX_IN_CHANNELS, c->in_channels);
    if (!(c->dropout >= 0 && c->dropout <= 1) || !(c->dropout_aux >= 0 && c->dropout_aux <= 1))
        return err_set("dropout %g / aux dropout %g must be in [0, 1]", c->dropout, c->dropout_aux);
    if (c->H < 1 || c->W < 1 || c->H > MODEL_MAX_SIDE || c->W > MODEL_MAX_SIDE)
        return err_set("input size %dx%d is not valid (sides 1..%d)", c->H, c->W, MODEL_MAX_SIDE);
    const char *ref = getenv("INCEPT_REFERENCE");
    m->reference = ref && *ref && strcmp(ref, "0");
    const char *arena = getenv("INCEPT_ARENA");
    if (arena && *arena && strcmp(arena, "shared")) {
        if (!strcmp(arena, "separate")) m->arena_mode = ARENA_SEPARATE;
        else if (!strcmp(arena, "poison")) m->arena_mode = ARENA_POISON;
        else return err_set("INCEPT_ARENA must be shared, separate or poison, not '%s'", arena);
    }
    m->plan_flags = m->ran_flags = -1;
    int rc = vgg ? vgg_build(m) : googlenet_build(m);
    if (rc) { model_free(m); return -1; }
    // Fusions of the fast kernels. A BN whose only consumer is the ReLU right after it computes
    // that ReLU; at inference a conv computes the BN and/or ReLU that follow it likewise.
    for (int i = 0; i < m->n_nodes; i++) m->nodes[i].fold_conv = -1;
    for (int i = 0; i < m->n_nodes; i++) {
        model_node *n = &m->nodes[i];
        n->fused_relu = n->op == OP_BN && only_next(m, i, OP_RELU);
        n->fused_pool = n->fused_relu && only_next(m, i + 1, OP_MAXPOOL) &&
                        n->H * n->W <= BN_POOL_MAX_HW;
        if (n->op != OP_CONV) continue;
        int t = i;
        if (only_next(m, t, OP_BN)) t++;
        if (only_next(m, t, OP_RELU)) t++;
        n->fold_to = t;
        for (int j = i + 1; j <= t; j++) m->nodes[j].fold_conv = i;
    }
    // Merged 1x1 convs (inference): same input, same passes, the same ReLU-or-not after them.
    for (int i = 0; i < m->n_nodes; i++) m->nodes[i].merge_lead = -1;
    for (int i = 0; i < m->n_nodes; i++) {
        model_node *n = &m->nodes[i];
        if (n->op != OP_CONV || n->k != 1 || n->stride != 1 || n->pad != 0 || n->merge_lead >= 0)
            continue;
        const int relu = m->nodes[n->fold_to].op == OP_RELU;
        int members = 1;
        for (int j = i + 1; j < m->n_nodes && members < MODEL_MAX_MERGE; j++) {
            model_node *o = &m->nodes[j];
            if (o->op == OP_CONV && o->k == 1 && o->stride == 1 && o->pad == 0 &&
                o->in[0] == n->in[0] && o->head == n->head && o->merge_lead < 0 &&
                (m->nodes[o->fold_to].op == OP_RELU) == relu) {
                o->merge_lead = i;
                members++;
            }
        }
        if (members > 1) n->merge_lead = i;
    }
    // Concatenations written in place (inference): every input the last node of a conv chain,
    // read by nothing else, in the same head.
    for (int i = 0; i < m->n_nodes; i++) m->nodes[i].concat_into = -1;
    for (int c = 0; c < m->n_nodes; c++) {
        const model_node *cat = &m->nodes[c];
        if (cat->op != OP_CONCAT) continue;
        int ok = 1;
        for (int k = 0; k < cat->n_in && ok; k++) {
            const int j = cat->in[k];
            const model_node *t = &m->nodes[j];
            const int conv = t->op == OP_CONV ? j : t->fold_conv;
            ok = conv >= 0 && m->nodes[conv].op == OP_CONV && m->nodes[conv].fold_to == j &&
                 consumers(m, j) == 1 && t->head == cat->head && j != m->logits &&
                 j != m->aux1 && j != m->aux2;
        }
        for (int k = 0, c0 = 0; ok && k < cat->n_in; c0 += m->nodes[cat->in[k]].C, k++) {
            m->nodes[cat->in[k]].concat_into = c;
            m->nodes[cat->in[k]].concat_c0 = c0;
        }
    }
    const char *fold = getenv("INCEPT_FOLD");
    m->fold = !(fold && !strcmp(fold, "0"));
    m->params = mem_calloc(m->n_floats, sizeof(float));
    m->grads = mem_calloc(m->n_floats, sizeof(float));
    m->counters = calloc(m->n_counters ? (size_t)m->n_counters : 1, sizeof(int64_t));
    if (!m->params || !m->grads || !m->counters) {
        const size_t n = m->n_floats;   // (model_free clears it)
        model_free(m);
        return err_set("out of memory allocating %zu parameters", n);
    }
    return 0;
}

void model_free(model *m) {
    free(m->nodes); free(m->tensors); free(m->params); free(m->grads); free(m->counters);
    free(m->arena); free(m->save); free(m->probs); free(m->ws); free(m->folded);
    memset(m, 0, sizeof *m);
}

// torch.nn.init.trunc_normal_: resample until inside [a, b].
static float trunc_normal(rng *r, double std, double a, double b) {
    for (;;) {
        double v = rng_normal(r) * std;
        if (v >= a && v <= b) return (float)v;
    }
}

void model_params_changed(model *m) {
    free(m->folded);
    m->folded = NULL;
}

int model_bn_stats_reset(model *m) {
    model_params_changed(m);
    int layers = 0;
    for (int i = 0; i < m->n_nodes; i++) {
        const model_node *n = &m->nodes[i];
        if (n->op != OP_BN) continue;
        layers++;
        float *rm = m->params + m->tensors[n->running_mean].off;
        float *rv = m->params + m->tensors[n->running_var].off;
        for (int c = 0; c < n->C; c++) rm[c] = 0.0f, rv[c] = 1.0f;
        m->counters[m->tensors[n->num_batches_tracked].off] = 0;
    }
    return layers;
}

void model_init(model *m, uint64_t seed) {
    model_params_changed(m);
    rng r;
    rng_seed(&r, seed);
    int vgg = is_vgg(&m->cfg);
    for (int t = 0; t < m->n_tensors; t++) {
        model_tensor *T = &m->tensors[t];
        if (T->kind == TK_COUNTER) { m->counters[T->off] = 0; continue; }
        float *p = m->params + T->off;
        const model_node *n = &m->nodes[T->node];
        const model_tensor *w = &m->tensors[n->weight];
        int is_w = t == n->weight, is_b = t == n->bias;
        if (n->op == OP_BN) {
            float v = (is_w || t == n->running_var) ? 1.0f : 0.0f;
            for (size_t i = 0; i < T->numel; i++) p[i] = v;
        } else if (vgg && n->op == OP_CONV && is_w) {          // kaiming_normal_, fan_out, relu
            double std = sqrt(2.0 / ((double)w->shape[0] * w->shape[2] * w->shape[3]));
            for (size_t i = 0; i < T->numel; i++) p[i] = (float)(rng_normal(&r) * std);
        } else if (vgg && is_w) {                             // linear: normal(0, 0.01)
            for (size_t i = 0; i < T->numel; i++) p[i] = (float)(rng_normal(&r) * 0.01);
        } else if (vgg && is_b) {
            memset(p, 0, T->numel * sizeof *p);
        } else if (is_w) {                                    // GoogLeNet conv and linear
            for (size_t i = 0; i < T->numel; i++) p[i] = trunc_normal(&r, 0.01, -2, 2);
        } else if (is_b) {           // GoogLeNet biases keep PyTorch's default U(±1/sqrt(fan_in))
            double bound = 1.0 / sqrt((double)(w->numel / (size_t)w->shape[0]));
            for (size_t i = 0; i < T->numel; i++) p[i] = (float)((2 * rng_uniform(&r) - 1) * bound);
        }
    }
    rng_seed(&m->dropout_rng, seed ^ 0x5eedd0d0u);
}

static size_t node_numel(const model_node *n) { return (size_t)n->C * n->H * n->W; }

int model_prepare(model *m, int N) {
    if (N == m->N && m->save) return 0;
    if (N < 1) return err_set("batch size must be at least 1, not %d", N);
    size_t s = 0;
    for (int i = 0; i < m->n_nodes; i++) {
        model_node *n = &m->nodes[i];
        n->save = s;
        if (n->op == OP_BN) s += 4 * (size_t)n->C;   // mean, invstd, affine (graph.c)
        if (n->op == OP_DROPOUT) s += (size_t)N * node_numel(n);
    }
    free(m->save); free(m->probs); free(m->ws);
    m->ws = NULL;       // resized for the new batch by the executor
    m->ws_threads = 0;
    m->plan_flags = m->ran_flags = -1;   // the arena is laid out again for the new batch
    m->save = mem_alloc(s * sizeof(float));
    m->probs = malloc((size_t)3 * N * m->cfg.num_classes * sizeof(float));
    m->save_floats = s;
    m->N = N;
    if (!m->save || !m->probs) {
        free(m->save); free(m->probs);
        m->save = m->probs = NULL;
        m->N = 0;
        return err_set("out of memory for batch %d", N);
    }
    return 0;
}

float *model_out(const model *m, int node) { return m->arena + m->nodes[node].act.off; }
float *model_dout(const model *m, int node) { return m->arena + m->nodes[node].dact.off; }

void model_zero_grad(model *m) { memset(m->grads, 0, m->n_floats * sizeof(float)); }

size_t model_param_count(const model *m, int with_aux) {
    size_t n = 0;
    for (int t = 0; t < m->n_tensors; t++) {
        const model_tensor *T = &m->tensors[t];
        if (T->kind == TK_PARAM && (with_aux || m->nodes[T->node].head == 0)) n += T->numel;
    }
    return n;
}

long long model_macs(const model *m, int with_aux) {
    long long s = 0;
    for (int i = 0; i < m->n_nodes; i++)
        if (with_aux || m->nodes[i].head == 0) s += m->nodes[i].macs;
    return s;
}

const char *model_op_name(op_kind op) {
    static const char *names[OP_COUNT] = {
        "Input", "transform_input", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "AvgPool2d",
        "AdaptiveAvgPool2d", "LocalResponseNorm", "Linear", "Dropout", "Inception", "flatten",
    };
    return (unsigned)op < OP_COUNT ? names[op] : "?";
}

// 1234567 -> "1,234,567"
static const char *commas(char *buf, unsigned long long v) {
    char tmp[32];
    int len = snprintf(tmp, sizeof tmp, "%llu", v), o = 0;
    for (int i = 0; i < len; i++) {
        if (i && (len - i) % 3 == 0) buf[o++] = ',';
        buf[o++] = tmp[i];
    }
    buf[o] = 0;
    return buf;
}

static const char *macs_str(char *buf, long long v) {
    if (v >= 1000000000LL) sprintf(buf, "%.3f G", v / 1e9);
    else if (v >= 1000000) sprintf(buf, "%.2f M", v / 1e6);
    else if (v >= 1000) sprintf(buf, "%.1f K", v / 1e3);
    else sprintf(buf, "%lld", v);
    return buf;
}

void model_summary(const model *m, FILE *f) {
    const model_config *c = &m->cfg;
    char b1[32], b2[32], shape[48];
    fprintf(f, "%s: input %dx%dx%d, %d classes\n\n", c->name, c->in_channels, c->H, c->W,
            c->num_classes);
    fprintf(f, "%-36s %-18s %-14s %12s %12s\n", "module", "type", "output", "params", "MACs");
    for (int i = 0; i < m->n_nodes; i++) {
        const model_node *n = &m->nodes[i];
        // F.relu inside BasicConv2d/aux heads has no module of its own: not a row.
        if (n->op == OP_RELU && n->functional) continue;
        unsigned long long p = 0;
        for (int t = 0; t < m->n_tensors; t++)
            if (m->tensors[t].node == i && m->tensors[t].kind == TK_PARAM) p += m->tensors[t].numel;
        if (n->H == 1 && n->W == 1 && (n->op == OP_LINEAR || n->op == OP_FLATTEN ||
                                       n->op == OP_DROPOUT || n->op == OP_RELU))
            snprintf(shape, sizeof shape, "%d", n->C);
        else
            snprintf(shape, sizeof shape, "%dx%dx%d", n->C, n->H, n->W);
        char path[96];
        snprintf(path, sizeof path, "%s%s", n->path, n->functional ? " (F)" : "");
        fprintf(f, "%-36s %-18s %-14s %12s %12s\n", path, model_op_name(n->op), shape,
                p ? commas(b1, p) : "-", n->macs ? macs_str(b2, n->macs) : "-");
    }
    fprintf(f, "\n(F) = functional in torchvision, no module of its own. MACs per image.\n");
    fprintf(f, "params: %s", commas(b1, model_param_count(m, 0)));
    if (m->aux1 >= 0)
        fprintf(f, " without aux heads, %s with aux heads (training only)",
                commas(b2, model_param_count(m, 1)));
    fprintf(f, "\nMACs:   %s (%s multiply-accumulates)", macs_str(b1, model_macs(m, 0)),
            commas(b2, (unsigned long long)model_macs(m, 0)));
    if (m->aux1 >= 0) fprintf(f, " without aux heads, %s with", macs_str(b1, model_macs(m, 1)));
    long long acts = 0;
    for (int i = 0; i < m->n_nodes; i++)
        if (m->nodes[i].head == 0 && m->nodes[i].op != OP_INPUT)
            acts += (long long)node_numel(&m->nodes[i]);
    fprintf(f, "\nactivations: %s floats per image (eval, all layers kept)\n",
            commas(b1, (unsigned long long)acts));
}

int model_save(const model *m, const char *path, const char *const *meta_keys,
               const char *const *meta_vals, int n_meta, const st_entry *extra, int n_extra) {
    st_entry *e = calloc((size_t)m->n_tensors + (size_t)n_extra, sizeof *e);
    if (!e) return err_set("%s: out of memory", path);
    for (int t = 0; t < m->n_tensors; t++) {
        const model_tensor *T = &m->tensors[t];
        e[t].name = T->key;
        e[t].ndim = T->ndim;
        for (int d = 0; d < T->ndim; d++) e[t].shape[d] = T->shape[d];
        if (T->kind == TK_COUNTER) { e[t].dtype = ST_I64; e[t].data = m->counters + T->off; }
        else { e[t].dtype = ST_F32; e[t].data = m->params + T->off; }
    }
    for (int i = 0; i < n_extra; i++) e[m->n_tensors + i] = extra[i];
    int rc = st_write(path, e, m->n_tensors + n_extra, meta_keys, meta_vals, n_meta);
    free(e);
    return rc;
}

static void shape_str(char *buf, size_t cap, int ndim, const int64_t *s) {
    int o = snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && o < (int)cap; d++)
        o += snprintf(buf + o, cap - o, "%s%" PRId64, d ? "," : "", s[d]);
    if (o < (int)cap) snprintf(buf + o, cap - o, "]");
}

static int is_aux_key(const char *k) { return !strncmp(k, "aux1.", 5) || !strncmp(k, "aux2.", 5); }

int model_load(model *m, const char *path, int *ignored_aux) {
    model_params_changed(m);
    st_file f;
    if (st_read(&f, path)) return -1;
    int rc = 0, ignored = 0;
    char want[96], got[96];
    for (int t = 0; t < m->n_tensors && !rc; t++) {
        const model_tensor *T = &m->tensors[t];
        const st_tensor *s = st_get(&f, T->key);
        st_dtype dt = T->kind == TK_COUNTER ? ST_I64 : ST_F32;
        int64_t shp[4];
        for (int d = 0; d < T->ndim; d++) shp[d] = T->shape[d];
        shape_str(want, sizeof want, T->ndim, shp);
        if (!s) {
            rc = err_set("%s: missing tensor '%s' (expected %s %s) for %s", path, T->key,
                         st_dtype_name(dt), want, m->cfg.name);
            break;
        }
        shape_str(got, sizeof got, s->ndim, s->shape);
        int same = s->ndim == T->ndim;
        for (int d = 0; same && d < T->ndim; d++) same = s->shape[d] == T->shape[d];
        if (s->dtype != dt || !same) {
            rc = err_set("%s: tensor '%s' is %s %s, expected %s %s", path, T->key,
                         st_dtype_name(s->dtype), got, st_dtype_name(dt), want);
            break;
        }
        if (T->kind == TK_COUNTER) memcpy(m->counters + T->off, s->data, 8);
        else memcpy(m->params + T->off, s->data, T->numel * sizeof(float));
    }
    for (int i = 0; i < f.n && !rc; i++) {
        const char *k = f.tensors[i].name;
        int known = 0;
        for (int t = 0; t < m->n_tensors && !known; t++) known = !strcmp(m->tensors[t].key, k);
        if (known || !strncmp(k, MODEL_EXTRA_PREFIX, strlen(MODEL_EXTRA_PREFIX))) continue;
        if (!m->cfg.aux && is_aux_key(k)) { ignored++; continue; }
        rc = err_set("%s: unexpected tensor '%s' for %s%s", path, k, m->cfg.name,
                     is_aux_key(k) ? " (aux-head weights in a model without them?)" : "");
    }
    st_free(&f);
    if (ignored_aux) *ignored_aux = ignored;
    return rc;
}
