/* What lamina's C files share: the block size, the threading helpers and the matrix-product pieces of qmatmul.c
 * (and of f16.c, which qmatmul.c hands the F16 and BF16 formats to) that the decode step (decode.c) calls from inside
 * its own parallel region. */
#pragma once
#include <stdint.h>
#include <stddef.h>

/* The instruction set a build targets, from its compiler flags (lamina/kernels/__init__.py builds one library per
 * path: portable C, AVX2, AVX-512 with VNNI). LAMINA_SIMDE builds the AVX-512 source over SIMDe's portable versions
 * of its intrinsics, so that the tests check that path's arithmetic on machines without AVX-512. */
#if defined(LAMINA_SIMDE)
#include <immintrin.h>
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define LAMINA_AVX512 1
#define LAMINA_AVX2 1
#define LAMINA_PATH "avx512 (SIMDe)"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) &&          \
    defined(__AVX512VNNI__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define LAMINA_AVX512 1
#define LAMINA_AVX2 1
#define LAMINA_PATH "avx512"
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define LAMINA_AVX2 1
#define LAMINA_PATH "avx2"
#else
#define LAMINA_PATH "portable"
#endif

#ifdef LAMINA_AVX2
/* The sum of a vector's eight lanes. */
static inline float hsum8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#endif

#ifdef LAMINA_AVX512
/* The sum of a 512-bit vector's 16 lanes. */
static inline float hsum16(__m512 v) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}
#endif

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_max_threads(void) { return 1; }
#endif

#define QK 32 /* activations per block, and weights per block of the 32-weight formats (a "chunk" of the others) */

/* The weight formats, by the ids of lamina/kernels/types.py's table (the same order). */
enum {
    T_Q4_1, T_Q8_0, T_Q4_0, T_Q5_0, T_Q5_1, T_IQ4_NL, T_IQ4_XS, T_Q2_K, T_Q3_K, T_Q4_K, T_Q5_K, T_Q6_K,
    T_F16, T_BF16, /* 16-bit floats, read by f16.c */
    LAMINA_NTYPES
};
#define NR 4  /* weight rows handled together for a single activation row; row ranges are split in multiples of it */

/* Where the scale (and sum) of block b of activation row m lies in the d and s arrays: rows in groups of 4, each
 * group's scales transposed ([group][block][row in group]), so that one vector load takes a block's four. The arrays
 * hold SCALE_ROWS(M) * nb floats; a caller allocates them zeroed (calloc), so the rows past M of the last group are
 * finite. */
#define SCALE_AT(m, b, nb) ((((m) / 4) * (nb) + (b)) * 4 + (m) % 4)
#define SCALE_ROWS(M) (((M) + 3) / 4 * 4)

/* One block of 32 floats -> int16 q, scale d (x ~= d * q) and d * sum(q). */
void lamina_quantize_block(const float *x, int16_t *q, float *d, float *s);

/* x [M, K] float -> per block of 32: int16 q, scale d (x ~= d * q) and d * sum(q), the last two at SCALE_AT. */
void lamina_quantize_rows(const float *x, int64_t M, int64_t K, int16_t *q, float *d, float *s);

/* Columns n0..n1-1 of y [M, N] = x @ W^T (row m of y at y + m * ldy), W [N, K] in `wtype` blocks (the enum above),
 * x quantized by lamina_quantize_rows; written to y, or added to it when `accumulate`. Runs on the calling thread
 * only. */
void lamina_matmul_rows(int wtype, const void *weights, int64_t N, int64_t K, const int16_t *q, const float *d,
                        const float *s, int64_t M, float *y, int64_t ldy, int64_t n0, int64_t n1, int accumulate);

/* Up to this many activation rows, each row's products are bitwise those it gets alone (the block formats;
 * AVX-512's few-rows path; 1 elsewhere). decode.c attends runs of up to as many rows row by row to match. */
#ifndef EXACT_ROWS
#define EXACT_ROWS 4
#endif
int64_t lamina_exact_rows(void);

/* Many activation rows (M >= lamina_panel_rows(), 0 where the path has no panels: AVX-512 only) are multiplied from
 * a transposed copy of q, d and s (qmatmul.c's panels), which lamina_matmul_rows makes for each call. A caller that
 * multiplies the same rows by several matrices, on several threads, makes it once instead: a buffer of
 * lamina_panel_bytes(M, K) bytes (64-byte aligned), filled by lamina_panel_prepare for groups g0..g1-1 of the
 * lamina_panel_groups(M) (split among threads as they like), then read by lamina_matmul_prepared. */
int64_t lamina_panel_rows(void);
int64_t lamina_panel_groups(int64_t M);
size_t lamina_panel_bytes(int64_t M, int64_t K);
void lamina_panel_prepare(const int16_t *q, const float *d, const float *s, int64_t M, int64_t K, int64_t g0,
                          int64_t g1, void *panels);
/* lamina_matmul_rows with the rows' panels prepared (`panels`; NULL: as lamina_matmul_rows). */
void lamina_matmul_prepared(int wtype, const void *weights, int64_t N, int64_t K, const int16_t *q, const float *d,
                            const float *s, int64_t M, const void *panels, float *y, int64_t ldy, int64_t n0,
                            int64_t n1, int accumulate);

/* lamina_matmul_rows for W of T_F16 or T_BF16 (f16.c): W [N, K] 16-bit floats row by row, widened to float32 as they
 * are read; the same activations (q and d; the F16 formats have no offset, so no s). */
void lamina_f16_rows(int wtype, const void *w, int64_t N, int64_t K, const int16_t *q, const float *d, int64_t M,
                     float *y, int64_t ldy, int64_t n0, int64_t n1, int accumulate);

/* lamina_dequantize for W of T_F16 or T_BF16 (f16.c): out [N, K] float32 (bf16 = 0) or bfloat16 (bf16 = 1). */
void lamina_f16_dequantize(int wtype, const void *w, int64_t N, int64_t K, void *out, int bf16);

/* Part `part` of `parts` of the range 0..n-1, cut at multiples of `align`: [*lo, *hi). */
void lamina_split(int64_t n, int64_t align, int part, int parts, int64_t *lo, int64_t *hi);
