// Training, evaluation and checkpoints: the engine behind `incept train`, `eval` and `predict`.
//
// A run lives in one directory: metrics.csv, curves.png, last.safetensors, best.safetensors,
// confusion.csv and args.txt. A checkpoint holds the model's tensors under torchvision's keys,
// the training state as extra tensors named "incept.*" (optimiser buffers and step, epochs
// done, best accuracy, the metrics history) and the whole configuration as metadata strings
// (model options, data source, preprocessing, class names, optimiser, schedule, seed).
//
// Exact resume: every random stream of an epoch (shuffle, augmentation, dropout) is seeded
// from (seed, epoch) when the epoch starts, so the state at an epoch boundary is only the
// weights, BN statistics and counters, optimiser state and step, and the history. Resuming
// from last.safetensors therefore continues bit for bit as if the run had never stopped
// (same machine, same thread count).
//
// Like all library code this never prints: progress goes to a callback, failures are one
// err_set() line naming the file or the step.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "data/data.h"
#include "io/safetensors.h"
#include "models/model.h"
#include "train/optim.h"
#include "train/schedule.h"

typedef struct {
    model_config model;       // name and options; num_classes, in_channels, H, W are resolved
                              // by trainer_open from the fields below and the data set
    char data[1024];          // data source, as dataset_load() takes it
    int folder_size;          // folder sets: stored image size (<= 0: DATASET_FOLDER_SIZE)
    int image_size;           // network input size (<= 0: train_default_image_size())
    int in_channels;          // <= 0: the data set's channel count
    int num_classes;          // <= 0: the data set's class count (else it must match)
    int augment;              // the data set's default augmentation (data.h) on or off
    float random_erasing;     // > 0: RandomErasing with this probability (augment must be on)
    int limit_train;          // > 0: train on the first N training samples only
    int limit_test;           // > 0: evaluate on the first N test samples only
    int epochs;
    int batch_size;           // training; the last partial batch of an epoch is dropped
    int eval_batch_size;      // <= 0: batch_size
    float label_smoothing;    // of the optimised loss (reported losses are plain CE)
    int precise_bn;           // > 0: before the last epoch's evaluation, batch norm's running
                              // statistics become averages over this many batches (bn_recompute)
    int bf16;                 // products in bfloat16 (cpu_bf16_set), set for the process by
                              // trainer_open/trainer_resume; everything else stays float32
    double time_budget;       // > 0: seconds for the whole run, counted from trainer_open (or
                              // trainer_resume). `epochs` is then a ceiling: when the warmup ends
                              // (budget_epoch()) the run's length becomes the epochs that fit, as
                              // if given as --epochs from the start, and this becomes 0. Should
                              // later epochs slow down so that the rest no longer fits, `epochs`
                              // is lowered to what fits (budget_guard)
    optim_config optim;
    schedule sched;           // sched.base_lr is the learning rate, sched.epochs = epochs
    uint64_t seed;
} train_config;

// The largest values the CLI takes (and a checkpoint's metadata may hold).
enum { TRAIN_MAX_EPOCHS = 1 << 20, TRAIN_MAX_BATCH = 1 << 16, TRAIN_MAX_PRECISE_BN = 1 << 20 };

// The run's lengths and sizes in range (epochs, batch sizes, label smoothing, precise BN,
// time budget): 0, or -1 with one line naming the option.
int train_config_check(const train_config *c);

// The recipe for MODEL (see the README): 15 epochs, SGD momentum 0.9 nesterov, weight decay
// 5e-4 without decay on BN and biases, lr 0.05 cosine per step after one epoch of linear warmup
// from 0.1x, batch 128, label smoothing 0.1, augmentation on. -1 if the model name is unknown.
int train_config_default(train_config *cfg, const char *model_name);
// Network input size when none is asked for: 32 for 28x28 sets (GoogLeNet's stem needs room),
// the stored size for the others, 224 for folders.
int train_default_image_size(const dataset *d);

// One row of metrics.csv (accuracies in percent).
typedef struct {
    double epoch, lr, train_loss, train_acc, test_loss, test_acc1, test_acc5, images_per_s, seconds;
} metrics_row;
#define METRICS_COLS 9
#define METRICS_HEADER "epoch,lr,train_loss,train_acc,test_loss,test_acc1,test_acc5,images_per_s,seconds"

// Evaluation of a model on a data set (eval mode, every sample).
typedef struct {
    int n, K;
    double loss;              // mean cross-entropy of the main head, no label smoothing
    long long correct1, correct5;   // top-1 / top-min(5,K) hits; a tie with the target counts
    int64_t *confusion;       // K*K counts, row = true class, column = predicted (argmax)
} eval_result;

enum { PHASE_TRAIN, PHASE_EVAL };
typedef struct {
    int phase;                // PHASE_TRAIN or PHASE_EVAL
    int epoch, epochs;        // 1-based epoch being run (0 in stand-alone evaluation)
    int step, steps;          // batches done, batches in this phase
    double loss, acc;         // running means over the phase so far (acc in percent)
    double images_per_s;      // so far in this phase
    double elapsed;           // seconds since the phase started
} train_progress;
typedef void (*train_progress_fn)(void *ctx, const train_progress *p);

// Evaluates with batches of up to `batch` samples (the last one is padded, model_prepare is
// called once). flip_tta: test-time augmentation, each image scored by the mean of the softmax
// probabilities of it and its mirror image (the loss is then -log of that mean). progress may
// be NULL. -1 on failure (r is then empty).
int  evaluate(model *m, const dataset *d, const preprocess *p, int batch, int flip_tta,
              eval_result *r, train_progress_fn progress, void *ctx);
void eval_result_free(eval_result *r);
// confusion.csv: a header row of predicted class names, then one row per true class.
int  confusion_write_csv(const char *path, const eval_result *r, char *const *class_names);

// What a checkpoint's metadata says.
typedef struct {
    train_config cfg;         // as resolved at the start of the run
    preprocess pre;           // the exact preprocessing of eval batches (and training)
    int resize;               // predict: image_load's `resize` reproducing the eval pipeline
    char data_name[16];       // dataset.name of the source
    char **classes; int n_classes;
} ckpt_meta;
// 1 if f carries incept's training metadata (meta filled), 0 if it holds plain weights
// (meta untouched), -1 (err_set naming path and key) if the metadata is malformed.
int  ckpt_meta_read(ckpt_meta *meta, const st_file *f, const char *path);
void ckpt_meta_free(ckpt_meta *meta);
// The metadata strings that describe meta (what ckpt_meta_read reads back exactly: numbers are
// written with enough digits to round-trip). Arrays and strings are malloc'd.
int  ckpt_meta_strings(const ckpt_meta *meta, char ***keys, char ***vals, int *n);
void ckpt_meta_strings_free(char **keys, char **vals, int n);

typedef struct {
    train_config cfg;
    char run_dir[1024];
    dataset train, test;
    preprocess pre;
    int resize;
    model m;
    optim opt;
    param_span *spans; int n_spans;
    int steps_per_epoch;
    int epoch;                // epochs completed
    double best_acc1; int best_epoch;
    metrics_row *rows;        // one per completed epoch
    eval_result last_eval;    // of the latest epoch
    float *x, *ce_probs;      // batch input, scratch for the reported loss
    int64_t *y;
    int *order;               // training sample order of the current epoch
    double t_start;           // clock_now_s() when trainer_open/trainer_resume began
    int budget_decided;       // the epoch after which time_budget fixed `epochs` (0: none)
    double budget_limit;      // that budget, kept for budget_guard in this process (not in the
                              // checkpoints: a resumed run keeps its length)
    int budget_ceiling;       // --epochs as given with the budget: the guard lengthens to no more
} trainer;

// A new run into run_dir (NULL: runs/<model>-<data>-<YYYYmmdd-HHMMSS>). Loads the data, builds
// and initialises the model (from init_weights when not NULL, else from cfg->seed), and only
// then creates the directory and writes args.txt (`command` + the resolved configuration).
// Refuses a directory that already holds a run. On failure nothing is left behind.
int  trainer_open(trainer *t, const train_config *cfg, const char *run_dir,
                  const char *init_weights, const char *command);
// The epoch after which a time budget fixes the run's length: the last warmup epoch (the
// learning rate before it does not depend on the length), at least 1.
int  budget_epoch(const train_config *cfg);
// Continues the run in run_dir from its last.safetensors. epochs > 0 changes the run's length
// (the schedule is then recomputed, so the result differs from an uninterrupted run).
int  trainer_resume(trainer *t, const char *run_dir, int epochs, const char *command);
// Trains epoch t->epoch + 1, evaluates it and writes last.safetensors (best.safetensors when
// the test top-1 improves), metrics.csv, curves.png and confusion.csv, in that order, each
// atomically. A non-finite loss stops it with -1 and a message naming the epoch and step;
// nothing of that epoch is written.
int  trainer_epoch(trainer *t, train_progress_fn progress, void *ctx);
void trainer_close(trainer *t);

// Writes data[0..len) to path atomically (PATH.tmp.<pid>, fflush, fsync, rename).
int  file_write_atomic(const char *path, const void *data, size_t len);
