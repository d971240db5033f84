// Training curves as a PNG: two panels side by side, loss vs epoch and accuracy (%) vs epoch,
// each with the train and the test curve, axes, ticks, grid, axis labels, a legend and a title.
#pragma once

// Image size and line colours (RGB), fixed so that tests and users know what to expect.
#define PLOT_WIDTH 1280
#define PLOT_HEIGHT 600
#define PLOT_TRAIN_RGB 31, 119, 180   // blue
#define PLOT_TEST_RGB 255, 127, 14    // orange

typedef struct {
    int n_epochs;               // points per curve; epoch e (1-based) is element e-1
    const float *train_loss;    // [n_epochs] each; a non-finite value leaves a gap.
    const float *test_loss;     // Either curve of a pair may be NULL (then it is not drawn
    const float *train_acc;     // and has no legend entry).
    const float *test_acc;      // accuracies in percent, 0..100
    const char *title;          // NULL: "Training curves"; non-ASCII characters become '?'
} curve_data;

// Draws the curves and writes the PNG atomically (temp file, fsync, rename).
// Returns 0, or -1 with err_set() naming the path and the problem.
int plot_curves(const char *png_path, const curve_data *d);
