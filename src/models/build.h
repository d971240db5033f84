// Graph-building primitives used by the network definitions (googlenet.c, vgg.c). Each adds one
// node, computes its output shape, registers its tensors under torchvision's keys and returns
// the node id. A shape that collapses below 1×1 records an error (first one wins) that
// model_build() reports, so definitions read as straight-line code without checks.
#pragma once
#include "models/model.h"

int b_input(model *m, int C, int H, int W);
int b_transform_input(model *m, int in);
int b_conv(model *m, const char *path, int in, int K, int k, int stride, int pad, int bias);
int b_bn(model *m, const char *path, int in, float eps);
int b_relu(model *m, const char *path, int in, int functional);
int b_maxpool(model *m, const char *path, int in, int k, int stride, int pad, int ceil_mode);
int b_avgpool(model *m, const char *path, int in, int k, int stride, int pad, int ceil_mode,
              int count_include_pad);
int b_adaptive_avgpool(model *m, const char *path, int in, int OH, int OW, int functional);
int b_lrn(model *m, const char *path, int in, int size, float alpha, float beta, float k);
int b_linear(model *m, const char *path, int in, int out, int bias);
int b_dropout(model *m, const char *path, int in, float p);
int b_concat(model *m, const char *path, const int *ins, int n);
int b_flatten(model *m, const char *path, int in);
// Subsequent nodes belong to head h (0 main, 1/2 aux).
void b_head(model *m, int h);
// Records a build error (printf-style) unless one is recorded already; returns -1.
int b_fail(model *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Network definitions.
int googlenet_build(model *m);   // googlenet, googlenet-paper, googlenet-naive
int vgg_build(model *m);         // vgg11 … vgg19_bn
