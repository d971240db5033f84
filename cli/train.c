// The verbs `train`, `eval` and `predict`: option parsing, the progress display and reports.
// The work itself is in src/train/train.c.
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "cli/cli.h"
#include "data/data.h"
#include "ops/cpu.h"
#include "ops/ops.h"
#include "train/train.h"
#include "util/err.h"
#include "util/clock.h"

// The command line as one string for args.txt (arguments with spaces quoted).
static char *command_join(int argc, char **argv) {
    size_t len = 8;
    for (int i = 0; i < argc; i++) len += strlen(argv[i]) + 3;
    char *s = malloc(len), *p = s;
    if (!s) return NULL;
    p += sprintf(p, "incept");
    for (int i = 1; i < argc; i++)
        p += sprintf(p, strpbrk(argv[i], " \t'\"") ? " '%s'" : " %s", argv[i]);
    return s;
}

static int threads_set(const char *flag, const char *v) {
    int n, rc = cli_int(flag, v, 1, CPU_MAX_THREADS, &n);
    if (rc) return rc;
    if (cpu_threads_set(n)) return cli_fail();
    return 0;
}

// ---------------------------------------------------------------- progress display

typedef struct {
    int tty;              // stderr is a terminal: redraw a bar; else stay quiet during epochs
    double last;          // when the bar was last drawn
    int drawn;            // a bar is on screen (to be cleared before other output)
} progress_view;

static void clock_str(char *buf, size_t cap, double s) {
    if (!(s >= 0) || s > 1e7) { snprintf(buf, cap, "--:--"); return; }
    int v = (int)lround(s);
    if (v >= 3600) snprintf(buf, cap, "%d:%02d:%02d", v / 3600, v / 60 % 60, v % 60);
    else snprintf(buf, cap, "%02d:%02d", v / 60, v % 60);
}

static void progress_clear(progress_view *v) {
    if (v->drawn) fprintf(stderr, "\r\033[K");
    fflush(stderr);
    v->drawn = 0;
}

// Redrawn in place with \r at most ~10 times a second (and at the end of each phase).
static void progress_draw(void *ctx, const train_progress *p) {
    progress_view *v = ctx;
    if (!v->tty) return;
    double t = clock_now_s();
    if (p->step != p->steps && t - v->last < 0.1) return;
    v->last = t;
    char bar[21], eta[32], el[32];
    int fill = p->steps ? 20 * p->step / p->steps : 0;
    for (int i = 0; i < 20; i++) bar[i] = i < fill ? '#' : '.';
    bar[20] = 0;
    double rate = p->elapsed > 0 ? p->step / p->elapsed : 0;
    clock_str(eta, sizeof eta, rate > 0 ? (p->steps - p->step) / rate : -1);
    clock_str(el, sizeof el, p->elapsed);
    if (p->phase == PHASE_TRAIN)
        fprintf(stderr, "\r\033[Kepoch %d/%d train [%s] %d/%d  loss %.4f  acc %.2f%%  %.0f img/s  %s<%s",
                p->epoch, p->epochs, bar, p->step, p->steps, p->loss, p->acc, p->images_per_s, el, eta);
    else
        fprintf(stderr, "\r\033[Kepoch %d/%d test  [%s] %d/%d  loss %.4f  acc %.2f%%  %.0f img/s  %s<%s",
                p->epoch, p->epochs, bar, p->step, p->steps, p->loss, p->acc, p->images_per_s, el, eta);
    fflush(stderr);
    v->drawn = 1;
}

// ---------------------------------------------------------------- reports

static void per_class_print(const eval_result *r, char *const *names) {
    int w = 5;
    for (int k = 0; k < r->K; k++) if ((int)strlen(names[k]) > w) w = (int)strlen(names[k]);
    if (w > 40) w = 40;
    printf("%-*s  accuracy\n", w, "class");
    for (int k = 0; k < r->K; k++) {
        long long row = 0, hit = r->confusion[(size_t)k * r->K + k];
        for (int j = 0; j < r->K; j++) row += r->confusion[(size_t)k * r->K + j];
        if (row) printf("%-*.*s  %6.2f%%  (%lld/%lld)\n", w, w, names[k], 100.0 * hit / row, hit, row);
        else printf("%-*.*s  (no samples)\n", w, w, names[k]);
    }
}

static void confusion_print(const eval_result *r) {
    printf("confusion matrix (row: true class, column: predicted class)\n     ");
    for (int j = 0; j < r->K; j++) printf(" %5d", j);
    printf("\n");
    for (int k = 0; k < r->K; k++) {
        printf("%5d", k);
        for (int j = 0; j < r->K; j++) printf(" %5lld", (long long)r->confusion[(size_t)k * r->K + j]);
        printf("\n");
    }
}

static void run_dir_print(const char *dir) {
    static const char *const what[][2] = {
        {"metrics.csv", "one row per epoch: lr, train/test loss and accuracy, img/s, seconds"},
        {"curves.png", "loss and accuracy curves"},
        {"last.safetensors", "checkpoint of the last epoch (weights + training state)"},
        {"best.safetensors", "checkpoint of the best test top-1 epoch"},
        {"confusion.csv", "confusion matrix of the last evaluation"},
        {"args.txt", "command lines and the resolved configuration"},
    };
    printf("run directory: %s\n", dir);
    for (size_t i = 0; i < sizeof what / sizeof *what; i++) {
        char p[2048];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", dir, what[i][0]);
        if (stat(p, &st) == 0)
            printf("  %-18s %10lld bytes  %s\n", what[i][0], (long long)st.st_size, what[i][1]);
    }
}

// ---------------------------------------------------------------- train

static const char *const TRAIN_USAGE =
    "usage: incept train MODEL --data SOURCE [options]\n"
    "       incept train [MODEL] --resume RUN_DIR [--epochs N] [--stop-after N] [--threads N]\n"
    "data:      --data fashion-mnist[:DIR] | mnist[:DIR] | cifar10:DIR | folder:DIR\n"
    "           --image-size S  --folder-size S  --no-augment  --random-erasing P\n"
    "           --limit-train N  --limit-test N\n"
    "recipe:    --epochs N  --batch-size N  --eval-batch-size N  --lr LR  --label-smoothing E\n"
    "           --precise-bn N: after the last epoch, BN statistics averaged over N batches\n"
    "           --time-budget T (seconds, or 59m, 1h): when the warmup ends, the run becomes as\n"
    "           many epochs as fit in T from the start (--epochs is then the ceiling); cut\n"
    "           or lengthened after each later epoch as the pace of the last two changes\n"
    "           --optimizer sgd|adam|adamw  --momentum M  --dampening D  --no-nesterov\n"
    "           --weight-decay WD  --decay-bn-bias  --beta1 B  --beta2 B  --eps E  --amsgrad\n"
    "           --schedule constant|step|cosine|poly  --warmup EPOCHS  --warmup-factor F\n"
    "           --step-size EPOCHS  --gamma G  --eta-min LR  --power P  --schedule-per epoch|step\n"
    "run:       --seed S  --threads N  --run-dir DIR  --init-weights W  --stop-after N\n"
    "speed:     --bf16: products in bfloat16 with float32 sums (AMX where the CPU has it), as\n"
    "           torch.set_float32_matmul_precision('medium'); weights, BN, optimiser stay float32\n"
    "defaults:  15 epochs, batch 128, sgd lr 0.05 momentum 0.9 nesterov, weight decay 5e-4 (not on\n"
    "           BN/bias), cosine per step after 1 warmup epoch from 0.1x, label smoothing 0.1,\n"
    "           augmentation on, seed 0; --image-size 32 for 28x28 sets\n";

typedef struct {
    int set;
    double v;
} opt_double;

static int parse_double_opt(const char *flag, const char *v, double lo, double hi, opt_double *o) {
    float f;
    char *end;
    double d = strtod(v, &end);
    if (!*v || *end || !(d >= lo && d <= hi)) return cli_float(flag, v, lo, hi, &f);
    o->set = 1;
    o->v = d;
    return 0;
}

// --time-budget: seconds, or with a unit: 90s, 59m, 1.5h.
static int parse_duration(const char *flag, const char *v, double *out) {
    char *end;
    double d = strtod(v, &end);
    double unit = !strcmp(end, "") || !strcmp(end, "s") ? 1 : !strcmp(end, "m") ? 60
                : !strcmp(end, "h") ? 3600 : 0;
    if (end == v || unit == 0 || !(d > 0) || !(d * unit < 1e9))
        return cli_usage("%s: expected a duration such as 3540, 59m or 1h, not '%s'", flag, v);
    *out = d * unit;
    return 0;
}

int cmd_train(int argc, char **argv) {
    if (argc >= 3 && (!strcmp(argv[2], "--help") || !strcmp(argv[2], "-h"))) {
        printf("%s%s", TRAIN_USAGE, CLI_MODEL_OPTIONS);
        return 0;
    }
    const char *model_name = argc >= 3 && argv[2][0] != '-' ? argv[2] : NULL;
    train_config cfg;
    if (model_name && train_config_default(&cfg, model_name)) {
        fprintf(stderr, "incept: %s\n", err_msg());
        return 2;
    }
    if (!model_name) train_config_default(&cfg, "googlenet");
    const char *data = NULL, *run_dir = NULL, *resume = NULL, *init = NULL, *optimizer = NULL;
    const char *sched_kind = NULL, *sched_per = NULL;
    opt_double lr = {0}, momentum = {0}, dampening = {0}, wd = {0}, beta1 = {0}, beta2 = {0},
               eps = {0}, gamma = {0}, eta_min = {0}, power = {0}, warm_f = {0};
    int epochs = 0, stop_after = 0, no_nesterov = 0, decay_bn_bias = 0, amsgrad = 0;
    int warmup = -1, step_size = -1, n_recipe = 0, rc = 0;
    const char *recipe_flag = NULL;   // a flag that --resume cannot take
    if (cpu_init()) return cli_fail();   // a bad INCEPT_ISA or INCEPT_THREADS
    for (int i = model_name ? 3 : 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int set_c = 0;
        if ((rc = cli_model_option(&cfg.model, argc, argv, &i, &set_c)) == 1) {
            if (set_c) cfg.in_channels = cfg.model.in_channels;
            if (!strcmp(a, "--num-classes")) cfg.num_classes = cfg.model.num_classes;
            recipe_flag = a;
            n_recipe++;
            continue;
        }
        if (rc) return rc;
        int flag = 1;
        if (!strcmp(a, "--no-augment")) cfg.augment = 0;
        else if (!strcmp(a, "--no-nesterov")) no_nesterov = 1;
        else if (!strcmp(a, "--decay-bn-bias")) decay_bn_bias = 1;
        else if (!strcmp(a, "--amsgrad")) amsgrad = 1;
        else if (!strcmp(a, "--bf16")) cfg.bf16 = 1;
        else flag = 0;
        if (flag) { recipe_flag = a; n_recipe++; continue; }
        if (!v) return cli_usage("unknown option '%s' for 'train', or it needs a value", a);
        int recipe = 1;
        if (!strcmp(a, "--data")) { data = v; recipe = 0; }   // checked against the run's
        else if (!strcmp(a, "--image-size")) rc = cli_int(a, v, 1, 4096, &cfg.image_size);
        else if (!strcmp(a, "--folder-size")) rc = cli_int(a, v, 8, 4096, &cfg.folder_size);
        else if (!strcmp(a, "--limit-train")) rc = cli_int(a, v, 1, 1 << 30, &cfg.limit_train);
        else if (!strcmp(a, "--limit-test")) rc = cli_int(a, v, 1, 1 << 30, &cfg.limit_test);
        else if (!strcmp(a, "--batch-size")) rc = cli_int(a, v, 2, TRAIN_MAX_BATCH, &cfg.batch_size);
        else if (!strcmp(a, "--eval-batch-size")) rc = cli_int(a, v, 1, TRAIN_MAX_BATCH, &cfg.eval_batch_size);
        else if (!strcmp(a, "--label-smoothing")) rc = cli_float(a, v, 0, 1, &cfg.label_smoothing);
        else if (!strcmp(a, "--random-erasing")) rc = cli_float(a, v, 0, 1, &cfg.random_erasing);
        else if (!strcmp(a, "--precise-bn")) rc = cli_int(a, v, 0, TRAIN_MAX_PRECISE_BN, &cfg.precise_bn);
        else if (!strcmp(a, "--time-budget")) rc = parse_duration(a, v, &cfg.time_budget);
        else if (!strcmp(a, "--lr")) rc = parse_double_opt(a, v, 0, 1e300, &lr);
        else if (!strcmp(a, "--optimizer")) optimizer = v;
        else if (!strcmp(a, "--momentum")) rc = parse_double_opt(a, v, 0, 1e300, &momentum);
        else if (!strcmp(a, "--dampening")) rc = parse_double_opt(a, v, 0, 1, &dampening);
        else if (!strcmp(a, "--weight-decay")) rc = parse_double_opt(a, v, 0, 1e300, &wd);
        else if (!strcmp(a, "--beta1")) rc = parse_double_opt(a, v, 0, 1, &beta1);
        else if (!strcmp(a, "--beta2")) rc = parse_double_opt(a, v, 0, 1, &beta2);
        else if (!strcmp(a, "--eps")) rc = parse_double_opt(a, v, 0, 1e300, &eps);
        else if (!strcmp(a, "--schedule")) sched_kind = v;
        else if (!strcmp(a, "--schedule-per")) sched_per = v;
        else if (!strcmp(a, "--warmup")) rc = cli_int(a, v, 0, TRAIN_MAX_EPOCHS, &warmup);
        else if (!strcmp(a, "--warmup-factor")) rc = parse_double_opt(a, v, 1e-12, 1, &warm_f);
        else if (!strcmp(a, "--step-size")) rc = cli_int(a, v, 1, TRAIN_MAX_EPOCHS, &step_size);
        else if (!strcmp(a, "--gamma")) rc = parse_double_opt(a, v, 1e-300, 1e300, &gamma);
        else if (!strcmp(a, "--eta-min")) rc = parse_double_opt(a, v, 0, 1e300, &eta_min);
        else if (!strcmp(a, "--power")) rc = parse_double_opt(a, v, 0, 1e300, &power);
        else if (!strcmp(a, "--seed")) rc = cli_u64(a, v, &cfg.seed);
        else if (!strcmp(a, "--run-dir")) run_dir = v;
        else if (!strcmp(a, "--init-weights")) init = v;
        else {
            recipe = 0;
            if (!strcmp(a, "--resume")) resume = v;
            else if (!strcmp(a, "--epochs")) rc = cli_int(a, v, 1, TRAIN_MAX_EPOCHS, &epochs);
            else if (!strcmp(a, "--stop-after")) rc = cli_int(a, v, 1, TRAIN_MAX_EPOCHS, &stop_after);
            else if (!strcmp(a, "--threads")) rc = threads_set(a, v);
            else return cli_usage("unknown option '%s' for 'train'", a);
        }
        if (rc) return rc;
        if (recipe) { recipe_flag = a; n_recipe++; }
        i++;
    }
    if (resume) {
        if (n_recipe)
            return cli_usage("--resume takes the configuration from %s/last.safetensors; only "
                             "--epochs, --stop-after and --threads may be given, not %s", resume, recipe_flag);
    } else {
        if (!model_name) return cli_usage("'train' needs a MODEL name (or --resume RUN_DIR)");
        if (!data) return cli_usage("'train' needs --data SOURCE (fashion-mnist, mnist, cifar10:DIR, folder:DIR)");
        if (strlen(data) >= sizeof cfg.data) return cli_usage("--data: path too long");
        snprintf(cfg.data, sizeof cfg.data, "%s", data);
        if (epochs) cfg.epochs = epochs;
        else if (cfg.time_budget > 0) cfg.epochs = 1000;   // a ceiling: the budget decides
        if (cfg.random_erasing > 0 && !cfg.augment)
            return cli_usage("--random-erasing is an augmentation: it cannot go with --no-augment");
        if (optimizer) {
            int k = optim_kind_parse(optimizer);
            if (k < 0) return cli_usage("--optimizer: %s", err_msg());
            if (k != OPT_SGD) {   // PyTorch's defaults for Adam/AdamW, and their usual lr
                optim_config_default(&cfg.optim, k);
                cfg.sched.base_lr = 1e-3;
            }
        }
        optim_config *o = &cfg.optim;
        if (momentum.set) o->momentum = momentum.v;
        if (dampening.set) o->dampening = dampening.v;
        if (wd.set) o->weight_decay = wd.v;
        if (beta1.set) o->beta1 = beta1.v;
        if (beta2.set) o->beta2 = beta2.v;
        if (eps.set) o->eps = eps.v;
        if (no_nesterov || o->momentum == 0 || o->dampening != 0) o->nesterov = 0;
        o->amsgrad = amsgrad;
        o->decay_bn_bias = decay_bn_bias;
        if (o->kind != OPT_SGD && (momentum.set || dampening.set || no_nesterov))
            return cli_usage("--momentum, --dampening and --no-nesterov are SGD options");
        if (o->kind == OPT_SGD && (beta1.set || beta2.set || eps.set || amsgrad))
            return cli_usage("--beta1, --beta2, --eps and --amsgrad are Adam/AdamW options");
        schedule *s = &cfg.sched;
        if (sched_kind) {
            int k = schedule_kind_parse(sched_kind);
            if (k < 0) return cli_usage("--schedule: %s", err_msg());
            s->kind = k;
        }
        if (lr.set) s->base_lr = lr.v;
        if (warmup >= 0) s->warmup = warmup;
        if (warm_f.set) s->warmup_start_factor = warm_f.v;
        if (step_size > 0) s->step_size = step_size;
        if (gamma.set) s->gamma = gamma.v;
        if (eta_min.set) s->eta_min = eta_min.v;
        if (power.set) s->power = power.v;
        if (sched_per) {
            if (!strcmp(sched_per, "epoch")) s->per_step = 0;
            else if (!strcmp(sched_per, "step")) s->per_step = 1;
            else return cli_usage("--schedule-per needs 'epoch' or 'step', not '%s'", sched_per);
        }
        // A warmup as long as the whole run leaves nothing to decay: shorten it for short runs.
        if (warmup < 0 && (s->kind == SCHED_COSINE || s->kind == SCHED_POLY) && s->warmup >= cfg.epochs)
            s->warmup = 0;
        s->epochs = cfg.epochs;
        if (schedule_check(s)) return cli_usage("%s", err_msg());
        if (cfg.time_budget > 0 && cfg.epochs <= budget_epoch(&cfg))
            return cli_usage("--time-budget: the run's length is fixed after epoch %d (the warmup), "
                             "so --epochs (the ceiling) must be above it, not %d",
                             budget_epoch(&cfg), cfg.epochs);
    }

    char *command = command_join(argc, argv);
    trainer t;
    if (resume) rc = trainer_resume(&t, resume, epochs, command);
    else rc = trainer_open(&t, &cfg, run_dir, init, command);
    free(command);
    if (rc) return cli_fail();
    // `make run RUN_ARGS="--resume DIR"` repeats MODEL and --data: they must be the run's.
    if (resume && model_name && strcmp(model_name, t.cfg.model.name)) {
        fprintf(stderr, "incept: %s holds a %s run, not %s\n", resume, t.cfg.model.name, model_name);
        trainer_close(&t);
        return 1;
    }
    if (resume && data && strcmp(data, t.cfg.data)) {
        fprintf(stderr, "incept: %s trains on --data %s, not %s\n", resume, t.cfg.data, data);
        trainer_close(&t);
        return 1;
    }
    const train_config *c = &t.cfg;
    printf("%s %s on %s (%d train, %d test images, %d classes, input %dx%dx%d), run directory %s\n",
           resume ? "resuming" : "training", c->model.name, c->data, t.train.n, t.test.n,
           c->num_classes, c->in_channels, c->image_size, c->image_size, t.run_dir);
    if (resume) printf("at epoch %d of %d\n", t.epoch, c->epochs);
    char length[96];
    if (c->time_budget > 0)
        snprintf(length, sizeof length, "as many epochs as fit %.0f s (at most %d)", c->time_budget,
                 c->epochs);
    else snprintf(length, sizeof length, "%d epochs", c->epochs);
    printf("%s lr %g, %s schedule, batch %d (%d steps/epoch, last partial batch dropped), "
           "%s, %d threads\n", optim_kind_name(c->optim.kind), c->sched.base_lr,
           schedule_kind_name(c->sched.kind), c->batch_size, t.steps_per_epoch, length, cpu_threads());
    if (c->bf16 && cpu_amx()) printf("bfloat16 products on AMX tiles\n");
    else if (c->bf16)  // the mode only pays on AMX; elsewhere it costs time (rounding, no Winograd)
        printf("bfloat16 products on the float32 kernels (%s): --bf16 is slower here than float32 "
               "(same rounding, for reproducing an AMX run)\n",
               cpu_amx_detected() ? "AMX turned off by INCEPT_AMX=0 or INCEPT_ISA"
                                  : "this CPU offers no AMX-BF16");
    fflush(stdout);
    progress_view view = {.tty = isatty(STDERR_FILENO)};
    rc = 0;
    while (t.epoch < c->epochs && !(stop_after && t.epoch >= stop_after)) {
        const int planned = c->epochs;   // the time budget's guard may change it
        if (trainer_epoch(&t, progress_draw, &view)) {
            progress_clear(&view);
            rc = cli_fail();
            break;
        }
        progress_clear(&view);
        const metrics_row *r = &t.rows[t.epoch - 1];
        printf("epoch %d/%d  lr %.4g  train loss %.4f acc %.2f%%  test loss %.4f top-1 %.2f%% "
               "top-5 %.2f%%  %.0f img/s  %.1f s%s\n", t.epoch, c->epochs, r->lr, r->train_loss,
               r->train_acc, r->test_loss, r->test_acc1, r->test_acc5, r->images_per_s, r->seconds,
               t.best_epoch == t.epoch ? "  (best)" : "");
        if (t.budget_decided == t.epoch)
            printf("time budget: %d epochs (epoch %d took %.1f s; %.0f s of the budget used)\n",
                   c->epochs, t.epoch, r->seconds, clock_now_s() - t.t_start);
        else if (c->epochs != planned)
            printf("time budget: %s to %d epochs from %d (epoch %d took %.1f s; %.0f s of the "
                   "budget used)\n", c->epochs < planned ? "cut" : "lengthened", c->epochs, planned,
                   t.epoch, r->seconds, clock_now_s() - t.t_start);
        fflush(stdout);
    }
    if (!rc) {
        if (t.epoch < c->epochs)
            printf("stopped after epoch %d of %d (--stop-after); continue with: incept train --resume %s\n",
                   t.epoch, c->epochs, t.run_dir);
        else if (!t.last_eval.confusion)
            printf("the run is complete (%d of %d epochs)\n", t.epoch, c->epochs);
        if (t.last_eval.confusion) {
            printf("\ntest set after epoch %d: top-1 %.2f%%, best %.2f%% (epoch %d)\n", t.epoch,
                   100.0 * t.last_eval.correct1 / t.last_eval.n, t.best_acc1, t.best_epoch);
            per_class_print(&t.last_eval, t.train.class_names);
        }
        printf("\n");
        run_dir_print(t.run_dir);
    }
    trainer_close(&t);
    return rc;
}

// ---------------------------------------------------------------- eval and predict

typedef struct {
    model_config cfg;
    const char *weights, *data, *output, *labels;
    int batch, limit, image_size, folder_size, top, in_set, n_model_opts, tta;
    int bf16;   // --bf16: as in training (cpu_bf16_set before the model is built)
    const char *model_opt;
    const char **images; int n_images;
} infer_opts;

static int infer_parse(int argc, char **argv, infer_opts *o, int predict) {
    memset(o, 0, sizeof *o);
    int rc = cli_model_name(&o->cfg, argc, argv);
    if (rc) return rc;
    o->batch = predict ? 16 : 128;
    o->top = 5;
    o->images = calloc((size_t)argc, sizeof *o->images);
    if (!o->images) return cli_usage("out of memory");
    for (int i = 3; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int set_c = 0;
        if ((rc = cli_model_option(&o->cfg, argc, argv, &i, &set_c)) == 1) {
            o->in_set |= set_c;
            o->n_model_opts++;
            o->model_opt = a;
            continue;
        }
        if (rc) return rc;
        if (predict && a[0] != '-') { o->images[o->n_images++] = a; continue; }
        if (!predict && !strcmp(a, "--tta")) { o->tta = 1; continue; }
        if (!strcmp(a, "--bf16")) { o->bf16 = 1; continue; }
        if (!v) return cli_usage("unknown option '%s' for '%s', or it needs a value", a, argv[1]);
        if (!strcmp(a, "--weights")) o->weights = v;
        else if (!strcmp(a, "--threads")) rc = threads_set(a, v);
        else if (!strcmp(a, "--batch-size")) rc = cli_int(a, v, 1, 1 << 16, &o->batch);
        else if (!predict && !strcmp(a, "--data")) o->data = v;
        else if (!predict && !strcmp(a, "--output")) o->output = v;
        else if (!predict && !strcmp(a, "--limit-test")) rc = cli_int(a, v, 1, 1 << 30, &o->limit);
        else if (!predict && !strcmp(a, "--image-size")) rc = cli_int(a, v, 1, 4096, &o->image_size);
        else if (!predict && !strcmp(a, "--folder-size")) rc = cli_int(a, v, 8, 4096, &o->folder_size);
        else if (predict && !strcmp(a, "--labels")) o->labels = v;
        else if (predict && !strcmp(a, "--top")) rc = cli_int(a, v, 1, 1 << 20, &o->top);
        else return cli_usage("unknown option '%s' for '%s'", a, argv[1]);
        if (rc) return rc;
        i++;
    }
    if (!o->weights) return cli_usage("'%s' needs --weights W", argv[1]);
    if (!predict && !o->data) return cli_usage("'eval' needs --data SOURCE");
    if (predict && !o->n_images) return cli_usage("'predict' needs at least one IMAGE");
    return 0;
}

// Reads the checkpoint's metadata when it has some: the model's options then come from it.
// Returns 1 (meta filled), 0 (plain weights) or -1 (printed; *exit_code set).
static int infer_meta(infer_opts *o, ckpt_meta *meta, const char *model_name, int *exit_code) {
    st_file f;
    if (st_read(&f, o->weights)) { *exit_code = cli_fail(); return -1; }
    int has = ckpt_meta_read(meta, &f, o->weights);
    st_free(&f);
    if (has < 0) { *exit_code = cli_fail(); return -1; }
    if (!has) return 0;
    if (strcmp(meta->cfg.model.name, model_name)) {
        fprintf(stderr, "incept: %s holds a %s, not a %s\n", o->weights, meta->cfg.model.name, model_name);
        ckpt_meta_free(meta);
        *exit_code = 1;
        return -1;
    }
    if (o->n_model_opts) {
        *exit_code = cli_usage("%s records its model options (it was written by incept train); "
                               "drop %s", o->weights, o->model_opt);
        ckpt_meta_free(meta);
        return -1;
    }
    o->cfg = meta->cfg.model;
    return 1;
}

static int model_ready(model *m, const model_config *cfg, const char *weights) {
    if (model_build(m, cfg)) return -1;
    int ignored = 0;
    if (model_load(m, weights, &ignored)) return -1;
    if (ignored)
        fprintf(stderr, "incept: note: %d aux-head tensors in %s ignored (--no-aux)\n", ignored, weights);
    return 0;
}

int cmd_eval(int argc, char **argv) {
    infer_opts o;
    ckpt_meta meta = {0};
    int rc = infer_parse(argc, argv, &o, 0), has = 0;
    if (!rc) has = infer_meta(&o, &meta, argv[2], &rc);
    free(o.images);
    if (rc) return rc;
    dataset te = {0};
    preprocess pre;
    model m = {0};
    eval_result r = {0};
    int folder_size = o.folder_size ? o.folder_size : has ? meta.cfg.folder_size : 0;
    if (dataset_load(NULL, &te, o.data, folder_size)) { rc = cli_fail(); goto done; }
    if (o.limit > 0 && o.limit < te.n) te.n = o.limit;
    if (te.n < 1) { fprintf(stderr, "incept: %s: the test split has no images\n", o.data); rc = 1; goto done; }
    if (has) {
        pre = meta.pre;
        if (o.image_size && o.image_size != pre.out_H) {
            rc = cli_usage("%s was trained at %dx%d; drop --image-size", o.weights, pre.out_H, pre.out_W);
            goto done;
        }
        if (preprocess_check(&pre, te.C)) {
            fprintf(stderr, "incept: %s: %s\n", o.data, err_msg());
            rc = 1;
            goto done;
        }
    } else {
        if (o.cfg.num_classes == 1000 && te.n_classes != 1000) o.cfg.num_classes = te.n_classes;
        if (!o.in_set) o.cfg.in_channels = te.C;
        int S = o.image_size ? o.image_size : train_default_image_size(&te);
        o.cfg.H = o.cfg.W = S;
        if (preprocess_default(&pre, &te, S, o.cfg.in_channels, 0)) {
            fprintf(stderr, "incept: %s: %s\n", o.data, err_msg());
            rc = 1;
            goto done;
        }
    }
    if (o.cfg.num_classes < te.n_classes) {
        fprintf(stderr, "incept: %s has %d classes but %s only %d\n", o.data, te.n_classes,
                o.weights, o.cfg.num_classes);
        rc = 1;
        goto done;
    }
    cpu_bf16_set(o.bf16);   // (inference folds and packs the weights for the mode it is in)
    if (model_ready(&m, &o.cfg, o.weights)) { rc = cli_fail(); goto done; }
    progress_view view = {.tty = isatty(STDERR_FILENO)};
    if (evaluate(&m, &te, &pre, o.batch, o.tta, &r, progress_draw, &view)) {
        progress_clear(&view);
        rc = cli_fail();
        goto done;
    }
    progress_clear(&view);
    // Names: the data set's for its classes, numbers for any extra outputs of the model.
    char **names = calloc((size_t)r.K, sizeof *names);
    char (*num)[16] = calloc((size_t)r.K, sizeof *num);
    if (!names || !num) { free(names); free(num); fprintf(stderr, "incept: out of memory\n"); rc = 1; goto done; }
    for (int k = 0; k < r.K; k++) {
        snprintf(num[k], sizeof num[k], "%d", k);
        names[k] = k < te.n_classes ? te.class_names[k] : num[k];
    }
    printf("%s on %s test split (%d images%s%s), weights %s\n", m.cfg.name, o.data, r.n,
           o.tta ? ", each scored with its mirror image" : "", cli_bf16_note(), o.weights);
    printf("loss %.4f  top-1 %.2f%% (%lld/%d)  top-%d %.2f%% (%lld/%d)\n\n", r.loss,
           100.0 * r.correct1 / r.n, r.correct1, r.n, r.K < 5 ? r.K : 5, 100.0 * r.correct5 / r.n,
           r.correct5, r.n);
    per_class_print(&r, names);
    if (r.K <= 20) { printf("\n"); confusion_print(&r); }
    if (o.output) {
        if (confusion_write_csv(o.output, &r, names)) rc = cli_fail();
        else printf("\nconfusion matrix written to %s\n", o.output);
    }
    free(names);
    free(num);
done:
    eval_result_free(&r);
    model_free(&m);
    dataset_free(&te);
    ckpt_meta_free(&meta);
    return rc;
}

// --labels FILE: one class name per line.
static int labels_read(const char *path, int K, char ***out) {
    FILE *f = fopen(path, "r");
    if (!f) return err_set("%s: cannot open: %s", path, strerror(errno));
    char **names = calloc((size_t)K, sizeof *names), line[4096];
    int n = 0, rc = names ? 0 : err_set("out of memory");
    while (!rc && fgets(line, sizeof line, f)) {
        size_t len = strcspn(line, "\r\n");
        line[len] = 0;
        if (n >= K) { rc = err_set("%s: more than %d lines, but the model has %d classes", path, K, K); break; }
        if (!(names[n++] = strdup(line))) rc = err_set("out of memory");
    }
    if (!rc && ferror(f)) rc = err_set("%s: read error", path);
    fclose(f);
    if (!rc && n != K) rc = err_set("%s: %d lines, but the model has %d classes (one name per line)", path, n, K);
    if (rc) {
        for (int i = 0; names && i < K; i++) free(names[i]);
        free(names);
        return -1;
    }
    *out = names;
    return 0;
}

int cmd_predict(int argc, char **argv) {
    infer_opts o;
    ckpt_meta meta = {0};
    int rc = infer_parse(argc, argv, &o, 1), has = 0;
    if (!rc) has = infer_meta(&o, &meta, argv[2], &rc);
    if (rc) { free(o.images); return rc; }
    preprocess pre;
    int resize;
    if (has) {
        pre = meta.pre;
        pre.augment = 0;
        resize = meta.resize;
    } else {   // plain torchvision weights: the ImageNet eval preset
        preprocess_imagenet(&pre);
        resize = 256;
        if (o.cfg.in_channels != 3) {
            free(o.images);
            return cli_usage("%s has no training metadata, so the ImageNet preset (3 channels) is "
                             "used; --in-channels must be 3", o.weights);
        }
        o.cfg.H = pre.out_H;
        o.cfg.W = pre.out_W;
    }
    const int K = o.cfg.num_classes, n = o.n_images;
    char **labels = NULL;
    model m = {0};
    const size_t per = (size_t)pre.out_C * pre.out_H * pre.out_W;
    float *x = NULL, *probs = NULL;
    const int Nb = n < o.batch ? n : o.batch;
    if (o.labels && labels_read(o.labels, K, &labels)) { rc = cli_fail(); goto done; }
    x = malloc((size_t)n * per * sizeof *x);
    probs = malloc((size_t)Nb * K * sizeof *probs);
    if (!x || !probs) { fprintf(stderr, "incept: out of memory for %d images\n", n); rc = 1; goto done; }
    // Every image is decoded before anything is printed: a bad one stops the run with no output.
    for (int i = 0; i < n; i++)
        if (image_load(x + (size_t)i * per, o.images[i], resize, &pre)) { rc = cli_fail(); goto done; }
    cpu_bf16_set(o.bf16);
    if (model_ready(&m, &o.cfg, o.weights) || model_prepare(&m, Nb)) { rc = cli_fail(); goto done; }
    const int top = o.top < K ? o.top : K;
    float *xb = malloc(Nb * per * sizeof *xb);
    int *order = malloc((size_t)K * sizeof *order);
    if (!xb || !order) { free(xb); free(order); fprintf(stderr, "incept: out of memory\n"); rc = 1; goto done; }
    for (int start = 0; start < n && !rc; start += Nb) {
        int cnt = n - start < Nb ? n - start : Nb;
        memcpy(xb, x + (size_t)start * per, cnt * per * sizeof *xb);
        memset(xb + cnt * per, 0, (Nb - cnt) * per * sizeof *xb);
        if (model_forward(&m, xb, 0)) { rc = cli_fail(); break; }
        softmax_forward(probs, model_out(&m, m.logits), Nb, K);
        for (int i = 0; i < cnt; i++) {
            const float *p = probs + (size_t)i * K;
            // Partial selection sort: the top classes by probability, ties to the lower index.
            for (int k = 0; k < K; k++) order[k] = k;
            for (int j = 0; j < top; j++) {
                int b = j;
                for (int k = j + 1; k < K; k++) if (p[order[k]] > p[order[b]]) b = k;
                int tmp = order[j]; order[j] = order[b]; order[b] = tmp;
            }
            printf("%s\n", o.images[start + i]);
            for (int j = 0; j < top; j++) {
                int k = order[j];
                const char *name = labels ? labels[k] : has ? meta.classes[k] : NULL;
                if (name) printf("  %.6f  %s (%d)\n", p[k], name, k);
                else printf("  %.6f  class %d\n", p[k], k);
            }
        }
    }
    free(xb);
    free(order);
done:
    for (int i = 0; labels && i < K; i++) free(labels[i]);
    free(labels);
    free(x);
    free(probs);
    free(o.images);
    model_free(&m);
    ckpt_meta_free(&meta);
    return rc;
}
