// incept — the command-line program. Each verb is one function below; options are parsed by
// one table-free loop per verb with shared model options. Usage errors exit 2, bad input 1.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cli/cli.h"
#include "io/safetensors.h"
#include "models/model.h"
#include "util/err.h"

static const char *USAGE =
    "usage: incept VERB [options]\n"
    "  models                                   list the networks with parameter counts\n"
    "  summary MODEL [--input CxHxW]            layer table: shapes, parameters, MACs\n"
    "  init MODEL --output W.safetensors [--seed S]\n"
    "  forward MODEL --weights W --input X --output Y [--train] [--seed S]\n"
    "  gradients MODEL --weights W --input X --output G [--label-smoothing E] [--seed S]\n"
    "  bench MODEL [--batch N] [--input CxHxW] [--train] [--threads T] [--iters I] [--layers] [--bf16]\n"
    "  train MODEL --data SOURCE [options]      train, evaluating every epoch (train --help)\n"
    "  train --resume RUN_DIR [--epochs N]      continue a run exactly where it stopped\n"
    "  eval MODEL --weights W --data SOURCE [--output CSV] [--batch-size N] [--limit-test N]\n"
    "                                          [--tta] [--bf16]  (--tta: also score each image's mirror)\n"
    "  predict MODEL --weights W [--labels FILE] [--top K] [--bf16] IMAGE...\n"
    "                                          (--bf16: bfloat16 products, as train --bf16)\n";

static void usage(FILE *f) { fprintf(f, "%s%s", USAGE, CLI_MODEL_OPTIONS); }

typedef struct {
    model_config cfg;
    const char *weights, *input, *output, *shape;
    uint64_t seed;
    int train;
    float smoothing;
} opts;

// Parses MODEL and the options shared by all verbs. Returns 0, or an exit code.
// Parses MODEL and the options shared by the model verbs. Returns 0, or an exit code.
static int parse(int argc, char **argv, opts *o) {
    memset(o, 0, sizeof *o);
    int rc = cli_model_name(&o->cfg, argc, argv);
    if (rc) return rc;
    for (int i = 3; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if ((rc = cli_model_option(&o->cfg, argc, argv, &i, NULL)) == 1) continue;
        if (rc) return rc;
        if (!strcmp(a, "--train")) { o->train = 1; continue; }
        if (!v) return cli_usage("unknown option '%s' for '%s', or it needs a value", a, argv[1]);
        if (!strcmp(a, "--label-smoothing")) rc = cli_float(a, v, 0, 1, &o->smoothing);
        else if (!strcmp(a, "--weights")) o->weights = v;
        else if (!strcmp(a, "--input")) o->input = v;
        else if (!strcmp(a, "--output")) o->output = v;
        else if (!strcmp(a, "--seed")) rc = cli_u64(a, v, &o->seed);
        else return cli_usage("unknown option '%s' for '%s'", a, argv[1]);
        if (rc) return rc;
        i++;
    }
    return 0;
}

static int need(const char *what, const char *flag, const char *verb) {
    return what ? 0 : cli_usage("%s needs %s", verb, flag);
}

// ---- verbs ----

static int cmd_models(void) {
    for (int i = 0; model_names[i]; i++) {
        model_config c;
        model m;
        model_config_init(&c, model_names[i]);
        if (model_build(&m, &c)) return cli_fail();
        char line[128];
        int o = snprintf(line, sizeof line, "%-16s %12zu params", c.name, model_param_count(&m, 0));
        if (m.aux1 >= 0) snprintf(line + o, sizeof line - o, " (%zu with aux heads)", model_param_count(&m, 1));
        printf("%s\n", line);
        model_free(&m);
    }
    return 0;
}

static int parse_shape(const char *s, int *C, int *H, int *W) {
    char tail;
    if (sscanf(s, "%dx%dx%d%c", C, H, W, &tail) != 3 || *C < 1 || *H < 1 || *W < 1)
        return cli_usage("--input needs CxHxW with positive sizes (e.g. 3x224x224), not '%s'", s);
    return 0;
}

static int cmd_summary(int argc, char **argv) {
    opts o;
    int rc = parse(argc, argv, &o);
    if (rc) return rc;
    if (o.input) {
        int C;
        if ((rc = parse_shape(o.input, &C, &o.cfg.H, &o.cfg.W))) return rc;
        o.cfg.in_channels = C;
    }
    model m;
    if (model_build(&m, &o.cfg)) return cli_fail();
    model_summary(&m, stdout);
    model_free(&m);
    return 0;
}

static int cmd_init(int argc, char **argv) {
    opts o;
    int rc = parse(argc, argv, &o);
    if (rc || (rc = need(o.output, "--output W.safetensors", "init"))) return rc;
    model m;
    if (model_build(&m, &o.cfg)) return cli_fail();
    model_init(&m, o.seed);
    rc = model_save(&m, o.output, NULL, NULL, 0, NULL, 0) ? cli_fail() : 0;
    model_free(&m);
    return rc;
}

// Reads `input` (F32 N×C×H×W) and optionally `target` (I64 N) from a safetensors file, builds
// the model for that input size and loads the weights.
static int load_inputs(opts *o, model *m, st_file *f, const float **x, const int64_t **target,
                       float **xbuf) {
    if (st_read(f, o->input)) return -1;
    const st_tensor *t = st_get(f, "input");
    if (!t) return err_set("%s: no tensor 'input' (F32, N x C x H x W)", o->input);
    if (t->dtype != ST_F32 || t->ndim != 4)
        return err_set("%s: tensor 'input' must be F32 with 4 dimensions (N x C x H x W), found %s "
                       "with %d", o->input, st_dtype_name(t->dtype), t->ndim);
    if (t->shape[0] < 1 || t->shape[0] > 1 << 20 || t->shape[2] > 1 << 16 || t->shape[3] > 1 << 16)
        return err_set("%s: tensor 'input' has an unsupported shape", o->input);
    if (t->shape[1] != o->cfg.in_channels)
        return err_set("%s: 'input' has %lld channels but the model takes %d (--in-channels)",
                       o->input, (long long)t->shape[1], o->cfg.in_channels);
    int N = (int)t->shape[0];
    o->cfg.H = (int)t->shape[2];
    o->cfg.W = (int)t->shape[3];
    *xbuf = malloc(t->nbytes ? t->nbytes : 1);
    if (!*xbuf) return err_set("%s: out of memory", o->input);
    memcpy(*xbuf, t->data, t->nbytes);
    *x = *xbuf;
    if (target) {
        const st_tensor *y = st_get(f, "target");
        if (!y) return err_set("%s: no tensor 'target' (I64, N)", o->input);
        if (y->dtype != ST_I64 || y->ndim != 1 || y->shape[0] != N)
            return err_set("%s: tensor 'target' must be I64 of shape [%d]", o->input, N);
        *target = y->data;   // safetensors data may be unaligned: copied by the caller
    }
    if (model_build(m, &o->cfg)) return -1;
    int ignored = 0;
    if (model_load(m, o->weights, &ignored)) return -1;
    if (ignored)
        fprintf(stderr, "incept: note: %d aux-head tensors in %s ignored (--no-aux)\n", ignored, o->weights);
    rng_seed(&m->dropout_rng, o->seed ^ 0x5eedd0d0u);
    return model_prepare(m, N);
}

static int cmd_forward(int argc, char **argv) {
    opts o;
    int rc = parse(argc, argv, &o);
    if (rc || (rc = need(o.weights, "--weights W", "forward")) || (rc = need(o.input, "--input X", "forward")) ||
        (rc = need(o.output, "--output Y", "forward")))
        return rc;
    model m = {0};
    st_file f = {0};
    const float *x;
    float *xbuf = NULL;
    if (load_inputs(&o, &m, &f, &x, NULL, &xbuf) || model_forward(&m, x, o.train ? MODEL_TRAIN : 0)) {
        rc = cli_fail();
    } else {
        st_entry e[3];
        int n = 0;
        const int outs[3] = {m.logits, o.train ? m.aux1 : -1, o.train ? m.aux2 : -1};
        const char *names[3] = {"logits", "aux1", "aux2"};
        for (int h = 0; h < 3; h++) {
            if (outs[h] < 0) continue;
            e[n] = (st_entry){.name = names[h], .dtype = ST_F32, .ndim = 2,
                              .shape = {m.N, m.cfg.num_classes}, .data = model_out(&m, outs[h])};
            n++;
        }
        rc = st_write(o.output, e, n, NULL, NULL, 0) ? cli_fail() : 0;
    }
    free(xbuf);
    st_free(&f);
    model_free(&m);
    return rc;
}

static int cmd_gradients(int argc, char **argv) {
    opts o;
    int rc = parse(argc, argv, &o);
    if (rc || (rc = need(o.weights, "--weights W", "gradients")) ||
        (rc = need(o.input, "--input X", "gradients")) || (rc = need(o.output, "--output G", "gradients")))
        return rc;
    model m = {0};
    st_file f = {0};
    const float *x;
    const int64_t *t_raw;
    float *xbuf = NULL;
    int64_t *target = NULL;
    float loss = 0;
    rc = load_inputs(&o, &m, &f, &x, &t_raw, &xbuf);
    if (!rc) {
        target = malloc((size_t)m.N * sizeof *target);
        if (!target) rc = err_set("out of memory");
        else memcpy(target, t_raw, (size_t)m.N * sizeof *target);
    }
    if (!rc) {
        model_zero_grad(&m);
        rc = model_loss_backward(&m, x, target, o.smoothing, &loss);
        if (rc) err_set("%s: %s", o.input, err_msg());
    }
    if (rc) {
        rc = cli_fail();
    } else {
        st_entry *e = calloc((size_t)m.n_tensors + 1, sizeof *e);
        int n = 0;
        e[n++] = (st_entry){.name = "loss", .dtype = ST_F32, .ndim = 0, .data = &loss};
        for (int t = 0; t < m.n_tensors; t++) {
            const model_tensor *T = &m.tensors[t];
            if (T->kind != TK_PARAM) continue;
            e[n] = (st_entry){.name = T->key, .dtype = ST_F32, .ndim = T->ndim, .data = m.grads + T->off};
            for (int d = 0; d < T->ndim; d++) e[n].shape[d] = T->shape[d];
            n++;
        }
        rc = st_write(o.output, e, n, NULL, NULL, 0) ? cli_fail() : 0;
        free(e);
    }
    free(target);
    free(xbuf);
    st_free(&f);
    model_free(&m);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *v = argv[1];
    if (!strcmp(v, "models")) return cmd_models();
    if (!strcmp(v, "summary")) return cmd_summary(argc, argv);
    if (!strcmp(v, "init")) return cmd_init(argc, argv);
    if (!strcmp(v, "forward")) return cmd_forward(argc, argv);
    if (!strcmp(v, "gradients")) return cmd_gradients(argc, argv);
    if (!strcmp(v, "train")) return cmd_train(argc, argv);
    if (!strcmp(v, "eval")) return cmd_eval(argc, argv);
    if (!strcmp(v, "predict")) return cmd_predict(argc, argv);
    if (!strcmp(v, "bench")) return cmd_bench(argc, argv);
    fprintf(stderr, "incept: unknown verb '%s'\n", v);
    usage(stderr);
    return 2;
}
