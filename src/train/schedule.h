// Learning-rate schedules, the closed forms of torch.optim.lr_scheduler (torch 1.13):
//
//   warmup (optional): LinearLR(start_factor=f, end_factor=1, total_iters=W) for t < W, then the
//   main schedule restarted at u = t - W, exactly as SequentialLR([warmup, main], milestones=[W]):
//     constant: base                                           (ConstantLR factor 1)
//     step:     base * gamma^floor(u / step_size)              (StepLR)
//     cosine:   eta_min + (base - eta_min) * (1 + cos(pi u/T)) / 2   (CosineAnnealingLR, T_max=T)
//     poly:     base * (1 - min(u, T)/T)^power                 (PolynomialLR, total_iters=T)
//   with T = epochs - warmup: the decay ends with the run. Past T, cosine stays at eta_min
//   (PyTorch's would rise again; a run never gets there).
//
// Lengths (epochs, warmup, step_size) are always given in epochs. The position t is
//   per_step = 0: the epoch index, step / steps_per_epoch (the lr changes once per epoch, like
//                 calling scheduler.step() after every epoch);
//   per_step = 1: the optimiser step index itself, with every length multiplied by
//                 steps_per_epoch (like calling scheduler.step() after every batch).
#pragma once

enum { SCHED_CONSTANT, SCHED_STEP, SCHED_COSINE, SCHED_POLY };

typedef struct {
    int kind;                    // SCHED_*
    double base_lr;              // the optimiser's lr (PyTorch's initial_lr)
    int epochs;                  // length of the whole run
    int step_size;               // step: decay period (epochs)
    double gamma;                // step: decay factor
    double eta_min;              // cosine: final lr
    double power;                // poly: exponent
    int warmup;                  // warmup length in epochs (0: none)
    double warmup_start_factor;  // warmup: lr factor at t = 0, in (0, 1]
    int per_step;                // see above
} schedule;

// Defaults: step_size 30, gamma 0.1, eta_min 0, power 1, no warmup (start factor 1/3, as
// LinearLR's default, should one be set), per-epoch.
void schedule_default(schedule *s, int kind, double base_lr, int epochs);
// "constant", "step", "cosine", "poly" -> SCHED_*; -1 with err_set() otherwise.
int schedule_kind_parse(const char *name);
const char *schedule_kind_name(int kind);
// 0 if usable, else -1 with err_set() naming the bad field.
int schedule_check(const schedule *s);
// The lr for optimiser step `step` (0-based, counted over the whole run).
double schedule_lr(const schedule *s, int step, int steps_per_epoch);
