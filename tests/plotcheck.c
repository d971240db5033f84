// Test helper for tests/test_plot.py (not run by the runner itself).
//   plotcheck OUT.png [--title T] [--no-test] < DATA
// DATA: one line per epoch, "train_loss test_loss train_acc test_acc" ("nan" allowed).
// --no-test draws the train curves only. Exit 1 with the error line on failure.
#include "train/plot.h"
#include "util/err.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: plotcheck OUT.png [--title T] [--no-test] < DATA\n");
        return 1;
    }
    const char *title = NULL;
    int no_test = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--title") && i + 1 < argc) title = argv[++i];
        else if (!strcmp(argv[i], "--no-test")) no_test = 1;
        else {
            fprintf(stderr, "plotcheck: unknown option %s\n", argv[i]);
            return 1;
        }
    }
    int cap = 16, n = 0;
    float *v = malloc(sizeof(float) * 4 * cap);
    float r[4];
    while (scanf("%f %f %f %f", &r[0], &r[1], &r[2], &r[3]) == 4) {
        if (n == cap) v = realloc(v, sizeof(float) * 4 * (cap *= 2));
        memcpy(v + 4 * n++, r, sizeof r);
    }
    float *cols = malloc(sizeof(float) * 4 * (n ? n : 1));   // column-major: 4 curves
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) cols[k * n + i] = v[4 * i + k];
    curve_data d = {n, cols, no_test ? NULL : cols + n, cols + 2 * n, no_test ? NULL : cols + 3 * n,
                    title};
    int rc = plot_curves(argv[1], &d);
    if (rc) fprintf(stderr, "plotcheck: %s\n", err_msg());
    free(v);
    free(cols);
    return rc ? 1 : 0;
}
