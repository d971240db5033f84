// incept bench: times forward (inference) or a full training step (forward + loss + backward
// + SGD-momentum update) of a model on random data, and reports it against this CPU's
// measured FMA peak.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include "cli/cli.h"
#include "ops/cpu.h"
#include "ops/gemm.h"
#include "train/optim.h"
#include "util/err.h"
#include "util/clock.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// --layers: milliseconds per pass of each node that took time (in inference, a conv's time
// includes the BN and ReLU folded into it; a merged group's 1x1 convs are timed as their lead),
// then totals per kind of op.
static void print_layers(const model *m, const double *prof, int iters) {
    const double *fwd = prof, *bwd = prof + m->n_nodes;
    double total = 0, by_op[OP_COUNT][2] = {{0}};
    for (int i = 0; i < m->n_nodes; i++) total += fwd[i] + bwd[i];
    printf("%-44s %-18s %-14s %9s %9s %6s %8s\n", "layer", "type", "output", "fwd ms", "bwd ms", "%",
           "GFLOP/s");
    for (int i = 0; i < m->n_nodes; i++) {
        const model_node *n = &m->nodes[i];
        by_op[n->op][0] += fwd[i];
        by_op[n->op][1] += bwd[i];
        if (fwd[i] + bwd[i] < 1e-3 * total) continue;   // under 0.1 %: folded, fused, trivial
        char shape[32];
        snprintf(shape, sizeof shape, "%dx%dx%d", n->C, n->H, n->W);
        // forward MACs once, backward twice (input and weight gradients); a merged 1x1
        // GEMM's row does the MACs of its whole group (inference folded or not, training)
        double macs = (double)n->macs;
        if (n->merge_lead == i && !m->reference)
            for (int j = i + 1; j < m->n_nodes; j++)
                if (m->nodes[j].merge_lead == i) macs += (double)m->nodes[j].macs;
        const double flops = 2.0 * macs * m->N * (bwd[i] > 0 ? 3 : 1) * iters;
        printf("%-44.44s %-18s %-14s %9.3f %9.3f %6.1f", n->path, model_op_name(n->op), shape,
               1e3 * fwd[i] / iters, 1e3 * bwd[i] / iters, 100 * (fwd[i] + bwd[i]) / total);
        if (n->macs > 0) printf(" %8.1f", flops / (fwd[i] + bwd[i]) * 1e-9);
        printf("\n");
    }
    printf("totals by type:\n");
    for (int o = 0; o < OP_COUNT; o++)
        if (by_op[o][0] + by_op[o][1] > 0)
            printf("  %-18s %9.3f %9.3f %6.1f\n", model_op_name((op_kind)o), 1e3 * by_op[o][0] / iters,
                   1e3 * by_op[o][1] / iters, 100 * (by_op[o][0] + by_op[o][1]) / total);
    printf("  %-18s %9.3f ms per pass (timed per layer)\n", "all", 1e3 * total / iters);
}

int cmd_bench(int argc, char **argv) {
    model_config cfg;
    int rc = cli_model_name(&cfg, argc, argv), batch = 1, train = 0, threads = 0, iters = 10;
    int layers = 0;
    const char *weights = NULL;   // default: model_init(seed 1), as `incept init --seed 1`
    if (rc) return rc;
    for (int i = 3; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if ((rc = cli_model_option(&cfg, argc, argv, &i, NULL)) == 1) { rc = 0; continue; }
        if (rc) return rc;
        if (!strcmp(a, "--train")) { train = 1; continue; }
        if (!strcmp(a, "--layers")) { layers = 1; continue; }
        if (!strcmp(a, "--bf16")) { cpu_bf16_set(1); continue; }
        if (!v) return cli_usage("unknown option '%s' for 'bench', or it needs a value", a);
        if (!strcmp(a, "--batch")) rc = cli_int(a, v, 1, 1 << 16, &batch);
        else if (!strcmp(a, "--threads")) rc = cli_int(a, v, 1, 256, &threads);
        else if (!strcmp(a, "--iters")) rc = cli_int(a, v, 1, 100000, &iters);
        else if (!strcmp(a, "--weights")) weights = v;
        else if (!strcmp(a, "--input")) {
            char tail;
            if (sscanf(v, "%dx%dx%d%c", &cfg.in_channels, &cfg.H, &cfg.W, &tail) != 3 ||
                cfg.in_channels < 1 || cfg.H < 1 || cfg.W < 1)
                return cli_usage("--input needs CxHxW, not '%s'", v);
        } else return cli_usage("unknown option '%s' for 'bench'", a);
        if (rc) return rc;
        i++;
    }
    if (cpu_init()) return cli_fail();
    if (threads && cpu_threads_set(threads)) return cli_fail();
    if (!train) cfg.aux = 0;
    model m;
    if (model_build(&m, &cfg)) return cli_fail();
    model_init(&m, 1);
    if ((weights && model_load(&m, weights, NULL)) || model_prepare(&m, batch)) {
        model_free(&m);
        return cli_fail();
    }
    size_t nx = (size_t)batch * cfg.in_channels * cfg.H * cfg.W;
    float *x = malloc(nx * sizeof *x);
    int64_t *y = malloc((size_t)batch * sizeof *y);
    rng r;
    rng_seed(&r, 2);
    for (size_t i = 0; i < nx; i++) x[i] = (float)rng_normal(&r);
    for (int i = 0; i < batch; i++) y[i] = rng_below(&r, (uint32_t)cfg.num_classes);
    optim opt = {0};
    optim_config oc;
    optim_config_default(&oc, OPT_SGD);
    oc.momentum = 0.9;
    param_span *spans = calloc((size_t)m.n_tensors, sizeof *spans);
    int n_spans = 0;
    for (int t = 0; t < m.n_tensors; t++)
        if (m.tensors[t].kind == TK_PARAM)
            spans[n_spans++] = (param_span){m.tensors[t].off, m.tensors[t].numel, m.tensors[t].no_decay};
    if (train && optim_init(&opt, &oc, m.n_floats)) rc = cli_fail();
    double *times = malloc((size_t)(iters + 2) * sizeof *times);
    double *prof = layers ? calloc(2 * (size_t)m.n_nodes, sizeof *prof) : NULL;
    for (int it = 0; !rc && it < iters + 2; it++) {   // the first two runs warm up
        if (prof && it == 2) {
            m.prof_fwd = prof;
            m.prof_bwd = prof + m.n_nodes;
        }
        double t0 = clock_now_s();
        if (train) {
            float loss;
            model_zero_grad(&m);
            if (model_loss_backward(&m, x, y, 0, &loss)) { rc = cli_fail(); break; }
            optim_step(&opt, m.params, m.grads, spans, n_spans, 0.01);
        } else if (model_forward(&m, x, 0)) {
            rc = cli_fail();
            break;
        }
        times[it] = clock_now_s() - t0;
    }
    if (!rc) {
        qsort(times + 2, (size_t)iters, sizeof *times, cmp_double);
        double med = times[2 + iters / 2];
        // Training is counted as 3× the forward MACs (forward, input and weight gradients).
        double macs = (double)model_macs(&m, train) * batch * (train ? 3 : 1);
        double gflops = 2 * macs / med / 1e9;
        double peak = cpu_fma_peak_gflops(cpu_isa()) * cpu_threads();
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        printf("%s %s batch %d input %dx%dx%d, %d thread%s, %s kernels%s\n", cfg.name,
               train ? "training step" : "inference", batch, cfg.in_channels, cfg.H, cfg.W,
               cpu_threads(), cpu_threads() > 1 ? "s" : "", m.reference ? "reference" : cpu_isa_name(cpu_isa()),
               cli_bf16_note());
        printf("median %.2f ms per batch (min %.2f, max %.2f over %d runs), %.1f img/s\n",
               med * 1e3, times[2] * 1e3, times[iters + 1] * 1e3, iters, batch / med);
        printf("%.1f GFLOP/s = %.0f %% of the measured FMA peak (%.0f GFLOP/s), peak RSS %.1f MiB\n",
               gflops, 100 * gflops / peak, peak, ru.ru_maxrss / 1024.0);
        if (cpu_bf16() && cpu_amx()) {   // the AMX unit's own pace on this host, right now
            double amx = gemm_amx_peak_gflops();
            printf("measured AMX peak: %.0f GFLOP/s per core (%.1f ns per 16x16x32 TDPBF16PS)\n",
                   amx, amx > 0 ? GEMM_AMX_TDP_FLOPS / amx : 0.0);
        }
    }
    if (!rc && prof) print_layers(&m, prof, iters);
    free(prof);
    free(times); free(spans); free(x); free(y);
    optim_free(&opt);
    model_free(&m);
    return rc;
}
