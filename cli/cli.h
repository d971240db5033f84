// Shared command-line helpers for the verbs in cli/*.c. Every problem is one line on stderr
// ("incept: ..."): usage errors return 2, bad input 1.
#pragma once
#include <stdint.h>
#include "models/model.h"

int cli_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));   // prints, returns 2
int cli_fail(void);                                   // prints err_msg(), returns 1
int cli_int(const char *flag, const char *s, long lo, long hi, int *out);    // 0 or 2
int cli_float(const char *flag, const char *s, double lo, double hi, float *out);
int cli_u64(const char *flag, const char *s, uint64_t *out);
// argv[2] must name a model: fills cfg with its defaults. 0 or 2.
int cli_model_name(model_config *cfg, int argc, char **argv);
// If argv[*i] is a model option (--num-classes, --in-channels, --dropout, --dropout-aux,
// --no-aux, --transform-input), applies it, advances *i past its value and returns 1;
// returns 0 if it is not one; 2 after a usage error. *set_in_channels (may be NULL) is set
// when --in-channels was given.
int cli_model_option(model_config *cfg, int argc, char **argv, int *i, int *set_in_channels);
extern const char *const CLI_MODEL_OPTIONS;   // usage text of the options above
// How products run after --bf16, for report lines: "", ", bfloat16 products on AMX" or
// ", bfloat16 products (float32 kernels)".
const char *cli_bf16_note(void);

// The verbs implemented outside incept.c.
int cmd_train(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_predict(int argc, char **argv);
int cmd_bench(int argc, char **argv);
