// torchvision's VGG built from the config lists (Simonyan & Zisserman, Table 1): a number is a
// 3×3/1 pad 1 conv with bias (+ BatchNorm eps 1e-5 for _bn) + ReLU, M a 2×2/2 max pool;
// features.<i> keys follow the nn.Sequential index exactly as torchvision's make_layers does.
#include <stdio.h>
#include <string.h>
#include "models/build.h"

#define M_ (-1)
static const int CFG_A[] = {64, M_, 128, M_, 256, 256, M_, 512, 512, M_, 512, 512, M_, 0};
static const int CFG_B[] = {64, 64, M_, 128, 128, M_, 256, 256, M_, 512, 512, M_, 512, 512, M_, 0};
static const int CFG_D[] = {64, 64, M_, 128, 128, M_, 256, 256, 256, M_, 512, 512, 512, M_,
                            512, 512, 512, M_, 0};
static const int CFG_E[] = {64, 64, M_, 128, 128, M_, 256, 256, 256, 256, M_, 512, 512, 512, 512,
                            M_, 512, 512, 512, 512, M_, 0};

int vgg_build(model *m) {
    const model_config *c = &m->cfg;
    int depth = 0, bn = strstr(c->name, "_bn") != NULL;
    sscanf(c->name, "vgg%d", &depth);
    const int *cfg = depth == 11 ? CFG_A : depth == 13 ? CFG_B : depth == 16 ? CFG_D : CFG_E;
    int x = b_input(m, c->in_channels, c->H, c->W), i = 0;
    char p[80];
    for (const int *v = cfg; *v; v++) {
        if (*v == M_) {
            snprintf(p, sizeof p, "features.%d", i++);
            x = b_maxpool(m, p, x, 2, 2, 0, 0);
            continue;
        }
        snprintf(p, sizeof p, "features.%d", i++);
        x = b_conv(m, p, x, *v, 3, 1, 1, 1);
        if (bn) {
            snprintf(p, sizeof p, "features.%d", i++);
            x = b_bn(m, p, x, 1e-5f);
        }
        snprintf(p, sizeof p, "features.%d", i++);
        x = b_relu(m, p, x, 0);
    }
    x = b_adaptive_avgpool(m, "avgpool", x, 7, 7, 0);
    x = b_flatten(m, "flatten", x);
    x = b_linear(m, "classifier.0", x, 4096, 1);
    x = b_relu(m, "classifier.1", x, 0);
    x = b_dropout(m, "classifier.2", x, c->dropout);
    x = b_linear(m, "classifier.3", x, 4096, 1);
    x = b_relu(m, "classifier.4", x, 0);
    x = b_dropout(m, "classifier.5", x, c->dropout);
    m->logits = b_linear(m, "classifier.6", x, c->num_classes, 1);
    return m->build_failed ? -1 : 0;
}
