// Arena planning for the executor (internal to src/models).
//
// A pass is a timeline of steps: forward of node i is step i, backward of node i is step
// 2n-1-i (n = number of nodes). node_uses() says which arena slots a node's forward and
// backward touch with the kernels in use (graph.c, next to the executor that does the
// touching); model_plan() turns that into each slot's lifetime and places the slots in one
// arena so that slots alive at the same time never share memory.
#pragma once
#include "models/model.h"

typedef struct {
    int runs;                               // the node runs in this pass
    int fwd_in[NODE_MAX_IN], n_fwd_in;      // nodes whose output its forward reads
    int fwd_out;                            // node whose output slot its forward writes, or -1
    int fwd_extra[MODEL_MAX_MERGE], n_fwd_extra;  // further slots it writes (merged convs)
    int argmax;                             // its forward writes an argmax that backward reads
    int fwd_argmax;                         // node whose argmax its forward writes (a BN that
                                            // computes the max pool after it), or -1
    int bwd_act[2], n_bwd_act;              // nodes whose output its backward reads
    int bwd_dout;                           // node whose gradient its backward reads, or -1
    int bwd_dout_extra[MODEL_MAX_MERGE], n_bwd_dout_extra;  // further ones (merged convs)
    int bwd_din[NODE_MAX_IN], n_bwd_din;    // nodes whose gradient its backward adds to
} node_uses;

// What node i touches in a pass with these MODEL_* flags (backward only with MODEL_GRAD).
void node_uses_of(const model *m, int i, int flags, node_uses *u);

static inline int plan_fwd_step(int i) { return i; }
static inline int plan_bwd_step(const model *m, int i) { return 2 * m->n_nodes - 1 - i; }

// Lays out the arena for batch m->N and these flags (no-op if the current plan is for them),
// growing m->arena if needed. -1 (err_set) if it does not fit in memory.
int model_plan(model *m, int flags);
