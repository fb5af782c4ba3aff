/* Quantized matrix products for the CPU: y[M, N] = x[M, K] @ W[N, K]^T with W in GGML's block formats.
 *
 * Weights stay in the blocks a GGUF file stores, in every format of lamina/kernels/types.py's table (its docstring
 * has their layouts): the 32-weight Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL, and the 256-weight K-quants (Q2_K to
 * Q6_K) and IQ4_XS. Activations are quantized per block of 32 to int16 with one float scale (and the block's sum,
 * for formats with an offset), so the inner product is an integer dot product (on AVX2 16 multiply-adds in one
 * madd). llama.cpp quantizes the activations to int8 instead, one instruction cheaper a block but 256 times
 * coarser: enough to change a greedy continuation of a small model within a few tokens; with int16 the products
 * match float32 on the same weights to about 1e-5. Each weight is read once however many rows x has.
 *
 * Built by lamina/kernels/__init__.py once per path (portable C, AVX2, AVX-512 VNNI); parallel over output rows
 * with OpenMP, which resolves to the libgomp torch has already loaded.
 */
#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifndef PF_BYTES
#define PF_BYTES 2048 /* how far ahead of the rows being multiplied weights are prefetched */
#endif
#ifndef PF_ONE
#define PF_ONE 8192 /* AVX-512, one activation row: how far ahead of the block being multiplied */
#endif

typedef struct { uint16_t d, m; uint8_t qs[QK / 2]; } block_q4_1;

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

/* ---- The formats: one row of TRAITS and one unpacking function (scalar, and SIMD) each ------------------------
 *
 * Every format is read a chunk of 32 weights at a time: chunk c of a block becomes 32 small integers w (int16) and
 * floats with which weight j = scale * w[j] + off[j / 16]. Integer sub-scales (Q6_K's, Q3_K's and Q2_K's per 16
 * weights) are multiplied into w, so a chunk's product with an activation block is one integer dot product times
 * one float (|w| <= 4096 for Q6_K: 16 products of it with int16 activations still fit an int32). An offset that is
 * constant over the chunk (Q4_1, Q5_1, Q4_K, Q5_K) is multiplied by the activation block's sum, s; Q2_K's, which
 * changes every 16 weights, is a second dot product (of the 4-bit mins with the activations). */
typedef struct { int block, bytes; } lamina_traits;
static const lamina_traits TRAITS[LAMINA_NTYPES] = {
    [T_Q4_1] = {32, 20},    [T_Q8_0] = {32, 34},   [T_Q4_0] = {32, 18},   [T_Q5_0] = {32, 22},
    [T_Q5_1] = {32, 24},    [T_IQ4_NL] = {32, 18}, [T_IQ4_XS] = {256, 136}, [T_Q2_K] = {256, 84},
    [T_Q3_K] = {256, 110},  [T_Q4_K] = {256, 144}, [T_Q5_K] = {256, 176}, [T_Q6_K] = {256, 210},
    [T_F16] = {32, 64},     [T_BF16] = {32, 64}, /* 16-bit floats, 32 a "block": f16.c's */
};
static const int8_t KVALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

int lamina_type_block(int t) { return t >= 0 && t < LAMINA_NTYPES ? TRAITS[t].block : 0; }
int lamina_type_bytes(int t) { return t >= 0 && t < LAMINA_NTYPES ? TRAITS[t].bytes : 0; }

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return fp16_to_float(h);
}
static inline uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Q4_K's and Q5_K's 6-bit scale and min of sub-block j (0..7), packed in 12 bytes. */
static inline void k4_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63, *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}
/* Q3_K's 6-bit scale of sub-block i (0..15), less 32: low 4 bits in bytes 0..7, high 2 bits in bytes 8..11. */
static inline int q3_scale(const uint8_t *s, int i) {
    const int low = i < 8 ? s[i] & 0xf : s[i - 8] >> 4, high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    return (low | (high << 4)) - 32;
}
/* IQ4_XS's 6-bit scale of sub-block c (0..7), less 32. */
static inline int iq4xs_scale(const uint8_t *x, int c) {
    const uint16_t high = (uint16_t)(x[2] | (x[3] << 8));
    return (((x[4 + c / 2] >> (4 * (c % 2))) & 0xf) | (((high >> (2 * c)) & 3) << 4)) - 32;
}

/* The chunk's float scale, and its offset (the first half's, for Q2_K). */
static inline __attribute__((always_inline)) float chunk_scale(const int t, const uint8_t *x, int c, float *off) {
    int sc, m;
    switch (t) {
    case T_Q4_1: case T_Q5_1: *off = f16_at(x + 2); return f16_at(x);
    case T_IQ4_XS: *off = 0.0f; return f16_at(x) * (float)iq4xs_scale(x, c);
    case T_Q2_K: *off = -f16_at(x + 82) * (float)(x[2 * c] >> 4); return f16_at(x + 80);
    case T_Q3_K: *off = 0.0f; return f16_at(x + 108);
    case T_Q4_K: case T_Q5_K:
        k4_scale_min(x + 4, c, &sc, &m);
        *off = -(f16_at(x + 2) * (float)m);
        return f16_at(x) * (float)sc;
    case T_Q6_K: *off = 0.0f; return f16_at(x + 208);
    default: *off = 0.0f; return f16_at(x); /* Q8_0, Q4_0, Q5_0, IQ4_NL */
    }
}

/* The reference unpacking, every path's dequantization edges and the portable path's products: chunk c of block x
 * of format t -> w [32], scale, off [2] (weight j = scale * w[j] + off[j / 16]). */
static inline __attribute__((always_inline)) float unpack_ref(const int t, const uint8_t *x, int c, int16_t *w,
                                                              float *off) {
    const float scale = chunk_scale(t, x, c, &off[0]);
    off[1] = off[0];
    switch (t) {
    case T_Q4_0: case T_Q4_1: case T_IQ4_NL: case T_IQ4_XS: {
        const uint8_t *qs = t == T_Q4_0 || t == T_IQ4_NL ? x + 2 : t == T_Q4_1 ? x + 4 : x + 8 + 16 * c;
        for (int j = 0; j < 16; j++) {
            const int lo = qs[j] & 0xf, hi = qs[j] >> 4;
            if (t == T_Q4_0) w[j] = (int16_t)(lo - 8), w[j + 16] = (int16_t)(hi - 8);
            else if (t == T_Q4_1) w[j] = (int16_t)lo, w[j + 16] = (int16_t)hi;
            else w[j] = KVALUES[lo], w[j + 16] = KVALUES[hi];
        }
        break;
    }
    case T_Q5_0: case T_Q5_1: {
        const uint32_t qh = u32_at(x + (t == T_Q5_0 ? 2 : 4));
        const uint8_t *qs = x + (t == T_Q5_0 ? 6 : 8);
        const int bias = t == T_Q5_0 ? 16 : 0;
        for (int j = 0; j < 16; j++) {
            w[j] = (int16_t)(((qs[j] & 0xf) | (((qh >> j) & 1) << 4)) - bias);
            w[j + 16] = (int16_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - bias);
        }
        break;
    }
    case T_Q8_0:
        for (int j = 0; j < 32; j++) w[j] = (int8_t)x[2 + j];
        break;
    case T_Q2_K: {
        const uint8_t *q = x + 16 + 32 * (c / 4);
        const int shift = 2 * (c % 4), s0 = x[2 * c] & 0xf, s1 = x[2 * c + 1] & 0xf;
        for (int j = 0; j < 16; j++) {
            w[j] = (int16_t)(((q[j] >> shift) & 3) * s0);
            w[j + 16] = (int16_t)(((q[j + 16] >> shift) & 3) * s1);
        }
        off[1] = -f16_at(x + 82) * (float)(x[2 * c + 1] >> 4);
        break;
    }
    case T_Q3_K: {
        const uint8_t *q = x + 32 + 32 * (c / 4);
        const int shift = 2 * (c % 4), s0 = q3_scale(x + 96, 2 * c), s1 = q3_scale(x + 96, 2 * c + 1);
        for (int j = 0; j < 32; j++)
            w[j] = (int16_t)((((q[j] >> shift) & 3) - ((x[j] >> c) & 1 ? 0 : 4)) * (j < 16 ? s0 : s1));
        break;
    }
    case T_Q4_K: case T_Q5_K: {
        const uint8_t *qs = x + (t == T_Q4_K ? 16 : 48) + 32 * (c / 2);
        const int shift = 4 * (c % 2);
        for (int j = 0; j < 32; j++)
            w[j] = (int16_t)(((qs[j] >> shift) & 0xf) | (t == T_Q5_K ? ((x[16 + j] >> c) & 1) << 4 : 0));
        break;
    }
    case T_Q6_K: {
        const int n = c / 4, k = c % 4;
        const uint8_t *ql = x + 64 * n + 32 * (k & 1), *qh = x + 128 + 32 * n;
        const int8_t *sc = (const int8_t *)(x + 192) + 8 * n + 2 * k;
        for (int j = 0; j < 32; j++)
            w[j] = (int16_t)(((((ql[j] >> (4 * (k >> 1))) & 0xf) | (((qh[j] >> (2 * k)) & 3) << 4)) - 32) * sc[j / 16]);
        break;
    }
    default: memset(w, 0, sizeof(int16_t) * QK); /* not a format (the callers check) */
    }
    return scale;
}

#ifdef LAMINA_AVX2
typedef struct { __m256i lo, hi; } vblock; /* a chunk's 32 int16, 0-15 and 16-31 */

static inline __m256i widen_u8(const uint8_t *p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)); }
/* 16 bits of v as 16 int16 lanes: 16 where the bit is set, else 0 (Q5_0/Q5_1's fifth bits). */
static inline __m256i bits_to_16(uint32_t v) {
    const __m256i mask = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                           (short)32768);
    const __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)v), mask), mask);
    return _mm256_and_si256(set, _mm256_set1_epi16(16));
}
/* 16 nibble indices (int16 lanes) -> the IQ4 grid's values. */
static inline __m256i iq4_lookup(__m128i nibbles) {
    const __m128i grid = _mm_loadu_si128((const __m128i *)KVALUES);
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(grid, nibbles));
}

/* unpack_ref's w as vectors (the scale and offsets come from chunk_scale). */
static inline __attribute__((always_inline)) vblock unpack(const int t, const uint8_t *x, int c) {
    const __m256i low4 = _mm256_set1_epi16(0x0f);
    switch (t) {
    case T_Q4_0: case T_Q4_1: {
        const __m256i raw = widen_u8(x + (t == T_Q4_0 ? 2 : 4));
        vblock w = {_mm256_and_si256(raw, low4), _mm256_srli_epi16(raw, 4)};
        if (t == T_Q4_0) w.lo = _mm256_sub_epi16(w.lo, _mm256_set1_epi16(8)), w.hi = _mm256_sub_epi16(w.hi, _mm256_set1_epi16(8));
        return w;
    }
    case T_IQ4_NL: case T_IQ4_XS: {
        const __m128i raw = _mm_loadu_si128((const __m128i *)(x + (t == T_IQ4_NL ? 2 : 8 + 16 * c)));
        const __m128i m = _mm_set1_epi8(0x0f);
        return (vblock){iq4_lookup(_mm_and_si128(raw, m)), iq4_lookup(_mm_and_si128(_mm_srli_epi16(raw, 4), m))};
    }
    case T_Q5_0: case T_Q5_1: {
        const uint32_t qh = u32_at(x + (t == T_Q5_0 ? 2 : 4));
        const __m256i raw = widen_u8(x + (t == T_Q5_0 ? 6 : 8));
        vblock w = {_mm256_or_si256(_mm256_and_si256(raw, low4), bits_to_16(qh)),
                    _mm256_or_si256(_mm256_srli_epi16(raw, 4), bits_to_16(qh >> 16))};
        if (t == T_Q5_0) w.lo = _mm256_sub_epi16(w.lo, _mm256_set1_epi16(16)), w.hi = _mm256_sub_epi16(w.hi, _mm256_set1_epi16(16));
        return w;
    }
    case T_Q8_0:
        return (vblock){_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x + 2))),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x + 18)))};
    case T_Q2_K: {
        const uint8_t *q = x + 16 + 32 * (c / 4);
        const int shift = 2 * (c % 4);
        const __m256i three = _mm256_set1_epi16(3);
        return (vblock){_mm256_mullo_epi16(_mm256_and_si256(_mm256_srli_epi16(widen_u8(q), shift), three),
                                           _mm256_set1_epi16(x[2 * c] & 0xf)),
                        _mm256_mullo_epi16(_mm256_and_si256(_mm256_srli_epi16(widen_u8(q + 16), shift), three),
                                           _mm256_set1_epi16(x[2 * c + 1] & 0xf))};
    }
    case T_Q3_K: {
        const uint8_t *q = x + 32 + 32 * (c / 4);
        const int shift = 2 * (c % 4);
        const __m256i three = _mm256_set1_epi16(3), one = _mm256_set1_epi16(1), four = _mm256_set1_epi16(4);
        /* ((q >> shift) & 3) - 4 + 4 * (bit c of the high mask) */
#define Q3_HALF(off, i)                                                                                             \
    _mm256_mullo_epi16(                                                                                             \
        _mm256_sub_epi16(_mm256_add_epi16(_mm256_and_si256(_mm256_srli_epi16(widen_u8(q + off), shift), three),      \
                                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(widen_u8(x + off), c), one), 2)), \
                         four),                                                                                     \
        _mm256_set1_epi16((short)q3_scale(x + 96, i)))
        return (vblock){Q3_HALF(0, 2 * c), Q3_HALF(16, 2 * c + 1)};
#undef Q3_HALF
    }
    case T_Q4_K: case T_Q5_K: {
        const uint8_t *qs = x + (t == T_Q4_K ? 16 : 48) + 32 * (c / 2);
        const int shift = 4 * (c % 2);
        vblock w = {_mm256_and_si256(_mm256_srli_epi16(widen_u8(qs), shift), low4),
                    _mm256_and_si256(_mm256_srli_epi16(widen_u8(qs + 16), shift), low4)};
        if (t == T_Q5_K) {
            const __m256i sixteen = _mm256_set1_epi16(16);
            w.lo = _mm256_or_si256(w.lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(widen_u8(x + 16), c), 4), sixteen));
            w.hi = _mm256_or_si256(w.hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(widen_u8(x + 32), c), 4), sixteen));
        }
        return w;
    }
    default: { /* T_Q6_K */
        const int n = c / 4, k = c % 4;
        const uint8_t *ql = x + 64 * n + 32 * (k & 1), *qh = x + 128 + 32 * n;
        const int8_t *sc = (const int8_t *)(x + 192) + 8 * n + 2 * k;
        const __m256i thirty_two = _mm256_set1_epi16(32), high2 = _mm256_set1_epi16(0x30);
#define Q6_HALF(off)                                                                                                \
    _mm256_sub_epi16(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(widen_u8(ql + off), 4 * (k >> 1)), low4),   \
                                     _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(widen_u8(qh + off), 2 * k), 4), high2)), \
                     thirty_two)
        return (vblock){_mm256_mullo_epi16(Q6_HALF(0), _mm256_set1_epi16(sc[0])),
                        _mm256_mullo_epi16(Q6_HALF(16), _mm256_set1_epi16(sc[1]))};
#undef Q6_HALF
    }
    }
}
/* Q2_K's 4-bit mins of chunk c's two halves, as weights (their float scale is -dmin). */
static inline vblock q2k_mins(const uint8_t *x, int c) {
    return (vblock){_mm256_set1_epi16(x[2 * c] >> 4), _mm256_set1_epi16(x[2 * c + 1] >> 4)};
}

/* 8 int32 partial sums of the 32 products of chunk w and the activation block at a */
static inline __m256i dot_block(vblock w, const int16_t *a) {
    const __m256i lo = _mm256_madd_epi16(w.lo, _mm256_loadu_si256((const __m256i *)a));
#if defined(LAMINA_AVX512)
    return _mm256_dpwssd_epi32(lo, w.hi, _mm256_loadu_si256((const __m256i *)(a + 16)));
#else
    return _mm256_add_epi32(lo, _mm256_madd_epi16(w.hi, _mm256_loadu_si256((const __m256i *)(a + 16))));
#endif
}
#endif

/* ---- The product: a register tile of TR weight rows against TM = 4 (or 1) activation rows ------------------------
 *
 * Each activation row's per-block scales d and sums s come transposed, four rows side by side (dT, sT: [nb][4]), so
 * that one vector holds a block's four scales. SIMD paths: a chunk's integer dot product with one activation row is
 * 8 int32 partial sums (two madd and an add on AVX2; a madd and a vpdpwssd, which fuses the second multiply with
 * the add, on AVX-512 VNNI). For four rows, two rounds of hadd fold their partial sums into one vector
 * [t0 t1 t2 t3 | t0 t1 t2 t3], converted and scaled by the chunk's four (weight scale x activation scale) products
 * with one multiply-add: the float work of a chunk is shared by four rows. An offset adds off * s for the four rows
 * in one more multiply-add. One activation row on AVX-512 goes to row512 or kquant_split instead (below). */
#define TM 4
#if defined(LAMINA_AVX2)
#if defined(LAMINA_AVX512)
#define TR 4 /* weight rows a tile: AVX-512 has the registers for four rows' accumulators */
#else
#define TR 2
#endif
#if defined(LAMINA_AVX512)
#define EVEN_ODD(t) 0 /* row512 reads every format in natural order */
#else
#define EVEN_ODD(t) ((t) == T_Q4_K || (t) == T_Q5_K || (t) == T_Q6_K) /* formats whose one-row product wants it */
#endif

/* One activation row's int16 values, each block of 32 as its 16 even values then its 16 odd ones. */
static inline void even_odd(const int16_t *q, int64_t K, int16_t *out) {
    for (int64_t b = 0; b < K; b += QK)
        for (int j = 0; j < QK / 2; j++) out[b + j] = q[b + 2 * j], out[b + QK / 2 + j] = q[b + 2 * j + 1];
}
/* acc += the products of chunk w (float scale `scale`) with activation block b of rows 0..tm-1 */
static inline __attribute__((always_inline)) void accumulate(vblock w, float scale, const int16_t *q, int64_t K,
                                                             int64_t b, const float *dT, const int tm, const int rows,
                                                             __m256 *acc) {
    if (tm == 1) {
        acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(w, q + b * QK)), _mm256_set1_ps(scale * dT[TM * b]), acc[0]);
        return;
    }
    __m256i p[TM];
    for (int t = 0; t < TM; t++) p[t] = t < rows ? dot_block(w, q + t * K + b * QK) : _mm256_setzero_si256();
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m256 D = _mm256_mul_ps(_mm256_broadcast_ps((const __m128 *)(dT + TM * b)), _mm256_set1_ps(scale));
    acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), D, acc[0]);
}

/* The float scales and offsets (weight j of chunk c = scales[c] * w[j] + offsets[c]) of 8 chunks from `x`: chunks
 * 0..7 of one 256-weight block, or the one chunk of each of 8 consecutive 32-weight blocks. */
static inline __attribute__((always_inline)) void group_scales(const int t, const uint8_t *x, __m256 *scales,
                                                               __m256 *offsets) {
    if (t == T_Q4_K || t == T_Q5_K) { /* the 12 bytes of 6-bit scales and mins, unpacked 4 at a time */
        uint32_t u[3];
        memcpy(u, x + 4, 12);
        const uint32_t sc_lo = u[0] & 0x3f3f3f3f, m_lo = u[1] & 0x3f3f3f3f;
        const uint32_t sc_hi = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
        const uint32_t m_hi = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32((int)sc_lo, (int)sc_hi, 0, 0)));
        const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32((int)m_lo, (int)m_hi, 0, 0)));
        *scales = _mm256_mul_ps(_mm256_set1_ps(f16_at(x)), sc);
        *offsets = _mm256_mul_ps(_mm256_set1_ps(-f16_at(x + 2)), m);
        return;
    }
    if (t == T_Q6_K || t == T_Q3_K || t == T_Q2_K) { /* one float scale; sub-scales are in the integers */
        *scales = _mm256_set1_ps(f16_at(x + (t == T_Q6_K ? 208 : t == T_Q3_K ? 108 : 80)));
        *offsets = _mm256_setzero_ps();
        return;
    }
    float S[8], O[8];
    if (t == T_IQ4_XS) {
        for (int c = 0; c < 8; c++) S[c] = (float)iq4xs_scale(x, c), O[c] = 0.0f;
        *scales = _mm256_mul_ps(_mm256_set1_ps(f16_at(x)), _mm256_loadu_ps(S));
        *offsets = _mm256_setzero_ps();
        return;
    }
    /* 32-weight blocks: each its float16 d (and m) */
    const int bytes = TRAITS[t].bytes;
    uint16_t d[8], m[8];
    for (int c = 0; c < 8; c++) memcpy(&d[c], x + c * bytes, 2), memcpy(&m[c], x + c * bytes + 2, 2);
    *scales = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)d));
    *offsets = t == T_Q4_1 || t == T_Q5_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)m)) : _mm256_setzero_ps();
    (void)O;
}

/* Q4_K, Q5_K and Q6_K for one activation row, without a cross-lane shuffle per chunk: a chunk's bytes are read
 * as 16 little-endian 16-bit lanes, so that masks and shifts alone give its even weights (the low byte of each
 * lane) and its odd ones (the high byte), and the activations come permuted to match (even_odd: per block of 32,
 * the 16 even values then the 16 odd ones). vblock.lo = the 16 even weights, .hi = the 16 odd ones. */
static inline __attribute__((always_inline)) vblock unpack_even_odd(const int t, const uint8_t *x, int c) {
    const __m256i low4 = _mm256_set1_epi16(0x0f);
    if (t == T_Q6_K) { /* raw q - 32: the sub-scales are applied in float (kquant_row) */
        const int n = c / 4, k = c % 4, shift = 4 * (k >> 1);
        const __m256i l = _mm256_loadu_si256((const __m256i *)(x + 64 * n + 32 * (k & 1)));
        const __m256i h = _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * n));
        const __m256i three = _mm256_set1_epi16(3), thirty_two = _mm256_set1_epi16(32);
        const __m256i even = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l, shift), low4),
                                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * k), three), 4));
        const __m256i odd = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l, 8 + shift), low4),
                                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 8 + 2 * k), three), 4));
        return (vblock){_mm256_sub_epi16(even, thirty_two), _mm256_sub_epi16(odd, thirty_two)};
    }
    const __m256i v = _mm256_loadu_si256((const __m256i *)(x + (t == T_Q4_K ? 16 : 48) + 32 * (c / 2)));
    vblock w = c % 2 == 0 ? (vblock){_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 8), low4)}
                          : (vblock){_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), _mm256_srli_epi16(v, 12)};
    if (t == T_Q5_K) { /* bit c of qh[j] is weight j's fifth bit */
        const __m256i h = _mm256_loadu_si256((const __m256i *)(x + 16)), sixteen = _mm256_set1_epi16(16);
        const __m256i he = c <= 4 ? _mm256_slli_epi16(h, 4 - c) : _mm256_srli_epi16(h, c - 4);
        w.lo = _mm256_or_si256(w.lo, _mm256_and_si256(he, sixteen));
        w.hi = _mm256_or_si256(w.hi, _mm256_and_si256(_mm256_srli_epi16(h, c + 4), sixteen));
    }
    return w;
}

static inline __attribute__((always_inline)) void kquant_row(const int t, const uint8_t *weights, int64_t row_bytes,
                                                             int64_t K, const int16_t *qp, const float *dT,
                                                             const float *sT, const int tr, float *out) {
    const int bytes = TRAITS[t].bytes;
    const __m256i every4 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28); /* row 0's scales in the [b][4] layout */
    __m256 acc[TR][2], off[TR];
    for (int r = 0; r < tr; r++) acc[r][0] = acc[r][1] = off[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / 256; g++) {
        const __m256 XD = _mm256_i32gather_ps(dT + TM * 8 * g, every4, 4);
        const __m256 XS = t == T_Q6_K ? _mm256_setzero_ps() : _mm256_i32gather_ps(sT + TM * 8 * g, every4, 4);
        for (int r = 0; r < tr; r++) {
            const uint8_t *x = weights + r * row_bytes + g * bytes;
            float S[16]; /* Q4_K/Q5_K: each chunk's scale x its activation scale; Q6_K: each 16 weights' */
            if (t == T_Q6_K) {
                const __m128i sc = _mm_loadu_si128((const __m128i *)(x + 192));
                const __m256 d = _mm256_set1_ps(f16_at(x + 208));
                const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc));
                const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)));
                const __m256 xlo = _mm256_permutevar8x32_ps(XD, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
                const __m256 xhi = _mm256_permutevar8x32_ps(XD, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
                _mm256_storeu_ps(S, _mm256_mul_ps(_mm256_mul_ps(lo, d), xlo));
                _mm256_storeu_ps(S + 8, _mm256_mul_ps(_mm256_mul_ps(hi, d), xhi));
            } else {
                __m256 scales, offsets;
                group_scales(t, x, &scales, &offsets);
                _mm256_storeu_ps(S, _mm256_mul_ps(scales, XD));
                off[r] = _mm256_fmadd_ps(offsets, XS, off[r]);
            }
            __asm__ volatile("" ::: "memory"); /* broadcast S from memory (a load), not by shuffles */
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                const __m256i p = dot_block(unpack_even_odd(t, x, c), qp + (8 * g + c) * QK);
                /* Q6_K: lanes 0-3 hold the chunk's first 16 weights' products, 4-7 its last 16's */
                const __m256 scale = t == T_Q6_K ? _mm256_set_m128(_mm_broadcast_ss(&S[2 * c + 1]), _mm_broadcast_ss(&S[2 * c]))
                                                 : _mm256_broadcast_ss(&S[c]);
                acc[r][c & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r][c & 1]);
            }
        }
    }
    for (int r = 0; r < tr; r++) out[r * TM] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), off[r]));
}

/* One activation row (decode of one sequence) against weight rows 0..tr-1, 8 chunks (256 weights) at a time: the
 * 8 chunks' weight scales times their activation scales are computed together (S), their offsets times the
 * activation sums in one multiply-add, and two accumulator chains run side by side a row. Chunks past the last
 * whole 8 (rows of 576 weights) go one at a time. out[r * TM] = the products. */
static inline __attribute__((always_inline)) void row_kernel(const int wtype, const uint8_t *weights,
                                                             int64_t row_bytes, int64_t K, const int16_t *q,
                                                             const float *dT, const float *sT, const int tr,
                                                             float *out) {
    const int block = TRAITS[wtype].block, bytes = TRAITS[wtype].bytes, chunks = block / QK;
    const int has_off = wtype == T_Q4_1 || wtype == T_Q5_1 || wtype == T_Q4_K || wtype == T_Q5_K;
    const __m256i every4 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28); /* row 0's scales in the [b][4] layout */
    __m256 acc[TR][2], off[TR];
    for (int r = 0; r < tr; r++) acc[r][0] = acc[r][1] = off[r] = _mm256_setzero_ps();
    const int64_t nb = K / QK, groups = nb / 8;
    for (int64_t g = 0; g < groups; g++) {
        const __m256 XD = _mm256_i32gather_ps(dT + TM * 8 * g, every4, 4);
        const __m256 XS = has_off ? _mm256_i32gather_ps(sT + TM * 8 * g, every4, 4) : _mm256_setzero_ps();
        for (int r = 0; r < tr; r++) {
            /* the 8 chunks: chunks 0..7 of one 256-weight block, or 8 consecutive 32-weight blocks */
            const uint8_t *base = weights + r * row_bytes + (chunks == 8 ? g * bytes : 8 * g * bytes);
            float S[8], O[8];
            __m256 scales, offsets;
            group_scales(wtype, base, &scales, &offsets);
            _mm256_storeu_ps(S, _mm256_mul_ps(scales, XD));
            if (has_off) off[r] = _mm256_fmadd_ps(offsets, XS, off[r]);
            (void)O;
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                const int64_t b = 8 * g + c;
                const uint8_t *x = chunks == 8 ? base : base + c * bytes;
                const int cc = chunks == 8 ? c : 0;
                const __m256i p = dot_block(unpack(wtype, x, cc), q + b * QK);
                acc[r][c & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(S[c]), acc[r][c & 1]);
                if (wtype == T_Q2_K) {
                    const __m256i m = dot_block(q2k_mins(x, cc), q + b * QK);
                    acc[r][c & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(-f16_at(x + 82) * dT[TM * b]),
                                                    acc[r][c & 1]);
                }
            }
        }
    }
    float tail[TR] = {0.0f};
    for (int64_t b = groups * 8; b < nb; b++) /* 32-weight formats only: 256-weight rows are whole groups */
        for (int r = 0; r < tr; r++) {
            float o;
            const uint8_t *x = weights + r * row_bytes + b / chunks * bytes;
            const float scale = chunk_scale(wtype, x, (int)(b % chunks), &o);
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(unpack(wtype, x, (int)(b % chunks)), q + b * QK)),
                                        _mm256_set1_ps(scale * dT[TM * b]), acc[r][0]);
            if (has_off) tail[r] += o * sT[TM * b];
        }
    for (int r = 0; r < tr; r++) out[r * TM] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), off[r])) + tail[r];
}

#if defined(LAMINA_AVX512)
/* ---- One activation row on AVX-512: a chunk of 32 weights in one 512-bit register, in natural order ------------
 *
 * Decode of one sequence reads every weight once for 2 flops, so its speed is how few instructions a byte of weights
 * costs. With 32 int16 lanes a register holds a whole chunk: its unpacking is a widening load and a mask or shift
 * (two chunks of Q4_K from one load), its integer product one madd, its float part one convert and one multiply-add
 * with the chunk's scale (weight scale x activation scale), broadcast from a small table built per 256 weights. A
 * fifth bit (Q5_0, Q5_1, Q5_K) is a masked add straight from the stored bits; IQ4's grid one vpermw. */

/* 32 bytes -> 32 int16 lanes, zero-extended */
static inline __m512i zx32(const uint8_t *p) {
#if defined(LAMINA_SIMDE) /* SIMDe has no 512-bit vpmovzxbw: two 256-bit halves */
    const __m128i lo = _mm_loadu_si128((const __m128i *)p), hi = _mm_loadu_si128((const __m128i *)(p + 16));
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_cvtepu8_epi16(lo)), _mm256_cvtepu8_epi16(hi), 1);
#else
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
#endif
}
/* Bit c of each of the 32 bytes at p, as a mask (bit j = bit c of byte j): each byte's bit c moved to its top */
static inline __mmask32 bit_mask(const uint8_t *p, int c) {
    return (__mmask32)_mm256_movemask_epi8(_mm256_slli_epi16(_mm256_loadu_si256((const __m256i *)p), 7 - c));
}
/* A 32-weight block's 16 nibble bytes -> its 32 nibbles in order (low halves are weights 0-15, high 16-31) */
static inline __m512i nibbles32(const uint8_t *p) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)), low4 = _mm256_set1_epi16(0x0f);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low4)), _mm256_srli_epi16(v, 4), 1);
}

/* Chunk c of the 8 chunks at `base` (one 256-weight block, or 8 consecutive 32-weight blocks of `bytes` each) as 32
 * int16 in order; Q2_K's, Q3_K's and Q6_K's with their sub-scales (Q2_K's mins go apart; Q4_K's and Q5_K's are in
 * the chunk's float scale). One stream reads Q4_K, Q5_K and Q6_K through kquant_split instead; the panels read every
 * format here. */
static inline __attribute__((always_inline)) __m512i unpack512(const int t, const uint8_t *base, int bytes, int c) {
    const __m512i low4 = _mm512_set1_epi16(0x0f);
    if (t == T_Q4_K || t == T_Q5_K) {
        const __m512i w = _mm512_and_si512(_mm512_srli_epi16(zx32(base + (t == T_Q4_K ? 16 : 48) + 32 * (c / 2)), 4 * (c % 2)), low4);
        return t == T_Q5_K ? _mm512_mask_add_epi16(w, bit_mask(base + 16, c), w, _mm512_set1_epi16(16)) : w;
    }
    if (t == T_Q6_K) {
        const int n = c / 4, k = c % 4;
        const int8_t *sc = (const int8_t *)(base + 192) + 8 * n + 2 * k;
        const __m512i lo = _mm512_and_si512(_mm512_srli_epi16(zx32(base + 64 * n + 32 * (k & 1)), 4 * (k >> 1)), low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(zx32(base + 128 + 32 * n), 2 * k), _mm512_set1_epi16(3));
        const __m512i q = _mm512_sub_epi16(_mm512_or_si512(lo, _mm512_slli_epi16(hi, 4)), _mm512_set1_epi16(32));
        return _mm512_mullo_epi16(q, _mm512_inserti64x4(_mm512_set1_epi16(sc[0]), _mm256_set1_epi16(sc[1]), 1));
    }
    switch (t) {
    case T_IQ4_XS: {
        const __m512i grid = _mm512_cvtepi8_epi16(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)KVALUES)));
        return _mm512_permutexvar_epi16(nibbles32(base + 8 + 16 * c), grid);
    }
    case T_Q3_K: {
        const __m512i q = zx32(base + 32 + 32 * (c / 4));
        const __m512i low2 = _mm512_and_si512(_mm512_srli_epi16(q, 2 * (c % 4)), _mm512_set1_epi16(3));
        /* q - 4, plus 4 where bit c of the high mask is set */
        const __m512i less4 = _mm512_sub_epi16(low2, _mm512_set1_epi16(4));
        const __m512i w = _mm512_mask_add_epi16(less4, bit_mask(base, c), less4, _mm512_set1_epi16(4));
        const __m512i sc = _mm512_inserti64x4(_mm512_set1_epi16((short)q3_scale(base + 96, 2 * c)),
                                              _mm256_set1_epi16((short)q3_scale(base + 96, 2 * c + 1)), 1);
        return _mm512_mullo_epi16(w, sc);
    }
    case T_Q2_K: {
        const __m512i q = zx32(base + 16 + 32 * (c / 4));
        const __m512i sc = _mm512_inserti64x4(_mm512_set1_epi16(base[2 * c] & 0xf),
                                              _mm256_set1_epi16(base[2 * c + 1] & 0xf), 1);
        return _mm512_mullo_epi16(_mm512_and_si512(_mm512_srli_epi16(q, 2 * (c % 4)), _mm512_set1_epi16(3)), sc);
    }
    case T_Q8_0: return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(base + c * bytes + 2)));
    case T_Q4_0: return _mm512_sub_epi16(nibbles32(base + c * bytes + 2), _mm512_set1_epi16(8));
    case T_Q4_1: return nibbles32(base + c * bytes + 4);
    case T_IQ4_NL: {
        const __m512i grid = _mm512_cvtepi8_epi16(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)KVALUES)));
        return _mm512_permutexvar_epi16(nibbles32(base + c * bytes + 2), grid);
    }
    default: { /* T_Q5_0, T_Q5_1 */
        const uint8_t *x = base + c * bytes;
        const __m512i w = nibbles32(x + (t == T_Q5_0 ? 6 : 8));
        const __m512i five = _mm512_mask_add_epi16(w, (__mmask32)u32_at(x + (t == T_Q5_0 ? 2 : 4)), w,
                                                   _mm512_set1_epi16(16));
        return t == T_Q5_0 ? _mm512_sub_epi16(five, _mm512_set1_epi16(16)) : five;
    }
    }
}

/* One activation row against weight rows 0..tr-1 (unpack512's formats), 8 chunks (256 weights) at a time. First
 * each row's table S of the 8 chunks' weight scales times their activation scales, and its offsets times the
 * activation sums in one multiply-add; then chunk by chunk, one activation load for all tr rows, two accumulator
 * chains a row. Rows of 576 weights end with a part-group of 32-weight blocks. dT, sT: this row's activation
 * scales and sums, contiguous. out[r * TM] = the products. */
static inline __attribute__((always_inline)) void row512(const int wtype, const uint8_t *weights, int64_t row_bytes,
                                                         int64_t K, const int16_t *q, const float *dT,
                                                         const float *sT, const int tr, float *out) {
    if (wtype == T_Q4_K || wtype == T_Q5_K || wtype == T_Q6_K) abort(); /* kquant_split's: never sent here */
    const int block = TRAITS[wtype].block, bytes = TRAITS[wtype].bytes, chunks = block / QK;
    const int has_off = wtype == T_Q4_1 || wtype == T_Q5_1;
    __m512 acc[TR][2];
    __m256 off[TR];
    for (int r = 0; r < tr; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps(), off[r] = _mm256_setzero_ps();
    const int64_t nb = K / QK, groups = nb / 8;
    for (int64_t g = 0; g < groups; g++) {
        const __m256 XD = _mm256_loadu_ps(dT + 8 * g);
        const __m256 XS = has_off ? _mm256_loadu_ps(sT + 8 * g) : _mm256_setzero_ps();
        const uint8_t *base[TR];
        float S[TR][8];
        for (int r = 0; r < tr; r++) {
            base[r] = weights + r * row_bytes + (chunks == 8 ? g * bytes : 8 * g * bytes);
            if (tr == 1) /* one stream (or a tile's last rows): PF_ONE bytes ahead */
                for (int o = 0; o < (chunks == 8 ? bytes : 8 * bytes); o += 64) __builtin_prefetch(base[r] + PF_ONE + o);
            __m256 scales, offsets;
            group_scales(wtype, base[r], &scales, &offsets);
            _mm256_storeu_ps(S[r], _mm256_mul_ps(scales, XD));
            if (has_off) off[r] = _mm256_fmadd_ps(offsets, XS, off[r]);
        }
        __asm__ volatile("" ::: "memory"); /* broadcast S from memory (a load), not by shuffles */
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            const __m512i a = _mm512_loadu_si512((const void *)(q + (8 * g + c) * QK));
            for (int r = 0; r < tr; r++) {
                const __m512i p = _mm512_madd_epi16(unpack512(wtype, base[r], bytes, c), a);
                acc[r][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(S[r][c]), acc[r][c & 1]);
                if (wtype == T_Q2_K) { /* minus dmin x the 4-bit mins x the activations, each half its own */
                    const uint8_t *x = base[r];
                    const __m512i m = _mm512_inserti64x4(_mm512_set1_epi16(x[2 * c] >> 4),
                                                         _mm256_set1_epi16(x[2 * c + 1] >> 4), 1);
                    acc[r][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(m, a)),
                                                    _mm512_set1_ps(-f16_at(x + 82) * dT[8 * g + c]), acc[r][c & 1]);
                }
            }
        }
    }
    float tail[TR] = {0.0f};
    for (int64_t b = groups * 8; b < nb; b++) /* 32-weight formats only: 256-weight rows are whole groups */
        for (int r = 0; r < tr; r++) {
            float o;
            const uint8_t *x = weights + r * row_bytes + b * bytes;
            const float scale = chunk_scale(wtype, x, 0, &o);
            const __m512i p = _mm512_madd_epi16(unpack512(wtype, x, bytes, 0),
                                                _mm512_loadu_si512((const void *)(q + b * QK)));
            acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(scale * dT[b]), acc[r][0]);
            if (has_off) tail[r] += o * sT[b];
        }
    for (int r = 0; r < tr; r++)
        out[r * TM] = hsum16(_mm512_add_ps(acc[r][0], acc[r][1])) + hsum8(off[r]) + tail[r];
}
/* ---- Q4_K, Q5_K and Q6_K against one activation row at int8's instruction rate, exactly (but for Q6_K's -32) --
 *
 * These formats' weights are small unsigned integers (0..15, 0..31, and 0..63 before Q6_K's -32), so a weight fits
 * either operand of vpdpbusd (unsigned x signed bytes, four products summed in each int32 lane: 64 a instruction,
 * twice vpdpwssd's 32). Each int16 activation is split as a = 256 hi + lo, hi = a >> 8 (signed byte) and
 * lo = a & 255 (unsigned byte); the weights are the unsigned operand against hi and the signed one against lo, and
 * 256 (w . hi) + w . lo is w . a exactly: the int16 product, in two int8 instructions a 64 weights instead of two
 * int16 ones a 32. The weights stay packed bytes (no widening): 64 bytes of Q4_K nibbles are two vectors of 64
 * weights, the chunks (0, 2) and (1, 3), and the split activations come in that order (split_row). */

/* The activations of one row (q, K values) split for the format's weight vectors: hi, lo [K] bytes, chunk by chunk
 * in the order the vectors meet them (Q4_K, Q5_K: chunks 0 2 1 3 of each 4; Q6_K: in order); for Q6_K `half` [K/16]
 * the sums of each 16 activations (its -32 becomes -32 x these). */
static void split_row(const int t, const int16_t *q, int64_t K, int8_t *hi, uint8_t *lo, float *half) {
    for (int64_t c = 0; c < K / QK; c++) {
        const int64_t at = t == T_Q6_K ? c * QK : (c & ~3) * QK + ((c & 1) * 2 + ((c & 3) >> 1)) * QK;
        const __m512i a = _mm512_loadu_si512((const void *)(q + c * QK));
        _mm256_storeu_si256((__m256i *)(hi + at), _mm512_cvtepi16_epi8(_mm512_srai_epi16(a, 8)));
        _mm256_storeu_si256((__m256i *)(lo + at), _mm512_cvtepi16_epi8(_mm512_and_si512(a, _mm512_set1_epi16(0xff))));
        if (t == T_Q6_K) {
            int s0 = 0, s1 = 0;
            for (int j = 0; j < 16; j++) s0 += q[c * QK + j], s1 += q[c * QK + 16 + j];
            half[2 * c] = (float)s0, half[2 * c + 1] = (float)s1;
        }
    }
}

/* Q4_K's and Q5_K's 8 six-bit scales and 8 six-bit mins (12 bytes at s, as k4_scale_min) as 16 floats: lanes 0-7
 * the scales, 8-15 the mins. Byte j of the 12: scales 0-3 and mins 0-3 in the low 6 bits of bytes 0-3 and 4-7;
 * scales and mins 4-7 in the low and high nibbles of bytes 8-11, their top 2 bits in the top bits of bytes 0-7. */
static inline __m512 k4_scales_mins(const uint8_t *s) {
    const __m128i b = _mm_loadu_si128((const __m128i *)s); /* 16 bytes: the 12 and 4 of the next field */
    const __m128i low = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m128i masked = _mm_and_si128(low, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0));
    const __m128i nibble = _mm_and_si128(_mm_srli_epi16(low, 4), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15));
    const __m128i tops = _mm_shuffle_epi8(b, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    const __m128i top = _mm_and_si128(_mm_srli_epi16(tops, 2), _mm_set1_epi8(0x30)); /* (b >> 6) << 4 */
    const __m128i all = _mm_or_si128(_mm_or_si128(masked, nibble), top);
#if defined(LAMINA_SIMDE) /* SIMDe has no 512-bit vpmovzxbd: two 256-bit halves */
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(all))),
                              _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(all, 8))), 1);
#else
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(all));
#endif
}

/* Weight vector v (0..3: 64 weights) of the 256-weight block x, as bytes: Q4_K, Q5_K the chunks (c0, c0 + 2) with
 * c0 = 4 (v / 2) + v % 2; Q6_K the chunks (2v, 2v + 1) */
static inline __attribute__((always_inline)) __m512i split_weights(const int t, const uint8_t *x, int v) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const int ternary = 0xf8; /* a | (b & c) */
    if (t == T_Q6_K) { /* chunks (4n + 2m, 4n + 2m + 1), n = v / 2, m = v % 2: 4 low bits from ql, 2 high from qh */
        const __m512i ql = _mm512_loadu_si512((const void *)(x + 64 * (v / 2)));
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x + 128 + 32 * (v / 2))));
        const __m512i low = v % 2 ? _mm512_and_si512(_mm512_srli_epi16(ql, 4), low4) : _mm512_and_si512(ql, low4);
        /* chunk k of 4 takes bits 2k, 2k + 1 of qh to bits 4, 5: left 4 and 2 (k = 0, 1), right 0 and 2 (k = 2, 3) */
        const __m512i high = v % 2 ? _mm512_srlv_epi16(qh, _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1))
                                   : _mm512_sllv_epi16(qh, _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1));
        return _mm512_ternarylogic_epi32(low, high, _mm512_set1_epi8(0x30), ternary);
    }
    /* Q4_K, Q5_K: 64 bytes of nibbles hold chunks 4i .. 4i + 3; v = 2i + m: the low (m = 0) or high nibbles */
    const __m512i qs = _mm512_loadu_si512((const void *)(x + (t == T_Q4_K ? 16 : 48) + 64 * (v / 2)));
    __m512i w = v % 2 ? _mm512_and_si512(_mm512_srli_epi16(qs, 4), low4) : _mm512_and_si512(qs, low4);
    if (t == T_Q5_K) { /* chunk c's fifth bits are bit c of qh's 32 bytes: moved to bit 4 (left 4 - c, or right) */
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x + 16)));
        const int c0 = 4 * (v / 2) + v % 2, c1 = c0 + 2; /* the chunks in the low and high half */
        const __m512i moved = c1 <= 4 ? _mm512_sllv_epi16(qh, _mm512_inserti64x4(_mm512_set1_epi16((short)(4 - c0)), _mm256_set1_epi16((short)(4 - c1)), 1))
                                      : _mm512_srlv_epi16(qh, _mm512_inserti64x4(_mm512_set1_epi16((short)(c0 - 4)), _mm256_set1_epi16((short)(c1 - 4)), 1));
        w = _mm512_ternarylogic_epi32(w, moved, _mm512_set1_epi8(0x10), ternary);
    }
    return w;
}

/* Which entry of a 256-weight block's scale table each lane of weight vector v (split_weights) takes: Q4_K/Q5_K
 * lanes 0-7 chunk c0, 8-15 chunk c0 + 2; Q6_K 4 lanes a half-chunk. */
static const int32_t IDX45[4][16] = {{0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2},
                                     {1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3},
                                     {4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6},
                                     {5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7}};
static const int32_t IDX6[4][16] = {{0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
                                    {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
                                    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
                                    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};

/* Q4_K, Q5_K or Q6_K, one activation row split by split_row, against weight rows 0..tr-1. Each 256 weights: each
 * row's table of scales (weight scale x activation scale: 8 chunks', or Q6_K's 16 half-chunks'), offsets x the
 * activation sums in one multiply-add; then 4 vectors of 64 weights, each two vpdpbusd, a shift, and one convert
 * and multiply-add with its lanes' scales (one permute of the table). out[r * TM] = the products. */
static inline __attribute__((always_inline)) void kquant_split(const int t, const uint8_t *weights, int64_t row_bytes,
                                                               int64_t K, const int8_t *ahi, const uint8_t *alo,
                                                               const float *half, const float *dT, const float *sT,
                                                               const int tr, float *out) {
    const int bytes = TRAITS[t].bytes;
    const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc[TR][2], bias[TR], off[TR];
    for (int r = 0; r < tr; r++) acc[r][0] = acc[r][1] = bias[r] = off[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 256; g++) {
        const __m256 XD = _mm256_loadu_ps(dT + 8 * g);
        /* Q4_K, Q5_K: the 8 activation scales, then the 8 sums (with -dmin's sign) */
        const __m512 XDS = t == T_Q6_K ? _mm512_setzero_ps()
                                       : _mm512_insertf32x8(_mm512_castps256_ps512(XD),
                                                            _mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(sT + 8 * g)), 1);
        const uint8_t *x[TR];
        __m512 S[TR];
        for (int r = 0; r < tr; r++) {
            x[r] = weights + r * row_bytes + g * bytes;
            if (tr == 1) /* one stream (or a tile's last rows): PF_ONE bytes ahead */
                for (int o = 0; o < bytes; o += 64) __builtin_prefetch(x[r] + PF_ONE + o);
            if (t == T_Q6_K) { /* S[h] = d * sc[h] * the activation scale of chunk h / 2; the -32 x S[h] x half[h] */
                const __m128i sc8 = _mm_loadu_si128((const __m128i *)(x[r] + 192));
                const __m512 sc = _mm512_insertf32x8(
                    _mm512_castps256_ps512(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8))), 1);
                const __m512 x16 = _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(XD));
                S[r] = _mm512_mul_ps(_mm512_mul_ps(sc, _mm512_set1_ps(f16_at(x[r] + 208))), x16);
                bias[r] = _mm512_fmadd_ps(S[r], _mm512_loadu_ps(half + 16 * g), bias[r]);
            } else { /* lanes 0-7: d * sc[c] * XD[c]; lanes 8-15: -dmin * m[c] * XS[c], summed into off */
                const __m512 dm = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(
                    _mm_cvtph_ps(_mm_cvtsi32_si128((int)u32_at(x[r])))));
                const __m512 prod = _mm512_mul_ps(_mm512_mul_ps(k4_scales_mins(x[r] + 4), dm), XDS);
                S[r] = prod;
                off[r] = _mm512_mask_add_ps(off[r], 0xff00, off[r], prod);
            }
        }
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) {
            const __m512i hi = _mm512_loadu_si512((const void *)(ahi + 256 * g + 64 * v));
            const __m512i lo = _mm512_loadu_si512((const void *)(alo + 256 * g + 64 * v));
            const __m512i idx = _mm512_loadu_si512((const void *)(t == T_Q6_K ? IDX6[v] : IDX45[v]));
            for (int r = 0; r < tr; r++) {
                const __m512i w = split_weights(t, x[r], v);
                const __m512i high = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, hi), 8);
                const __m512i p = _mm512_dpbusd_epi32(high, lo, w);
                acc[r][v & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, S[r]), acc[r][v & 1]);
            }
        }
    }
    for (int r = 0; r < tr; r++)
        out[r * TM] = hsum16(_mm512_fmadd_ps(bias[r], _mm512_set1_ps(-32.0f),
                                             _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), off[r])));
}
#endif

/* Weight rows 0..tr-1 (row_bytes apart) against activation rows 0..rows-1 of q (row stride K; tm: 1, or TM for
 * 1..4 rows); out[r * TM + t] = their products. wtype, tr and tm are constants at every call, so the loops unroll
 * and the accumulators are registers. */
static inline __attribute__((always_inline)) void tile_kernel(const int wtype, const uint8_t *weights,
                                                              int64_t row_bytes, int64_t K, const int16_t *q,
                                                              const float *dT, const float *sT, const int tr,
                                                              const int tm, const int rows, float *out) {
#if defined(LAMINA_AVX512)
    if (tm == 1) {
        row512(wtype, weights, row_bytes, K, q, dT, sT, tr, out);
        return;
    }
#endif
    if (tm == 1 && EVEN_ODD(wtype)) { /* q: the activations permuted by even_odd */
        kquant_row(wtype, weights, row_bytes, K, q, dT, sT, tr, out);
        return;
    }
    if (tm == 1) {
        row_kernel(wtype, weights, row_bytes, K, q, dT, sT, tr, out);
        return;
    }
    const int block = TRAITS[wtype].block, bytes = TRAITS[wtype].bytes, chunks = block / QK;
    const int has_off = wtype == T_Q4_1 || wtype == T_Q5_1 || wtype == T_Q4_K || wtype == T_Q5_K;
    __m256 acc[TR][1];
    __m128 off[TR];
    for (int r = 0; r < tr; r++) acc[r][0] = _mm256_setzero_ps(), off[r] = _mm_setzero_ps();
    /* 8 chunks at a time (one 256-weight block, or 8 blocks of 32): their scales and offsets unpacked together */
    const int64_t nb = K / QK, groups = nb / 8;
    for (int64_t g = 0; g < groups; g++) {
        for (int r = 0; r < tr; r++) {
            const uint8_t *base = weights + r * row_bytes + (chunks == 8 ? g * bytes : 8 * g * bytes);
            float S[8], O[8];
            __m256 scales, offsets;
            group_scales(wtype, base, &scales, &offsets);
            _mm256_storeu_ps(S, scales);
            _mm256_storeu_ps(O, offsets);
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                const int64_t b = 8 * g + c;
                const uint8_t *x = chunks == 8 ? base : base + c * bytes;
                const int cc = chunks == 8 ? c : 0;
                accumulate(unpack(wtype, x, cc), S[c], q, K, b, dT, tm, rows, &acc[r][0]);
                if (wtype == T_Q2_K)
                    accumulate(q2k_mins(x, cc), -f16_at(x + 82), q, K, b, dT, tm, rows, &acc[r][0]);
                else if (has_off)
                    off[r] = _mm_fmadd_ps(_mm_set1_ps(O[c]), _mm_loadu_ps(sT + TM * b), off[r]);
            }
        }
    }
    for (int64_t b = groups * 8; b < nb; b++) /* 32-weight formats only: 256-weight rows are whole groups */
        for (int r = 0; r < tr; r++) {
            const uint8_t *x = weights + r * row_bytes + b * bytes;
            float o;
            const float scale = chunk_scale(wtype, x, 0, &o);
            accumulate(unpack(wtype, x, 0), scale, q, K, b, dT, tm, rows, &acc[r][0]);
            if (has_off) off[r] = _mm_fmadd_ps(_mm_set1_ps(o), _mm_loadu_ps(sT + TM * b), off[r]);
        }
    for (int r = 0; r < tr; r++) {
        float lanes[4], o[4];
        _mm_storeu_ps(o, off[r]);
        _mm_storeu_ps(lanes, _mm_add_ps(_mm256_castps256_ps128(acc[r][0]), _mm256_extractf128_ps(acc[r][0], 1)));
        for (int t = 0; t < rows; t++) out[r * TM + t] = lanes[t] + o[t];
    }
}
#else
#define TR 1
static inline __attribute__((always_inline)) void tile_kernel(const int wtype, const uint8_t *weights,
                                                              int64_t row_bytes, int64_t K, const int16_t *q,
                                                              const float *dT, const float *sT, const int tr,
                                                              const int tm, const int rows, float *out) {
    const int block = TRAITS[wtype].block, bytes = TRAITS[wtype].bytes, chunks = block / QK;
    float total[TM] = {0.0f};
    int16_t w[QK];
    for (int64_t sb = 0; sb < K / block; sb++)
        for (int c = 0; c < chunks; c++) {
            const int64_t b = sb * chunks + c;
            float off[2];
            const float scale = unpack_ref(wtype, weights + sb * bytes, c, w, off);
            for (int t = 0; t < rows; t++) {
                const int16_t *a = q + t * K + b * QK;
                int64_t lo = 0, hi = 0, sum_hi = 0, sum = 0;
                for (int j = 0; j < 16; j++) lo += w[j] * a[j], hi += w[j + 16] * a[j + 16], sum_hi += a[j + 16];
                for (int j = 0; j < 32; j++) sum += a[j];
                /* off * s is off * d * sum(a); Q2_K's two halves' offsets each take their half's sum */
                const float halves = off[0] == off[1] ? off[0] * sT[TM * b + t]
                                                      : dT[TM * b + t] * (off[0] * (float)(sum - sum_hi) + off[1] * (float)sum_hi);
                total[t] += scale * dT[TM * b + t] * (float)(lo + hi) + halves;
            }
        }
    for (int t = 0; t < rows; t++) out[t] = total[t];
    (void)tr, (void)tm, (void)row_bytes;
}
#endif

/* Weight rows n..n+tr-1 against activation rows m0..m0+rows-1 (their scales transposed in dT, sT), written to (or
 * added to) y [M, N]. */
#define LAMINA_TILE(T)                                                                                              \
    static void tile_##T(const uint8_t *w, int64_t row_bytes, int64_t K, const int16_t *q, const float *dT,         \
                         const float *sT, int tr, int rows, float *out) {                                           \
        if (tr == TR) {                                                                                             \
            if (rows == 1) tile_kernel(T, w, row_bytes, K, q, dT, sT, TR, 1, 1, out);                                \
            else tile_kernel(T, w, row_bytes, K, q, dT, sT, TR, TM, rows, out);                                      \
        } else {                                                                                                    \
            if (rows == 1) tile_kernel(T, w, row_bytes, K, q, dT, sT, 1, 1, 1, out);                                 \
            else tile_kernel(T, w, row_bytes, K, q, dT, sT, 1, TM, rows, out);                                       \
        }                                                                                                           \
    }
LAMINA_TILE(T_Q4_1) LAMINA_TILE(T_Q8_0) LAMINA_TILE(T_Q4_0) LAMINA_TILE(T_Q5_0) LAMINA_TILE(T_Q5_1)
LAMINA_TILE(T_IQ4_NL) LAMINA_TILE(T_IQ4_XS) LAMINA_TILE(T_Q2_K) LAMINA_TILE(T_Q3_K) LAMINA_TILE(T_Q4_K)
LAMINA_TILE(T_Q5_K) LAMINA_TILE(T_Q6_K)
#undef LAMINA_TILE

#if defined(LAMINA_AVX512)
/* kquant_split for tr = TR or 1 rows, per format */
#define LAMINA_SPLIT(T)                                                                                             \
    static void split_##T(const uint8_t *w, int64_t row_bytes, int64_t K, const int8_t *hi, const uint8_t *lo,      \
                          const float *half, const float *d, const float *s, int tr, float *out) {                  \
        if (tr == TR) kquant_split(T, w, row_bytes, K, hi, lo, half, d, s, TR, out);                                \
        else kquant_split(T, w, row_bytes, K, hi, lo, half, d, s, 1, out);                                          \
    }
LAMINA_SPLIT(T_Q4_K) LAMINA_SPLIT(T_Q5_K) LAMINA_SPLIT(T_Q6_K)
#undef LAMINA_SPLIT
#define SPLIT(t) ((t) == T_Q4_K || (t) == T_Q5_K || (t) == T_Q6_K) /* formats kquant_split reads */

/* One activation row: its values q, for SPLIT formats split into bytes (hi, lo, half: split_row), and its scales d
 * and sums s contiguous. */
typedef struct { const int16_t *q; const int8_t *hi; const uint8_t *lo; const float *half, *d, *s; int64_t K; } one_row;
/* That row against weight rows 0..rows-1, one at a time in one loop (kquant_split or row512), written to (or added
 * to) y[0..rows-1]: a call per weight row cost as much as a third of the time of a row of 2048 weights. */
#define LAMINA_ROWS(T)                                                                                              \
    static void rows_##T(const uint8_t *w, int64_t row_bytes, int64_t K, const one_row *a, int64_t rows, float *y,  \
                         int accumulate) {                                                                          \
        for (int64_t r = 0; r < rows; r++) {                                                                        \
            float o;                                                                                                \
            if (SPLIT(T)) kquant_split(T, w + r * row_bytes, row_bytes, K, a->hi, a->lo, a->half, a->d, a->s, 1, &o); \
            else row512(T, w + r * row_bytes, row_bytes, K, a->q, a->d, a->s, 1, &o);                               \
            y[r] = o + (accumulate ? y[r] : 0.0f);                                                                  \
        }                                                                                                           \
    }
LAMINA_ROWS(T_Q4_1) LAMINA_ROWS(T_Q8_0) LAMINA_ROWS(T_Q4_0) LAMINA_ROWS(T_Q5_0) LAMINA_ROWS(T_Q5_1)
LAMINA_ROWS(T_IQ4_NL) LAMINA_ROWS(T_IQ4_XS) LAMINA_ROWS(T_Q2_K) LAMINA_ROWS(T_Q3_K) LAMINA_ROWS(T_Q4_K)
LAMINA_ROWS(T_Q5_K) LAMINA_ROWS(T_Q6_K)
#undef LAMINA_ROWS
typedef void (*rows_fn)(const uint8_t *, int64_t, int64_t, const one_row *, int64_t, float *, int);
static const rows_fn ROWS[LAMINA_NTYPES] = {
    [T_Q4_1] = rows_T_Q4_1, [T_Q8_0] = rows_T_Q8_0, [T_Q4_0] = rows_T_Q4_0, [T_Q5_0] = rows_T_Q5_0,
    [T_Q5_1] = rows_T_Q5_1, [T_IQ4_NL] = rows_T_IQ4_NL, [T_IQ4_XS] = rows_T_IQ4_XS, [T_Q2_K] = rows_T_Q2_K,
    [T_Q3_K] = rows_T_Q3_K, [T_Q4_K] = rows_T_Q4_K, [T_Q5_K] = rows_T_Q5_K, [T_Q6_K] = rows_T_Q6_K,
};

/* ---- A few activation rows (2..FEW_ROWS, AVX-512): each weight row read once for all of them --------------------
 *
 * A decode step of a few sequences, or of one sequence and its draft tokens (speculative decoding), is as
 * memory-bound as one row: the weights are what costs, and each weight vector unpacked once can serve every row.
 * Here each weight row meets the activation rows up to 4 at a time (their accumulators in registers) while it sits
 * in L1, one weight row after the other in one stream a thread (as the one-row path). Each activation row's
 * arithmetic is the one-row kernel's (kquant_split / row512 with one weight row): the same products, scales and
 * additions in the same order, so a row's result is bitwise what it gets alone, whatever else is in the step
 * (a verified draft token's logits are those of the step without it). */
#ifndef FEW_ROWS
#define FEW_ROWS 8 /* activation rows up to which this path beats the panels on weights from memory (Zen 4) */
#endif
#ifndef FEW_BYTES
#define FEW_BYTES (1 << 20) /* a matrix larger than this comes from memory (more than a core's L2) */
#endif
/* Whether M activation rows go through this path: 2..EXACT_ROWS whatever the matrix, so that a step of that many
 * rows gives each row what it gets alone; up to FEW_ROWS where the matrix comes from memory, where this path is the
 * fastest (Llama 3 1B's Q4_K/Q6_K, Zen 4: 2 rows 2.5x faster than the tiles, 8 as fast as the panels). On a matrix
 * in cache the products are compute-bound, and from 5 rows the tiles and panels spend fewer instructions a product
 * (SmolLM2's 576-wide ones, Zen 4: 8 rows ~20% faster through the panels; 2-4 rows as fast or slower). */
static inline int few_rows_path(int64_t M, int64_t N, int64_t row_bytes) {
    return M >= 2 && (M <= EXACT_ROWS || (M <= FEW_ROWS && N * row_bytes > FEW_BYTES));
}

static inline __attribute__((always_inline)) void kquant_few(const int t, const uint8_t *x0, const one_row *a,
                                                             const int m, float *out) {
    const int bytes = TRAITS[t].bytes;
    const int64_t K = a[0].K;
    const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc[4][2], bias[4], off[4], S[4];
    for (int j = 0; j < m; j++) acc[j][0] = acc[j][1] = bias[j] = off[j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 256; g++) {
        const uint8_t *x = x0 + g * bytes;
        for (int o = 0; o < bytes; o += 64) __builtin_prefetch(x + PF_ONE + o);
        /* the weight row's scales once; each activation row's products with them as kquant_split's */
        __m512 sc = _mm512_setzero_ps(), dm = _mm512_setzero_ps();
        if (t == T_Q6_K) {
            const __m128i sc8 = _mm_loadu_si128((const __m128i *)(x + 192));
            sc = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8))),
                                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8))), 1);
        } else {
            dm = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)u32_at(x)))));
            sc = k4_scales_mins(x + 4);
        }
        for (int j = 0; j < m; j++) {
            const __m256 XD = _mm256_loadu_ps(a[j].d + 8 * g);
            if (t == T_Q6_K) {
                const __m512 x16 = _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(XD));
                S[j] = _mm512_mul_ps(_mm512_mul_ps(sc, _mm512_set1_ps(f16_at(x + 208))), x16);
                bias[j] = _mm512_fmadd_ps(S[j], _mm512_loadu_ps(a[j].half + 16 * g), bias[j]);
            } else {
                const __m512 XDS = _mm512_insertf32x8(_mm512_castps256_ps512(XD),
                                                      _mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(a[j].s + 8 * g)), 1);
                S[j] = _mm512_mul_ps(_mm512_mul_ps(sc, dm), XDS);
                off[j] = _mm512_mask_add_ps(off[j], 0xff00, off[j], S[j]);
            }
        }
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) {
            const __m512i idx = _mm512_loadu_si512((const void *)(t == T_Q6_K ? IDX6[v] : IDX45[v]));
            const __m512i w = split_weights(t, x, v);
            for (int j = 0; j < m; j++) {
                const __m512i hi = _mm512_loadu_si512((const void *)(a[j].hi + 256 * g + 64 * v));
                const __m512i lo = _mm512_loadu_si512((const void *)(a[j].lo + 256 * g + 64 * v));
                const __m512i high = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, hi), 8);
                const __m512i p = _mm512_dpbusd_epi32(high, lo, w);
                acc[j][v & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, S[j]), acc[j][v & 1]);
            }
        }
    }
    for (int j = 0; j < m; j++)
        out[j] = hsum16(_mm512_fmadd_ps(bias[j], _mm512_set1_ps(-32.0f),
                                        _mm512_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]), off[j])));
}

static inline __attribute__((always_inline)) void row512_few(const int wtype, const uint8_t *x0, const one_row *a,
                                                             const int m, float *out) {
    const int block = TRAITS[wtype].block, bytes = TRAITS[wtype].bytes, chunks = block / QK;
    const int has_off = wtype == T_Q4_1 || wtype == T_Q5_1;
    const int64_t K = a[0].K, nb = K / QK, groups = nb / 8;
    __m512 acc[4][2];
    __m256 off[4];
    float S[4][8], tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < m; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps(), off[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *base = x0 + (chunks == 8 ? g * bytes : 8 * g * bytes);
        for (int o = 0; o < (chunks == 8 ? bytes : 8 * bytes); o += 64) __builtin_prefetch(base + PF_ONE + o);
        __m256 scales, offsets;
        group_scales(wtype, base, &scales, &offsets);
        for (int j = 0; j < m; j++) {
            _mm256_storeu_ps(S[j], _mm256_mul_ps(scales, _mm256_loadu_ps(a[j].d + 8 * g)));
            if (has_off) off[j] = _mm256_fmadd_ps(offsets, _mm256_loadu_ps(a[j].s + 8 * g), off[j]);
        }
        __asm__ volatile("" ::: "memory"); /* broadcast S from memory (a load), not by shuffles */
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            const __m512i w = unpack512(wtype, base, bytes, c);
            for (int j = 0; j < m; j++) {
                const __m512i av = _mm512_loadu_si512((const void *)(a[j].q + (8 * g + c) * QK));
                const __m512i p = _mm512_madd_epi16(w, av);
                acc[j][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(S[j][c]), acc[j][c & 1]);
                if (wtype == T_Q2_K) {
                    const __m512i mn = _mm512_inserti64x4(_mm512_set1_epi16(base[2 * c] >> 4),
                                                          _mm256_set1_epi16(base[2 * c + 1] >> 4), 1);
                    acc[j][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(mn, av)),
                                                    _mm512_set1_ps(-f16_at(base + 82) * a[j].d[8 * g + c]), acc[j][c & 1]);
                }
            }
        }
    }
    for (int64_t b = groups * 8; b < nb; b++) { /* 32-weight formats only: 256-weight rows are whole groups */
        float o;
        const uint8_t *x = x0 + b * bytes;
        const float scale = chunk_scale(wtype, x, 0, &o);
        const __m512i w = unpack512(wtype, x, bytes, 0);
        for (int j = 0; j < m; j++) {
            const __m512i p = _mm512_madd_epi16(w, _mm512_loadu_si512((const void *)(a[j].q + b * QK)));
            acc[j][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(scale * a[j].d[b]), acc[j][0]);
            if (has_off) tail[j] += o * a[j].s[b];
        }
    }
    for (int j = 0; j < m; j++) out[j] = hsum16(_mm512_add_ps(acc[j][0], acc[j][1])) + hsum8(off[j]) + tail[j];
}

/* Weight rows 0..rows-1 against the M activation rows `a`, written to (or added to) y [M, ldy]. */
#define LAMINA_FEW(T)                                                                                               \
    static void few_##T(const uint8_t *w, int64_t row_bytes, const one_row *a, int64_t M, int64_t rows, float *y,  \
                        int64_t ldy, int accumulate) {                                                              \
        float out[4];                                                                                               \
        for (int64_t r = 0; r < rows; r++)                                                                          \
            for (int64_t j0 = 0; j0 < M; j0 += 4) {                                                                 \
                const int m = M - j0 < 4 ? (int)(M - j0) : 4;                                                      \
                const uint8_t *x = w + r * row_bytes;                                                               \
                if (m == 4) SPLIT(T) ? kquant_few(T, x, a + j0, 4, out) : row512_few(T, x, a + j0, 4, out);        \
                else if (m == 3) SPLIT(T) ? kquant_few(T, x, a + j0, 3, out) : row512_few(T, x, a + j0, 3, out);   \
                else if (m == 2) SPLIT(T) ? kquant_few(T, x, a + j0, 2, out) : row512_few(T, x, a + j0, 2, out);   \
                else SPLIT(T) ? kquant_few(T, x, a + j0, 1, out) : row512_few(T, x, a + j0, 1, out);               \
                for (int j = 0; j < m; j++) {                                                                       \
                    float *o = y + (j0 + j) * ldy + r;                                                              \
                    *o = out[j] + (accumulate ? *o : 0.0f);                                                         \
                }                                                                                                   \
            }                                                                                                       \
    }
LAMINA_FEW(T_Q4_1) LAMINA_FEW(T_Q8_0) LAMINA_FEW(T_Q4_0) LAMINA_FEW(T_Q5_0) LAMINA_FEW(T_Q5_1)
LAMINA_FEW(T_IQ4_NL) LAMINA_FEW(T_IQ4_XS) LAMINA_FEW(T_Q2_K) LAMINA_FEW(T_Q3_K) LAMINA_FEW(T_Q4_K)
LAMINA_FEW(T_Q5_K) LAMINA_FEW(T_Q6_K)
#undef LAMINA_FEW
typedef void (*few_fn)(const uint8_t *, int64_t, const one_row *, int64_t, int64_t, float *, int64_t, int);
static const few_fn FEW[LAMINA_NTYPES] = {
    [T_Q4_1] = few_T_Q4_1, [T_Q8_0] = few_T_Q8_0, [T_Q4_0] = few_T_Q4_0, [T_Q5_0] = few_T_Q5_0,
    [T_Q5_1] = few_T_Q5_1, [T_IQ4_NL] = few_T_IQ4_NL, [T_IQ4_XS] = few_T_IQ4_XS, [T_Q2_K] = few_T_Q2_K,
    [T_Q3_K] = few_T_Q3_K, [T_Q4_K] = few_T_Q4_K, [T_Q5_K] = few_T_Q5_K, [T_Q6_K] = few_T_Q6_K,
};

#ifdef LAMINA_AVX2
/* rows_q4_1_m1 (below: one activation row against NR Q4_1 weight rows, the one-row path) for m activation rows
 * (1..4): each weight block widened once for all of them, each row's arithmetic that of rows_q4_1_m1.
 * out[j * NR + r]. The rows' values q (row stride K) and scales d, s (SCALE_AT's layout, from row 0 of a group). */
static inline __attribute__((always_inline)) void q4_1_few(const block_q4_1 *w, int64_t nb, const int16_t *q,
                                                           int64_t K, const float *d, const float *s, const int m,
                                                           float *out) {
    __m256 acc[4][NR], offsets[4]; /* odd lanes of offsets[j]: each weight row's sum of m * s */
    for (int j = 0; j < m; j++) {
        offsets[j] = _mm256_setzero_ps();
        for (int r = 0; r < NR; r++) acc[j][r] = _mm256_setzero_ps();
    }
    const __m256i low = _mm256_set1_epi16(0x0f);
    const char *ahead = (const char *)(w + 2 * NR * nb);
    for (int64_t b = 0; b < nb; b++) {
        _mm_prefetch(ahead + b * NR * sizeof(block_q4_1), _MM_HINT_T0);
        _mm_prefetch(ahead + b * NR * sizeof(block_q4_1) + 64, _MM_HINT_T0);
        int32_t dm[NR];
        for (int r = 0; r < NR; r++) memcpy(&dm[r], &w[r * nb + b], sizeof(int32_t));
        const __m256 wdm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm));
        __m256i lo4[NR], hi4[NR];
        for (int r = 0; r < NR; r++) {
            const __m256i raw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)w[r * nb + b].qs));
            lo4[r] = _mm256_and_si256(raw, low), hi4[r] = _mm256_srli_epi16(raw, 4);
        }
        for (int j = 0; j < m; j++) {
            const int16_t *qj = q + j * K;
            const float *dj = d + SCALE_AT(j, 0, nb), *sj = s + SCALE_AT(j, 0, nb);
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(qj + b * QK));
            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(qj + b * QK + 16));
            const __m256 scales = _mm256_mul_ps(wdm, _mm256_blend_ps(_mm256_set1_ps(dj[TM * b]), _mm256_set1_ps(sj[TM * b]), 0xaa));
            offsets[j] = _mm256_add_ps(offsets[j], scales);
            for (int r = 0; r < NR; r++) {
                const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo4[r], a0), _mm256_madd_epi16(hi4[r], a1));
                acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(2 * r)), acc[j][r]);
            }
        }
    }
    for (int j = 0; j < m; j++) {
        float off[8];
        _mm256_storeu_ps(off, offsets[j]);
        for (int r = 0; r < NR; r++) out[j * NR + r] = hsum8(acc[j][r]) + off[2 * r + 1];
    }
}
#endif

/* The M activation rows as the one-row kernels read them (one_row each: values, their split for kquant_split's
 * formats, scales and sums contiguous), in one allocation; weight rows n0..n1-1 through FEW. */
static void few_rows(int wtype, const void *weights, int64_t K, const int16_t *q, const float *d, const float *s,
                     int64_t M, float *y, int64_t ldy, int64_t n0, int64_t n1, int accumulate) {
    const int64_t nb = K / QK, row_bytes = K / TRAITS[wtype].block * TRAITS[wtype].bytes;
    const int split = SPLIT(wtype);
    const size_t per_row = sizeof(float) * (size_t)(2 * nb + (split ? K / 16 : 0)) + (split ? 2 * (size_t)K : 0);
    uint8_t *room = malloc(per_row * (size_t)M);
    if (!room) abort(); /* out of memory for a few rows of activations */
    one_row a[FEW_ROWS];
    for (int64_t j = 0; j < M; j++) {
        float *one = (float *)(room + j * per_row), *half = one + 2 * nb;
        for (int64_t b = 0; b < nb; b++) one[b] = d[SCALE_AT(j, b, nb)], one[nb + b] = s[SCALE_AT(j, b, nb)];
        int8_t *hi = split ? (int8_t *)(half + K / 16) : NULL;
        if (split) split_row(wtype, q + j * K, K, hi, (uint8_t *)hi + K, half);
        a[j] = (one_row){q + j * K, hi, split ? (const uint8_t *)hi + K : NULL, split ? half : NULL, one, one + nb, K};
    }
    int64_t n = n0;
#ifdef LAMINA_AVX2
    if (wtype == T_Q4_1) { /* as one row: NR weight rows at a time (rows_q4_1_m1), the rest below (row512) */
        const block_q4_1 *w = (const block_q4_1 *)weights;
        float out[4 * NR];
        for (; n + NR <= n1; n += NR)
            for (int64_t j0 = 0; j0 < M; j0 += 4) {
                const int m = M - j0 < 4 ? (int)(M - j0) : 4;
                const int16_t *qg = q + j0 * K;
                const float *dg = d + j0 * nb, *sg = s + j0 * nb; /* SCALE_AT(j0, 0, nb): j0 a multiple of 4 */
                if (m == 4) q4_1_few(w + n * nb, nb, qg, K, dg, sg, 4, out);
                else if (m == 3) q4_1_few(w + n * nb, nb, qg, K, dg, sg, 3, out);
                else if (m == 2) q4_1_few(w + n * nb, nb, qg, K, dg, sg, 2, out);
                else q4_1_few(w + n * nb, nb, qg, K, dg, sg, 1, out);
                for (int j = 0; j < m; j++)
                    for (int r = 0; r < NR; r++) {
                        float *o = y + (j0 + j) * ldy + n + r;
                        *o = out[j * NR + r] + (accumulate ? *o : 0.0f);
                    }
            }
    }
#endif
    if (n < n1) FEW[wtype]((const uint8_t *)weights + n * row_bytes, row_bytes, a, M, n1 - n, y + n, ldy, accumulate);
    free(room);
}

/* ---- Several activation rows on AVX-512: a panel of unpacked weights, 8 or 16 activation rows a vector ---------
 *
 * With several rows the products stop being memory-bound, and what counts is how many instructions a multiply-add
 * costs. In the tiles above the lanes run along K, so every chunk's partial sums are folded across lanes (hadd)
 * before they are scaled, for each weight row and group of 4 activation rows. Here the lanes are activation rows: a
 * vector holds one pair of int16 values of 16 activation rows (8 in a group of 8 or fewer), and a vpdpwssd
 * multiplies it by one weight pair broadcast from memory, so a chunk of 32 is 16 vpdpwssd per weight row and the
 * float work (convert, scale, offset) comes once per chunk for the group. PC weight rows at a time are unpacked once
 * into a panel of int16 (each row's chunks in order, sub-scales multiplied in, as `unpack`) with their float scales
 * and offsets, and multiplied against every group of activation rows, transposed for it once (pairs:
 * [group][K / 2][16] int32; scales, sums: [group][nb][16]). The integer products and their sums are those of the
 * other paths; only the order of the float additions differs. 512-bit vectors of 16 rows against 256-bit ones of 8:
 * +10% at 512 rows of SmolLM2's shapes on Zen 4 (which runs 512 bits as two halves), the kernel alone. */
#ifndef PC
#define PC 12 /* weight rows a panel (8: 7% slower, 16: no faster; Zen 4) */
#endif
#define PG 16 /* activation rows a group: 512-bit vectors of 16 rows, or 256-bit ones of 8 (panel.h) */
#ifndef PANEL_ROWS
#define PANEL_ROWS 6 /* activation rows from which products go through panels (5: as fast as the tiles; Zen 4) */
#endif

typedef struct {
    const int32_t *a;        /* [groups][K / 2][PG] activation pairs */
    const float *d, *s, *lo; /* [groups][nb][PG] scales, d * sums, and (Q2_K) d * sums of each block's first 16 */
} panel_rows;

/* The nb chunks of weight rows 0..cols-1 (cols <= PC) unpacked into w [nb][PC][32] int16 (chunk by chunk, the rows
 * side by side), their scales and offsets into S, O, O2 [nb][PC] (O2: Q2_K's second-half offsets); rows past cols
 * are zeros. */
static inline __attribute__((always_inline)) void panel_unpack(const int t, const uint8_t *weights, int64_t row_bytes,
                                                               int64_t nb, int cols, int16_t *w, float *S, float *O,
                                                               float *O2) {
    const int block = TRAITS[t].block, bytes = TRAITS[t].bytes, chunks = block / QK;
    const int64_t groups = nb / 8; /* groups of 8 chunks, then (rows of 576) a tail */
    if (cols < PC)
        for (int64_t b = 0; b < nb; b++) {
            memset(w + (b * PC + cols) * QK, 0, sizeof(int16_t) * QK * (size_t)(PC - cols));
            for (int c = cols; c < PC; c++) S[b * PC + c] = O[b * PC + c] = O2[b * PC + c] = 0.0f;
        }
    for (int c = 0; c < cols; c++) {
        const uint8_t *row = weights + c * row_bytes;
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *base = row + (chunks == 8 ? g * bytes : 8 * g * bytes);
            /* the next panel's same bytes, meanwhile: from memory its rows would wait on every read */
            for (int o = 0; o < (chunks == 8 ? bytes : 8 * bytes); o += 64) __builtin_prefetch(base + PC * row_bytes + o);
            __m256 scales, offsets;
            float Sg[8], Og[8];
            group_scales(t, base, &scales, &offsets);
            _mm256_storeu_ps(Sg, scales);
            _mm256_storeu_ps(Og, offsets);
#pragma GCC unroll 8
            for (int ci = 0; ci < 8; ci++) {
                const int64_t b = 8 * g + ci;
                const uint8_t *x = chunks == 8 ? base : base + ci * bytes;
                const int cc = chunks == 8 ? ci : 0;
                _mm512_storeu_si512((void *)(w + (b * PC + c) * QK), unpack512(t, base, bytes, ci));
                S[b * PC + c] = Sg[ci], O[b * PC + c] = Og[ci];
                if (t == T_Q2_K) { /* -dmin x each half's 4-bit min */
                    O[b * PC + c] = -f16_at(x + 82) * (float)(x[2 * cc] >> 4);
                    O2[b * PC + c] = -f16_at(x + 82) * (float)(x[2 * cc + 1] >> 4);
                }
            }
        }
        for (int64_t b = groups * 8; b < nb; b++) { /* 32-weight formats only (rows of 576) */
            const uint8_t *x = row + b * bytes;
            S[b * PC + c] = chunk_scale(t, x, 0, &O[b * PC + c]);
            _mm512_storeu_si512((void *)(w + (b * PC + c) * QK), unpack512(t, x, bytes, 0));
        }
    }
}

#define PK_LANES 8
#include "panel.h"
#undef PK_LANES
#define PK_LANES 16
#include "panel.h"
#undef PK_LANES

/* Columns n0..n1-1 of y for M activation rows through panels (the arguments of lamina_matmul_rows, and the rows
 * transposed by panel_fill), each panel unpacked once for every group of activation rows (unpacking and
 * multiplying 16 or 64 chunks at a time instead, while they are in the first-level cache, measured no faster at
 * 8 rows; Zen 4). w and SO: room for PC x K int16 and 3 x PC x K / 32 floats. */
typedef void (*panel_fn)(const uint8_t *, int64_t, int64_t, const panel_rows *, int64_t, float *, int64_t, int64_t,
                         int64_t, int, int16_t *, float *);
#define LAMINA_PANEL(T)                                                                                             \
    static void panel_##T(const uint8_t *weights, int64_t row_bytes, int64_t K, const panel_rows *r, int64_t M,     \
                          float *y, int64_t ldy, int64_t n0, int64_t n1, int accumulate, int16_t *w, float *SO) {   \
        const int64_t nb = K / QK, groups = (M + PG - 1) / PG;                                                      \
        float *S = SO, *O = SO + PC * nb, *O2 = SO + 2 * PC * nb;                                                   \
        for (int64_t n = n0; n < n1; n += PC) {                                                                     \
            const int cols = n1 - n < PC ? (int)(n1 - n) : PC;                                                      \
            const uint8_t *wn = weights + n * row_bytes;                                                            \
            panel_unpack(T, wn, row_bytes, nb, cols, w, S, O, O2);                                           \
            for (int64_t g = 0; g < groups; g++) {                                                                  \
                const int32_t *a = r->a + g * (K / 2) * PG;                                                         \
                const float *d = r->d + g * nb * PG, *s = r->s + g * nb * PG, *lo = r->lo + g * nb * PG;           \
                if (M - g * PG <= 8) { /* 8 rows or fewer: the first half of the group, in 256-bit vectors */      \
                    __m256 f[PC];                                                                                   \
                    for (int c = 0; c < PC; c++) f[c] = _mm256_setzero_ps();                                        \
                    panel_kernel8(T, w, S, O, O2, nb, a, d, s, lo, f);                                              \
                    panel_store8(f, M, g, y, ldy, n, cols, accumulate);                                             \
                } else {                                                                                            \
                    __m512 f[PC];                                                                                   \
                    for (int c = 0; c < PC; c++) f[c] = _mm512_setzero_ps();                                        \
                    panel_kernel16(T, w, S, O, O2, nb, a, d, s, lo, f);                                             \
                    panel_store16(f, M, g, y, ldy, n, cols, accumulate);                                            \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
    }
LAMINA_PANEL(T_Q4_1) LAMINA_PANEL(T_Q8_0) LAMINA_PANEL(T_Q4_0) LAMINA_PANEL(T_Q5_0) LAMINA_PANEL(T_Q5_1)
LAMINA_PANEL(T_IQ4_NL) LAMINA_PANEL(T_IQ4_XS) LAMINA_PANEL(T_Q2_K) LAMINA_PANEL(T_Q3_K) LAMINA_PANEL(T_Q4_K)
LAMINA_PANEL(T_Q5_K) LAMINA_PANEL(T_Q6_K)
#undef LAMINA_PANEL
static const panel_fn PANELS[LAMINA_NTYPES] = {
    [T_Q4_1] = panel_T_Q4_1, [T_Q8_0] = panel_T_Q8_0, [T_Q4_0] = panel_T_Q4_0, [T_Q5_0] = panel_T_Q5_0,
    [T_Q5_1] = panel_T_Q5_1, [T_IQ4_NL] = panel_T_IQ4_NL, [T_IQ4_XS] = panel_T_IQ4_XS, [T_Q2_K] = panel_T_Q2_K,
    [T_Q3_K] = panel_T_Q3_K, [T_Q4_K] = panel_T_Q4_K, [T_Q5_K] = panel_T_Q5_K, [T_Q6_K] = panel_T_Q6_K,
};

/* The layout of a prepared buffer (lamina_panel_bytes): the pairs, then the scales, sums and half sums. */
static panel_rows panel_layout(const void *panels, int64_t M, int64_t K) {
    const int64_t nb = K / QK, groups = (M + PG - 1) / PG;
    const char *mem = panels;
    const float *dT = (const float *)(mem + sizeof(int32_t) * (size_t)(groups * (K / 2) * PG));
    return (panel_rows){(const int32_t *)mem, dT, dT + groups * nb * PG, dT + 2 * groups * nb * PG};
}

/* Groups g0..g1-1 of the M activation rows of lamina_matmul_rows (q [M, K], d and s at SCALE_AT) into a buffer laid
 * out as panel_layout says: rows past M are zeros; `lo` (Q2_K's first-half sums) is filled for every format. */
static void panel_fill(const int16_t *q, const float *d, const float *s, int64_t M, int64_t K, int64_t g0,
                       int64_t g1, void *panels) {
    const int64_t nb = K / QK;
    const panel_rows r = panel_layout(panels, M, K);
    int32_t *a = (int32_t *)r.a;
    float *dT = (float *)r.d, *sT = (float *)r.s, *lo = (float *)r.lo;
    for (int64_t g = g0; g < g1; g++)
        for (int i = 0; i < PG; i++) {
            const int64_t m = g * PG + i;
            int32_t *ag = a + g * (K / 2) * PG + i;
            float *dg = dT + g * nb * PG + i, *sg = sT + g * nb * PG + i, *lg = lo + g * nb * PG + i;
            if (m >= M) {
                for (int64_t p = 0; p < K / 2; p++) ag[p * PG] = 0;
                for (int64_t b = 0; b < nb; b++) dg[b * PG] = sg[b * PG] = lg[b * PG] = 0.0f;
                continue;
            }
            const int16_t *qm = q + m * K;
            for (int64_t p = 0; p < K / 2; p++) memcpy(&ag[p * PG], qm + 2 * p, 4);
            for (int64_t b = 0; b < nb; b++) {
                int sum = 0;
                for (int j = 0; j < QK / 2; j++) sum += qm[b * QK + j];
                dg[b * PG] = d[SCALE_AT(m, b, nb)], sg[b * PG] = s[SCALE_AT(m, b, nb)];
                lg[b * PG] = dg[b * PG] * (float)sum;
            }
        }
}
#endif

typedef void (*tile_fn)(const uint8_t *, int64_t, int64_t, const int16_t *, const float *, const float *, int, int,
                        float *);
/* This path's kernel per format: the C side of the type table. */
static const tile_fn TILES[LAMINA_NTYPES] = {
    [T_Q4_1] = tile_T_Q4_1, [T_Q8_0] = tile_T_Q8_0, [T_Q4_0] = tile_T_Q4_0, [T_Q5_0] = tile_T_Q5_0,
    [T_Q5_1] = tile_T_Q5_1, [T_IQ4_NL] = tile_T_IQ4_NL, [T_IQ4_XS] = tile_T_IQ4_XS, [T_Q2_K] = tile_T_Q2_K,
    [T_Q3_K] = tile_T_Q3_K, [T_Q4_K] = tile_T_Q4_K, [T_Q5_K] = tile_T_Q5_K, [T_Q6_K] = tile_T_Q6_K,
    [T_F16] = NULL,         [T_BF16] = NULL, /* lamina_f16_rows (f16.c) */
};

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
                        const float *s, int64_t M, float *y, int64_t ldy, int64_t n0, int64_t n1, int accumulate) {
    if (wtype == T_F16 || wtype == T_BF16) { /* 16-bit floats: f16.c */
        lamina_f16_rows(wtype, weights, N, K, q, d, M, y, ldy, n0, n1, accumulate);
        return;
    }
    int64_t n = n0;
    const int64_t row_bytes = K / TRAITS[wtype].block * TRAITS[wtype].bytes;
#if defined(LAMINA_AVX512)
    if (few_rows_path(M, N, row_bytes)) { /* a few activation rows: each weight row read once for them (above) */
        few_rows(wtype, weights, K, q, d, s, M, y, ldy, n0, n1, accumulate);
        return;
    }
    if (M >= PANEL_ROWS && PANELS[wtype]) { /* several activation rows: panels (above) */
        void *panels = aligned_alloc(64, lamina_panel_bytes(M, K));
        if (!panels) abort(); /* out of memory for a panel */
        panel_fill(q, d, s, M, K, 0, lamina_panel_groups(M), panels);
        lamina_matmul_prepared(wtype, weights, N, K, q, d, s, M, panels, y, ldy, n0, n1, accumulate);
        free(panels);
        return;
    }
#endif
#ifdef LAMINA_AVX2
    if (M == 1 && wtype == T_Q4_1) { /* one Q4_1 row of x: NR weight rows at a time (for the others that measured slower;
                                       * on AVX-512 the one-row path below measured the same, Zen 4) */
        const int64_t nb = K / QK;
        float out[NR];
        for (; n + NR <= n1; n += NR) {
            rows_q4_1_m1((const block_q4_1 *)weights + n * nb, nb, q, d, s, out);
            for (int r = 0; r < NR; r++) y[n + r] = out[r] + (accumulate ? y[n + r] : 0.0f); /* M = 1: row 0 */
        }
    }
#endif
    /* TR weight rows at a time against every activation row, TM at a time; the rows past the tile (and ~2 KB more)
     * are fetched meanwhile (as above), except for one stream on AVX-512 (below). */
    const int64_t nb = K / QK, groups = (M + TM - 1) / TM;
    const int64_t ahead = TR + (PF_BYTES + row_bytes - 1) / row_bytes; /* past the tile being multiplied */
#if defined(LAMINA_AVX512)
    /* One activation row (decode of one sequence): one weight row at a time, in address order, each 256 weights
     * fetched PF_ONE bytes ahead, all of a thread's rows in one loop. Measured on a Zen 4 (2 threads, matrices
     * 8192 x 2048 from memory): Q8_0 0.54 -> 0.94 of the read bandwidth, Q6_K 0.36 -> 0.67, Q4_K 0.46 -> 0.62
     * against four interleaved rows and the burst prefetch below (one sequential stream a thread is what the
     * hardware prefetcher follows best); then, 32768 x 2048, one loop instead of a call per row: Q4_K 34 -> 47
     * Gw/s, Q8_0 36 -> 46; and the prefetch 8 KB ahead: Q4_K 47 -> 57, Q6_K 29 -> 45 (4-16 KB measured alike). */
    const int one_stream = M == 1;
#endif
    const tile_fn tile = TILES[wtype];
    float out[TR * TM];
    int16_t *permuted = NULL;
#if defined(LAMINA_AVX2) && !defined(LAMINA_AVX512)
    /* a group of one activation row (M = 1, or the last of M = 4k + 1) is multiplied from its values permuted */
    int16_t permuted_here[16384]; /* rows of up to 16384 weights on the stack (8B: 14336) */
    if (M % TM == 1 && EVEN_ODD(wtype)) {
        permuted = K <= 16384 ? permuted_here : malloc(sizeof(int16_t) * (size_t)K);
        if (!permuted) abort(); /* out of memory for one row of activations */
        even_odd(q + (M - 1) * K, K, permuted);
    }
#endif
#if defined(LAMINA_AVX512)
    /* a group of one activation row takes its scales and sums contiguous (row512 reads 8 with one load) */
    float one_here[2 * 512], *one = NULL;
    if (M % TM == 1) {
        one = nb <= 512 ? one_here : malloc(sizeof(float) * 2 * (size_t)nb);
        if (!one) abort(); /* out of memory for one row's scales */
        for (int64_t b = 0; b < nb; b++) one[b] = d[SCALE_AT(M - 1, b, nb)], one[nb + b] = s[SCALE_AT(M - 1, b, nb)];
    }
    /* and, for the formats kquant_split reads, its values split into bytes */
    int8_t split_here[2 * 16384], *split = NULL; /* hi [K], then lo [K] */
    float half_here[1024], *half = NULL;         /* Q6_K: the sums of each 16 values [K / 16] */
    if (M % TM == 1 && SPLIT(wtype)) {
        split = K <= 16384 ? split_here : malloc(2 * (size_t)K);
        half = K <= 16384 ? half_here : malloc(sizeof(float) * (size_t)(K / 16));
        if (!split || !half) abort(); /* out of memory for one row of activations */
        split_row(wtype, q + (M - 1) * K, K, split, (uint8_t *)split + K, half);
    }
#endif
#if defined(LAMINA_AVX512)
    if (one_stream) {
        const one_row a = {q, split, split ? (const uint8_t *)split + K : NULL, half, one, one + nb, K};
        ROWS[wtype]((const uint8_t *)weights + n * row_bytes, row_bytes, K, &a, n1 - n, y + n, accumulate);
        n = n1;
    }
#endif
    for (; n < n1;) {
        const int tr = n + TR <= n1 ? TR : 1;
        if (n + ahead + tr <= N) {
            const char *next = (const char *)weights + (n + ahead) * row_bytes;
            for (int64_t off = 0; off < tr * row_bytes; off += 64) __builtin_prefetch(next + off);
        }
        for (int64_t g = 0; g < groups; g++) {
            const int rows = M - g * TM < TM ? (int)(M - g * TM) : TM;
            const int16_t *qg = rows == 1 && permuted ? permuted : q + g * TM * K;
#if defined(LAMINA_AVX512)
            if (rows == 1 && split) {
                const uint8_t *w = (const uint8_t *)weights + n * row_bytes;
                const int8_t *hi = split;
                const uint8_t *lo = (const uint8_t *)split + K;
                if (wtype == T_Q4_K) split_T_Q4_K(w, row_bytes, K, hi, lo, half, one, one + nb, tr, out);
                else if (wtype == T_Q5_K) split_T_Q5_K(w, row_bytes, K, hi, lo, half, one, one + nb, tr, out);
                else split_T_Q6_K(w, row_bytes, K, hi, lo, half, one, one + nb, tr, out);
            } else if (rows == 1)
                tile((const uint8_t *)weights + n * row_bytes, row_bytes, K, qg, one, one + nb, tr, 1, out);
            else
#endif
            tile((const uint8_t *)weights + n * row_bytes, row_bytes, K, qg, d + g * nb * TM,
                 s + g * nb * TM, tr, rows, out);
            for (int r = 0; r < tr; r++)
                for (int t = 0; t < rows; t++) {
                    float *o = y + (g * TM + t) * ldy + n + r;
                    *o = out[r * TM + t] + (accumulate ? *o : 0.0f);
                }
        }
        n += tr;
    }
#if defined(LAMINA_AVX2) && !defined(LAMINA_AVX512)
    if (permuted != permuted_here) free(permuted);
#endif
#if defined(LAMINA_AVX512)
    if (one != one_here) free(one);
    if (split != split_here) free(split);
    if (half != half_here) free(half);
#endif
}

int64_t lamina_exact_rows(void) {
#if defined(LAMINA_AVX512)
    return EXACT_ROWS;
#else
    return 1;
#endif
}
int64_t lamina_panel_rows(void) {
#if defined(LAMINA_AVX512)
    return PANEL_ROWS;
#else
    return 0;
#endif
}
int64_t lamina_panel_groups(int64_t M) {
#if defined(LAMINA_AVX512)
    return (M + PG - 1) / PG;
#else
    (void)M;
    return 0;
#endif
}
size_t lamina_panel_bytes(int64_t M, int64_t K) {
#if defined(LAMINA_AVX512)
    const int64_t groups = (M + PG - 1) / PG;
    const size_t bytes = sizeof(int32_t) * (size_t)(groups * (K / 2) * PG) + 3 * sizeof(float) * (size_t)(groups * (K / QK) * PG);
    return (bytes + 63) / 64 * 64;
#else
    (void)M, (void)K;
    return 0;
#endif
}
void lamina_panel_prepare(const int16_t *q, const float *d, const float *s, int64_t M, int64_t K, int64_t g0,
                          int64_t g1, void *panels) {
#if defined(LAMINA_AVX512)
    panel_fill(q, d, s, M, K, g0, g1, panels);
#else
    (void)q, (void)d, (void)s, (void)M, (void)K, (void)g0, (void)g1, (void)panels;
#endif
}
void lamina_matmul_prepared(int wtype, const void *weights, int64_t N, int64_t K, const int16_t *q, const float *d,
                            const float *s, int64_t M, const void *panels, float *y, int64_t ldy, int64_t n0,
                            int64_t n1, int accumulate) {
#if defined(LAMINA_AVX512)
    const int64_t row_bytes = K / TRAITS[wtype].block * TRAITS[wtype].bytes;
    if (panels && M >= PANEL_ROWS && PANELS[wtype] && !few_rows_path(M, N, row_bytes)) {
        const int64_t nb = K / QK;
        const panel_rows r = panel_layout(panels, M, K);
        int16_t *w = aligned_alloc(64, (sizeof(int16_t) * PC * (size_t)K + 63) / 64 * 64);
        float *SO = malloc(sizeof(float) * 3 * PC * (size_t)nb);
        if (!w || !SO) abort(); /* out of memory for a panel */
        PANELS[wtype](weights, row_bytes, K, &r, M, y, ldy, n0, n1, accumulate, w, SO);
        free(w), free(SO);
        return;
    }
#endif
    (void)panels;
    lamina_matmul_rows(wtype, weights, N, K, q, d, s, M, y, ldy, n0, n1, accumulate);
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
    int16_t *q = aligned_alloc(64, (sizeof(int16_t) * (size_t)(M * K) + 63) / 64 * 64);
    float *d = calloc((size_t)(SCALE_ROWS(M) * nb), sizeof(float)), *s = calloc((size_t)(SCALE_ROWS(M) * nb), sizeof(float));
    if (!q || !d || !s) { free(q); free(d); free(s); return -1; }
    lamina_quantize_rows(x, M, K, q, d, s);
#pragma omp parallel
    {
        int64_t lo, hi;
        lamina_split(N, NR, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        lamina_matmul_rows(wtype, weights, N, K, q, d, s, M, y, N, lo, hi, 0);
    }
    free(q); free(d); free(s);
    return 0;
}


/* W [N, K] in `wtype` blocks -> out [N, K], float32 (bf16 = 0) or bfloat16 rounded to nearest even (bf16 = 1), in
 * parallel over rows: prefill multiplies the dequantized matrix with a float GEMM, and embeddings look rows up. */
void lamina_dequantize(int wtype, const void *weights, int64_t N, int64_t K, void *out, int bf16) {
    if (wtype == T_F16 || wtype == T_BF16) { /* 16-bit floats: f16.c */
        lamina_f16_dequantize(wtype, weights, N, K, out, bf16);
        return;
    }
    const int block = TRAITS[wtype].block, bytes = TRAITS[wtype].bytes, chunks = block / QK;
    const int64_t row_bytes = K / block * bytes;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float row[QK];
        for (int64_t sb = 0; sb < K / block; sb++)
            for (int c = 0; c < chunks; c++) {
                const uint8_t *x = (const uint8_t *)weights + n * row_bytes + sb * bytes;
                const int64_t at = n * K + sb * block + c * QK;
                float *o = bf16 ? row : (float *)out + at, off[2];
#ifdef LAMINA_AVX2
                switch (wtype) { /* the vector unpacking (a constant format in each case, so it inlines) */
#define LAMINA_DEQ(T)                                                                                               \
    case T: {                                                                                                       \
        const float scale = chunk_scale(T, x, c, &off[0]);                                                          \
        off[1] = T == T_Q2_K ? -f16_at(x + 82) * (float)(x[2 * c + 1] >> 4) : off[0];                               \
        const vblock w = unpack(T, x, c);                                                                           \
        const __m256 sv = _mm256_set1_ps(scale), o0 = _mm256_set1_ps(off[0]), o1 = _mm256_set1_ps(off[1]);          \
        const __m256i parts[2] = {w.lo, w.hi};                                                                       \
        for (int h = 0; h < 2; h++)                                                                                 \
            for (int e = 0; e < 2; e++) {                                                                           \
                const __m128i half = e ? _mm256_extracti128_si256(parts[h], 1) : _mm256_castsi256_si128(parts[h]);   \
                const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(half));                                   \
                _mm256_storeu_ps(o + 16 * h + 8 * e, _mm256_add_ps(_mm256_mul_ps(sv, v), h ? o1 : o0));              \
            }                                                                                                       \
        break;                                                                                                      \
    }
                LAMINA_DEQ(T_Q4_1) LAMINA_DEQ(T_Q8_0) LAMINA_DEQ(T_Q4_0) LAMINA_DEQ(T_Q5_0) LAMINA_DEQ(T_Q5_1)
                LAMINA_DEQ(T_IQ4_NL) LAMINA_DEQ(T_IQ4_XS) LAMINA_DEQ(T_Q2_K) LAMINA_DEQ(T_Q3_K) LAMINA_DEQ(T_Q4_K)
                LAMINA_DEQ(T_Q5_K) LAMINA_DEQ(T_Q6_K)
#undef LAMINA_DEQ
                }
#else
                int16_t w[QK];
                const float scale = unpack_ref(wtype, x, c, w, off);
                for (int j = 0; j < QK; j++) o[j] = scale * (float)w[j] + off[j / 16];
#endif
                if (bf16) {
                    uint16_t *dst = (uint16_t *)out + at;
                    for (int j = 0; j < QK; j++) {
                        uint32_t bits;
                        memcpy(&bits, &row[j], 4);
                        dst[j] = (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16); /* finite values only */
                    }
                }
            }
    }
}
