// Arena planning (see plan.h): lifetimes from node_uses(), then placement.
//
// Placement is greedy by size (largest slot first), each slot at the lowest offset where it
// overlaps no already placed slot whose lifetime overlaps its own. Inference then needs about
// two or three layers' worth of activations; training keeps what backward reads until backward
// has read it, and the activation gradients, which live only from their consumers' backward to
// their own, reuse the memory of activations backward has finished with.
#include "models/plan.h"
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include "util/err.h"
#include "util/mem.h"

// Slots start 64-byte aligned (whole cache lines, aligned vector loads).
static size_t round16(size_t n) { return (n + 15) & ~(size_t)15; }

static void touch(model_slot *s, int step) {
    if (step < s->first) s->first = step;
    if (step > s->last) s->last = step;
}

static int overlap(const model_slot *a, const model_slot *b) {
    return a->first <= b->last && b->first <= a->last;
}

static int by_size_desc(const void *pa, const void *pb) {
    const model_slot *a = *(model_slot *const *)pa, *b = *(model_slot *const *)pb;
    if (a->floats != b->floats) return a->floats < b->floats ? 1 : -1;
    if (a->first != b->first) return a->first < b->first ? -1 : 1;
    return a < b ? -1 : a > b;   // slots live in one array: a fixed tie-break
}

static int by_offset(const void *pa, const void *pb) {
    const model_slot *a = *(model_slot *const *)pa, *b = *(model_slot *const *)pb;
    return (a->off > b->off) - (a->off < b->off);
}

// Places slots[0..n) (sorted largest first); returns the arena size in floats.
static size_t place(model_slot **slots, int n, int separate, model_slot **scratch) {
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        model_slot *s = slots[i];
        size_t off = 0;
        if (separate) {
            off = total;
        } else {
            int k = 0;
            for (int j = 0; j < i; j++)
                if (overlap(s, slots[j])) scratch[k++] = slots[j];
            qsort(scratch, (size_t)k, sizeof *scratch, by_offset);
            for (int j = 0; j < k && scratch[j]->off < off + s->floats; j++)
                if (scratch[j]->off + scratch[j]->floats > off) off = scratch[j]->off + scratch[j]->floats;
        }
        s->off = off;
        if (off + s->floats > total) total = off + s->floats;
    }
    return total;
}

int model_plan(model *m, int flags) {
    if (m->plan_flags == flags) return 0;
    const int n = m->n_nodes, grad = flags & MODEL_GRAD;
    const model_slot unused = {0, 0, INT_MAX, -1};
    for (int i = 0; i < n; i++) m->nodes[i].act = m->nodes[i].dact = m->nodes[i].argmax = unused;
    for (int i = 0; i < n; i++) {
        node_uses u;
        node_uses_of(m, i, flags, &u);
        if (!u.runs) continue;
        model_node *nd = m->nodes;
        const int f = plan_fwd_step(i), b = plan_bwd_step(m, i);
        if (u.fwd_out >= 0) touch(&nd[u.fwd_out].act, f);
        for (int j = 0; j < u.n_fwd_extra; j++) touch(&nd[u.fwd_extra[j]].act, f);
        for (int j = 0; j < u.n_fwd_in; j++) touch(&nd[u.fwd_in[j]].act, f);
        if (u.argmax) { touch(&nd[i].argmax, f); touch(&nd[i].argmax, b); }
        if (u.fwd_argmax >= 0) touch(&nd[u.fwd_argmax].argmax, f);
        for (int j = 0; j < u.n_bwd_act; j++) touch(&nd[u.bwd_act[j]].act, b);
        if (u.bwd_dout >= 0) touch(&nd[u.bwd_dout].dact, b);
        for (int j = 0; j < u.n_bwd_dout_extra; j++) touch(&nd[u.bwd_dout_extra[j]].dact, b);
        for (int j = 0; j < u.n_bwd_din; j++) touch(&nd[u.bwd_din[j]].dact, b);
    }
    // Outputs are read by the caller after the pass (and after backward: the trainer's
    // accuracy); their gradients are written by the caller before backward starts.
    const int outs[3] = {m->logits, m->aux1, m->aux2};
    for (int h = 0; h < 3; h++) {
        if (outs[h] < 0 || m->nodes[outs[h]].act.last < 0) continue;
        touch(&m->nodes[outs[h]].act, 2 * n);
        if (grad) touch(&m->nodes[outs[h]].dact, n);
    }
    model_slot **slots = malloc((size_t)6 * n * sizeof *slots), **scratch = slots + 3 * n;
    if (!slots) return err_set("out of memory planning the arena");
    int ns = 0;
    for (int i = 0; i < n; i++) {
        model_node *nd = &m->nodes[i];
        model_slot *s3[3] = {&nd->act, &nd->dact, &nd->argmax};
        for (int k = 0; k < 3; k++) {
            if (s3[k]->last < 0) continue;
            s3[k]->floats = round16((size_t)m->N * nd->C * nd->H * nd->W);
            slots[ns++] = s3[k];
        }
    }
    qsort(slots, (size_t)ns, sizeof *slots, by_size_desc);
    size_t need = place(slots, ns, m->arena_mode == ARENA_SEPARATE, scratch);
    free(slots);
    if (need > m->arena_floats) {
        free(m->arena);
        m->arena = mem_alloc(need * sizeof(float));
        m->arena_floats = m->arena ? need : 0;
        if (!m->arena) {
            m->plan_flags = -1;
            return err_set("out of memory: the activations of batch %d need %.1f MiB", m->N,
                           need * 4.0 / 1048576);
        }
    }
    m->plan_floats = need;
    m->plan_flags = flags;
    return 0;
}
