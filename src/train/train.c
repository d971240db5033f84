// The training loop, evaluation and the run directory (see train.h).
#include "train/train.h"
#include "ops/cpu.h"
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "ops/ops.h"
#include "train/plot.h"
#include "util/err.h"
#include "util/clock.h"

#define PATH_CAP 1024
#define EXTRA "incept."     // MODEL_EXTRA_PREFIX: training state that model_load skips

_Static_assert(sizeof(metrics_row) == METRICS_COLS * sizeof(double), "metrics_row is 9 doubles");

// ---------------------------------------------------------------- defaults

int train_config_default(train_config *cfg, const char *model_name) {
    memset(cfg, 0, sizeof *cfg);
    if (model_config_init(&cfg->model, model_name)) return -1;
    cfg->augment = 1;
    cfg->epochs = 15;
    cfg->batch_size = 128;
    cfg->label_smoothing = 0.1f;
    optim_config_default(&cfg->optim, OPT_SGD);
    cfg->optim.momentum = 0.9;
    cfg->optim.nesterov = 1;
    cfg->optim.weight_decay = 5e-4;
    schedule_default(&cfg->sched, SCHED_COSINE, 0.05, cfg->epochs);
    cfg->sched.warmup = 1;
    cfg->sched.warmup_start_factor = 0.1;
    cfg->sched.per_step = 1;
    return 0;
}

int train_default_image_size(const dataset *d) {
    if (!strcmp(d->name, "folder")) return 224;
    if (d->H < 32 || d->W < 32) return 32;
    return d->H;
}

// ---------------------------------------------------------------- files

int file_write_atomic(const char *path, const void *data, size_t len) {
    char tmp[PATH_CAP + 32];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return err_set("%s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return err_set("%s: cannot create: %s", tmp, strerror(errno));
    int ok = fwrite(data, 1, len, f) == len && fflush(f) == 0 && fsync(fileno(f)) == 0;
    int err = errno;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        if (ok) err = errno;
        remove(tmp);
        return err_set("%s: cannot write: %s", path, strerror(err));
    }
    return 0;
}

// A growable text buffer for the CSV files.
typedef struct { char *s; size_t len, cap; int failed; } text;

static void text_add(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void text_add(text *t, const char *fmt, ...) {
    if (t->failed) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = t->cap - t->len;
        int n = vsnprintf(t->s ? t->s + t->len : NULL, t->s ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0) { t->failed = 1; return; }
        if ((size_t)n < room) { t->len += (size_t)n; return; }
        size_t cap = (t->cap ? t->cap * 2 : 4096) + (size_t)n;
        char *s = realloc(t->s, cap);
        if (!s) { t->failed = 1; return; }
        t->s = s;
        t->cap = cap;
    }
}

static int text_write(text *t, const char *path) {
    int rc = t->failed ? err_set("%s: out of memory", path) : file_write_atomic(path, t->s ? t->s : "", t->len);
    free(t->s);
    memset(t, 0, sizeof *t);
    return rc;
}

// A CSV field, quoted when it holds a comma, quote or line break (RFC 4180).
static void csv_field(text *t, const char *s) {
    if (!strpbrk(s, ",\"\r\n")) { text_add(t, "%s", s); return; }
    text_add(t, "\"");
    for (const char *p = s; *p; p++) {
        if (*p == '"') text_add(t, "\"\"");
        else text_add(t, "%c", *p);
    }
    text_add(t, "\"");
}

static int path_in(char *out, const char *dir, const char *name) {
    if (snprintf(out, PATH_CAP, "%s/%s", dir, name) >= PATH_CAP)
        return err_set("%s/%s: path too long", dir, name);
    return 0;
}

static int is_dir(const char *p) { struct stat st; return stat(p, &st) == 0 && S_ISDIR(st.st_mode); }
static int exists(const char *p) { struct stat st; return stat(p, &st) == 0; }

// mkdir -p
static int dir_make(const char *path) {
    char buf[PATH_CAP];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return err_set("%s: path too long", path);
    for (char *p = buf + 1; ; p++) {
        if (*p == '/' || !*p) {
            char c = *p;
            *p = 0;
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return err_set("%s: cannot create directory: %s", buf, strerror(errno));
            if (!is_dir(buf)) return err_set("%s: exists and is not a directory", buf);
            *p = c;
            if (!c) break;
        }
    }
    return 0;
}

// ---------------------------------------------------------------- evaluation

void eval_result_free(eval_result *r) {
    free(r->confusion);
    memset(r, 0, sizeof *r);
}

static int argmax(const float *v, int K) {
    int best = 0;
    for (int k = 1; k < K; k++)
        if (v[k] > v[best]) best = k;
    return best;
}

// x [n, C, H, W] mirrored left-right in place.
static void batch_flip(float *x, int n, int C, int H, int W) {
    for (size_t r = 0; r < (size_t)n * C * H; r++)
        for (int a = 0, b = W - 1; a < b; a++, b--) {
            float t = x[r * W + a];
            x[r * W + a] = x[r * W + b];
            x[r * W + b] = t;
        }
}

int evaluate(model *m, const dataset *d, const preprocess *p, int batch, int flip_tta,
             eval_result *r, train_progress_fn progress, void *ctx) {
    memset(r, 0, sizeof *r);
    const int K = m->cfg.num_classes, n = d->n;
    if (n < 1) return err_set("evaluation: the data set is empty");
    if (p->out_C != m->cfg.in_channels || p->out_H != m->cfg.H || p->out_W != m->cfg.W)
        return err_set("evaluation: preprocessing makes %dx%dx%d inputs, the model takes %dx%dx%d",
                       p->out_C, p->out_H, p->out_W, m->cfg.in_channels, m->cfg.H, m->cfg.W);
    for (int i = 0; i < n; i++)
        if (d->labels[i] < 0 || d->labels[i] >= K)
            return err_set("evaluation: label %lld of sample %d is outside the model's %d classes",
                           (long long)d->labels[i], i, K);
    const int Nb = batch < n ? batch : n;
    if (Nb < 1) return err_set("evaluation: batch size %d < 1", batch);
    if (model_prepare(m, Nb)) return -1;
    const size_t per = (size_t)p->out_C * p->out_H * p->out_W;
    float *x = malloc(Nb * per * sizeof *x), *probs = malloc((size_t)Nb * K * sizeof *probs);
    int64_t *y = malloc((size_t)Nb * sizeof *y);
    int *idx = malloc((size_t)n * sizeof *idx);
    float *score = flip_tta ? malloc((size_t)Nb * K * sizeof *score) : NULL;
    r->confusion = calloc((size_t)K * K, sizeof *r->confusion);
    int rc = x && probs && y && idx && r->confusion && (!flip_tta || score)
                 ? 0 : err_set("evaluation: out of memory");
    for (int i = 0; !rc && i < n; i++) idx[i] = i;
    const int steps = (n + Nb - 1) / Nb, topk = K < 5 ? K : 5;
    double loss = 0, t0 = clock_now_s();
    for (int s = 0; !rc && s < steps; s++) {
        int start = s * Nb, cnt = n - start < Nb ? n - start : Nb;
        batch_make(x, y, d, idx + start, cnt, p, NULL, 0);
        // The padding rows are computed and ignored: eval mode treats samples independently.
        memset(x + cnt * per, 0, (Nb - cnt) * per * sizeof *x);
        if (model_forward(m, x, 0)) { rc = -1; break; }
        const float *logits = model_out(m, m->logits);
        if (flip_tta) {   // rank by the mean probability of the image and its mirror
            softmax_forward(probs, logits, cnt, K);
            batch_flip(x, Nb, p->out_C, p->out_H, p->out_W);
            if (model_forward(m, x, 0)) { rc = -1; break; }
            softmax_forward(score, model_out(m, m->logits), cnt, K);
            for (size_t j = 0; j < (size_t)cnt * K; j++) score[j] = (probs[j] + score[j]) / 2;
            for (int i = 0; i < cnt; i++) {
                double pt = score[(size_t)i * K + y[i]];
                loss -= log(pt > 1e-300 ? pt : 1e-300);
            }
            logits = score;
        } else {
            loss += (double)cross_entropy_forward(probs, logits, y, cnt, K, 0) * cnt;
        }
        for (int i = 0; i < cnt; i++) {
            const float *l = logits + (size_t)i * K;
            int t = (int)y[i], pred = argmax(l, K), above = 0;
            for (int k = 0; k < K; k++) above += l[k] > l[t];
            r->correct1 += pred == t;
            r->correct5 += above < topk;
            r->confusion[(size_t)t * K + pred]++;
        }
        if (progress) {
            double el = clock_now_s() - t0;
            train_progress pr = {.phase = PHASE_EVAL, .step = s + 1, .steps = steps,
                                 .loss = loss / (start + cnt),
                                 .acc = 100.0 * r->correct1 / (start + cnt),
                                 .images_per_s = el > 0 ? (start + cnt) / el : 0, .elapsed = el};
            progress(ctx, &pr);
        }
    }
    free(x); free(probs); free(y); free(idx); free(score);
    if (rc) { eval_result_free(r); return -1; }
    r->n = n;
    r->K = K;
    r->loss = loss / n;
    return 0;
}

int confusion_write_csv(const char *path, const eval_result *r, char *const *names) {
    text t = {0};
    text_add(&t, "true\\predicted");
    for (int k = 0; k < r->K; k++) { text_add(&t, ","); csv_field(&t, names[k]); }
    text_add(&t, "\n");
    for (int i = 0; i < r->K; i++) {
        csv_field(&t, names[i]);
        for (int k = 0; k < r->K; k++) text_add(&t, ",%lld", (long long)r->confusion[(size_t)i * r->K + k]);
        text_add(&t, "\n");
    }
    return text_write(&t, path);
}

// ---------------------------------------------------------------- set-up

void trainer_close(trainer *t) {
    dataset_free(&t->train);
    dataset_free(&t->test);
    model_free(&t->m);
    optim_free(&t->opt);
    eval_result_free(&t->last_eval);
    free(t->spans); free(t->rows); free(t->x); free(t->ce_probs); free(t->y); free(t->order);
    memset(t, 0, sizeof *t);
}

int train_config_check(const train_config *c) {
    if (c->epochs < 1 || c->epochs > TRAIN_MAX_EPOCHS)
        return err_set("--epochs must lie in 1..%d, not %d", TRAIN_MAX_EPOCHS, c->epochs);
    if (c->batch_size < 2 || c->batch_size > TRAIN_MAX_BATCH)
        return err_set("--batch-size must lie in 2..%d (batch norm in training mode needs more "
                       "than one value per channel), not %d", TRAIN_MAX_BATCH, c->batch_size);
    if (c->eval_batch_size > TRAIN_MAX_BATCH)
        return err_set("--eval-batch-size must be at most %d, not %d", TRAIN_MAX_BATCH,
                       c->eval_batch_size);
    if (!(c->label_smoothing >= 0 && c->label_smoothing <= 1))
        return err_set("--label-smoothing must lie in [0, 1], not %g", c->label_smoothing);
    if (c->precise_bn < 0 || c->precise_bn > TRAIN_MAX_PRECISE_BN)
        return err_set("--precise-bn must lie in 0..%d, not %d", TRAIN_MAX_PRECISE_BN, c->precise_bn);
    if (!(c->time_budget >= 0 && c->time_budget < 1e9))
        return err_set("--time-budget must lie in 0..1e9 seconds, not %g", c->time_budget);
    return 0;
}

// Loads the data, resolves the model's size options, builds the model and the optimiser.
// pre: the stored preprocessing of a resumed run, or NULL for the data set's defaults.
static int setup(trainer *t, const preprocess *pre, int resize) {
    train_config *c = &t->cfg;
    if (train_config_check(c)) return -1;
    if (c->eval_batch_size <= 0) c->eval_batch_size = c->batch_size;
    if (dataset_load(&t->train, &t->test, c->data, c->folder_size)) return -1;
    if (c->limit_train > 0 && c->limit_train < t->train.n) t->train.n = c->limit_train;
    if (c->limit_test > 0 && c->limit_test < t->test.n) t->test.n = c->limit_test;
    if (t->test.n < 1) return err_set("%s: the test split has no images", c->data);
    const int K = t->train.n_classes;
    if (c->num_classes > 0 && c->num_classes != K)
        return err_set("--num-classes %d does not match the %d classes of %s", c->num_classes, K, c->data);
    c->num_classes = c->model.num_classes = K;
    if (c->in_channels <= 0) c->in_channels = t->train.C;
    c->model.in_channels = c->in_channels;
    if (c->image_size <= 0) c->image_size = train_default_image_size(&t->train);
    c->model.H = c->model.W = c->image_size;
    if (pre) {
        t->pre = *pre;
        t->resize = resize;
        if (preprocess_check(&t->pre, t->train.C)) return -1;
        if (t->pre.out_C != c->in_channels || t->pre.out_H != c->image_size || t->pre.out_W != c->image_size)
            return err_set("stored preprocessing (%dx%dx%d) does not fit the model (%dx%dx%d)",
                           t->pre.out_C, t->pre.out_H, t->pre.out_W, c->in_channels, c->image_size,
                           c->image_size);
    } else {
        if (preprocess_default(&t->pre, &t->train, c->image_size, c->in_channels, c->augment))
            return err_set("%s: %s (--in-channels %d, --image-size %d)", c->data, err_msg(),
                           c->in_channels, c->image_size);
        t->pre.erase_p = c->random_erasing;
        if (preprocess_check(&t->pre, t->train.C)) return -1;
        // predict's single-image pipeline that reproduces the eval crop of a folder set
        // (Resize(256) + CenterCrop(224) at the defaults); other sets are resized whole.
        t->resize = strcmp(t->train.name, "folder") ? 0
                  : (int)lround(c->image_size / (double)t->pre.eval_crop);
    }
    cpu_bf16_set(c->bf16);
    if (model_build(&t->m, &c->model)) return -1;
    t->spans = calloc((size_t)t->m.n_tensors, sizeof *t->spans);
    if (!t->spans) return err_set("out of memory");
    for (int i = 0; i < t->m.n_tensors; i++) {
        const model_tensor *T = &t->m.tensors[i];
        if (T->kind == TK_PARAM)
            t->spans[t->n_spans++] = (param_span){T->off, T->numel, T->no_decay};
    }
    if (optim_init(&t->opt, &c->optim, t->m.n_floats) ||
        optim_check_spans(&t->opt, t->spans, t->n_spans))
        return -1;
    c->sched.epochs = c->epochs;
    if (schedule_check(&c->sched)) return -1;
    t->steps_per_epoch = t->train.n / c->batch_size;
    if (t->steps_per_epoch < 1)
        return err_set("%s: the training split has %d images, fewer than one batch of %d "
                       "(--batch-size)", c->data, t->train.n, c->batch_size);
    const int B = c->batch_size > c->eval_batch_size ? c->batch_size : c->eval_batch_size;
    const size_t per = (size_t)c->in_channels * c->image_size * c->image_size;
    t->x = malloc((size_t)B * per * sizeof *t->x);
    t->y = malloc((size_t)B * sizeof *t->y);
    t->ce_probs = malloc((size_t)B * K * sizeof *t->ce_probs);
    t->order = malloc((size_t)t->train.n * sizeof *t->order);
    if (!t->x || !t->y || !t->ce_probs || !t->order)
        return err_set("out of memory for batches of %d", B);
    t->best_acc1 = -1;
    return 0;
}

static void meta_of(const trainer *t, ckpt_meta *m) {
    memset(m, 0, sizeof *m);
    m->cfg = t->cfg;
    m->pre = t->pre;
    m->resize = t->resize;
    snprintf(m->data_name, sizeof m->data_name, "%s", t->train.name);
    m->classes = t->train.class_names;
    m->n_classes = t->train.n_classes;
}

static void time_str(char *buf, size_t cap, const char *fmt) {
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    strftime(buf, cap, fmt, &tm);
}

// args.txt: one "command:" line per invocation (the old ones kept), then the configuration.
// resumed: 0 a new run, 1 a resumed one (a command line added), 2 the configuration changed
// (the command lines kept, none added).
static int args_write(const trainer *t, const char *command, int resumed) {
    char path[PATH_CAP], when[64];
    if (path_in(path, t->run_dir, "args.txt")) return -1;
    time_str(when, sizeof when, "%Y-%m-%d %H:%M:%S");
    text out = {0};
    if (resumed) {   // keep the earlier command lines
        FILE *f = fopen(path, "r");
        char line[8192];
        while (f && fgets(line, sizeof line, f) && !strncmp(line, "command", 7)) text_add(&out, "%s", line);
        if (f) fclose(f);
    }
    if (resumed < 2)
        text_add(&out, "command (%s%s): %s\n", resumed ? "resumed " : "", when, command ? command : "");
    ckpt_meta m;
    meta_of(t, &m);
    char **keys, **vals;
    int n;
    if (ckpt_meta_strings(&m, &keys, &vals, &n)) { free(out.s); return -1; }
    text_add(&out, "\n# the resolved configuration (also in every checkpoint's metadata)\n");
    for (int i = 0; i < n; i++) text_add(&out, "%s = %s\n", keys[i], vals[i]);
    ckpt_meta_strings_free(keys, vals, n);
    return text_write(&out, path);
}

int trainer_open(trainer *t, const train_config *cfg, const char *run_dir,
                 const char *init_weights, const char *command) {
    memset(t, 0, sizeof *t);
    t->t_start = clock_now_s();
    t->cfg = *cfg;
    char last[PATH_CAP];
    if (run_dir) {
        if (snprintf(t->run_dir, sizeof t->run_dir, "%s", run_dir) >= (int)sizeof t->run_dir)
            return err_set("%s: path too long", run_dir);
        if (path_in(last, t->run_dir, "last.safetensors")) return -1;
        if (exists(last))
            return err_set("%s already holds a run (last.safetensors): continue it with --resume %s "
                           "or choose another --run-dir", run_dir, run_dir);
        if (exists(run_dir) && !is_dir(run_dir)) return err_set("%s: exists and is not a directory", run_dir);
    }
    if (setup(t, NULL, 0)) { trainer_close(t); return -1; }
    if (init_weights) {
        int ignored = 0;
        if (model_load(&t->m, init_weights, &ignored)) { trainer_close(t); return -1; }
    } else {
        model_init(&t->m, t->cfg.seed);
    }
    if (!run_dir) {   // runs/<model>-<data>-<timestamp>, made unique with a suffix
        char stamp[32];
        time_str(stamp, sizeof stamp, "%Y%m%d-%H%M%S");
        for (int k = 1; ; k++) {
            char suffix[16] = "";
            if (k > 1) snprintf(suffix, sizeof suffix, "-%d", k);
            snprintf(t->run_dir, sizeof t->run_dir, "runs/%s-%s-%s%s", t->cfg.model.name,
                     t->train.name, stamp, suffix);
            if (!exists(t->run_dir)) break;
        }
    }
    if (dir_make(t->run_dir) || args_write(t, command, 0)) { trainer_close(t); return -1; }
    return 0;
}

// ---------------------------------------------------------------- checkpoints

static int checkpoint_save(trainer *t, const char *name) {
    char path[PATH_CAP];
    if (path_in(path, t->run_dir, name)) return -1;
    ckpt_meta m;
    meta_of(t, &m);
    char **keys, **vals;
    int n_meta;
    if (ckpt_meta_strings(&m, &keys, &vals, &n_meta)) return -1;
    int64_t epoch = t->epoch, step = t->opt.step, best_epoch = t->best_epoch;
    double best = t->best_acc1;
    st_entry e[8];
    int n = 0;
    e[n++] = (st_entry){.name = EXTRA "epoch", .dtype = ST_I64, .ndim = 0, .data = &epoch};
    e[n++] = (st_entry){.name = EXTRA "optim.step", .dtype = ST_I64, .ndim = 0, .data = &step};
    e[n++] = (st_entry){.name = EXTRA "best_acc1", .dtype = ST_F64, .ndim = 0, .data = &best};
    e[n++] = (st_entry){.name = EXTRA "best_epoch", .dtype = ST_I64, .ndim = 0, .data = &best_epoch};
    e[n++] = (st_entry){.name = EXTRA "metrics", .dtype = ST_F64, .ndim = 2,
                        .shape = {t->epoch, METRICS_COLS}, .data = t->rows};
    char bufname[3][64];
    for (int i = 0; i < 3; i++) {
        const char *b = optim_buffer_name(&t->opt, i);
        if (!b) continue;
        snprintf(bufname[i], sizeof bufname[i], EXTRA "%s", b);
        e[n++] = (st_entry){.name = bufname[i], .dtype = ST_F32, .ndim = 1,
                            .shape = {(int64_t)t->opt.n}, .data = optim_buffer(&t->opt, i)};
    }
    int rc = model_save(&t->m, path, (const char *const *)keys, (const char *const *)vals, n_meta, e, n);
    ckpt_meta_strings_free(keys, vals, n_meta);
    return rc;
}

// A training-state tensor of the checkpoint, checked for dtype and shape (ndim 0: scalar).
static const st_tensor *state_get(const st_file *f, const char *path, const char *name,
                                  st_dtype dt, int ndim, int64_t d0, int64_t d1) {
    const st_tensor *s = st_get(f, name);
    if (!s) { err_set("%s: training state '%s' is missing", path, name); return NULL; }
    int ok = s->dtype == dt && s->ndim == ndim && (ndim < 1 || s->shape[0] == d0) &&
             (ndim < 2 || s->shape[1] == d1);
    if (!ok) {
        if (ndim == 0) err_set("%s: training state '%s' must be a %s scalar", path, name, st_dtype_name(dt));
        else if (ndim == 1) err_set("%s: training state '%s' must be %s of shape [%lld]", path, name,
                                    st_dtype_name(dt), (long long)d0);
        else err_set("%s: training state '%s' must be %s of shape [%lld,%lld]", path, name,
                     st_dtype_name(dt), (long long)d0, (long long)d1);
        return NULL;
    }
    return s;
}

static int state_restore(trainer *t, const st_file *f, const char *path) {
    const st_tensor *s;
    int64_t v;
    if (!(s = state_get(f, path, EXTRA "epoch", ST_I64, 0, 0, 0))) return -1;
    memcpy(&v, s->data, 8);
    if (v < 1 || v > 1000000) return err_set("%s: training state 'incept.epoch' is %lld", path, (long long)v);
    t->epoch = (int)v;
    if (!(s = state_get(f, path, EXTRA "optim.step", ST_I64, 0, 0, 0))) return -1;
    memcpy(&t->opt.step, s->data, 8);
    if (t->opt.step != (int64_t)t->epoch * t->steps_per_epoch)
        return err_set("%s: %lld optimiser steps in %d epochs, but the data gives %d steps per epoch "
                       "(did the data set change?)", path, (long long)t->opt.step, t->epoch,
                       t->steps_per_epoch);
    if (!(s = state_get(f, path, EXTRA "best_acc1", ST_F64, 0, 0, 0))) return -1;
    memcpy(&t->best_acc1, s->data, 8);
    if (!(s = state_get(f, path, EXTRA "best_epoch", ST_I64, 0, 0, 0))) return -1;
    memcpy(&v, s->data, 8);
    t->best_epoch = (int)v;
    if (!(s = state_get(f, path, EXTRA "metrics", ST_F64, 2, t->epoch, METRICS_COLS))) return -1;
    t->rows = malloc(s->nbytes);
    if (!t->rows) return err_set("%s: out of memory", path);
    memcpy(t->rows, s->data, s->nbytes);
    for (int i = 0; i < 3; i++) {
        const char *b = optim_buffer_name(&t->opt, i);
        if (!b) continue;
        char name[64];
        snprintf(name, sizeof name, EXTRA "%s", b);
        if (!(s = state_get(f, path, name, ST_F32, 1, (int64_t)t->opt.n, 0))) return -1;
        memcpy(optim_buffer(&t->opt, i), s->data, s->nbytes);
    }
    return 0;
}

int trainer_resume(trainer *t, const char *run_dir, int epochs, const char *command) {
    memset(t, 0, sizeof *t);
    t->t_start = clock_now_s();
    char path[PATH_CAP];
    if (!is_dir(run_dir)) return err_set("%s: run directory not found", run_dir);
    if (path_in(path, run_dir, "last.safetensors")) return -1;
    if (!exists(path)) return err_set("%s: not found: nothing to resume in %s", path, run_dir);
    st_file f;
    if (st_read(&f, path)) return -1;
    ckpt_meta meta;
    int rc = ckpt_meta_read(&meta, &f, path);
    if (rc == 0) rc = err_set("%s: not a checkpoint of incept train (no training metadata)", path);
    if (rc < 0) { st_free(&f); return -1; }
    if (train_config_check(&meta.cfg)) {
        err_set("%s: metadata: %s", path, err_msg());
        ckpt_meta_free(&meta);
        st_free(&f);
        return -1;
    }
    t->cfg = meta.cfg;
    t->cfg.image_size = meta.cfg.model.H;
    t->cfg.in_channels = meta.cfg.model.in_channels;
    t->cfg.num_classes = meta.cfg.model.num_classes;
    if (epochs > 0) t->cfg.epochs = epochs, t->cfg.time_budget = 0;   // a length, not a budget
    snprintf(t->run_dir, sizeof t->run_dir, "%s", run_dir);
    rc = setup(t, &meta.pre, meta.resize);
    for (int k = 0; !rc && k < meta.n_classes; k++)
        if (strcmp(meta.classes[k], t->train.class_names[k]))
            rc = err_set("%s: class %d is '%s' in the checkpoint but '%s' in %s", path, k,
                         meta.classes[k], t->train.class_names[k], t->cfg.data);
    if (!rc) rc = model_load(&t->m, path, NULL);
    if (!rc) rc = state_restore(t, &f, path);
    if (!rc) rc = args_write(t, command, 1);
    ckpt_meta_free(&meta);
    st_free(&f);
    if (rc) { trainer_close(t); return -1; }
    return 0;
}

// ---------------------------------------------------------------- the epoch

int budget_epoch(const train_config *cfg) {
    const int w = cfg->sched.kind == SCHED_COSINE || cfg->sched.kind == SCHED_POLY ? cfg->sched.warmup : 0;
    return w > 1 ? w : 1;
}

// The epochs that fit what is left of `limit` (seconds since t_start) after epoch t->epoch, at
// `per` seconds each, leaving time for precise BN (forward passes, ~1/3 of a training step each,
// at epoch row r's pace): at least one more epoch, at most `ceiling`.
static int budget_length(const trainer *t, double limit, double per, const metrics_row *r, int ceiling) {
    const train_config *c = &t->cfg;
    const double left = limit - (clock_now_s() - t->t_start);
    const double step_s = r->images_per_s > 0 ? c->batch_size / r->images_per_s : 0;
    const double tail = c->precise_bn * step_s / 3 + 2;
    double fit = floor((left - tail) / per);
    long n = t->epoch + (fit > 0 ? (long)(fit < 1e6 ? fit : 1e6) : 0);
    if (n < t->epoch + 1) n = t->epoch + 1;
    if (n > ceiling) n = ceiling;
    return (int)n;
}

static int budget_set_length(trainer *t, int n) {
    train_config *c = &t->cfg;
    c->epochs = c->sched.epochs = n;
    if (schedule_check(&c->sched)) return -1;
    return args_write(t, NULL, 2);
}

// The time budget's decision, after epoch t->epoch (budget_epoch()): the epochs that fit, at
// this epoch's pace (train + test pass) plus 3 % and half a second for the checkpoints.
static int budget_decide(trainer *t, const metrics_row *r) {
    train_config *c = &t->cfg;
    t->budget_ceiling = c->epochs;
    const int n = budget_length(t, c->time_budget, r->seconds * 1.03 + 0.5, r, c->epochs);
    t->budget_limit = c->time_budget;
    c->time_budget = 0;
    t->budget_decided = t->epoch;
    return budget_set_length(t, n);
}

// After the decision the host's pace may change (epochs of the same run have differed by 50 %),
// so the length is checked after every epoch: when the epochs left no longer fit at the pace of
// the last two, the run is cut to what fits; when they leave room for more at the slower one's
// pace plus 10 %, the run is lengthened, up to the ceiling. (Neighbouring epochs on a shared
// host differ by ~10 %: with less slack, the next slow epoch would cut the added one again.)
// The schedule follows the new length from then on (the learning rate steps onto its curve),
// as a resume with --epochs would.
static int budget_guard(trainer *t) {
    const train_config *c = &t->cfg;
    const metrics_row *r = &t->rows[t->epoch - 1], *q = t->epoch >= 2 ? r - 1 : r;
    const int cut = budget_length(t, t->budget_limit, (r->seconds + q->seconds) / 2 + 0.5, r, c->epochs);
    if (cut < c->epochs) return budget_set_length(t, cut);
    const double slow = r->seconds > q->seconds ? r->seconds : q->seconds;
    const int more = budget_length(t, t->budget_limit, slow * 1.10 + 0.5, r, t->budget_ceiling);
    return more > c->epochs ? budget_set_length(t, more) : 0;
}

// Each epoch's random streams from (seed, epoch, stream) alone: resuming needs no RNG state.
static uint64_t epoch_seed(uint64_t seed, int epoch, int stream) {
    return seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(2 * epoch + stream + 1));
}
enum { STREAM_DATA = 0, STREAM_DROPOUT = 1 };

static int metrics_write(const trainer *t) {
    char path[PATH_CAP];
    if (path_in(path, t->run_dir, "metrics.csv")) return -1;
    text out = {0};
    text_add(&out, METRICS_HEADER "\n");
    for (int i = 0; i < t->epoch; i++) {
        const metrics_row *r = &t->rows[i];
        text_add(&out, "%d,%.6g,%.6f,%.4f,%.6f,%.4f,%.4f,%.1f,%.2f\n", (int)r->epoch, r->lr,
                 r->train_loss, r->train_acc, r->test_loss, r->test_acc1, r->test_acc5,
                 r->images_per_s, r->seconds);
    }
    return text_write(&out, path);
}

static int curves_write(const trainer *t) {
    char path[PATH_CAP], title[128];
    if (path_in(path, t->run_dir, "curves.png")) return -1;
    int n = t->epoch;
    float *v = malloc((size_t)4 * n * sizeof *v);
    if (!v) return err_set("%s: out of memory", path);
    for (int i = 0; i < n; i++) {
        v[i] = (float)t->rows[i].train_loss;
        v[n + i] = (float)t->rows[i].test_loss;
        v[2 * n + i] = (float)t->rows[i].train_acc;
        v[3 * n + i] = (float)t->rows[i].test_acc1;
    }
    snprintf(title, sizeof title, "%s on %s", t->cfg.model.name, t->train.name);
    curve_data d = {.n_epochs = n, .train_loss = v, .test_loss = v + n, .train_acc = v + 2 * n,
                    .test_acc = v + 3 * n, .title = title};
    int rc = plot_curves(path, &d);
    free(v);
    return rc;
}

typedef struct { train_progress_fn fn; void *ctx; int epoch, epochs; } progress_relay;

static void relay(void *ctx, const train_progress *p) {
    const progress_relay *r = ctx;
    train_progress q = *p;
    q.epoch = r->epoch;
    q.epochs = r->epochs;
    r->fn(r->ctx, &q);
}

static const char *nonfinite(double v) { return isnan(v) ? "NaN" : "infinite"; }

static int stop_message(const trainer *t, const char *what, int step) {
    char kept[PATH_CAP + 96];
    if (t->epoch) snprintf(kept, sizeof kept, "%s/last.safetensors (epoch %d) is the last good checkpoint",
                           t->run_dir, t->epoch);
    else snprintf(kept, sizeof kept, "no checkpoint was written");
    if (step) return err_set("epoch %d, step %d of %d: %s; training stopped, %s", t->epoch + 1,
                             step, t->steps_per_epoch, what, kept);
    return err_set("epoch %d: %s; training stopped, %s", t->epoch + 1, what, kept);
}

// Precise batch norm, after the last epoch's steps: the running statistics become the plain
// averages over nb batches of training images as evaluation sees them (no augmentation), what
// torch.optim.swa_utils.update_bn computes on such a loader. Batch k takes images
// (j*nb + k) * n / (nb*B), j < B: spread over the whole set whatever its order (folders are
// sorted by class). The momentum's running average remembers only the last ~20 steps; their
// noise moved the test accuracy by up to 0.3 points between the last two epochs of a run, at
// a learning rate near zero. Once, at the end, as update_bn is used: each epoch would cost
// nb forward passes every time.
static int bn_recompute(trainer *t, int nb) {
    model *m = &t->m;
    const int B = t->cfg.batch_size, n = t->train.n;
    if ((long long)nb * B > n) nb = n / B;   // (setup ensured n >= B)
    const long long total = (long long)nb * B;
    if (!model_bn_stats_reset(m)) return 0;   // (VGG without _bn)
    int *idx = malloc((size_t)B * sizeof *idx);
    if (!idx) return err_set("out of memory");   // (the run stops: nothing is saved)
    m->bn_average = 1;
    int rc = 0;
    for (int k = 0; k < nb && !rc; k++) {
        for (int j = 0; j < B; j++) idx[j] = (int)(((long long)j * nb + k) * n / total);
        batch_make(t->x, t->y, &t->train, idx, B, &t->pre, NULL, 0);
        rc = model_forward(m, t->x, MODEL_TRAIN);
    }
    m->bn_average = 0;
    free(idx);
    return rc;
}

int trainer_epoch(trainer *t, train_progress_fn progress, void *ctx) {
    model *m = &t->m;
    const train_config *c = &t->cfg;
    const int B = c->batch_size, K = c->num_classes, steps = t->steps_per_epoch, e = t->epoch;
    rng data;
    rng_seed(&data, epoch_seed(c->seed, e, STREAM_DATA));
    rng_seed(&m->dropout_rng, epoch_seed(c->seed, e, STREAM_DROPOUT));
    for (int i = 0; i < t->train.n; i++) t->order[i] = i;
    indices_shuffle(t->order, t->train.n, &data);
    if (model_prepare(m, B)) return -1;
    double t0 = clock_now_s(), loss_sum = 0, lr = 0;
    long long correct = 0;
    for (int s = 0; s < steps; s++) {
        lr = schedule_lr(&c->sched, (int)t->opt.step, steps);
        batch_make(t->x, t->y, &t->train, t->order + (size_t)s * B, B, &t->pre, &data, 1);
        model_zero_grad(m);
        float loss;
        if (model_loss_backward(m, t->x, t->y, c->label_smoothing, &loss)) return -1;
        if (!isfinite(loss)) {
            char what[64];
            snprintf(what, sizeof what, "the loss is %s", nonfinite(loss));
            return stop_message(t, what, s + 1);
        }
        // Reported: the main head's plain cross-entropy, comparable with the test loss.
        const float *logits = model_out(m, m->logits);
        loss_sum += cross_entropy_forward(t->ce_probs, logits, t->y, B, K, 0);
        for (int i = 0; i < B; i++) correct += argmax(logits + (size_t)i * K, K) == t->y[i];
        optim_step(&t->opt, m->params, m->grads, t->spans, t->n_spans, lr);
        if (progress) {
            double el = clock_now_s() - t0;
            train_progress p = {.phase = PHASE_TRAIN, .epoch = e + 1, .epochs = c->epochs,
                                .step = s + 1, .steps = steps, .loss = loss_sum / (s + 1),
                                .acc = 100.0 * correct / ((double)(s + 1) * B),
                                .images_per_s = el > 0 ? (s + 1) * (double)B / el : 0, .elapsed = el};
            progress(ctx, &p);
        }
    }
    double train_s = clock_now_s() - t0;
    if (c->precise_bn > 0 && e + 1 == c->epochs && bn_recompute(t, c->precise_bn)) return -1;
    eval_result r;
    progress_relay pr = {progress, ctx, e + 1, c->epochs};
    if (evaluate(m, &t->test, &t->pre, c->eval_batch_size, 0, &r, progress ? relay : NULL, &pr)) return -1;
    if (!isfinite(r.loss)) {
        char what[64];
        snprintf(what, sizeof what, "the test loss is %s", nonfinite(r.loss));
        eval_result_free(&r);
        return stop_message(t, what, 0);
    }
    metrics_row *rows = realloc(t->rows, (size_t)(e + 1) * sizeof *rows);
    if (!rows) { eval_result_free(&r); return err_set("out of memory"); }
    t->rows = rows;
    rows[e] = (metrics_row){
        .epoch = e + 1, .lr = lr, .train_loss = loss_sum / steps,
        .train_acc = 100.0 * correct / ((double)steps * B), .test_loss = r.loss,
        .test_acc1 = 100.0 * r.correct1 / r.n, .test_acc5 = 100.0 * r.correct5 / r.n,
        .images_per_s = train_s > 0 ? (double)steps * B / train_s : 0, .seconds = clock_now_s() - t0};
    eval_result_free(&t->last_eval);
    t->last_eval = r;
    t->epoch = e + 1;
    if (c->time_budget > 0 && t->epoch == budget_epoch(c)) {
        if (budget_decide(t, &rows[e])) return -1;
    } else if (t->budget_limit > 0 && t->epoch < c->epochs && budget_guard(t)) {
        return -1;
    }
    int best = rows[e].test_acc1 > t->best_acc1;
    if (best) {
        t->best_acc1 = rows[e].test_acc1;
        t->best_epoch = e + 1;
    }
    char conf[PATH_CAP];
    if (checkpoint_save(t, "last.safetensors") || (best && checkpoint_save(t, "best.safetensors")) ||
        metrics_write(t) || curves_write(t) || path_in(conf, t->run_dir, "confusion.csv") ||
        confusion_write_csv(conf, &t->last_eval, t->train.class_names))
        return -1;
    return 0;
}
