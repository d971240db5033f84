// GoogLeNet (Inception v1) in three variants, written as torchvision's GoogLeNet.forward reads:
//   googlenet        torchvision: BasicConv2d = conv (no bias) + BN(eps 1e-3) + ReLU; the
//                    "5×5" branch is a 3×3 (torchvision's kept quirk); aux: adaptive pool 4×4.
//   googlenet-paper  the paper / Caffe bvlc_googlenet: conv with bias + ReLU, LRN, true 5×5,
//                    maxpool4 3×3/2, aux: avg pool 5×5/3.
//   googlenet-naive  Fig. 2a modules: 1×1, 3×3, 5×5 convs and a 3×3/1 max pool on the same
//                    input, concatenated, no reductions — so channels and MACs explode.
#include <stdio.h>
#include <string.h>
#include "models/build.h"
#include "ops/ops.h"

typedef enum { V_TORCHVISION, V_PAPER, V_NAIVE } variant;

// in_channels is derived from the graph; these are the other six of torchvision's arguments.
typedef struct { const char *name; int ch1, ch3r, ch3, ch5r, ch5, pool_proj; } inception_spec;

static const inception_spec SPEC[] = {
    {"inception3a", 64, 96, 128, 16, 32, 32},    {"inception3b", 128, 128, 192, 32, 96, 64},
    {"inception4a", 192, 96, 208, 16, 48, 64},   {"inception4b", 160, 112, 224, 24, 64, 64},
    {"inception4c", 128, 128, 256, 24, 64, 64},  {"inception4d", 112, 144, 288, 32, 64, 64},
    {"inception4e", 256, 160, 320, 32, 128, 128}, {"inception5a", 256, 160, 320, 32, 128, 128},
    {"inception5b", 384, 192, 384, 48, 128, 128},
};

static char *cat(char *buf, const char *a, const char *b) {
    snprintf(buf, 80, "%s.%s", a, b);
    return buf;
}

// torchvision's BasicConv2d (conv without bias, BN eps 1e-3, ReLU) or, for the paper variant,
// conv with bias + ReLU, under the same key prefix (PREFIX.conv.*).
static int basic_conv(model *m, variant v, const char *prefix, int in, int K, int k, int stride,
                      int pad) {
    char p[80];
    int x = b_conv(m, cat(p, prefix, "conv"), in, K, k, stride, pad, v == V_PAPER);
    if (v != V_PAPER) x = b_bn(m, cat(p, prefix, "bn"), x, 1e-3f);
    return b_relu(m, cat(p, prefix, "relu"), x, 1);
}

static int inception(model *m, variant v, const inception_spec *s, int in) {
    char p[80];
    int br[4];
    if (v == V_NAIVE) {
        br[0] = basic_conv(m, v, cat(p, s->name, "branch1"), in, s->ch1, 1, 1, 0);
        br[1] = basic_conv(m, v, cat(p, s->name, "branch2"), in, s->ch3, 3, 1, 1);
        br[2] = basic_conv(m, v, cat(p, s->name, "branch3"), in, s->ch5, 5, 1, 2);
        br[3] = b_maxpool(m, cat(p, s->name, "branch4"), in, 3, 1, 1, 1);
    } else {
        int k5 = v == V_PAPER ? 5 : 3;
        br[0] = basic_conv(m, v, cat(p, s->name, "branch1"), in, s->ch1, 1, 1, 0);
        int x = basic_conv(m, v, cat(p, s->name, "branch2.0"), in, s->ch3r, 1, 1, 0);
        br[1] = basic_conv(m, v, cat(p, s->name, "branch2.1"), x, s->ch3, 3, 1, 1);
        x = basic_conv(m, v, cat(p, s->name, "branch3.0"), in, s->ch5r, 1, 1, 0);
        br[2] = basic_conv(m, v, cat(p, s->name, "branch3.1"), x, s->ch5, k5, 1, k5 / 2);
        x = b_maxpool(m, cat(p, s->name, "branch4.0"), in, 3, 1, 1, 1);
        br[3] = basic_conv(m, v, cat(p, s->name, "branch4.1"), x, s->pool_proj, 1, 1, 0);
    }
    return b_concat(m, s->name, br, 4);
}

static int aux_head(model *m, variant v, const char *name, int in) {
    char p[80];
    int x;
    if (v == V_PAPER) {
        // fc1 expects 128×4×4: the 14×14 maps of 224-class inputs.
        int H = m->nodes[in].H, W = m->nodes[in].W;
        if (pool_out_size(H, 5, 3, 0, 0) != 4 || pool_out_size(W, 5, 3, 0, 0) != 4)
            return b_fail(m, "googlenet-paper aux heads need a 14x14 map at %s (4x4 after the 5x5/3 "
                          "pool), got %dx%d from a %dx%d input: use --no-aux", name,
                          H, W, m->cfg.H, m->cfg.W);
        x = b_avgpool(m, cat(p, name, "pool"), in, 5, 3, 0, 0, 1);
    } else {
        x = b_adaptive_avgpool(m, cat(p, name, "adaptive_avg_pool2d"), in, 4, 4, 1);
    }
    x = basic_conv(m, v, cat(p, name, "conv"), x, 128, 1, 1, 0);
    x = b_flatten(m, cat(p, name, "flatten"), x);
    x = b_linear(m, cat(p, name, "fc1"), x, 1024, 1);
    x = b_relu(m, cat(p, name, "relu"), x, 1);
    x = b_dropout(m, cat(p, name, "dropout"), x, m->cfg.dropout_aux);
    return b_linear(m, cat(p, name, "fc2"), x, m->cfg.num_classes, 1);
}

int googlenet_build(model *m) {
    const model_config *c = &m->cfg;
    variant v = !strcmp(c->name, "googlenet-paper") ? V_PAPER
              : !strcmp(c->name, "googlenet-naive") ? V_NAIVE : V_TORCHVISION;
    int x = b_input(m, c->in_channels, c->H, c->W);
    if (c->transform_input) x = b_transform_input(m, x);
    x = basic_conv(m, v, "conv1", x, 64, 7, 2, 3);
    x = b_maxpool(m, "maxpool1", x, 3, 2, 0, 1);
    if (v == V_PAPER) x = b_lrn(m, "lrn1", x, 5, 1e-4f, 0.75f, 1.0f);
    x = basic_conv(m, v, "conv2", x, 64, 1, 1, 0);
    x = basic_conv(m, v, "conv3", x, 192, 3, 1, 1);
    if (v == V_PAPER) x = b_lrn(m, "lrn2", x, 5, 1e-4f, 0.75f, 1.0f);
    x = b_maxpool(m, "maxpool2", x, 3, 2, 0, 1);
    x = inception(m, v, &SPEC[0], x);
    x = inception(m, v, &SPEC[1], x);
    x = b_maxpool(m, "maxpool3", x, 3, 2, 0, 1);
    x = inception(m, v, &SPEC[2], x);
    if (c->aux) { b_head(m, 1); m->aux1 = aux_head(m, v, "aux1", x); b_head(m, 0); }
    x = inception(m, v, &SPEC[3], x);
    x = inception(m, v, &SPEC[4], x);
    x = inception(m, v, &SPEC[5], x);
    if (c->aux) { b_head(m, 2); m->aux2 = aux_head(m, v, "aux2", x); b_head(m, 0); }
    x = inception(m, v, &SPEC[6], x);
    x = v == V_PAPER ? b_maxpool(m, "maxpool4", x, 3, 2, 0, 1) : b_maxpool(m, "maxpool4", x, 2, 2, 0, 1);
    x = inception(m, v, &SPEC[7], x);
    x = inception(m, v, &SPEC[8], x);
    x = b_adaptive_avgpool(m, "avgpool", x, 1, 1, 0);
    x = b_flatten(m, "flatten", x);
    x = b_dropout(m, "dropout", x, c->dropout);
    m->logits = b_linear(m, "fc", x, c->num_classes, 1);
    return m->build_failed ? -1 : 0;
}
