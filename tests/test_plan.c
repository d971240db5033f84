// The arena plan (src/models/plan.c) of every model, batch size, kernel path and kind of pass:
// slots whose lifetimes overlap never share memory, every slot fits in the arena and has its
// node's size, and each slot a node touches (node_uses_of) is alive at that step. (That the
// executor touches nothing else is tested end to end: tests/test_models.py, INCEPT_ARENA.)
#include "models/plan.h"
#include <stdio.h>
#include <string.h>
#include "util/err.h"

#include "tap.h"

static int alive(const model_slot *s, int step) {
    return s->floats && s->first <= step && step <= s->last;
}

// Checks one plan; returns the first problem found, or NULL.
static const char *check(const model *m, int flags, char *why, size_t cap) {
    const int n = m->n_nodes;
    for (int i = 0; i < n; i++) {
        const model_node *a = &m->nodes[i];
        const model_slot *sa[3] = {&a->act, &a->dact, &a->argmax};
        for (int k = 0; k < 3; k++) {
            if (!sa[k]->floats) continue;
            if (sa[k]->off + sa[k]->floats > m->plan_floats || sa[k]->off % 16 ||
                sa[k]->floats < (size_t)m->N * a->C * a->H * a->W) {
                snprintf(why, cap, "%s slot %d: [%zu, +%zu) outside the arena of %zu or misshaped",
                         a->path, k, sa[k]->off, sa[k]->floats, m->plan_floats);
                return why;
            }
            for (int j = i; j < n; j++) {
                const model_node *b = &m->nodes[j];
                const model_slot *sb[3] = {&b->act, &b->dact, &b->argmax};
                for (int l = j == i ? k + 1 : 0; l < 3; l++) {
                    const model_slot *x = sa[k], *y = sb[l];
                    if (!y->floats || x->last < y->first || y->last < x->first) continue;
                    if (x->off < y->off + y->floats && y->off < x->off + x->floats) {
                        snprintf(why, cap, "%s slot %d and %s slot %d are alive together "
                                 "and overlap", a->path, k, b->path, l);
                        return why;
                    }
                }
            }
        }
    }
    for (int i = 0; i < n; i++) {
        node_uses u;
        node_uses_of(m, i, flags, &u);
        if (!u.runs) continue;
        const int f = plan_fwd_step(i), b = plan_bwd_step(m, i);
        int ok = u.fwd_out < 0 || alive(&m->nodes[u.fwd_out].act, f);
        for (int j = 0; j < u.n_fwd_in; j++) ok &= alive(&m->nodes[u.fwd_in[j]].act, f);
        if (u.argmax) ok &= alive(&m->nodes[i].argmax, f) && alive(&m->nodes[i].argmax, b);
        for (int j = 0; j < u.n_bwd_act; j++) ok &= alive(&m->nodes[u.bwd_act[j]].act, b);
        if (u.bwd_dout >= 0) ok &= alive(&m->nodes[u.bwd_dout].dact, b);
        for (int j = 0; j < u.n_bwd_din; j++) ok &= alive(&m->nodes[u.bwd_din[j]].dact, b);
        if (!ok) {
            snprintf(why, cap, "%s touches a slot outside its lifetime", m->nodes[i].path);
            return why;
        }
    }
    return NULL;
}

int main(void) {
    char why[256];
    for (int t = 0; model_names[t]; t++) {
        model_config cfg;
        model_config_init(&cfg, model_names[t]);
        if (!strcmp(cfg.name, "googlenet-naive")) cfg.H = cfg.W = 96;   // small: many configs
        model m;
        if (model_build(&m, &cfg)) {
            result(0, "plan %s: %s", cfg.name, err_msg());
            continue;
        }
        const char *bad = NULL;
        double shared[2] = {0}, separate[2] = {0};
        for (int N = 1; N <= 3 && !bad; N += 2) {
            if (model_prepare(&m, N)) {
                bad = err_msg();
                break;
            }
            for (int ref = 0; ref < 2 && !bad; ref++)
                for (int flags = 0; flags < 4 && !bad; flags++) {
                    m.reference = ref;
                    for (int mode = ARENA_SEPARATE; mode >= ARENA_SHARED && !bad; mode--) {
                        m.arena_mode = mode;
                        m.plan_flags = -1;   // plan again
                        if (model_plan(&m, flags)) {
                            bad = err_msg();
                            break;
                        }
                        bad = check(&m, flags, why, sizeof why);
                        if (N == 1 && !ref && (flags == 0 || flags == 3))
                            (mode == ARENA_SHARED ? shared : separate)[flags == 3] =
                                m.plan_floats * 4.0 / 1048576;
                    }
                }
        }
        result(!bad, "plan %s: 2 batch sizes x 2 kernel paths x 4 kinds of pass x shared/separate "
               "(batch 1: inference %.1f MiB of %.1f, training %.1f of %.1f)%s%s", cfg.name,
               shared[0], separate[0], shared[1], separate[1], bad ? ": " : "", bad ? bad : "");
        model_free(&m);
    }
    return failed != 0;
}
