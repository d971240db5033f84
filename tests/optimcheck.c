// Test helper for tests/test_optim.py (not run by the runner itself).
//
//   optimcheck optim --kind K (first) --n N --steps S --params P.bin --grads G.bin --lrs LR1,LR2,...
//                    --out OUT.bin [--spans OFF:N:NODECAY,...] [--momentum X] [--dampening X]
//                    [--wd X] [--beta1 X] [--beta2 X] [--eps X] [--nesterov] [--amsgrad]
//                    [--decay-bn-bias] [--resume-at K]
//     P.bin holds N float32 (initial params), G.bin S*N float32 (the gradient of each step),
//     one lr per step. Writes the final params to OUT.bin and every state buffer to
//     OUT.bin.<name> (e.g. OUT.bin.optim.exp_avg) and the step count to OUT.bin.step.
//     --resume-at K moves the state into a fresh optimiser after K steps (a checkpoint resume).
//
//   optimcheck sched --kind K --lr X --epochs E --spe SPE --steps N [--step-size N] [--gamma X]
//                    [--eta-min X] [--power X] [--warmup N] [--start-factor X] [--per-step]
//     Prints schedule_lr(step) for step 0..N-1, one per line.
#include "train/optim.h"
#include "train/schedule.h"
#include "util/err.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Noreturn void die(const char *msg) {
    fprintf(stderr, "optimcheck: %s\n", msg);
    exit(1);
}

static double num(const char *s) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end) die("bad number");
    return v;
}

static float *read_floats(const char *path, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open input");
    float *p = malloc((n ? n : 1) * sizeof(float));
    if (!p || fread(p, sizeof(float), n, f) != n) die("short input file");
    fclose(f);
    return p;
}

static void write_floats(const char *path, const float *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, sizeof(float), n, f) != n || fclose(f)) die("cannot write output");
}

static int run_optim(int argc, char **argv) {
    optim_config cfg;
    optim_config_default(&cfg, OPT_SGD);
    int have_kind = 0, resume_at = -1;
    double wd = -1;
    size_t n = 0;
    int steps = 0;
    const char *ppath = NULL, *gpath = NULL, *out = NULL, *lrs = NULL, *spans_s = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--nesterov")) { cfg.nesterov = 1; continue; }
        if (!strcmp(a, "--amsgrad")) { cfg.amsgrad = 1; continue; }
        if (!strcmp(a, "--decay-bn-bias")) { cfg.decay_bn_bias = 1; continue; }
        if (!v) die("missing value");
        i++;
        if (!strcmp(a, "--kind")) {
            int k = optim_kind_parse(v);
            if (k < 0) die(err_msg());
            optim_config_default(&cfg, k);  // the kind's defaults: give --kind first
            have_kind = 1;
        } else if (!strcmp(a, "--n")) n = (size_t)num(v);
        else if (!strcmp(a, "--steps")) steps = (int)num(v);
        else if (!strcmp(a, "--params")) ppath = v;
        else if (!strcmp(a, "--grads")) gpath = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--lrs")) lrs = v;
        else if (!strcmp(a, "--spans")) spans_s = v;
        else if (!strcmp(a, "--momentum")) cfg.momentum = num(v);
        else if (!strcmp(a, "--dampening")) cfg.dampening = num(v);
        else if (!strcmp(a, "--wd")) wd = num(v);
        else if (!strcmp(a, "--beta1")) cfg.beta1 = num(v);
        else if (!strcmp(a, "--beta2")) cfg.beta2 = num(v);
        else if (!strcmp(a, "--eps")) cfg.eps = num(v);
        else if (!strcmp(a, "--resume-at")) resume_at = (int)num(v);
        else die("unknown option");
    }
    if (!have_kind || !ppath || !gpath || !out || !lrs || steps < 1) die("missing option");
    if (wd >= 0) cfg.weight_decay = wd;

    // spans: "off:n:nodecay,..." (default: one span over everything)
    param_span spans[64];
    int n_spans = 0;
    if (spans_s) {
        for (const char *s = spans_s; *s && n_spans < 64;) {
            unsigned long off, len;
            int nd, used;
            if (sscanf(s, "%lu:%lu:%d%n", &off, &len, &nd, &used) != 3) die("bad --spans");
            spans[n_spans++] = (param_span){off, len, nd};
            s += used;
            if (*s == ',') s++;
        }
    } else {
        spans[n_spans++] = (param_span){0, n, 0};
    }

    double *lr = malloc(steps * sizeof(double));
    const char *s = lrs;
    for (int t = 0; t < steps; t++) {
        char *end;
        lr[t] = strtod(s, &end);
        if (end == s) die("too few --lrs");
        s = *end == ',' ? end + 1 : end;
    }

    float *p = read_floats(ppath, n), *g = read_floats(gpath, n * steps);
    optim o;
    if (optim_init(&o, &cfg, n) || optim_check_spans(&o, spans, n_spans)) die(err_msg());
    for (int t = 0; t < steps; t++) {
        if (t == resume_at) {  // what a checkpoint save + load does with the state
            optim o2;
            if (optim_init(&o2, &cfg, n)) die(err_msg());
            o2.step = o.step;
            for (int b = 0; b < 3; b++)
                if (optim_buffer(&o, b)) memcpy(optim_buffer(&o2, b), optim_buffer(&o, b), n * 4);
            optim_free(&o);
            o = o2;
        }
        optim_step(&o, p, g + (size_t)t * n, spans, n_spans, lr[t]);
    }
    write_floats(out, p, n);
    char path[4096];
    for (int b = 0; b < 3; b++) {
        if (!optim_buffer(&o, b)) continue;
        snprintf(path, sizeof path, "%s.%s", out, optim_buffer_name(&o, b));
        write_floats(path, optim_buffer(&o, b), n);
    }
    snprintf(path, sizeof path, "%s.step", out);
    FILE *f = fopen(path, "w");
    if (!f) die("cannot write step");
    fprintf(f, "%lld\n", (long long)o.step);
    fclose(f);
    optim_free(&o);
    free(p);
    free(g);
    free(lr);
    return 0;
}

static int run_sched(int argc, char **argv) {
    schedule sc;
    schedule_default(&sc, SCHED_CONSTANT, 0.1, 1);
    int spe = 1, steps = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--per-step")) { sc.per_step = 1; continue; }
        if (!v) die("missing value");
        i++;
        if (!strcmp(a, "--kind")) {
            sc.kind = schedule_kind_parse(v);
            if (sc.kind < 0) die(err_msg());
        } else if (!strcmp(a, "--lr")) sc.base_lr = num(v);
        else if (!strcmp(a, "--epochs")) sc.epochs = (int)num(v);
        else if (!strcmp(a, "--spe")) spe = (int)num(v);
        else if (!strcmp(a, "--steps")) steps = (int)num(v);
        else if (!strcmp(a, "--step-size")) sc.step_size = (int)num(v);
        else if (!strcmp(a, "--gamma")) sc.gamma = num(v);
        else if (!strcmp(a, "--eta-min")) sc.eta_min = num(v);
        else if (!strcmp(a, "--power")) sc.power = num(v);
        else if (!strcmp(a, "--warmup")) sc.warmup = (int)num(v);
        else if (!strcmp(a, "--start-factor")) sc.warmup_start_factor = num(v);
        else die("unknown option");
    }
    if (schedule_check(&sc)) die(err_msg());
    for (int t = 0; t < steps; t++) printf("%.17g\n", schedule_lr(&sc, t, spe));
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "optim")) return run_optim(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "sched")) return run_sched(argc - 2, argv + 2);
    die("usage: optimcheck optim|sched OPTIONS (see the source)");
}
