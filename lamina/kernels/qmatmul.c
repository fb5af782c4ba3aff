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

#ifndef PF_BYTES
#define PF_BYTES 2048 /* how far ahead of the rows being multiplied weights are prefetched */
#endif

typedef struct { uint16_t d, m; uint8_t qs[QK / 2]; } block_q4_1;
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;

const char *lamina_path(void) { return LAMINA_PATH; }

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

#ifdef LAMINA_AVX2
static inline int hsum8i(__m256i v) {
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    return _mm_cvtsi128_si32(t);
}
#endif

/* One block of 32: q = round(x / d) with d = max|x| / 32767 (to nearest, ties to even, as lrintf). Every path
 * computes the same q, d and s bit for bit (the same float operations, in the same order). */
void lamina_quantize_block(const float *x, int16_t *q, float *d, float *s) {
#if defined(LAMINA_AVX512)
    const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    const __m512i r0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), r1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm256_storeu_si256((__m256i *)q, _mm512_cvtsepi32_epi16(r0));
    _mm256_storeu_si256((__m256i *)(q + 16), _mm512_cvtsepi32_epi16(r1));
    const __m512i total = _mm512_add_epi32(r0, r1);
    const int sum = hsum8i(_mm256_add_epi32(_mm512_castsi512_si256(total), _mm512_extracti64x4_epi64(total, 1)));
#elif defined(LAMINA_AVX2)
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
    const int sum = hsum8i(total);
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
    const int64_t nb = K / QK;
    for (int64_t i = 0; i < M * nb; i++)
        lamina_quantize_block(x + i * QK, q + i * QK, d + SCALE_AT(i / nb, i % nb, nb), s + SCALE_AT(i / nb, i % nb, nb));
}

/* The register tile of the product: TR weight rows against TM = 4 activation rows, block by block. Each activation
 * row's per-block scales d and sums s come transposed, four rows side by side (dT, sT: [nb][4]), so that one vector
 * holds a block's four scales.
 *
 * SIMD paths: a block's integer dot product with one activation row is 8 int32 partial sums (two madd and an add on
 * AVX2; a madd and a vpdpwssd, which fuses the second multiply with the add, on AVX-512 VNNI). Two rounds of hadd fold
 * the four rows' partial sums into one vector [t0 t1 t2 t3 | t0 t1 t2 t3], converted and scaled by the block's four
 * (weight scale x activation scale) products with one multiply-add: the float work of a block is shared by four rows
 * instead of repeated for each (15 instructions per row and block before, about 7 now). Q4_1's offset m adds
 * m * s for the four rows in one more multiply-add. */
#define TM 4
#if defined(LAMINA_AVX2)
#define TR 2
typedef struct { __m256i lo, hi; } vblock; /* a block's 32 int16, 0-15 and 16-31 */
static inline vblock unpack_q4_1(const block_q4_1 *b) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)b->qs), low = _mm_set1_epi8(0x0f);
    return (vblock){_mm256_cvtepu8_epi16(_mm_and_si128(raw, low)),
                    _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low))};
}
static inline vblock unpack_q8_0(const block_q8_0 *b) {
    return (vblock){_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->qs)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b->qs + 16)))};
}
/* 8 int32 partial sums of the 32 products of weight block w and the activation block at a */
static inline __m256i dot_block(vblock w, const int16_t *a) {
    const __m256i lo = _mm256_madd_epi16(w.lo, _mm256_loadu_si256((const __m256i *)a));
#if defined(LAMINA_AVX512)
    return _mm256_dpwssd_epi32(lo, w.hi, _mm256_loadu_si256((const __m256i *)(a + 16)));
#else
    return _mm256_add_epi32(lo, _mm256_madd_epi16(w.hi, _mm256_loadu_si256((const __m256i *)(a + 16))));
#endif
}

/* Weight rows 0..tr-1 of `weights` (nb blocks of type wtype each) against activation rows 0..tm-1 of q (row stride
 * K); out[r * TM + t] = their products. wtype, tr and tm are constants at every call, so the loops unroll and the
 * accumulators are registers. */
static inline __attribute__((always_inline)) void tile_kernel(const int wtype, const void *weights, int64_t nb,
                                                              const int16_t *q, const float *dT, const float *sT,
                                                              int64_t K, const int tr, const int tm, float *out) {
    __m256 acc[TR];
    __m128 off[TR];
    for (int r = 0; r < tr; r++) acc[r] = _mm256_setzero_ps(), off[r] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256 D = _mm256_broadcast_ps((const __m128 *)(dT + TM * b)); /* [d0 d1 d2 d3 | d0 d1 d2 d3] */
        for (int r = 0; r < tr; r++) {
            const void *blk = (const char *)weights + (r * nb + b) * (wtype == 0 ? sizeof(block_q4_1) : sizeof(block_q8_0));
            const vblock w = wtype == 0 ? unpack_q4_1((const block_q4_1 *)blk) : unpack_q8_0((const block_q8_0 *)blk);
            int32_t dm; /* the block's float16 d (and Q4_1's m) */
            memcpy(&dm, blk, sizeof dm);
            const __m128 scales = _mm_cvtph_ps(_mm_cvtsi32_si128(dm)); /* [d m . .] */
            const __m256 wd = _mm256_broadcastss_ps(scales);
            if (tm == 1) { /* one row: its 8 partial sums scaled alike, summed at the end */
                const __m256i p = dot_block(w, q + b * QK);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(wd, _mm256_set1_ps(dT[4 * b])), acc[r]);
            } else {
                __m256i p[TM];
                for (int t = 0; t < TM; t++) p[t] = t < tm ? dot_block(w, q + t * K + b * QK) : _mm256_setzero_si256();
                const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(wd, D), acc[r]);
            }
            if (wtype == 0)
                off[r] = _mm_fmadd_ps(_mm_permute_ps(scales, 0x55), _mm_loadu_ps(sT + 4 * b), off[r]);
        }
    }
    for (int r = 0; r < tr; r++) {
        float o[4];
        _mm_storeu_ps(o, off[r]);
        if (tm == 1) {
            out[r * TM] = hsum8(acc[r]) + o[0];
            continue;
        }
        float lanes[4];
        _mm_storeu_ps(lanes, _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1)));
        for (int t = 0; t < tm; t++) out[r * TM + t] = lanes[t] + o[t];
    }
}
#else
#define TR 1
static inline __attribute__((always_inline)) void tile_kernel(const int wtype, const void *weights, int64_t nb,
                                                              const int16_t *q, const float *dT, const float *sT,
                                                              int64_t K, const int tr, const int tm, float *out) {
    for (int t = 0; t < tm; t++) {
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const int16_t *a = q + t * K + b * QK;
            int dot = 0;
            if (wtype == 0) {
                const block_q4_1 *w = (const block_q4_1 *)weights + b;
                for (int j = 0; j < QK / 2; j++) dot += (w->qs[j] & 0x0f) * a[j] + (w->qs[j] >> 4) * a[j + QK / 2];
                total += fp16_to_float(w->d) * dT[4 * b + t] * (float)dot + fp16_to_float(w->m) * sT[4 * b + t];
            } else {
                const block_q8_0 *w = (const block_q8_0 *)weights + b;
                for (int j = 0; j < QK; j++) dot += w->qs[j] * a[j];
                total += fp16_to_float(w->d) * dT[4 * b + t] * (float)dot;
            }
        }
        out[t] = total;
    }
    (void)tr;
}
#endif

/* Weight rows n..n+tr-1 against activation rows m0..m0+tm-1 (their scales transposed in dT, sT), written to (or
 * added to) y [M, N]. */
static void tile(int wtype, const void *weights, int64_t n, int64_t N, int64_t K, const int16_t *q, const float *dT,
                 const float *sT, int64_t m0, int tr, int tm, float *y, int accumulate) {
    const int64_t nb = K / QK, row_bytes = nb * (wtype == 0 ? (int64_t)sizeof(block_q4_1) : (int64_t)sizeof(block_q8_0));
    const void *w = (const char *)weights + n * row_bytes;
    float out[TR * TM];
    q += m0 * K;
#define LAMINA_TILE(TRC, TMC)                                                                                       \
    (wtype == 0 ? tile_kernel(0, w, nb, q, dT, sT, K, TRC, TMC, out) : tile_kernel(1, w, nb, q, dT, sT, K, TRC, TMC, out))
#define LAMINA_TILES(TRC)                                                                                           \
    switch (tm) {                                                                                                   \
    case 1: LAMINA_TILE(TRC, 1); break;                                                                             \
    case 2: LAMINA_TILE(TRC, 2); break;                                                                             \
    case 3: LAMINA_TILE(TRC, 3); break;                                                                             \
    default: LAMINA_TILE(TRC, 4); break;                                                                            \
    }
    if (tr == TR) { LAMINA_TILES(TR) }
    else { LAMINA_TILES(1) }
#undef LAMINA_TILES
#undef LAMINA_TILE
    for (int r = 0; r < tr; r++)
        for (int t = 0; t < tm; t++) {
            float *o = y + (m0 + t) * N + n + r;
            *o = out[r * TM + t] + (accumulate ? *o : 0.0f);
        }
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
        const __m256 x = _mm256_blend_ps(_mm256_set1_ps(d[TM * b]), _mm256_set1_ps(s[TM * b]), 0xaa);
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
    /* TR weight rows at a time against every activation row, TM at a time; the rows ~2 KB ahead are fetched
     * meanwhile (as above). */
    const int64_t nb = K / QK, groups = (M + TM - 1) / TM;
    const int64_t row_bytes = nb * (wtype == 0 ? (int64_t)sizeof(block_q4_1) : (int64_t)sizeof(block_q8_0));
    const int64_t ahead = (PF_BYTES + row_bytes - 1) / row_bytes;
    for (; n < n1;) {
        const int tr = n + TR <= n1 ? TR : 1;
        if (n + ahead + tr <= N) {
            const char *next = (const char *)weights + (n + ahead) * row_bytes;
            for (int64_t off = 0; off < tr * row_bytes; off += 64) __builtin_prefetch(next + off);
        }
        for (int64_t g = 0; g < groups; g++) {
            const int tm = M - g * TM < TM ? (int)(M - g * TM) : TM;
            tile(wtype, weights, n, N, K, q, d + g * nb * TM, s + g * nb * TM, g * TM, tr, tm, y, accumulate);
        }
        n += tr;
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
    float *d = calloc((size_t)(SCALE_ROWS(M) * nb), sizeof(float)), *s = calloc((size_t)(SCALE_ROWS(M) * nb), sizeof(float));
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

/* W [N, K] in `wtype` blocks (0: Q4_1, 1: Q8_0) -> out [N, K], float32 (bf16 = 0) or bfloat16 rounded to nearest
 * even (bf16 = 1), in parallel over rows: prefill multiplies the dequantized matrix with a float GEMM (oneDNN's
 * bfloat16 GEMM on CPUs with AMX or AVX-512 BF16). */
void lamina_dequantize(int wtype, const void *weights, int64_t N, int64_t K, void *out, int bf16) {
    const int64_t nb = K / QK;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float row[QK];
        for (int64_t b = 0; b < nb; b++) {
            float *o = bf16 ? row : (float *)out + n * K + b * QK;
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
            if (bf16) {
                uint16_t *dst = (uint16_t *)out + n * K + b * QK;
                for (int j = 0; j < QK; j++) {
                    uint32_t bits;
                    memcpy(&bits, &row[j], 4);
                    dst[j] = (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16); /* finite values only */
                }
            }
        }
    }
}
