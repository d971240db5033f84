// Data sets, preprocessing and augmentation for training and inference.
//
// A data set split is held fully decoded in memory as uint8 pixels (N x C x H x W, C = 1 or 3).
// Batches are assembled from it on the fly: choose a region of each stored image (the whole
// image, a centre box, a random padded crop or a RandomResizedCrop box), resize it with
// bilinear interpolation to the network input size, maybe flip it, scale to [0, 1] and
// normalise per channel. The maths is torchvision's (ToTensor -> Pad/RandomCrop or
// RandomResizedCrop -> Resize -> RandomHorizontalFlip -> Normalize, with
// F.interpolate(mode="bilinear", align_corners=False, antialias=False)).
//
// Typical use (train loop):
//   dataset tr, te;
//   if (dataset_load(&tr, &te, "fashion-mnist", 0)) die(err_msg());
//   preprocess p;
//   if (preprocess_default(&p, &tr, 32, 0, 1)) die(err_msg());   // 32x32, augmented
//   int *idx = malloc(tr.n * sizeof *idx); for (i...) idx[i] = i;
//   indices_shuffle(idx, tr.n, &r);
//   batch_make(x, y, &tr, idx + b * B, B, &p, &r, 1);            // x: B*out_C*out_H*out_W
//   ... eval: batch_make(x, y, &te, idx, B, &p, NULL, 0);        // no randomness used
//   dataset_free(&tr); dataset_free(&te);
//
// Every function that can fail returns -1 with one err_set() line naming the file and the
// problem; none prints or exits.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "util/rng.h"

// Folder images are stored resized so that their shorter side is this many pixels and then
// centre-cropped to a square (torchvision Resize(S) + CenterCrop(S)), unless told otherwise.
#define DATASET_FOLDER_SIZE 256

typedef struct {
    char name[16];          // "fashion-mnist", "mnist", "cifar10" or "folder"
    int n, C, H, W;         // n images of C x H x W (C = 1 or 3)
    uint8_t *pixels;        // n*C*H*W bytes, image i at pixels + i*C*H*W, planar CHW
    int64_t *labels;        // n labels in [0, n_classes)
    int n_classes;
    char **class_names;     // n_classes strings
    float mean[3], std[3];  // the set's normalisation per channel on [0,1] pixels: the usual
                            // published values for the named sets, computed from the
                            // training split for folders (same values in both splits)
} dataset;

// Loads the training and test splits of SOURCE (either pointer may be NULL to skip a split):
//   "fashion-mnist" / "fashion-mnist:DIR"  IDX files (train-images-idx3-ubyte[.gz],
//   "mnist" / "mnist:DIR"                   train-labels-idx1-ubyte[.gz], t10k-...; gzip or
//                                           plain). Default DIRs: /usr/share/datasets/
//                                           fashion-mnist and /usr/share/datasets/mnist.
//   "cifar10:DIR"                           data_batch_1..5.bin, test_batch.bin (also inside
//                                           DIR/cifar-10-batches-bin/), batches.meta.txt
//                                           (optional; default CIFAR-10 names).
//   "folder:DIR"                            DIR/train/<class>/*.{jpg,jpeg,png,bmp} and
//                                           DIR/val/<class>/... (or DIR/test/...): classes are
//                                           the train subfolders sorted by name (as
//                                           torchvision ImageFolder); hidden entries are
//                                           skipped; images are decoded as RGB and stored
//                                           at folder_size x folder_size (shorter side resized
//                                           to folder_size with antialiased bilinear, then
//                                           centre crop). folder_size <= 0 means
//                                           DATASET_FOLDER_SIZE; other sources ignore it.
// On failure nothing is left allocated.
int  dataset_load(dataset *train, dataset *test, const char *source, int folder_size);
void dataset_free(dataset *d);
// Mean and (population) standard deviation per channel of all pixels scaled to [0, 1].
void dataset_stats(const dataset *d, float mean[3], float std[3]);

// ---- preprocessing and augmentation ----
typedef struct {
    int out_C, out_H, out_W;   // network input; out_C = 3 with a 1-channel set replicates it
    float mean[3], std[3];     // per OUTPUT channel, applied to [0,1] pixels: (v - mean) / std
    float eval_crop;           // eval (and train without augmentation): the centred box of
                               // this fraction of the stored height and width (rounded) is
                               // resized to the output; 1 = the whole image
    int augment;               // 0: training batches are made exactly like eval batches
    int pad_crop;              // > 0: RandomCrop(stored size, padding=pad_crop), zero fill
    int hflip;                 // RandomHorizontalFlip(p=0.5)
    int rrc;                   // RandomResizedCrop(scale=rrc_scale, ratio=rrc_ratio); it
    float rrc_scale[2], rrc_ratio[2];  // replaces pad_crop when both are set
    float erase_p;             // > 0: RandomErasing(p, erase_scale, erase_ratio, value=0) after
    float erase_scale[2], erase_ratio[2];  // Normalize (0 = the mean), training batches only
} preprocess;

// Defaults for a data set at image_size x image_size (<= 0: the stored size) with out_C
// channels (<= 0: the set's own): the set's mean/std, and when augment is set
//   mnist: pad_crop 2;  fashion-mnist: pad_crop 2 + hflip;  cifar10: pad_crop 4 + hflip;
//   folder: RandomResizedCrop (0.08,1) (3/4,4/3) + hflip, eval centre crop 0.875 (256 -> 224).
int preprocess_default(preprocess *p, const dataset *d, int image_size, int out_C, int augment);
// torchvision's ImageNet eval preset at 224 (3 channels, ImageNet mean/std, no augmentation).
void preprocess_imagenet(preprocess *p);
// Checks p against a set with C channels: sizes, channels (1 -> 3 allowed, 3 -> 1 is not),
// std > 0, crop fractions and RRC ranges.
int  preprocess_check(const preprocess *p, int C);

// Which part of a stored image one sample is made from: rows [top, top+h), columns
// [left, left+w) (may extend past the image: zero padding), then mirrored if flip; then the
// output box rows [etop, etop+eh), columns [eleft, eleft+ew) set to 0 (eh = 0: none).
typedef struct { int top, left, h, w, flip, etop, eleft, eh, ew; } crop;

// Chooses the crop of a stored H x W image. train && p->augment: random per p, drawing from r
// in this order: the RRC box (rrc_box) or the pad-crop offsets (rng_below(2*pad+1) for the
// top, then for the left), then the flip (rng_uniform(r) < 0.5), then with erase_p > 0 the
// erasing: rng_uniform(r) < erase_p, then erase_box. Otherwise the centre box of
// p->eval_crop, no randomness (r may be NULL).
void crop_draw(crop *c, int H, int W, const preprocess *p, rng *r, int train);
// Renders one sample: out [out_C x out_H x out_W] from img [C x H x W] uint8 and crop c
// (H, W <= 4096, as every loaded data set is).
void crop_render(float *out, const uint8_t *img, int C, int H, int W, const crop *c,
                 const preprocess *p);
// Fills x [B x out_C x out_H x out_W] and y [B] (y may be NULL) from images idx[0..B) of d:
// crop_draw + crop_render for each in order, so the same rng state gives the same batch.
// p must have passed preprocess_check(p, d->C).
void batch_make(float *x, int64_t *y, const dataset *d, const int *idx, int B,
                const preprocess *p, rng *r, int train);
// Fisher-Yates shuffle of idx[0..n) (i from n-1 down to 1 swaps i with rng_below(r, i+1)).
void indices_shuffle(int *idx, int n, rng *r);

// torchvision RandomResizedCrop.get_params on an H x W image: up to 10 attempts, each drawing
// s = lo + u*(hi-lo) from scale then log-ratio the same way (u = rng_uniform(r), computed in
// float as torch does), w = round(sqrt(H*W*s*e^lr)), h = round(sqrt(H*W*s/e^lr)) (round half
// to even, as Python); accepted if 0 < w <= W and 0 < h <= H, then top = rng_below(H-h+1),
// left = rng_below(W-w+1). Else the centre crop fallback clamped to the ratio range.
void rrc_box(crop *c, int H, int W, const float scale[2], const float ratio[2], rng *r);
// torchvision RandomErasing.get_params on an H x W output: up to 10 attempts, each drawing
// s then log-ratio as rrc_box; h = round(sqrt(H*W*s*e^lr)), w = round(sqrt(H*W*s/e^lr));
// accepted if h < H and w < W, then etop = rng_below(H-h+1), eleft = rng_below(W-w+1).
// No attempt fits: nothing erased (eh = ew = 0).
void erase_box(crop *c, int H, int W, const float scale[2], const float ratio[2], rng *r);

// ---- images ----
// Decodes a JPEG, PNG or BMP file into *pix (malloc'd, planar C x H x W, C = 1 or 3; the
// caller frees it). C = 3 drops alpha and replicates grey; C = 1 takes grey images as they are
// and converts colour ones with PIL's convert("L") weights (0.299, 0.587, 0.114).
int  image_decode(uint8_t **pix, int *H, int *W, const char *path, int C);
// Bilinear resize of C planes, F.interpolate(mode="bilinear", align_corners=False,
// antialias=False) to float rounding: in [C x H x W] -> out [C x OH x OW].
void image_resize(float *out, const float *in, int C, int H, int W, int OH, int OW);
// The same with antialias=True (PIL-style triangle filter widened when shrinking); tmp needs
// C*H*OW floats. For upsampling both agree. Fails only if out of memory (filter weights).
int  image_resize_aa(float *out, float *tmp, const float *in, int C, int H, int W,
                     int OH, int OW);
// Shorter side to `size` (longer side int(size*long/short)), then centre crop size x size,
// antialiased: the storage transform of folder images. out [C x size x size] uint8.
int  image_resize_square(uint8_t *out, const uint8_t *in, int C, int H, int W, int size);
// One image file for inference -> out [p->out_C x p->out_H x p->out_W] normalised floats.
// resize > 0: shorter side to `resize` (antialiased bilinear), centre crop out_H x out_W
// (torchvision Resize(resize) + CenterCrop; with preprocess_imagenet and resize 256 this is
// the ImageNet eval preset). resize <= 0: the whole image resized to out_H x out_W
// (antialiased, equal to the training resize when upsampling, e.g. 28 -> 32).
int  image_load(float *out, const char *path, int resize, const preprocess *p);
