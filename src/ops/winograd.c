// Winograd F(m x m, 3 x 3) convolution: see winograd.h.
//
// Transforms (Lavin & Gray's points 0, +-1, +-2 for F(4,3); 0, +-1 for F(2,3)), 1-D forms
// applied along columns then rows:
//   F(2,3): B^T d = (d0 - d2, d1 + d2, d2 - d1, d1 - d3)
//           G g   = (g0, (g0 + g1 + g2)/2, (g0 - g1 + g2)/2, g2)
//           A^T m = (m0 + m1 + m2, m1 - m2 - m3)
//   F(4,3): B^T d = (4d0 - 5d2 + d4, (d3 + d4) - 4(d1 + d2), (d4 - d3) + 4(d1 - d2),
//                    (d4 - d2) + 2(d3 - d1), (d4 - d2) - 2(d3 - d1), 4d1 - 5d3 + d5)
//           G g   = (g0/4, -(g0 + g1 + g2)/6, -(g0 - g1 + g2)/6, g0/24 + g1/12 + g2/6,
//                    g0/24 - g1/12 + g2/6, g2)
//           A^T m = (m0 + (m1 + m2) + (m3 + m4), (m1 - m2) + 2(m3 - m4),
//                    (m1 + m2) + 4(m3 + m4), (m1 - m2) + 8(m3 - m4) + m5)
//
// Work layout (workspace), a = m + 2, positions pos = (xi, nu) of the a x a transforms:
//   U [pos][K/MR panels][C][MR]   transformed filters as the micro-kernel's packed A panels
//                                 (K padded to MR with zero filters; all of them, or a block)
//   V [pos][TB/NR slivers][C][NR] transformed input of a chunk of TB tiles as packed B slivers
//                                 (tiles past the chunk's end are zero)
//   M [pos][K][TB]                the GEMM results of a chunk (all filters, or a block's)
// with one cache line of padding between positions. Tiles are numbered (image, tile row, tile
// column) row-major. The order of the work (by chunks of tiles or by blocks of filters) is
// described at plan_make(); it changes the speed only, never a result.
#include "ops/winograd.h"
#include "ops/cpu.h"
#include "ops/gemm.h"
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define TARGET_AVX2 __attribute__((target("avx2")))
#define TARGET_AVX512 __attribute__((target("avx512f")))

enum {
    LANES = 48,  // tiles the transforms handle at once: NR at most
    RUN_VECTOR_MIN = 3,  // run_lanes()
    MR_MAX = 8,
};
// Plan sizes in floats (see plan_make).
#define CHUNK_FLOATS ((size_t)1 << 18)      // V + M of a chunk when U is small: 1 MiB
#define BIG_CHUNK_FLOATS ((size_t)4 << 20)  // when U is re-read from memory per chunk
#define U_BIG_FLOATS ((size_t)2 << 20)      // U that does not stay in cache
#define V_MAX_FLOATS ((size_t)4 << 20)      // V of all tiles, for the by-filters order
#define U_BLOCK_FLOATS ((size_t)1 << 17)    // U of a block of filters (by filters): 512 KiB

typedef struct wplan wplan;
typedef void input_fn(const wplan *p, float *V, const float *in, int t0, int nt, int c0, int c1);
typedef void output_fn(const wplan *p, float *out, const float *M, size_t mpos,
                       const float *bias, int t0, int nt, int k0, int k1);
typedef void weight_fn(const wplan *p, float *U, size_t upos, const float *w, int g0, int g1);

struct wplan {
    int m, a, aa;                          // tile, patch size m + 2, positions a*a
    int N, C, H, W, K, pad, relu, OH, OW;  // the convolution
    int accumulate;                        // out += the result (no bias or ReLU then)
    ptrdiff_t ostride;                     // floats from one image's output to the next
    int th, tw, P;                         // tile rows and columns per image, tiles in all
    int MR, NR;                            // micro-kernel tile
    gemm_kernel_fn *kernel;
    input_fn *input;
    output_fn *output;
    weight_fn *weight;
    int panels;                            // K / MR rounded up
    int TB, nchunks;                       // tiles per chunk (a multiple of NR), chunks
    int by_filters;                        // one chunk; threads take blocks of filters
    int by_chunks;                         // threads take whole chunks
    int block;                             // by_filters: panels per block of filters
    int nbuf;                              // buffers for U (by_filters) and M, per thread
    size_t upos, vpos, mpos;               // floats from one position to the next in U, V, M
    size_t u_floats, v_floats, m_floats;   // U (whole or a block), V and M (a chunk)
};

static int ceil_div(int a, int b) { return (a + b - 1) / b; }
static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

// ---------------------------------------------------------------------------------------------
// 1-D transforms (constant m after inlining)

// bt_1d and at_1d for one tile (float) and, as bt_1d_v / at_1d_v, for 16 tiles at once (the
// lanes path below): the same expressions for both element types.
typedef float v16 __attribute__((vector_size(64)));
#define WINO_BT_AT(T, SFX)                                                                    \
    INLINE void bt_1d##SFX(T *v, const T *d, const int m) {                                   \
        if (m == 2) {                                                                         \
            v[0] = d[0] - d[2];                                                               \
            v[1] = d[1] + d[2];                                                               \
            v[2] = d[2] - d[1];                                                               \
            v[3] = d[1] - d[3];                                                               \
        } else {                                                                              \
            T d13 = d[3] - d[1], d42 = d[4] - d[2];                                           \
            v[0] = (4.0f * d[0] - 5.0f * d[2]) + d[4];                                        \
            v[1] = (d[3] + d[4]) - 4.0f * (d[1] + d[2]);                                      \
            v[2] = (d[4] - d[3]) + 4.0f * (d[1] - d[2]);                                      \
            v[3] = d42 + 2.0f * d13;                                                          \
            v[4] = d42 - 2.0f * d13;                                                          \
            v[5] = (4.0f * d[1] - 5.0f * d[3]) + d[5];                                        \
        }                                                                                     \
    }                                                                                         \
    INLINE void at_1d##SFX(T *y, const T *x, const int m) {                                   \
        if (m == 2) {                                                                         \
            y[0] = (x[0] + x[1]) + x[2];                                                      \
            y[1] = (x[1] - x[2]) - x[3];                                                      \
        } else {                                                                              \
            T s12 = x[1] + x[2], d12 = x[1] - x[2], s34 = x[3] + x[4], d34 = x[3] - x[4];     \
            y[0] = (x[0] + s12) + s34;                                                        \
            y[1] = d12 + 2.0f * d34;                                                          \
            y[2] = s12 + 4.0f * s34;                                                          \
            y[3] = (d12 + 8.0f * d34) + x[5];                                                 \
        }                                                                                     \
    }
WINO_BT_AT(float, )
WINO_BT_AT(v16, _v)

INLINE void g_1d(float *u, const float *g, const int m) {
    if (m == 2) {
        u[0] = g[0];
        u[1] = 0.5f * ((g[0] + g[2]) + g[1]);
        u[2] = 0.5f * ((g[0] + g[2]) - g[1]);
        u[3] = g[2];
    } else {
        float s = g[0] + g[2], q = g[0] * (1.0f / 24) + g[2] * (1.0f / 6);
        u[0] = g[0] * 0.25f;
        u[1] = (s + g[1]) * (-1.0f / 6);
        u[2] = (s - g[1]) * (-1.0f / 6);
        u[3] = q + g[1] * (1.0f / 12);
        u[4] = q - g[1] * (1.0f / 12);
        u[5] = g[2];
    }
}

// ---------------------------------------------------------------------------------------------
// Runs of tiles: consecutive tiles of one tile row, at most LANES.

typedef struct {
    int n, ty, tx, len;
} tile_run;

// Tile t's image, tile row and tile column (len 0).
static tile_run tile_at(const wplan *p, int t) {
    return (tile_run){t / (p->th * p->tw), t / p->tw % p->th, t % p->tw, 0};
}

// The run from tile t (chunk-relative q) on, at most max tiles and within one sliver.
static tile_run run_at(const wplan *p, int t, int q, int max) {
    tile_run r = tile_at(p, t);
    r.len = p->tw - r.tx;
    if (r.len > max) r.len = max;
    if (r.len > p->NR - q % p->NR) r.len = p->NR - q % p->NR;
    return r;
}

// Lanes the transforms compute for a run of len tiles: whole vectors of 16 for runs of 3 or
// more (the 7-tile rows of 28x28 and 14x14 maps would otherwise be a scalar remainder loop);
// runs of 1 or 2 as they are (a vector of 16 for them cost more than the scalar loop in 64x64
// training, where 4x4 maps have one tile per row). The extra lanes are never stored.
static int run_lanes(int len) {
    int L = len >= RUN_VECTOR_MIN ? (len + 15) / 16 * 16 : len;
    return L < LANES ? L : LANES;
}

// ---- copies of n floats (the input transform's stores into V) ----
typedef void copy_fn(float *d, const float *s, int n);

INLINE void copy_c(float *d, const float *s, int n) { memcpy(d, s, (size_t)n * sizeof(float)); }

INLINE TARGET_AVX2 void copy_avx2(float *d, const float *s, int n) {
    int t = 0;
    for (; t + 8 <= n; t += 8) _mm256_storeu_ps(d + t, _mm256_loadu_ps(s + t));
    if (t < n) {
        __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - t), lane);
        _mm256_maskstore_ps(d + t, mask, _mm256_maskload_ps(s + t, mask));
    }
}

INLINE TARGET_AVX512 void copy_avx512(float *d, const float *s, int n) {
    int t = 0;
    for (; t + 16 <= n; t += 16) _mm512_storeu_ps(d + t, _mm512_loadu_ps(s + t));
    if (t < n) {
        __mmask16 mask = (__mmask16)((1u << (n - t)) - 1);
        _mm512_mask_storeu_ps(d + t, mask, _mm512_maskz_loadu_ps(mask, s + t));
    }
}

// Zeros up to the next 16 lanes past tile nt of V's last sliver, channels c0..c1-1: the
// micro-kernels read a narrow last sliver one vector (16 or 8 lanes) at a time and never the
// lanes beyond (49 tiles: 15 floats, not 47).
static void zero_sliver_tail(const wplan *p, float *V, int nt, int c0, int c1, int NR) {
    int lane = nt % NR, upto = (lane + 15) / 16 * 16 < NR ? (lane + 15) / 16 * 16 : NR;
    if (lane)
        for (int pos = 0; pos < p->aa; pos++)
            for (int c = c0; c < c1; c++)
                memset(V + pos * p->vpos + ((size_t)(nt / NR) * p->C + c) * NR + lane, 0,
                       (size_t)(upto - lane) * sizeof(float));
}

// ---------------------------------------------------------------------------------------------
// Input transform: V for tiles t0..t0+nt-1 (chunk-relative index q = t - t0) and channels
// c0..c1-1; also zeroes the lanes of the last sliver past nt that the kernels read.

INLINE void input_body(const wplan *p, float *V, const float *in, int t0, int nt, int c0, int c1,
                       const int m, const int NR, copy_fn *copy) {
    enum { A = 6, XW = LANES * 4 + 4 };
    const int a = m + 2, C = p->C;
    const size_t vpos = p->vpos;
    static const float zeros[XW];  // padding rows
    float tv[A][XW], vals[A * A][LANES];
    // de-interleaved rows: cols[i][j] = tv[xi][m*j + i]; zeroed once, so that the lanes past a
    // run (below) read numbers
    float cols[4][LANES + 1] = {{0}};
    const float *rows[A];
    for (int q = 0; q < nt;) {
        tile_run r = run_at(p, t0 + q, q, nt - q);
        const int L = run_lanes(r.len);
        int width = r.len * m + 2, x0 = r.tx * m - p->pad, y0 = r.ty * m - p->pad;
        // columns x0 + x, lo <= x < hi, are inside the image; the others are padding
        int lo = x0 < 0 ? -x0 : 0, hi = p->W - x0 < width ? p->W - x0 : width;
        if (hi < lo) hi = lo;
        for (int c = c0; c < c1; c++) {
            const float *plane = in + ((size_t)r.n * C + c) * p->H * p->W;
            for (int i = 0; i < a; i++) {  // rows[i][x - lo] = input at (y0 + i, x0 + x)
                int y = y0 + i;
                rows[i] = y >= 0 && y < p->H ? plane + (size_t)y * p->W + x0 + lo : zeros;
            }
            for (int x = 0; x < lo; x++)
                for (int i = 0; i < a; i++) tv[i][x] = 0.0f;
            for (int x = lo; x < hi; x++) {  // down the columns
                float d[A], v[A];
                for (int i = 0; i < a; i++) d[i] = rows[i][x - lo];
                bt_1d(v, d, m);
                for (int i = 0; i < a; i++) tv[i][x] = v[i];
            }
            for (int x = hi; x < m * (r.len + 1); x++)
                for (int i = 0; i < a; i++) tv[i][x] = 0.0f;
            for (int xi = 0; xi < a; xi++) {  // along the rows, one tile per lane
                for (int j = 0; j <= r.len; j++)
                    for (int i = 0; i < m; i++) cols[i][j] = tv[xi][m * j + i];
                for (int j = 0; j < L; j++) {
                    float d[A], v[A];
                    for (int i = 0; i < m; i++) d[i] = cols[i][j];
                    d[m] = cols[0][j + 1], d[m + 1] = cols[1][j + 1];
                    bt_1d(v, d, m);
                    for (int nu = 0; nu < a; nu++) vals[xi * a + nu][j] = v[nu];
                }
            }
            float *dst = V + ((size_t)(q / NR) * C + c) * NR + q % NR;  // the run's sliver
            for (int pos = 0; pos < a * a; pos++) copy(dst + pos * vpos, vals[pos], r.len);
        }
        q += r.len;
    }
    zero_sliver_tail(p, V, nt, c0, c1, NR);
}

// ---------------------------------------------------------------------------------------------
// Output transform of filters k0..k1-1 for tiles t0..t0+nt-1, + bias, ReLU. M holds rows of
// TB tiles from filter k0 on, positions mpos floats apart.

INLINE void output_body(const wplan *p, float *out, const float *M, size_t mpos, const float *bias,
                        int t0, int nt, int k0, int k1, const int m) {
    enum { A = 6 };
    const int a = m + 2, TB = p->TB, OH = p->OH, OW = p->OW;
    float s[4][A][LANES], y[4][LANES * 4];
    for (int q = 0; q < nt;) {
        tile_run r = run_at(p, t0 + q, q, nt - q);
        int oy0 = r.ty * m, ox0 = r.tx * m;
        int rows = OH - oy0 < m ? OH - oy0 : m, cols = OW - ox0 < m * r.len ? OW - ox0 : m * r.len;
        // (extra lanes read M past the run: inside the buffer, positions end in 16 floats of
        // padding)
        const int L = run_lanes(r.len);
        for (int k = k0; k < k1; k++) {
            const float *mk = M + (size_t)(k - k0) * TB + q;
            for (int nu = 0; nu < a; nu++)  // down the columns
                for (int j = 0; j < L; j++) {
                    float x[A], v[4];
                    for (int xi = 0; xi < a; xi++) x[xi] = mk[(xi * a + nu) * mpos + j];
                    at_1d(v, x, m);
                    for (int i = 0; i < m; i++) s[i][nu][j] = v[i];
                }
            for (int i = 0; i < rows; i++)  // along the rows
                for (int j = 0; j < L; j++) {
                    float x[A], v[4];
                    for (int nu = 0; nu < a; nu++) x[nu] = s[i][nu][j];
                    at_1d(v, x, m);
                    for (int e = 0; e < m; e++) y[i][m * j + e] = v[e];
                }
            float b = bias ? bias[k] : 0.0f;
            for (int i = 0; i < rows; i++) {
                float *o = out + (ptrdiff_t)r.n * p->ostride + ((size_t)k * OH + oy0 + i) * OW + ox0;
                if (p->accumulate) {
                    for (int x = 0; x < cols; x++) o[x] += y[i][x];
                    continue;
                }
                for (int x = 0; x < cols; x++) {
                    float v = y[i][x] + b;
                    if (p->relu && v < 0.0f) v = 0.0f;  // NaN < 0 is false: NaN stays
                    o[x] = v;
                }
            }
        }
        q += r.len;
    }
}

// ---------------------------------------------------------------------------------------------
// One tile per lane (AVX-512): for maps whose tile rows hold at most LANES_TW_MAX tiles, where
// the runs above are short (8x8 maps with F(4x4): runs of 2, scalar lane loops; 16x16: 4 tiles
// in a vector of 16). Sixteen consecutive tiles of any images, rows and columns form one
// vector: each element of their patches comes in with one gather (padding masked to zero), the
// transforms are the same 1-D forms on whole vectors, and V's slivers take the results with
// plain stores. The output side loads M's rows of 16 tiles the same way and writes each lane's
// tile with scalar stores. Measured (2-core AVX-512 Intel, GoogLeNet): 64-px training step
// 500 -> 460 ms (transforms 15 % -> 7 % of it); conv3 at 16x16 forward 17 -> 12 ms; at 224 px
// 3a's 28x28 maps (7 tiles a row) a little faster, conv3's 56x56 (14 a row) ~5 % slower.

enum { TL = 16, LANES_TW_MAX = 8 };  // tiles per vector; the widest tile rows it takes

// The tiles that the lanes path handles: every one's patch offset fits in 32 bits.
static int lanes_fit(const wplan *p) {
    return p->tw <= LANES_TW_MAX && (size_t)p->N * p->C * p->H * p->W < ((size_t)1 << 31);
}

// 1-D forms of the weight gradient's transforms (see winograd_weight_grad):
//   a_1d: A x, an m-vector of output gradients to a positions, the transpose of at_1d:
//     F(2,3): (x0, x0 + x1, x0 - x1, -x1)
//     F(4,3): (x0, (x0 + x2) + (x1 + x3), (x0 + x2) - (x1 + x3), (x0 + 4x2) + (2x1 + 8x3),
//              (x0 + 4x2) - (2x1 + 8x3), x3)
//   gt_1d: G^T x, a positions back to the 3 taps, the transpose of g_1d.
INLINE void a_1d_v(v16 *z, const v16 *x, const int m) {
    if (m == 2) {
        z[0] = x[0];
        z[1] = x[0] + x[1];
        z[2] = x[0] - x[1];
        z[3] = -x[1];
    } else {
        v16 e = x[0] + x[2], o = x[1] + x[3], e4 = x[0] + 4.0f * x[2], o4 = 2.0f * x[1] + 8.0f * x[3];
        z[0] = x[0];
        z[1] = e + o;
        z[2] = e - o;
        z[3] = e4 + o4;
        z[4] = e4 - o4;
        z[5] = x[3];
    }
}

INLINE void gt_1d(float *y, const float *x, const int m) {
    if (m == 2) {
        y[0] = x[0] + 0.5f * (x[1] + x[2]);
        y[1] = 0.5f * (x[1] - x[2]);
        y[2] = 0.5f * (x[1] + x[2]) + x[3];
    } else {
        float s12 = x[1] + x[2], d12 = x[1] - x[2], s34 = x[3] + x[4], d34 = x[3] - x[4];
        y[0] = (x[0] * 0.25f - s12 * (1.0f / 6)) + s34 * (1.0f / 24);
        y[1] = d12 * (-1.0f / 6) + d34 * (1.0f / 12);
        y[2] = (s12 * (-1.0f / 6) + s34 * (1.0f / 6)) + x[5];
    }
}

// Input transform of tiles t0..t0+nt-1, channels c0..c1-1, a tile per lane: V as input_body
// writes it (the (m+2)^2 patch at (ty*m - pad, tx*m - pad), zeros outside the image).
INLINE TARGET_AVX512 void input_lanes_body(const wplan *p, float *V, const float *in, int t0,
                                           int nt, int c0, int c1, const int m) {
    enum { A = 6 };
    const int a = m + 2, C = p->C, H = p->H, W = p->W, NR = p->NR;
    const size_t plane = (size_t)H * W, vpos = p->vpos;
    int32_t idx[A * A][TL];  // lane j's element (i, x): offset from channel c's plane of image 0
    __mmask16 inside[A * A];
    for (int q = 0; q < nt;) {
        int len = nt - q < TL ? nt - q : TL;
        if (len > NR - q % NR) len = NR - q % NR;  // one sliver
        for (int e = 0; e < a * a; e++) inside[e] = 0;
        for (int j = 0; j < TL; j++) {
            tile_run r = tile_at(p, t0 + q + (j < len ? j : 0));
            int y0 = r.ty * m - p->pad, x0 = r.tx * m - p->pad;
            for (int i = 0; i < a; i++)
                for (int x = 0; x < a; x++) {
                    int y = y0 + i, xx = x0 + x, ok = j < len && y >= 0 && y < H && xx >= 0 && xx < W;
                    idx[i * a + x][j] = ok ? (int32_t)(r.n * C * plane + (size_t)y * W + xx) : 0;
                    inside[i * a + x] |= (__mmask16)(ok << j);
                }
        }
        const __mmask16 store = (__mmask16)((1u << len) - 1);
        float *dst = V + (size_t)(q / NR) * C * NR + q % NR;
        for (int c = c0; c < c1; c++) {
            const float *src = in + c * plane;
            v16 tv[A][A];  // tv[i][x]: the column pass, B^T d
            for (int x = 0; x < a; x++) {
                v16 d[A], v[A];
                for (int i = 0; i < a; i++)
                    d[i] = (v16)_mm512_mask_i32gather_ps(
                        _mm512_setzero_ps(), inside[i * a + x],
                        _mm512_loadu_si512((const void *)idx[i * a + x]), src, 4);
                bt_1d_v(v, d, m);
                for (int i = 0; i < a; i++) tv[i][x] = v[i];
            }
            float *dc = dst + (size_t)c * NR;
            for (int xi = 0; xi < a; xi++) {  // the row pass: (B^T d) B
                v16 v[A];
                bt_1d_v(v, tv[xi], m);
                for (int nu = 0; nu < a; nu++)
                    _mm512_mask_storeu_ps(dc + (xi * a + nu) * vpos, store, (__m512)v[nu]);
            }
        }
        q += len;
    }
    zero_sliver_tail(p, V, nt, c0, c1, NR);
}

INLINE TARGET_AVX512 void output_lanes_body(const wplan *p, float *out, const float *M,
                                            size_t mpos, const float *bias, int t0, int nt,
                                            int k0, int k1, const int m) {
    enum { A = 6 };
    const int a = m + 2, TB = p->TB, OH = p->OH, OW = p->OW;
    ptrdiff_t base[TL];
    int rows[TL], cols[TL];
    float y[4][4][TL];
    for (int q = 0; q < nt;) {
        const int len = nt - q < TL ? nt - q : TL;
        for (int j = 0; j < len; j++) {
            tile_run r = tile_at(p, t0 + q + j);
            int oy0 = r.ty * m, ox0 = r.tx * m;
            base[j] = (ptrdiff_t)r.n * p->ostride + (ptrdiff_t)oy0 * OW + ox0;
            rows[j] = OH - oy0 < m ? OH - oy0 : m;
            cols[j] = OW - ox0 < m ? OW - ox0 : m;
        }
        for (int k = k0; k < k1; k++) {
            // (lanes past len read M past the chunk's tiles: inside the buffer, as above)
            const float *mk = M + (size_t)(k - k0) * TB + q;
            v16 s[4][A];
            for (int nu = 0; nu < a; nu++) {  // down the columns
                v16 x[A], v[4];
                for (int xi = 0; xi < a; xi++)
                    x[xi] = (v16)_mm512_loadu_ps(mk + (xi * a + nu) * mpos);
                at_1d_v(v, x, m);
                for (int i = 0; i < m; i++) s[i][nu] = v[i];
            }
            const v16 b = (v16)_mm512_set1_ps(bias ? bias[k] : 0.0f), zero = {0};
            for (int i = 0; i < m; i++) {  // along the rows, + bias, ReLU
                v16 v[4];
                at_1d_v(v, s[i], m);
                for (int e = 0; e < m; e++) {
                    v16 o = v[e];
                    if (!p->accumulate) {
                        o = o + b;
                        if (p->relu)  // NaN < 0 is false: NaN stays
                            o = (v16)_mm512_mask_blend_ps(
                                _mm512_cmp_ps_mask((__m512)o, (__m512)zero, _CMP_LT_OQ), (__m512)o,
                                (__m512)zero);
                    }
                    _mm512_storeu_ps(y[i][e], (__m512)o);
                }
            }
            float *ok = out + (size_t)k * OH * OW;
            for (int j = 0; j < len; j++)
                for (int i = 0; i < rows[j]; i++) {
                    float *o = ok + base[j] + (ptrdiff_t)i * OW;
                    if (p->accumulate)
                        for (int e = 0; e < cols[j]; e++) o[e] += y[i][e][j];
                    else
                        for (int e = 0; e < cols[j]; e++) o[e] = y[i][e][j];
                }
        }
        q += len;
    }
}

static TARGET_AVX512 void input_lanes_avx512(const wplan *p, float *V, const float *in, int t0,
                                             int nt, int c0, int c1) {
    if (p->m == 2) input_lanes_body(p, V, in, t0, nt, c0, c1, 2);
    else input_lanes_body(p, V, in, t0, nt, c0, c1, 4);
}

static TARGET_AVX512 void output_lanes_avx512(const wplan *p, float *out, const float *M,
                                              size_t mpos, const float *bias, int t0, int nt,
                                              int k0, int k1) {
    if (p->m == 2) output_lanes_body(p, out, M, mpos, bias, t0, nt, k0, k1, 2);
    else output_lanes_body(p, out, M, mpos, bias, t0, nt, k0, k1, 4);
}

// ---------------------------------------------------------------------------------------------
// Filter transform

// g[i][l] = tap i of filter l's channel: w0[l*ks + i] for l < n, 0 for n <= l < MR.
typedef void gather_fn(float g[9][MR_MAX], const float *w0, ptrdiff_t ks, int n, int MR);

INLINE void gather_c(float g[9][MR_MAX], const float *w0, ptrdiff_t ks, int n, int MR) {
    for (int l = 0; l < MR; l++)
        for (int i = 0; i < 9; i++) g[i][l] = l < n ? w0[l * ks + i] : 0.0f;
}

// A hardware gather per tap: the filters are C*9 floats apart.
INLINE TARGET_AVX2 void gather_avx2(float g[9][MR_MAX], const float *w0, ptrdiff_t ks, int n,
                                    int MR) {
    (void)MR;
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i idx = _mm256_mullo_epi32(lane, _mm256_set1_epi32((int)ks));
    __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
    for (int i = 0; i < 9; i++)
        _mm256_storeu_ps(g[i], _mm256_mask_i32gather_ps(_mm256_setzero_ps(), w0 + i, idx, mask, 4));
}

// Panels g0..g1-1 (filters g*MR .. g*MR + MR - 1; past K: zeros) to U, panel g at
// U + (g - g0)*C*MR, positions upos floats apart. One filter per lane.
// With pack8 (AVX-512, MR 8), a full panel's filters are first transposed a block of channels
// at a time into [channel][tap][filter], which is the g[][] of each channel in turn: contiguous
// loads instead of one gather per tap.
enum { PACK_CB = 32 };   // channels per transposed block (9 KiB)
_Static_assert(GEMM_AVX512_MR == MR_MAX, "pack8 writes panels of MR_MAX filters");

INLINE void weight_body(const wplan *p, float *U, size_t upos, const float *w, int g0, int g1,
                        const int m, const int MR, gather_fn *gather, const int pack8) {
    enum { A = 6 };
    const int a = m + 2, C = p->C, K = p->K;
    float g[9][MR_MAX], u[A * A][MR_MAX];
    float blk[PACK_CB * 9 * MR_MAX];   // pack8 only (MR = MR_MAX = 8)
    for (int pg = g0; pg < g1; pg++)
        for (int c = 0; c < C; c++) {
            int n = K - pg * MR < MR ? K - pg * MR : MR;
            const float(*gc)[MR_MAX] = g;
            if (pack8 && n == MR) {
                const int cb = c % PACK_CB;
                if (cb == 0) {
                    const int nc = C - c < PACK_CB ? C - c : PACK_CB;
                    gemm_pack_a8_avx512(blk, w + ((size_t)pg * MR * C + c) * 9, (ptrdiff_t)C * 9,
                                        nc * 9);
                }
                gc = (const float(*)[MR_MAX])(blk + (size_t)cb * 9 * MR_MAX);
            } else {
                gather(g, w + ((size_t)pg * MR * C + c) * 9, (ptrdiff_t)C * 9, n, MR);
            }
            for (int l = 0; l < MR; l++) {  // vectorised over the lanes
                float col[3][A], x[3], v[A];
                for (int j = 0; j < 3; j++) {  // down the columns: G g
                    for (int i = 0; i < 3; i++) x[i] = gc[i * 3 + j][l];
                    g_1d(col[j], x, m);
                }
                for (int i = 0; i < a; i++) {  // along the rows: (G g) G^T
                    for (int j = 0; j < 3; j++) x[j] = col[j][i];
                    g_1d(v, x, m);
                    for (int j = 0; j < a; j++) u[i * a + j][l] = v[j];
                }
            }
            float *dst = U + ((size_t)(pg - g0) * C + c) * MR;
            for (int pos = 0; pos < a * a; pos++)
                memcpy(dst + pos * upos, u[pos], (size_t)MR * sizeof(float));
        }
}

// ---- the transforms at each ISA level (the compiler vectorises the lane loops) ----
// The micro-kernel's MR and NR are constants here, so lane loops have fixed lengths.
#define TRANSFORMS(SUFFIX, TARGET, MR, NR, GATHER, PACK8)                                       \
    static TARGET void input_##SUFFIX(const wplan *p, float *V, const float *in, int t0,        \
                                      int nt, int c0, int c1) {                                 \
        if (p->m == 2) input_body(p, V, in, t0, nt, c0, c1, 2, NR, copy_##SUFFIX);              \
        else input_body(p, V, in, t0, nt, c0, c1, 4, NR, copy_##SUFFIX);                        \
    }                                                                                           \
    static TARGET void output_##SUFFIX(const wplan *p, float *out, const float *M, size_t mpos, \
                                       const float *bias, int t0, int nt, int k0, int k1) {     \
        if (p->m == 2) output_body(p, out, M, mpos, bias, t0, nt, k0, k1, 2);                   \
        else output_body(p, out, M, mpos, bias, t0, nt, k0, k1, 4);                             \
    }                                                                                           \
    static TARGET void weight_##SUFFIX(const wplan *p, float *U, size_t upos, const float *w,   \
                                       int g0, int g1) {                                        \
        if (p->m == 2) weight_body(p, U, upos, w, g0, g1, 2, MR, GATHER, PACK8);                \
        else weight_body(p, U, upos, w, g0, g1, 4, MR, GATHER, PACK8);                          \
    }

TRANSFORMS(c, , GEMM_SCALAR_MR, GEMM_SCALAR_NR, gather_c, 0)
TRANSFORMS(avx2, TARGET_AVX2, GEMM_AVX2_MR, GEMM_AVX2_NR, gather_avx2, 0)
TRANSFORMS(avx512, TARGET_AVX512, GEMM_AVX512_MR, GEMM_AVX512_NR, gather_avx2, 1)

// ---------------------------------------------------------------------------------------------
// The plan: sizes, order and functions for one ISA level and thread count. Each value is
// computed the same way in every order (the GEMM sums each one over the channels in one
// micro-kernel call), so the choice changes the speed only.
//   by chunks of tiles: U once, whole; then per chunk (small enough that its V and M stay in
//     cache between the input transform, the GEMMs and the output transform) the three phases,
//     a thread per chunk when there are many, else each phase split over the threads;
//   by filters, when U would not stay in cache and the tiles are few (deep layers at small
//     batches): V once, for all tiles; then per block of filters, a thread each, that block's
//     U, GEMMs and output transform, so U is never written out to memory.

// Position strides are a multiple of 16 floats plus 16: the a*a values of one element then lie
// in different cache sets (strides of a multiple of 4 KiB would put them all in one).
static size_t pos_stride(size_t n) { return (n + 15) / 16 * 16 + 16; }

static wplan plan_make(int N, int C, int H, int W, int K, int pad, int relu, int m,
                       cpu_isa_level isa, int threads) {
    wplan p = {.m = m, .a = m + 2, .aa = (m + 2) * (m + 2), .N = N, .C = C, .H = H, .W = W,
               .K = K, .pad = pad, .relu = relu, .OH = H + 2 * pad - 2, .OW = W + 2 * pad - 2};
    p.th = ceil_div(p.OH, m), p.tw = ceil_div(p.OW, m), p.P = N * p.th * p.tw;
    if (isa == CPU_ISA_AVX512) {
        p.MR = GEMM_AVX512_MR, p.NR = GEMM_AVX512_NR, p.kernel = gemm_kernel_avx512;
        p.input = input_avx512, p.output = output_avx512, p.weight = weight_avx512;
        if (lanes_fit(&p)) p.input = input_lanes_avx512, p.output = output_lanes_avx512;
    } else if (isa == CPU_ISA_AVX2) {
        p.MR = GEMM_AVX2_MR, p.NR = GEMM_AVX2_NR, p.kernel = gemm_kernel_avx2;
        p.input = input_avx2, p.output = output_avx2, p.weight = weight_avx2;
    } else {
        p.MR = GEMM_SCALAR_MR, p.NR = GEMM_SCALAR_NR, p.kernel = gemm_kernel_scalar;
        p.input = input_c, p.output = output_c, p.weight = weight_c;
    }
    if (threads < 1) threads = 1;
    p.panels = ceil_div(K, p.MR);
    size_t u_all = (size_t)p.aa * p.panels * p.MR * C;
    int all = ceil_div(p.P, p.NR) * p.NR;  // every tile in one chunk
    p.by_filters = u_all > U_BIG_FLOATS && (size_t)p.aa * all * C <= V_MAX_FLOATS;
    if (p.by_filters) {
        p.TB = all, p.nchunks = 1;
        // a block's U stays in L2 while V streams past (the micro-kernel keeps up with L3)
        p.block = (int)(U_BLOCK_FLOATS / ((size_t)p.aa * p.MR * C));
        if (p.block < 1) p.block = 1;
        if (p.block > p.panels) p.block = p.panels;
        p.nbuf = threads;
        p.upos = pos_stride((size_t)p.block * p.MR * C);
        p.mpos = pos_stride((size_t)p.block * p.MR * p.TB);
    } else {
        size_t budget = u_all > U_BIG_FLOATS ? BIG_CHUNK_FLOATS : CHUNK_FLOATS;
        size_t tb = budget / ((size_t)p.aa * (C + K)) / p.NR * p.NR;
        p.TB = tb < (size_t)p.NR ? p.NR : tb > (size_t)all ? all : (int)tb;
        p.nchunks = ceil_div(p.P, p.TB);
        p.by_chunks = threads == 1 || p.nchunks >= 4 * threads;
        p.nbuf = p.by_chunks ? threads : 1;
        p.upos = pos_stride((size_t)p.panels * p.MR * C);
        p.mpos = pos_stride((size_t)K * p.TB);
    }
    p.vpos = pos_stride((size_t)p.TB * C);
    p.u_floats = p.aa * p.upos, p.v_floats = p.aa * p.vpos, p.m_floats = p.aa * p.mpos;
    return p;
}

// Floats of workspace: alignment, then U or V (shared), then per buffer V or U, and M.
static size_t plan_ws(const wplan *p) {
    size_t shared = p->by_filters ? p->v_floats : p->u_floats;
    size_t own = p->by_filters ? p->u_floats : p->v_floats;
    return 16 + round16(shared) + p->nbuf * (round16(own) + round16(p->m_floats));
}

// Measured with per-call filter transforms (conv2d_fast_forward transforms the filters on every
// call): F(4x4) wins once there are a few dozen 4x4 tiles to share its larger U; F(2x2) below
// that down to ~32 2x2 tiles; fewer (7x7 maps at batch 1) or few channels: the direct GEMM.
int winograd_tile(int N, int C, int H, int W, int K, int pad) {
    int OH = H + 2 * pad - 2, OW = W + 2 * pad - 2;
    if (pad > 2 || OH < 1 || OW < 1 || C < 16 || K < 16) return 0;
    long long tiles4 = (long long)N * ceil_div(OH, 4) * ceil_div(OW, 4);
    long long tiles2 = (long long)N * ceil_div(OH, 2) * ceil_div(OW, 2);
    if (tiles4 >= 48) return 4;
    return tiles2 >= 32 ? 2 : 0;
}

size_t winograd_workspace_size(int N, int C, int H, int W, int K, int pad, int m) {
    size_t most = 0;
    for (int isa = CPU_ISA_SCALAR; isa <= CPU_ISA_AVX512; isa++) {
        wplan p = plan_make(N, C, H, W, K, pad, 0, m, (cpu_isa_level)isa, cpu_threads());
        size_t s = plan_ws(&p);
        if (s > most) most = s;
    }
    return most;
}

// ---------------------------------------------------------------------------------------------
// Execution

typedef struct {
    const wplan *p;
    float *out;
    const float *in, *w, *b;
    float *shared;  // U (by chunks) or V (by filters)
    float *bufs;    // nbuf x (V or U, M)
    int chunk;      // the chunk whose phases are being split
    cpu_claims claims;  // chunks_task's chunks, filters_task's blocks: claimed in turn
} wctx;

static void split(int total, int t, int n, int *lo, int *hi) {
    *lo = (int)((long long)total * t / n);
    *hi = (int)((long long)total * (t + 1) / n);
}

// Buffer i: its own V (by chunks) or U (by filters), then its M.
static float *buf_own(const wctx *x, int i) {
    const wplan *p = x->p;
    size_t own = p->by_filters ? p->u_floats : p->v_floats;
    return x->bufs + (size_t)i * (round16(own) + round16(p->m_floats));
}
static float *buf_m(const wctx *x, int i) {
    const wplan *p = x->p;
    return buf_own(x, i) + round16(p->by_filters ? p->u_floats : p->v_floats);
}

// GEMMs for nt tiles (from the start of V) of units u0..u1-1, unit = (position, panel) with
// np panels from panel g0 on: U holds those panels (positions upos apart), M their filters'
// rows (TB apart, positions mpos apart).
static void gemm_units(const wplan *p, float *M, size_t mpos, const float *U, size_t upos,
                       const float *V, int nt, int g0, int np, int u0, int u1) {
    const int C = p->C, MR = p->MR, NR = p->NR, TB = p->TB;
    const size_t vpos = p->vpos;
    const gemm_epilogue e = {0};
    const int tall = p->kernel == gemm_kernel_avx512;
    for (int u = u0; u < u1; u++) {
        int pos = u / np, g = u % np, k0 = (g0 + g) * MR;
        int mr = p->K - k0 < MR ? p->K - k0 : MR;
        const float *a = U + pos * upos + (size_t)g * C * MR;
        float *c = M + pos * mpos + (size_t)g * MR * TB;
        for (int j = 0; j < nt; j += NR) {  // the A panel stays in L1 while V's slivers pass
            int nr = nt - j < NR ? nt - j : NR;
            const float *v = V + pos * vpos + (size_t)j * C;
            if (tall && nr <= 16) {
                // A narrow last sliver: panels g0' = g - g % 3 .. +2 (of this position) in one
                // tall tile, by whichever unit of this range comes first among them.
                int lead = g - g % 3, span = np - lead < 3 ? np - lead : 3;
                int first = pos * np + lead, last = first + span - 1;
                if (first < u0 || last >= u1) {   // the group is split between ranges
                    p->kernel(C, a, v, c + j, TB, mr, nr, &e);
                } else if (g == lead) {
                    int rows = p->K - k0 < span * MR ? p->K - k0 : span * MR;
                    gemm_kernel_avx512_tall(C, a, (ptrdiff_t)C * MR, v, c + j, TB, rows, nr, &e);
                }
                continue;
            }
            p->kernel(C, a, v, c + j, TB, mr, nr, &e);
        }
    }
}

static void chunk_tiles(const wplan *p, int chunk, int *t0, int *nt) {
    *t0 = chunk * p->TB;
    *nt = p->P - *t0 < p->TB ? p->P - *t0 : p->TB;
}


// ---- by chunks of tiles ----

static void weight_task(void *ctx, int t, int n) {
    const wctx *x = ctx;
    int g0, g1;
    split(x->p->panels, t, n, &g0, &g1);
    float *U = x->shared + (size_t)g0 * x->p->C * x->p->MR;
    x->p->weight(x->p, U, x->p->upos, x->w, g0, g1);
}

static void chunks_task(void *ctx, int t, int n) {
    (void)n;
    wctx *x = ctx;
    const wplan *p = x->p;
    float *V = buf_own(x, t), *M = buf_m(x, t);
    for (int c; (c = cpu_claim(&x->claims)) < p->nchunks;) {
        int t0, nt;
        chunk_tiles(p, c, &t0, &nt);
        p->input(p, V, x->in, t0, nt, 0, p->C);
        gemm_units(p, M, p->mpos, x->shared, p->upos, V, nt, 0, p->panels, 0,
                   p->aa * p->panels);
        p->output(p, x->out, M, p->mpos, x->b, t0, nt, 0, p->K);
    }
}

static void input_task(void *ctx, int t, int n) {
    const wctx *x = ctx;
    const wplan *p = x->p;
    int t0, nt, c0, c1;
    chunk_tiles(p, x->chunk, &t0, &nt);
    split(p->C, t, n, &c0, &c1);
    p->input(p, p->by_filters ? x->shared : buf_own(x, 0), x->in, t0, nt, c0, c1);
}

static void gemm_task(void *ctx, int t, int n) {
    const wctx *x = ctx;
    const wplan *p = x->p;
    int t0, nt, u0, u1;
    chunk_tiles(p, x->chunk, &t0, &nt);
    split(p->aa * p->panels, t, n, &u0, &u1);
    gemm_units(p, buf_m(x, 0), p->mpos, x->shared, p->upos, buf_own(x, 0), nt, 0, p->panels,
               u0, u1);
}

static void output_task(void *ctx, int t, int n) {
    const wctx *x = ctx;
    const wplan *p = x->p;
    int t0, nt, k0, k1;
    chunk_tiles(p, x->chunk, &t0, &nt);
    split(p->K, t, n, &k0, &k1);
    p->output(p, x->out, buf_m(x, 0) + (size_t)k0 * p->TB, p->mpos, x->b, t0, nt, k0, k1);
}

// ---- by blocks of filters ----

static void filters_task(void *ctx, int t, int n) {
    (void)n;
    wctx *x = ctx;
    const wplan *p = x->p;
    int blocks = ceil_div(p->panels, p->block);
    float *U = buf_own(x, t), *M = buf_m(x, t);
    size_t upos = p->upos, mpos = p->mpos;
    for (int b; (b = cpu_claim(&x->claims)) < blocks;) {
        int g0 = b * p->block, np = p->panels - g0 < p->block ? p->panels - g0 : p->block;
        int k0 = g0 * p->MR, k1 = (g0 + np) * p->MR < p->K ? (g0 + np) * p->MR : p->K;
        p->weight(p, U, upos, x->w, g0, g0 + np);
        gemm_units(p, M, mpos, U, upos, x->shared, p->P, g0, np, 0, p->aa * np);
        p->output(p, x->out, M, mpos, x->b, 0, p->P, k0, k1);
    }
}

void winograd_forward(float *out, const float *in, const float *w, const float *b, int N, int C,
                      int H, int W, int K, int pad, int relu, int m, float *ws) {
    winograd_forward_ex(out, 0, in, w, b, N, C, H, W, K, pad, relu, 0, m, ws);
}

void winograd_forward_ex(float *out, ptrdiff_t out_stride, const float *in, const float *w,
                         const float *b, int N, int C, int H, int W, int K, int pad, int relu,
                         int accumulate, int m, float *ws) {
    int threads = cpu_threads();
    wplan p = plan_make(N, C, H, W, K, pad, relu, m, cpu_isa(), threads);
    p.accumulate = accumulate;
    p.ostride = out_stride ? out_stride : (ptrdiff_t)K * p.OH * p.OW;
    if (N <= 0 || K <= 0 || p.OH <= 0 || p.OW <= 0) return;
    // 64-byte alignment for the packed panels (ws may have any float alignment)
    float *base = ws + (16 - ((uintptr_t)ws / sizeof(float)) % 16) % 16;
    wctx x = {.p = &p, .out = out, .in = in, .w = w, .b = b, .shared = base,
              .bufs = base + round16(p.by_filters ? p.v_floats : p.u_floats)};
    if (p.by_filters) {
        cpu_parallel(input_task, &x, threads);  // chunk 0: all tiles
        cpu_parallel(filters_task, &x, threads);
        return;
    }
    cpu_parallel(weight_task, &x, threads);
    if (p.by_chunks) {
        cpu_parallel(chunks_task, &x, threads);
        return;
    }
    for (x.chunk = 0; x.chunk < p.nchunks; x.chunk++) {
        cpu_parallel(input_task, &x, threads);
        cpu_parallel(gemm_task, &x, threads);
        cpu_parallel(output_task, &x, threads);
    }
}

// ---------------------------------------------------------------------------------------------
// The weight gradient (AVX-512, maps with at most LANES_TW_MAX tiles a row). The forward is
// Y = A^T [U .* V] A with U = G g G^T, so dL/dU = (A dY A^T) .* V and dL/dg = G^T (dL/dU) G;
// summed over tiles, for each position one GEMM over the tiles:
//     dU[pos] (K x C) = Y'[pos] (K x tiles) * V[pos]^T (tiles x C),  Y' = A dY A^T,
// then dW[k][c] += G^T dU[k][c] G. Per chunk of TB tiles, the transforms (16 channels of one
// tile per vector) write Y' as the micro-kernel's A panels [K/MR][tile][MR] and V as its B
// slivers [C/NR][tile][NR]; the kernels then accumulate into dU chunk after chunk: the same
// sums in the same order for any thread count.

enum { WG_CHUNK_FLOATS = 1 << 20 };  // V + Y' of a chunk: 4 MiB

typedef struct {
    wplan p;
    int TB;
    int groups_c, groups_k;   // channels and filters in groups of 16
    int slivers, panels;      // of NR channels, of MR filters (panels past K hold zeros)
    size_t vpos, ypos, upos;  // floats from one position to the next in V, Y', dU
} wgplan;

static wgplan wg_make(int N, int C, int H, int W, int K, int pad, int m) {
    wgplan g = {.p = plan_make(N, C, H, W, K, pad, 0, m, CPU_ISA_AVX512, cpu_threads())};
    size_t tb = WG_CHUNK_FLOATS / ((size_t)g.p.aa * (C + K));
    g.TB = tb < 16 ? 16 : tb > (size_t)g.p.P ? g.p.P : (int)tb;
    if (g.TB < 1) g.TB = 1;
    g.groups_c = ceil_div(C, 16), g.groups_k = ceil_div(K, 16);
    g.slivers = ceil_div(C, GEMM_AVX512_NR), g.panels = g.groups_k * 16 / GEMM_AVX512_MR;
    g.vpos = pos_stride((size_t)g.slivers * g.TB * GEMM_AVX512_NR);
    g.ypos = pos_stride((size_t)g.panels * g.TB * GEMM_AVX512_MR);
    g.upos = pos_stride((size_t)K * C);
    return g;
}

int winograd_weight_grad_tile(int N, int C, int H, int W, int K, int pad) {
    int m = winograd_tile(N, C, H, W, K, pad);
    if (!m) return 0;
    int OH = H + 2 * pad - 2, OW = W + 2 * pad - 2, tw = ceil_div(OW, m);
    if (tw > LANES_TW_MAX || (size_t)16 * H * W >= ((size_t)1 << 31) ||
        (size_t)16 * OH * OW >= ((size_t)1 << 31))
        return 0;
    return m;
}

size_t winograd_weight_grad_workspace_size(int N, int C, int H, int W, int K, int pad, int m) {
    wgplan g = wg_make(N, C, H, W, K, pad, m);
    int aa = g.p.aa;
    return 16 + round16(aa * g.vpos) + round16(aa * g.ypos) + round16(aa * g.upos);
}

// Groups gr0..gr1-1 of 16 channels of tiles t0..t0+nt-1, 16 channels per vector (lanes past
// the channels: zeros). grad = 0: B^T d B of in [N,C,H,W] to V's slivers; grad = 1: A dY A^T
// of in = dout [N,K,OH,OW] to Y''s panels.
INLINE TARGET_AVX512 void wg_pack_body(const wgplan *g, float *dst, const float *in, int t0,
                                       int nt, int gr0, int gr1, const int m, const int grad) {
    enum { A = 6, NR = GEMM_AVX512_NR, MR = GEMM_AVX512_MR };
    const wplan *p = &g->p;
    const int a = m + 2, s = grad ? m : a, TB = g->TB;
    const int C = grad ? p->K : p->C, H = grad ? p->OH : p->H, W = grad ? p->OW : p->W;
    const int pad = grad ? 0 : p->pad;
    const size_t plane = (size_t)H * W, dpos = grad ? g->ypos : g->vpos;
    const __m512i lane = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)plane));
    for (int gr = gr0; gr < gr1; gr++) {
        const int c0 = gr * 16, left = C - c0;
        const __mmask16 chans = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
        for (int q = 0; q < nt; q++) {
            const tile_run r = tile_at(p, t0 + q);
            const int y0 = r.ty * m - pad, x0 = r.tx * m - pad;
            const float *base = in + ((size_t)r.n * C + c0) * plane;
            v16 tv[A][A];
            for (int x = 0; x < s; x++) {  // down the columns
                v16 d[A], v[A];
                const int xx = x0 + x, xin = xx >= 0 && xx < W;
                for (int i = 0; i < s; i++) {
                    const int y = y0 + i;
                    d[i] = xin && y >= 0 && y < H
                               ? (v16)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), chans, lane,
                                                               base + (size_t)y * W + xx, 4)
                               : (v16)_mm512_setzero_ps();
                }
                if (grad) a_1d_v(v, d, m);
                else bt_1d_v(v, d, m);
                for (int i = 0; i < a; i++) tv[i][x] = v[i];
            }
            for (int xi = 0; xi < a; xi++) {  // along the rows, then to the packed layouts
                v16 v[A];
                if (grad) a_1d_v(v, tv[xi], m);
                else bt_1d_v(v, tv[xi], m);
                for (int nu = 0; nu < a; nu++) {
                    float *d = dst + (xi * a + nu) * dpos;
                    if (grad) {  // filters c0..c0+7 and c0+8..c0+15: two panels
                        const int pn = c0 / MR;
                        _mm256_storeu_ps(d + ((size_t)pn * TB + q) * MR,
                                         _mm512_castps512_ps256((__m512)v[nu]));
                        _mm256_storeu_ps(d + ((size_t)(pn + 1) * TB + q) * MR,
                                         _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                             _mm512_castps_pd((__m512)v[nu]), 1)));
                    } else {
                        _mm512_storeu_ps(d + ((size_t)(c0 / NR) * TB + q) * NR + c0 % NR,
                                         (__m512)v[nu]);
                    }
                }
            }
        }
    }
}

static TARGET_AVX512 void wg_pack(const wgplan *g, float *dst, const float *in, int t0, int nt,
                                  int gr0, int gr1, int grad) {
    if (g->p.m == 2 && grad) wg_pack_body(g, dst, in, t0, nt, gr0, gr1, 2, 1);
    else if (g->p.m == 2) wg_pack_body(g, dst, in, t0, nt, gr0, gr1, 2, 0);
    else if (grad) wg_pack_body(g, dst, in, t0, nt, gr0, gr1, 4, 1);
    else wg_pack_body(g, dst, in, t0, nt, gr0, gr1, 4, 0);
}

typedef struct {
    const wgplan *g;
    float *V, *Y, *dU, *dw;
    const float *in, *dout;
    int t0, nt;
    cpu_claims claims;  // wg_transform_task's groups, wg_gemm_task's pieces: claimed in turn
} wgctx;

// Groups of x's channels, then those of dY's (unequal work: claimed one at a time).
static void wg_transform_task(void *ctx, int t, int n) {
    (void)t, (void)n;
    wgctx *x = ctx;
    const wgplan *g = x->g;
    for (int u; (u = cpu_claim(&x->claims)) < g->groups_c + g->groups_k;) {
        if (u < g->groups_c) wg_pack(g, x->V, x->in, x->t0, x->nt, u, u + 1, 0);
        else wg_pack(g, x->Y, x->dout, x->t0, x->nt, u - g->groups_c, u - g->groups_c + 1, 1);
    }
}

// Units (position, panel of MR filters): dU rows of those filters, all channels; ~4 pieces of
// units a thread, claimed in turn.
static void wg_gemm_task(void *ctx, int t, int n) {
    (void)t;
    wgctx *x = ctx;
    const wgplan *g = x->g;
    const wplan *p = &g->p;
    enum { NR = GEMM_AVX512_NR, MR = GEMM_AVX512_MR };
    const int np = ceil_div(p->K, MR), units = p->aa * np, pieces = 4 * n;
    const gemm_epilogue e = {.load_c = x->t0 > 0};
    for (int c; (c = cpu_claim(&x->claims)) < pieces;) {
        int u0, u1;
        split(units, c, pieces, &u0, &u1);
        for (int u = u0; u < u1; u++) {
            const int pos = u / np, pn = u % np, mr = p->K - pn * MR < MR ? p->K - pn * MR : MR;
            const float *a = x->Y + pos * g->ypos + (size_t)pn * g->TB * MR;
            for (int sl = 0; sl < g->slivers; sl++) {
                const int nr = p->C - sl * NR < NR ? p->C - sl * NR : NR;
                gemm_kernel_avx512(x->nt, a, x->V + pos * g->vpos + (size_t)sl * g->TB * NR,
                                   x->dU + pos * g->upos + (size_t)pn * MR * p->C + sl * NR, p->C,
                                   mr, nr, &e);
            }
        }
    }
}

static void wg_filters_task(void *ctx, int t, int n) {
    const wgctx *x = ctx;
    const wplan *p = &x->g->p;
    const int a = p->a, C = p->C;
    int k0, k1;
    split(p->K, t, n, &k0, &k1);
    for (int k = k0; k < k1; k++)
        for (int c = 0; c < C; c++) {
            float col[6][3], v[6], y[3];
            const float *u = x->dU + (size_t)k * C + c;
            for (int nu = 0; nu < a; nu++) {  // down the columns: G^T dU
                for (int xi = 0; xi < a; xi++) v[xi] = u[(xi * a + nu) * x->g->upos];
                gt_1d(y, v, p->m);
                for (int r = 0; r < 3; r++) col[nu][r] = y[r];
            }
            float *d = x->dw + ((size_t)k * C + c) * 9;
            for (int r = 0; r < 3; r++) {  // along the rows: (G^T dU) G
                for (int nu = 0; nu < a; nu++) v[nu] = col[nu][r];
                gt_1d(y, v, p->m);
                for (int s = 0; s < 3; s++) d[r * 3 + s] += y[s];
            }
        }
}

void winograd_weight_grad(float *dw, const float *in, const float *dout, int N, int C, int H,
                          int W, int K, int pad, int m, float *ws) {
    wgplan g = wg_make(N, C, H, W, K, pad, m);
    const wplan *p = &g.p;
    if (N <= 0 || K <= 0 || C <= 0 || p->OH <= 0 || p->OW <= 0) return;
    float *base = ws + (16 - ((uintptr_t)ws / sizeof(float)) % 16) % 16;
    wgctx x = {.g = &g, .V = base, .dw = dw, .in = in, .dout = dout};
    x.Y = x.V + round16(p->aa * g.vpos);
    x.dU = x.Y + round16(p->aa * g.ypos);
    const int threads = cpu_threads();
    for (x.t0 = 0; x.t0 < p->P; x.t0 += g.TB) {
        x.nt = p->P - x.t0 < g.TB ? p->P - x.t0 : g.TB;
        atomic_store(&x.claims.next, 0);
        cpu_parallel(wg_transform_task, &x, threads);
        atomic_store(&x.claims.next, 0);
        cpu_parallel(wg_gemm_task, &x, threads);
    }
    cpu_parallel(wg_filters_task, &x, threads);
}
