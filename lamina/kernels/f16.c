/* F16 and BF16 weight matrices on the CPU: y[M, N] = x[M, K] @ W[N, K]^T, and W's dequantization, with W kept as the
 * 16-bit floats a GGUF file stores.
 *
 * A row of W is its K 16-bit values as they are (lamina/kernels/types.py counts them as K / 32 "blocks" of 64
 * bytes, so that the loader, tensor-parallel cuts and qmatmul.c's dispatch treat them as the other formats). The
 * activations are those every format gets: quantized to int16 per block of 32 with one float scale
 * (lamina_quantize_rows: x ~= d * q), so that a model's products carry the same error whatever its weights' format.
 * They are widened back to float32 (d * q) once a call, and each weight is widened as it is read (F16C's
 * vcvtph2ps for F16, a 16-bit shift for BF16; the same conversions in scalar C on the portable path), with float32
 * multiply-adds. No integer product here: a 16-bit float has 11 (F16) or 8 (BF16) significant bits and its own
 * exponent, so int16 products of them would need a scale per weight.
 *
 * qmatmul.c's lamina_matmul_rows and lamina_dequantize hand these two formats to this file's functions; decode.c and
 * lamina_qmatmul reach them that way. Register tiles of TR weight rows against up to 4 activation rows, each weight
 * loaded and widened once for the 4.
 */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

static inline float float_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint32_t bits_from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* IEEE float16 -> float32, exact for every input (zeros, subnormals, infinities, NaNs) and without branches, so
 * that loops of it vectorize: the bits moved into place and rescaled by 2^-112 for normal numbers, subnormals
 * built as 0.5 + m * 2^-24 less 0.5 (the FP16 library's conversion, as GGML's scalar one). */
static inline float half_to_float(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normal = float_from_bits((two_w >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
    const float subnormal = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return float_from_bits(sign | bits_from_float(two_w < (1u << 27) ? subnormal : normal));
}
static inline float bf16_to_float(uint16_t h) { return float_from_bits((uint32_t)h << 16); }
static inline __attribute__((always_inline)) float widen(const int t, uint16_t h) {
    return t == T_F16 ? half_to_float(h) : bf16_to_float(h);
}

#define TM 4 /* activation rows a tile */
#ifndef PF_BYTES
#define PF_BYTES 1024 /* how far ahead in each row weights are prefetched */
#endif

#if defined(LAMINA_AVX512)
typedef __m512 vec;
#define VL 16
#define TR 4 /* 16 accumulators, 4 weight vectors and an activation vector of the 32 registers */
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return hsum16(v); }
/* 16 weights from p, widened to float32 */
static inline __attribute__((always_inline)) vec vweights(const int t, const uint16_t *p) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    if (t == T_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#elif defined(LAMINA_AVX2)
typedef __m256 vec;
#define VL 8
#define TR 2 /* 8 accumulators, 2 weight vectors and an activation vector of the 16 registers */
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return hsum8(v); }
/* 8 weights from p, widened to float32 */
static inline __attribute__((always_inline)) vec vweights(const int t, const uint16_t *p) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (t == T_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#else
#define TR 2
#endif

/* out[r * TM + i] = W row r . x row i, for weight rows 0..tr-1 (K apart) and activation rows 0..tm-1 (K apart). t,
 * tr and tm are constants at every call, so the loops unroll and the accumulators are registers. */
static inline __attribute__((always_inline)) void tile(const int t, const uint16_t *w, int64_t K, const float *x,
                                                       const int tr, const int tm, float *out) {
#if defined(LAMINA_AVX2)
    vec acc[TR][TM];
    for (int r = 0; r < tr; r++)
        for (int i = 0; i < tm; i++) acc[r][i] = vzero();
    for (int64_t k = 0; k < K; k += QK) { /* a block of 32: one 64-byte line of each weight row */
        for (int r = 0; r < tr; r++) __builtin_prefetch((const char *)(w + r * K + k) + PF_BYTES);
#pragma GCC unroll 4
        for (int j = 0; j < QK; j += VL) {
            vec wv[TR];
            for (int r = 0; r < tr; r++) wv[r] = vweights(t, w + r * K + k + j);
            for (int i = 0; i < tm; i++) {
                const vec a = vload(x + i * K + k + j);
                for (int r = 0; r < tr; r++) acc[r][i] = vfma(wv[r], a, acc[r][i]);
            }
        }
    }
    for (int r = 0; r < tr; r++)
        for (int i = 0; i < tm; i++) out[r * TM + i] = vsum(acc[r][i]);
#else
    /* 32 lanes a row pair, summed at the end: element-wise multiply-adds, which the compiler vectorizes without
     * reordering a sum */
    float acc[TR][TM][QK];
    memset(acc, 0, sizeof acc);
    for (int64_t k = 0; k < K; k += QK)
        for (int r = 0; r < tr; r++) {
            float wf[QK];
            for (int j = 0; j < QK; j++) wf[j] = widen(t, w[r * K + k + j]);
            for (int i = 0; i < tm; i++)
                for (int j = 0; j < QK; j++) acc[r][i][j] += wf[j] * x[i * K + k + j];
        }
    for (int r = 0; r < tr; r++)
        for (int i = 0; i < tm; i++) {
            float total = 0.0f;
            for (int j = 0; j < QK; j++) total += acc[r][i][j];
            out[r * TM + i] = total;
        }
#endif
}

/* tile() for a format and tile shape known only at run time: one inlined copy per constant shape. */
#define LAMINA_F16_TILE(T, NAME)                                                                                    \
    static void NAME(const uint16_t *w, int64_t K, const float *x, int tr, int tm, float *out) {                    \
        if (tr == TR) {                                                                                             \
            switch (tm) {                                                                                           \
            case 1: tile(T, w, K, x, TR, 1, out); return;                                                           \
            case 2: tile(T, w, K, x, TR, 2, out); return;                                                           \
            case 3: tile(T, w, K, x, TR, 3, out); return;                                                           \
            default: tile(T, w, K, x, TR, 4, out); return;                                                          \
            }                                                                                                       \
        }                                                                                                           \
        switch (tm) {                                                                                               \
        case 1: tile(T, w, K, x, 1, 1, out); return;                                                                \
        case 2: tile(T, w, K, x, 1, 2, out); return;                                                                \
        case 3: tile(T, w, K, x, 1, 3, out); return;                                                                \
        default: tile(T, w, K, x, 1, 4, out); return;                                                               \
        }                                                                                                           \
    }
LAMINA_F16_TILE(T_F16, tile_f16)
LAMINA_F16_TILE(T_BF16, tile_bf16)
#undef LAMINA_F16_TILE

void lamina_f16_rows(int wtype, const void *w, int64_t N, int64_t K, const int16_t *q, const float *d, int64_t M,
                     float *y, int64_t ldy, int64_t n0, int64_t n1, int accumulate) {
    if (M <= 0 || n0 >= n1) return;
    /* the activations as floats, d * q: rows of up to 8192 values (one sequence's) on the stack */
    const int64_t nb = K / QK;
    float here[8192], *x = M * K <= 8192 ? here : malloc(sizeof(float) * (size_t)(M * K));
    if (!x) abort(); /* out of memory for the activations (as qmatmul.c's one-row buffer) */
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const float scale = d[SCALE_AT(m, b, nb)];
            for (int j = 0; j < QK; j++) x[m * K + b * QK + j] = scale * (float)q[m * K + b * QK + j];
        }
    void (*const run)(const uint16_t *, int64_t, const float *, int, int, float *) = wtype == T_F16 ? tile_f16 : tile_bf16;
    float out[TR * TM];
    /* TR weight rows at a time against every activation row, TM at a time: the rows are read from memory once, and
     * from cache for the later groups of activation rows */
    for (int64_t n = n0; n < n1;) {
        const int tr = n + TR <= n1 ? TR : 1;
        for (int64_t g = 0; g < M; g += TM) {
            const int tm = M - g < TM ? (int)(M - g) : TM;
            run((const uint16_t *)w + n * K, K, x + g * K, tr, tm, out);
            for (int r = 0; r < tr; r++)
                for (int i = 0; i < tm; i++) {
                    float *o = y + (g + i) * ldy + n + r;
                    *o = out[r * TM + i] + (accumulate ? *o : 0.0f);
                }
        }
        n += tr;
    }
    if (x != here) free(x);
    (void)N;
}

/* W [N, K] of F16 or BF16 -> out [N, K], float32 (bf16 = 0) or bfloat16 (bf16 = 1: F16 rounded to nearest even, as
 * torch's conversion of its float32 value; BF16 copied), in parallel over rows. */
void lamina_f16_dequantize(int wtype, const void *w, int64_t N, int64_t K, void *out, int bf16) {
    if (bf16 && wtype == T_BF16) {
        memcpy(out, w, sizeof(uint16_t) * (size_t)(N * K));
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *src = (const uint16_t *)w + n * K;
        int64_t k = 0;
        if (bf16) { /* F16 -> bfloat16 through float32 */
            uint16_t *dst = (uint16_t *)out + n * K;
            for (; k < K; k++) {
                const uint32_t u = bits_from_float(half_to_float(src[k]));
                dst[k] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16); /* finite values only */
            }
            continue;
        }
        float *dst = (float *)out + n * K;
#if defined(LAMINA_AVX2)
        if (wtype == T_F16)
            for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + k))));
        else
            for (; k + 8 <= K; k += 8)
                _mm256_storeu_ps(dst + k, _mm256_castsi256_ps(_mm256_slli_epi32(
                                              _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + k))), 16)));
#endif
        if (wtype == T_F16)
            for (; k < K; k++) dst[k] = half_to_float(src[k]);
        else
            for (; k < K; k++) dst[k] = bf16_to_float(src[k]);
    }
}
