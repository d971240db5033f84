// Closed forms of PyTorch's schedulers (see schedule.h), evaluated in double like Python.
#include "train/schedule.h"
#include "util/err.h"
#include <math.h>
#include <string.h>

static const char *const kind_names[] = {"constant", "step", "cosine", "poly"};

void schedule_default(schedule *s, int kind, double base_lr, int epochs) {
    memset(s, 0, sizeof *s);
    s->kind = kind;
    s->base_lr = base_lr;
    s->epochs = epochs;
    s->step_size = 30;
    s->gamma = 0.1;
    s->power = 1.0;
    s->warmup_start_factor = 1.0 / 3;
}

int schedule_kind_parse(const char *name) {
    for (int k = 0; k < 4; k++)
        if (!strcmp(name, kind_names[k])) return k;
    return err_set("unknown lr schedule '%s' (expected constant, step, cosine or poly)", name);
}

const char *schedule_kind_name(int kind) {
    return kind >= 0 && kind < 4 ? kind_names[kind] : "?";
}

int schedule_check(const schedule *s) {
    if (s->kind < 0 || s->kind > SCHED_POLY) return err_set("lr schedule: unknown kind %d", s->kind);
    if (!(s->base_lr >= 0 && isfinite(s->base_lr)))
        return err_set("lr schedule: learning rate %g must be finite and >= 0", s->base_lr);
    if (s->epochs < 1) return err_set("lr schedule: epochs %d < 1", s->epochs);
    if (s->warmup < 0) return err_set("lr schedule: warmup %d < 0", s->warmup);
    if (s->warmup > 0 && !(s->warmup_start_factor > 0 && s->warmup_start_factor <= 1))
        return err_set("lr schedule: warmup start factor %g outside (0, 1]",
                       s->warmup_start_factor);
    switch (s->kind) {
    case SCHED_STEP:
        if (s->step_size < 1) return err_set("lr schedule: step size %d < 1", s->step_size);
        if (!(s->gamma > 0)) return err_set("lr schedule: gamma %g must be > 0", s->gamma);
        break;
    case SCHED_COSINE:
    case SCHED_POLY:
        if (s->warmup >= s->epochs)
            return err_set("lr schedule: %s decay needs warmup (%d) < epochs (%d)",
                           kind_names[s->kind], s->warmup, s->epochs);
        if (s->kind == SCHED_COSINE && !(s->eta_min >= 0))
            return err_set("lr schedule: eta_min %g < 0", s->eta_min);
        if (s->kind == SCHED_POLY && !(s->power >= 0))
            return err_set("lr schedule: power %g < 0", s->power);
        break;
    }
    return 0;
}

double schedule_lr(const schedule *s, int step, int steps_per_epoch) {
    const long spe = steps_per_epoch > 0 ? steps_per_epoch : 1;
    const long scale = s->per_step ? spe : 1;           // units per epoch
    const long t = s->per_step ? step : step / spe;     // position in units
    const long W = s->warmup * scale;
    const double base = s->base_lr;
    if (t < W)  // LinearLR closed form; at t = W it would reach base, where main takes over
        return base * (s->warmup_start_factor + (1.0 - s->warmup_start_factor) * (double)t / W);
    const long u = t - W;
    const long T = (long)(s->epochs - s->warmup) * scale;
    switch (s->kind) {
    case SCHED_STEP:
        return base * pow(s->gamma, (double)(u / (s->step_size * scale)));
    case SCHED_COSINE:
        return s->eta_min + (base - s->eta_min) * (1 + cos(M_PI * (double)(u < T ? u : T) / T)) / 2;
    case SCHED_POLY:
        return base * pow(1.0 - (double)(u < T ? u : T) / T, s->power);
    default:
        return base;
    }
}
