// Single-precision GEMM for the fast kernels: C[M x N] (+)= A[M x K] * B[K x N], row-major.
//
// GotoBLAS/BLIS structure: B is packed block by block (KC x NC, kept in L2) into slivers NR
// columns wide, A into panels MR rows tall (one panel stays in L1 while the slivers stream
// past it), and a register-blocked micro-kernel computes MR x NR tiles of C with broadcast-FMA:
//   avx512: 8 x 48 (24 zmm accumulators),  avx2: 6 x 16 (12 ymm),  scalar: 4 x 16.
// In bfloat16 mode (cpu_bf16_set(), off by default) the operands are rounded to bfloat16 and
// the products run on AMX as 32 x 32 tiles (4 accumulator tiles) where the CPU has AMX, else on
// the kernels above fed the rounded values.
// The kernel follows cpu_isa() at call time. Work is split over cpu_threads() threads by
// blocks of rows or of columns of C; every element of C is computed by one thread with the
// same sequence of operations whatever the thread count, so results are bit-identical for any
// number of threads (but differ in rounding between ISA levels).
//
// The caller provides the packing workspace (the functions never allocate).
#pragma once
#include <stddef.h>

enum {
    GEMM_TRANS_A    = 1 << 0,  // A is stored as [K x M]: A(i,k) = A[k*lda + i]
    GEMM_TRANS_B    = 1 << 1,  // B is stored as [N x K]: B(k,j) = B[j*ldb + k]
    GEMM_ACCUMULATE = 1 << 2,  // C += A*B (+ bias); without it C is overwritten
    GEMM_BIAS_ROW   = 1 << 3,  // + bias[i] (bias has M entries; e.g. conv output channels)
    GEMM_BIAS_COL   = 1 << 4,  // + bias[j] (bias has N entries; e.g. linear layers)
    GEMM_RELU       = 1 << 5,  // C = max(C, 0) last, after accumulation and bias (NaN stays)
};

// Workspace (in floats) that gemm() needs for these sizes at the current thread count
// (cpu_threads()); enough for every ISA level. Raising the thread count needs a new size.
size_t gemm_workspace_size(int M, int N, int K);

// C = A*B (or C += A*B with GEMM_ACCUMULATE), then + bias and ReLU if flagged. lda/ldb/ldc
// are row strides in floats of the matrices as stored. bias may be NULL without a BIAS flag.
// ws: gemm_workspace_size(M, N, K) floats, any alignment. M, N, K >= 0 (K = 0 gives bias only).
void gemm(float *C, int ldc, const float *A, int lda, const float *B, int ldb, const float *bias,
          int M, int N, int K, int flags, float *ws);

// ---- generalised operands, for the convolutions in conv_fast.c ----
// The matrices of a convolution are views of NCHW tensors: the batch is folded into a
// dimension of the GEMM, and im2col matrices are read straight from the image while packing
// (no im2col buffer).
typedef enum {
    GEMM_DENSE,     // (r,c) = p[(c / fold) * fold_stride + r*rs + (c % fold) * cs]; fold 0 = none
    GEMM_IM2COL,    // rows q = (ch, dy, dx) of C*k*k, columns j = (n, oy, ox) of N*OH*OW:
                    // (q,j) = p[n][ch][oy*stride - pad + dy][ox*stride - pad + dx], 0 outside
    GEMM_IM2COL_T,  // the transpose: rows are pixels j, columns are q
    GEMM_PACKED,    // (A only) p = panels made by gemm_pack_a() for this M and K
} gemm_operand_kind;

typedef struct {
    gemm_operand_kind kind;
    const float *p;
    ptrdiff_t rs, cs;                       // GEMM_DENSE
    int fold;                               // GEMM_DENSE: columns fold over the batch
    ptrdiff_t fold_stride;
    int C, H, W, k, stride, pad, OH, OW;    // GEMM_IM2COL(_T): image [C,H,W] per batch item
} gemm_operand;

// C(i,j) = p[(j / fold) * fold_stride + i*ldc + j % fold]; fold 0 = plain row-major.
// Row groups (ngroups >= 1; 0 = none): rows row0[g] .. row0[g+1]-1 of C are rows 0.. of the
// matrix at gp[g] with fold stride gfs[g] (p and fold_stride are then unused): one GEMM writing
// several tensors, e.g. convolutions of one input with their weights stacked.
enum { GEMM_MAX_GROUPS = 4 };
typedef struct {
    float *p;
    ptrdiff_t ldc;
    int fold;
    ptrdiff_t fold_stride;
    int ngroups;
    int row0[GEMM_MAX_GROUPS + 1];
    float *gp[GEMM_MAX_GROUPS];
    ptrdiff_t gfs[GEMM_MAX_GROUPS];
} gemm_output;

// gemm() on these views (A may only be GEMM_DENSE or GEMM_PACKED). Flags as above except the
// TRANS ones (express a transpose through rs/cs). ws: gemm_workspace_size(M, N, K) floats.
void gemm_ex(const gemm_output *c, const gemm_operand *a, const gemm_operand *b,
             const float *bias, int M, int N, int K, int flags, float *ws);

// ---- pre-packed A ----
// gemm() packs A into MR-row panels on every call; a matrix used many times (a layer's
// weights at inference) can be packed once instead. The layout belongs to the ISA level in
// use when packing (a small header records it, with M and K).
size_t gemm_pack_a_size(int M, int K);  // floats
// A as for gemm() (lda, GEMM_TRANS_A in flags; other flags ignored).
void gemm_pack_a(float *packed, const float *A, int lda, int flags, int M, int K);
// 0 if `packed` was made by gemm_pack_a for M x K at the current ISA level; else -1 (err_set).
int gemm_pack_a_check(const float *packed, int M, int K);

// ---- internal: the micro-kernels (gemm.c, gemm_avx2.c, gemm_avx512.c) ----
// A kernel computes one tile: acc = sum_k a[k*MR + i] * b[k*NR + j] over kc steps from packed
// panels, then writes C (rows ldc apart) for i < mr, j < nr only.
typedef struct {
    int load_c;             // C = C + acc (else C = acc)
    const float *bias_row;  // + bias_row[i], or NULL
    const float *bias_col;  // + bias_col[j], or NULL
    int relu;               // then max(., 0), keeping NaN
} gemm_epilogue;

typedef void gemm_kernel_fn(int kc, const float *a, const float *b, float *c, ptrdiff_t ldc,
                            int mr, int nr, const gemm_epilogue *e);

gemm_kernel_fn gemm_kernel_scalar;  // MR 4, NR 16 (plain C)
gemm_kernel_fn gemm_kernel_avx512;  // MR 8, NR 48
// A narrow last sliver (nr <= 16) against up to 3 consecutive A panels (mr <= 24 rows, panel p
// at a + p*pstride): what 3 gemm_kernel_avx512 calls would write, with one B load per 24 FMAs.
void gemm_kernel_avx512_tall(int kc, const float *a, ptrdiff_t pstride, const float *b, float *c,
                             ptrdiff_t ldc, int mr, int nr, const gemm_epilogue *e);
// Packing helpers with AVX-512 (plain-C equivalents in gemm.c):
// a full 8-row A panel from rows rs floats apart: d[t*8 + i] = s[i*rs + t], t < n;
void gemm_pack_a8_avx512(float *d, const float *s, ptrdiff_t rs, int n);
// d[r*ld + c] = s[c*ls + r] for r < rows, c < 16.
void gemm_transpose16_avx512(float *d, ptrdiff_t ld, const float *s, ptrdiff_t ls, int rows);
gemm_kernel_fn gemm_kernel_avx2;    // MR 6, NR 16
// bfloat16 mode (cpu_bf16_set(), gemm_amx.c): rounding in place for the float32 fallback
// (avx512: use the AVX-512 version), one value's bfloat16 bits, and the AMX pieces: a 32 x 32
// kernel on operands laid out by gemm_amx_cvt (rows of A tiles) and gemm_amx_pack_b_rows
// (columns of B -> B tiles: step s, half h (columns 16h..16h+15), pair row r, column j at
// ((s*2 + h)*16 + r)*32 + 2j + e for row 32s + 2r + e; kc rounded up to kcp, a multiple of 32,
// with zeros), used between gemm_amx_begin() and gemm_amx_end() on the same thread.
void gemm_bf16_round(float *x, size_t n, int avx512);
unsigned short gemm_bf16_of(float x);
void gemm_amx_cvt(unsigned short *d, const float *s, int n);
// n <= 16 columns of B rows 0..kc-1 (row k at b + k*rs) into their place in B tiles (d: the
// first column's pair slot in step 0); rows kc..kcp-1 are zero.
void gemm_amx_pack_b_rows(unsigned short *d, const float *b, ptrdiff_t rs, int kc, int kcp, int n);
void gemm_amx_begin(void);
void gemm_amx_end(void);
gemm_kernel_fn gemm_kernel_amx;     // MR 32, NR 32 (kc a multiple of 32)
// Single-core TDPBF16PS rate in GFLOP/s, for benchmarks (call only where cpu_amx()); one
// TDPBF16PS is 16 x 16 x 32 multiply-adds.
double gemm_amx_peak_gflops(void);
enum { GEMM_AMX_TDP_FLOPS = 16 * 16 * 32 * 2 };
// The same with C's four 16 x 16 quarters anywhere: rows 16h.., columns 16v.. at q[2h + v]
// (rows ldc apart in each), for tiles that cross a fold (image) or row group at 16.
void gemm_kernel_amx_quads(int kcp, const float *a, const float *b, float *const *q,
                           ptrdiff_t ldc, int mr, int nr, const gemm_epilogue *e);
#define GEMM_AVX512_MR 8
#define GEMM_AVX512_NR 48
#define GEMM_AVX2_MR 6
#define GEMM_AVX2_NR 16
#define GEMM_SCALAR_MR 4
#define GEMM_SCALAR_NR 16
