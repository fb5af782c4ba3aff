/* Quantized matrix products for the CPU: y[M, N] = x[M, K] @ W[N, K]^T with W in GGML's block formats.
 *
 * Weights stay in the blocks a GGUF file stores (32 weights a block, row-major, K/32 blocks per row):
 *   Q4_1: float16 d, float16 m, 16 bytes of nibbles   w[j] = d * q[j] + m  (byte j: q[j] low, q[j+16] high)
 *   Q8_0: float16 d, 32 int8                          w[j] = d * q[j]
 * Activations are quantized per block of 32 to int16 with one float scale (and, for Q4_1's offset, the block's sum),
 * so the inner product is an integer dot product (on AVX2 16 multiply-adds in one madd). llama.cpp quantizes the
 * activations to int8 instead, one instruction cheaper a block but 256 times coarser: enough to change a greedy
 * continuation of a small model within a few tokens; with int16 the products match float32 on the same weights to
 * about 1e-5. Each weight is read once however many rows x has.
 *
 * Built by lamina/kernels/__init__.py with the machine's compiler (-O3 -march=native -fopenmp); parallel over
 * output rows with OpenMP, which resolves to the libgomp torch has already loaded.
 */
#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define LAMINA_AVX2 1
#endif

#define MT 4 /* activation rows handled together per weight block */
#ifndef PF_BYTES
#define PF_BYTES 2048 /* how far ahead of the row being multiplied weights are prefetched */
#endif

typedef struct { uint16_t d, m; uint8_t qs[QK / 2]; } block_q4_1;
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;

static inline float fp16_to_float(uint16_t h) {
#ifdef LAMINA_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) { bits = sign; }
        else { float f = ldexpf((float)mant, -24); return sign ? -f : f; }
    } else if (exp == 31) { bits = sign | 0x7f800000 | (mant << 13); }
    else { bits = sign | ((exp + 112) << 23) | (mant << 13); }
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

/* One block of 32: q = round(x / d) with d = max|x| / 32767 (to nearest, ties to even, as lrintf). */
void lamina_quantize_block(const float *x, int16_t *q, float *d, float *s) {
#ifdef LAMINA_AVX2
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], m = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps(x + 8 * j), m = _mm256_max_ps(_mm256_andnot_ps(sign, v[j]), m);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    __m256i r[4], total = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) r[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv)), total = _mm256_add_epi32(total, r[j]);
    /* packs works within 128-bit lanes: [0-3 8-11 4-7 12-15] -> reorder the 64-bit quarters */
    _mm256_storeu_si256((__m256i *)q, _mm256_permute4x64_epi64(_mm256_packs_epi32(r[0], r[1]), 0xd8));
    _mm256_storeu_si256((__m256i *)(q + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(r[2], r[3]), 0xd8));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    const int sum = _mm_cvtsi128_si32(t);
#else
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < QK; j++) {
        q[j] = (int16_t)lrintf(x[j] * inv);
        sum += q[j];
    }
#endif
    *d = amax / 32767.0f;
    *s = *d * (float)sum;
}

void lamina_quantize_rows(const float *x, int64_t M, int64_t K, int16_t *q, float *d, float *s) {
    for (int64_t i = 0; i < M * (K / QK); i++) lamina_quantize_block(x + i * QK, q + i * QK, d + i, s + i);
}

#ifdef LAMINA_AVX2
static inline float hsum8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#endif

/* One weight row against activation rows 0..mt-1 (mt a compile-time constant at every call, so the accumulators
 * live in registers); two accumulators per row alternate over blocks to hide the multiply-add latency. */
static inline __attribute__((always_inline)) void row_q4_1(const block_q4_1 *w, int64_t nb, const int16_t *q,
                                                           const float *d, const float *s, int64_t K, const int mt,
                                                           float *out) {
#ifdef LAMINA_AVX2
    __m256 acc0[MT], acc1[MT];
    float off0[MT], off1[MT];
    for (int t = 0; t < mt; t++) acc0[t] = acc1[t] = _mm256_setzero_ps(), off0[t] = off1[t] = 0.0f;
    const __m128i low = _mm_set1_epi8(0x0f);
#define LAMINA_Q4_1_BLOCK(B, ACC, OFF)                                                                              \
    do {                                                                                                            \
        const float wd = _cvtsh_ss(w[B].d), wm = _cvtsh_ss(w[B].m);                                                 \
        const __m128i raw = _mm_loadu_si128((const __m128i *)w[B].qs);                                              \
        const __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));                                          \
        const __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));                       \
        for (int t = 0; t < mt; t++) {                                                                              \
            const __m256i *a = (const __m256i *)(q + t * K + (B) * QK);                                             \
            const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(a)),                        \
                                               _mm256_madd_epi16(w1, _mm256_loadu_si256(a + 1)));                   \
            ACC[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(wd * d[t * nb + (B)]), ACC[t]);          \
            OFF[t] += wm * s[t * nb + (B)];                                                                         \
        }                                                                                                           \
    } while (0)
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        LAMINA_Q4_1_BLOCK(b, acc0, off0);
        LAMINA_Q4_1_BLOCK(b + 1, acc1, off1);
    }
    if (b < nb) LAMINA_Q4_1_BLOCK(b, acc0, off0);
#undef LAMINA_Q4_1_BLOCK
    for (int t = 0; t < mt; t++) out[t] = hsum8(_mm256_add_ps(acc0[t], acc1[t])) + off0[t] + off1[t];
#else
    for (int t = 0; t < mt; t++) {
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const int16_t *a = q + t * K + b * QK;
            int dot = 0;
            for (int j = 0; j < QK / 2; j++) dot += (w[b].qs[j] & 0x0f) * a[j] + (w[b].qs[j] >> 4) * a[j + QK / 2];
            total += fp16_to_float(w[b].d) * d[t * nb + b] * (float)dot + fp16_to_float(w[b].m) * s[t * nb + b];
        }
        out[t] = total;
    }
#endif
}

static inline __attribute__((always_inline)) void row_q8_0(const block_q8_0 *w, int64_t nb, const int16_t *q,
                                                           const float *d, int64_t K, const int mt, float *out) {
#ifdef LAMINA_AVX2
    __m256 acc0[MT], acc1[MT];
    for (int t = 0; t < mt; t++) acc0[t] = acc1[t] = _mm256_setzero_ps();
#define LAMINA_Q8_0_BLOCK(B, ACC)                                                                                   \
    do {                                                                                                            \
        const float wd = _cvtsh_ss(w[B].d);                                                                         \
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[B].qs));                        \
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w[B].qs + 16)));                 \
        for (int t = 0; t < mt; t++) {                                                                              \
            const __m256i *a = (const __m256i *)(q + t * K + (B) * QK);                                             \
            const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(a)),                        \
                                               _mm256_madd_epi16(w1, _mm256_loadu_si256(a + 1)));                   \
            ACC[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(wd * d[t * nb + (B)]), ACC[t]);          \
        }                                                                                                           \
    } while (0)
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        LAMINA_Q8_0_BLOCK(b, acc0);
        LAMINA_Q8_0_BLOCK(b + 1, acc1);
    }
    if (b < nb) LAMINA_Q8_0_BLOCK(b, acc0);
#undef LAMINA_Q8_0_BLOCK
    for (int t = 0; t < mt; t++) out[t] = hsum8(_mm256_add_ps(acc0[t], acc1[t]));
#else
    for (int t = 0; t < mt; t++) {
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const int16_t *a = q + t * K + b * QK;
            int dot = 0;
            for (int j = 0; j < QK; j++) dot += w[b].qs[j] * a[j];
            total += fp16_to_float(w[b].d) * d[t * nb + b] * (float)dot;
        }
        out[t] = total;
    }
#endif
}

#ifdef LAMINA_AVX2
/* One activation row against NR = 4 weight rows (decode of one sequence): each activation block is loaded once for
 * the four, the four accumulator chains run side by side, and the four rows' float16 scales and offsets of a block
 * are converted and multiplied together, as one vector [d0 m0 d1 m1 d2 m2 d3 m3]. */
static void rows_q4_1_m1(const block_q4_1 *w, int64_t nb, const int16_t *q, const float *d, const float *s,
                         float *out) {
    __m256 acc[NR], offsets = _mm256_setzero_ps(); /* odd lanes: each row's sum of m * s */
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi16(0x0f);
    /* The next-but-one group of rows is fetched while this one is computed, a block (80 bytes) at a time: without
     * it each core waits on memory (the hardware prefetcher loses the four short interleaved streams), and the
     * whole decode step takes twice as long. */
    const char *ahead = (const char *)(w + 2 * NR * nb);
    for (int64_t b = 0; b < nb; b++) {
        _mm_prefetch(ahead + b * NR * sizeof(block_q4_1), _MM_HINT_T0);
        _mm_prefetch(ahead + b * NR * sizeof(block_q4_1) + 64, _MM_HINT_T0);
        const __m256i a0 = _mm256_loadu_si256((const __m256i *)(q + b * QK));
        const __m256i a1 = _mm256_loadu_si256((const __m256i *)(q + b * QK + 16));
        int32_t dm[NR]; /* each row's (d, m) pair of float16, as stored */
        for (int r = 0; r < NR; r++) memcpy(&dm[r], &w[r * nb + b], sizeof(int32_t));
        const __m256 x = _mm256_blend_ps(_mm256_set1_ps(d[b]), _mm256_set1_ps(s[b]), 0xaa);
        const __m256 scales = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm)), x);
        offsets = _mm256_add_ps(offsets, scales);
        for (int r = 0; r < NR; r++) {
            /* bytes to 16-bit lanes once; the low nibble is q[j], the rest q[j + 16] */
            const __m256i raw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)w[r * nb + b].qs));
            const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(raw, low), a0),
                                               _mm256_madd_epi16(_mm256_srli_epi16(raw, 4), a1));
            const __m256 scale = _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(2 * r));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r]);
        }
    }
    float off[8];
    _mm256_storeu_ps(off, offsets);
    for (int r = 0; r < NR; r++) out[r] = hsum8(acc[r]) + off[2 * r + 1];
}

#endif

/* Weight row n against activation rows m0..m0+mt-1, written to (or added to) y. */
static void tile(int wtype, const void *weights, int64_t n, int64_t N, int64_t K, const int16_t *q, const float *d,
                 const float *s, int64_t m0, int64_t mt, float *y, int accumulate) {
    const int64_t nb = K / QK;
    float out[MT];
    q += m0 * K, d += m0 * nb, s += m0 * nb;
#define LAMINA_TILE(MTC)                                                                                              \
    (wtype == 0 ? row_q4_1((const block_q4_1 *)weights + n * nb, nb, q, d, s, K, MTC, out)                          \
                : row_q8_0((const block_q8_0 *)weights + n * nb, nb, q, d, K, MTC, out))
    switch (mt) {
    case 1: LAMINA_TILE(1); break;
    case 2: LAMINA_TILE(2); break;
    case 3: LAMINA_TILE(3); break;
    default: LAMINA_TILE(4); break;
    }
#undef LAMINA_TILE
    for (int64_t t = 0; t < mt; t++) y[(m0 + t) * N + n] = out[t] + (accumulate ? y[(m0 + t) * N + n] : 0.0f);
}

void lamina_matmul_rows(int wtype, const void *weights, int64_t N, int64_t K, const int16_t *q, const float *d,
                        const float *s, int64_t M, float *y, int64_t n0, int64_t n1, int accumulate) {
    int64_t n = n0;
#ifdef LAMINA_AVX2
    if (M == 1 && wtype == 0) { /* one Q4_1 row of x: NR weight rows at a time (for Q8_0 that measured slower) */
        const int64_t nb = K / QK;
        float out[NR];
        for (; n + NR <= n1; n += NR) {
            rows_q4_1_m1((const block_q4_1 *)weights + n * nb, nb, q, d, s, out);
            for (int r = 0; r < NR; r++) y[n + r] = out[r] + (accumulate ? y[n + r] : 0.0f);
        }
    }
#endif
    /* one weight row at a time, the row ~2 KB ahead fetched meanwhile (as above) */
    const int64_t row_bytes = K / QK * (wtype == 0 ? (int64_t)sizeof(block_q4_1) : (int64_t)sizeof(block_q8_0));
    const int64_t ahead = (PF_BYTES + row_bytes - 1) / row_bytes;
    for (; n < n1; n++) {
        if (n + ahead < N) {
            const char *next = (const char *)weights + (n + ahead) * row_bytes;
            for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(next + off);
        }
        for (int64_t m0 = 0; m0 < M; m0 += MT) tile(wtype, weights, n, N, K, q, d, s, m0, M - m0 < MT ? M - m0 : MT, y, accumulate);
    }
}

void lamina_split(int64_t n, int64_t align, int part, int parts, int64_t *lo, int64_t *hi) {
    const int64_t units = (n + align - 1) / align;
    *lo = units * part / parts * align;
    *hi = units * (part + 1) / parts * align;
    if (*hi > n) *hi = n;
    if (*lo > n) *lo = n;
}

int lamina_qmatmul(int wtype, const void *weights, int64_t N, int64_t K, const float *x, int64_t M, float *y) {
    const int64_t nb = K / QK;
    if (M <= 0 || N <= 0) return 0;
    int16_t *q = malloc(sizeof(int16_t) * (size_t)(M * K));
    float *d = malloc(sizeof(float) * (size_t)(M * nb)), *s = malloc(sizeof(float) * (size_t)(M * nb));
    if (!q || !d || !s) { free(q); free(d); free(s); return -1; }
    lamina_quantize_rows(x, M, K, q, d, s);
#pragma omp parallel
    {
        int64_t lo, hi;
        lamina_split(N, NR, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        lamina_matmul_rows(wtype, weights, N, K, q, d, s, M, y, lo, hi, 0);
    }
    free(q); free(d); free(s);
    return 0;
}

/* W [N, K] in `wtype` blocks (0: Q4_1, 1: Q8_0) -> float32 out [N, K], in parallel over rows (prefill multiplies the
 * dequantized matrix with a float GEMM). */
void lamina_dequantize(int wtype, const void *weights, int64_t N, int64_t K, float *out) {
    const int64_t nb = K / QK;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b = 0; b < nb; b++) {
            float *o = out + n * K + b * QK;
            if (wtype == 0) {
                const block_q4_1 *blk = (const block_q4_1 *)weights + n * nb + b;
                const float d = fp16_to_float(blk->d), m = fp16_to_float(blk->m);
                for (int j = 0; j < QK / 2; j++) {
                    o[j] = d * (float)(blk->qs[j] & 0x0f) + m;
                    o[j + QK / 2] = d * (float)(blk->qs[j] >> 4) + m;
                }
            } else {
                const block_q8_0 *blk = (const block_q8_0 *)weights + n * nb + b;
                const float d = fp16_to_float(blk->d);
                for (int j = 0; j < QK; j++) o[j] = d * (float)blk->qs[j];
            }
        }
    }
}
