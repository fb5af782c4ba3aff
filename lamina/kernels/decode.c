/* The step of a Llama model whose projections are GGML blocks, as one call: every layer's RMSNorm, fused q/k/v
 * projection, rotary embedding, KV-cache write, grouped-query attention over each sequence's filled cache, output
 * projection, SwiGLU feed-forward and residuals, for B rows, each a token at a position of a sequence: one new token
 * of each of B sequences (decode), or a prompt's tokens as rows of one sequence (prefill; see `run` for attention).
 *
 * Why in C: at one token a step the arithmetic is small and PyTorch spends about as long dispatching the ~25
 * operations of each layer as the kernel spends reading its weights. Here one OpenMP team runs the whole step and
 * meets at a barrier between dependent stages (a few per layer), so threads are started once per step, not once
 * per operation. The numerics are those of lamina.model.transformer on the same blocks: float32 everywhere,
 * activations quantized to int16 per block of 32 before each product (qmatmul.c), rotation of adjacent pairs.
 */
#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    /* blocks: [H D, dim], [KVH D, dim] twice, [dim, H D], [F, dim] twice, [dim, F]; each in its own format (a file
     * mixes them: a Q4_K_M file has Q6_K wv in some layers), of kernels.h's enum */
    const void *wq, *wk, *wv, *wo, *w1, *w3, *w2;
    int32_t wq_type, wk_type, wv_type, wo_type, w1_type, w3_type, w2_type;
    const float *attention_norm, *ffn_norm; /* [dim] */
    void *k_cache, *v_cache;               /* [num_blocks, KVH, block_size, D] of kv_type */
    float *k_scale, *v_scale;              /* q8_0 only: [num_blocks, KVH, block_size, D / 32] */
} lamina_layer;

/* The KV cache's element types (lamina.engine.kv_cache): float32, float16, bfloat16, or q8_0 (int8, one float32
 * scale per 32 values: x ~= scale * q, scale = max |x| / 127, q rounded to nearest even, as the PyTorch side). */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2, KV_Q8_0 = 3 };

typedef struct {
    int64_t n_layers, dim, hidden_dim, n_heads, n_kv_heads, head_dim, num_blocks, block_size;
    double norm_eps;
    const float *inv_freq; /* [D / 2] rotation frequencies */
    const float *norm;     /* [dim] final norm */
    const lamina_layer *layers;
    const void *output;    /* blocks [vocab_size, dim] of the output projection, or NULL (hidden states only) */
    int64_t vocab_size;
    int32_t output_type;
    /* Tensor parallelism (NULL: one process): the model holds one rank's heads and hidden units, and the output
     * and down projections give partial sums; reduce(x, n) sums x [n] over the ranks in place (called by one thread
     * at a time, the caller's), returning 0, or non-zero when it failed. */
    int (*reduce)(float *x, int64_t n);
    int32_t kv_type;
} lamina_model;

static float inverse_rms(const float *x, int64_t n, double eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / (float)n + (float)eps);
}

/* Blocks lo..hi-1 of the B x K/32 blocks of rows x [B, K] (row-major), quantized for the next product (q, d, s as
 * lamina_quantize_rows lays them out); with `norm`, each row first becomes x / rms(x) * norm, as RMSNorm does.
 * Split by blocks, not rows, so that one sequence's work is shared by every thread. */
static void quantize_stage(const float *x, int64_t K, const float *norm, double eps, int64_t lo, int64_t hi,
                           int16_t *q, float *d, float *s) {
    const int64_t nb = K / QK;
    int64_t row = -1;
    float r = 1.0f, tmp[QK];
    for (int64_t u = lo; u < hi; u++) {
        const int64_t b = u / nb, j = u % nb;
        const float *xb = x + b * K + j * QK;
        if (norm) {
            if (b != row) row = b, r = inverse_rms(x + b * K, K, eps);
            for (int i = 0; i < QK; i++) tmp[i] = (xb[i] * r) * norm[j * QK + i];
            xb = tmp;
        }
        lamina_quantize_block(xb, q + u * QK, d + SCALE_AT(b, j, nb), s + SCALE_AT(b, j, nb));
    }
}

static inline float f16_load(const void *p, int64_t i) { return (float)((const _Float16 *)p)[i]; }
static inline float bf16_load(const void *p, int64_t i) {
    const uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t bf16_round(float f) { /* round to nearest even, as torch's conversion (NaN aside) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#ifdef LAMINA_AVX2
/* Eight cached values from element i of a cache of `type` as floats: F16C's conversion for f16, a shift for bf16, a
 * widening for q8_0's int8 (unscaled). Called with a constant `type`, the switch folds away. */
static inline __attribute__((always_inline)) __m256 kv_load8(int type, const void *cache, int64_t i) {
    switch (type) {
    case KV_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i)));
    case KV_BF16: {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
    case KV_Q8_0:
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)cache + i))));
    default: return _mm256_loadu_ps((const float *)cache + i);
    }
}

/* acc + q [n] * the n cached values from element `at`, lane by lane (n a multiple of 8). */
static inline __attribute__((always_inline)) __m256 dot_run(int type, const void *cache, int64_t at, const float *q,
                                                            int64_t n, __m256 acc) {
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv_load8(type, cache, at + i), acc);
    return acc;
}

/* out [n] += p * the n cached values from element `at` (n a multiple of 8). */
static inline __attribute__((always_inline)) void axpy_run(int type, const void *cache, int64_t at, float p,
                                                           float *out, int64_t n) {
    const __m256 pv = _mm256_set1_ps(p);
    for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, kv_load8(type, cache, at + i), _mm256_loadu_ps(out + i)));
}
#endif

/* Store x [D] at element `at` of a cache of kv_type (and its scales, for q8_0). */
static void kv_store(int type, void *cache, float *scales, int64_t at, const float *x, int64_t D) {
    switch (type) {
    case KV_F32: memcpy((float *)cache + at, x, sizeof(float) * (size_t)D); break;
    case KV_F16: {
        int64_t i = 0;
#ifdef LAMINA_AVX2
        for (; i + 8 <= D; i += 8)
            _mm_storeu_si128((__m128i *)((uint16_t *)cache + at + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
        for (; i < D; i++) ((_Float16 *)cache)[at + i] = (_Float16)x[i];
        break;
    }
    case KV_BF16: for (int64_t i = 0; i < D; i++) ((uint16_t *)cache)[at + i] = bf16_round(x[i]); break;
    case KV_Q8_0:
        for (int64_t j = 0; j < D / QK; j++) {
            float amax = 0.0f;
            for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[j * QK + i]));
            const float scale = amax / 127.0f;
            for (int i = 0; i < QK; i++) {
                const float q = scale > 0.0f ? nearbyintf(x[j * QK + i] / scale) : 0.0f;
                ((int8_t *)cache)[at + j * QK + i] = (int8_t)fminf(fmaxf(q, -127.0f), 127.0f);
            }
            scales[at / QK + j] = scale;
        }
        break;
    }
}

/* q [D] . the cached vector at element `at`. */
static float kv_dot(int type, const void *cache, const float *scales, int64_t at, const float *q, int64_t D) {
#ifdef LAMINA_AVX2
    if (D % 8 == 0) { /* every head size lamina meets; q8_0 caches need D % 32 == 0 anyway */
        const __m256 zero = _mm256_setzero_ps();
        switch (type) {
        case KV_F32: return hsum8(dot_run(KV_F32, cache, at, q, D, zero));
        case KV_F16: return hsum8(dot_run(KV_F16, cache, at, q, D, zero));
        case KV_BF16: return hsum8(dot_run(KV_BF16, cache, at, q, D, zero));
        case KV_Q8_0: {
            __m256 acc = zero;
            for (int64_t j = 0; j < D / QK; j++)
                acc = _mm256_fmadd_ps(dot_run(KV_Q8_0, cache, at + j * QK, q + j * QK, QK, zero),
                                      _mm256_set1_ps(scales[at / QK + j]), acc);
            return hsum8(acc);
        }
        }
    }
#endif
    float dot = 0.0f;
    switch (type) {
    case KV_F32: {
        const float *k = (const float *)cache + at;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < D; i++) dot += q[i] * k[i];
        break;
    }
    case KV_F16:
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < D; i++) dot += q[i] * f16_load(cache, at + i);
        break;
    case KV_BF16:
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < D; i++) dot += q[i] * bf16_load(cache, at + i);
        break;
    case KV_Q8_0: {
        const int8_t *k = (const int8_t *)cache + at;
        for (int64_t j = 0; j < D / QK; j++) {
            float part = 0.0f;
#pragma omp simd reduction(+ : part)
            for (int i = 0; i < QK; i++) part += q[j * QK + i] * (float)k[j * QK + i];
            dot += part * scales[at / QK + j];
        }
        break;
    }
    }
    return dot;
}

/* out [D] += p * the cached vector at element `at`. */
static void kv_axpy(int type, const void *cache, const float *scales, int64_t at, float p, float *out, int64_t D) {
#ifdef LAMINA_AVX2
    if (D % 8 == 0) {
        switch (type) {
        case KV_F32: axpy_run(KV_F32, cache, at, p, out, D); return;
        case KV_F16: axpy_run(KV_F16, cache, at, p, out, D); return;
        case KV_BF16: axpy_run(KV_BF16, cache, at, p, out, D); return;
        case KV_Q8_0:
            for (int64_t j = 0; j < D / QK; j++)
                axpy_run(KV_Q8_0, cache, at + j * QK, p * scales[at / QK + j], out + j * QK, QK);
            return;
        }
    }
#endif
    switch (type) {
    case KV_F32: {
        const float *v = (const float *)cache + at;
#pragma omp simd
        for (int64_t i = 0; i < D; i++) out[i] += p * v[i];
        break;
    }
    case KV_F16:
#pragma omp simd
        for (int64_t i = 0; i < D; i++) out[i] += p * f16_load(cache, at + i);
        break;
    case KV_BF16:
#pragma omp simd
        for (int64_t i = 0; i < D; i++) out[i] += p * bf16_load(cache, at + i);
        break;
    case KV_Q8_0: {
        const int8_t *v = (const int8_t *)cache + at;
        for (int64_t j = 0; j < D / QK; j++) {
            const float ps = p * scales[at / QK + j];
#pragma omp simd
            for (int i = 0; i < QK; i++) out[j * QK + i] += ps * (float)v[j * QK + i];
        }
        break;
    }
    }
}

/* Rotate the adjacent pairs of one head of D by the angles whose cos/sin are given. */
static void rotate(float *x, const float *cos, const float *sin, int64_t D) {
    for (int64_t i = 0; i < D / 2; i++) {
        const float x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * cos[i] - x1 * sin[i];
        x[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
    }
}

/* Where position t of a sequence (block table `table`) keeps kv head `kvh`'s vector, in a [blocks, KVH, BS, D] cache. */
static inline int64_t cached(const int64_t *table, int64_t t, int64_t BS, int64_t KVH, int64_t kvh, int64_t D) {
    return ((table[t / BS] * KVH + kvh) * BS + t % BS) * D;
}

/* One query head against positions 0..len-1 of its sequence's keys/values (kv head kvh of the blocks in `table`,
 * caches of kv_type): out [D] = softmax(q k^T / sqrt(D)) v. */
static void attend(const float *q, const lamina_layer *L, int type, const int64_t *table, int64_t BS, int64_t KVH,
                   int64_t kvh, int64_t len, int64_t D, float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)D);
    float max = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        scores[t] = kv_dot(type, L->k_cache, L->k_scale, cached(table, t, BS, KVH, kvh, D), q, D) * scale;
        max = fmaxf(max, scores[t]);
    }
    float total = 0.0f;
    for (int64_t t = 0; t < len; t++) total += scores[t] = expf(scores[t] - max);
    for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < len; t++)
        kv_axpy(type, L->v_cache, L->v_scale, cached(table, t, BS, KVH, kvh, D), scores[t] / total, out, D);
}

/* ---- Several rows of one sequence (a prompt's chunk, or draft tokens to verify): attention a tile of keys at once.
 *
 * Rows b..b+R-1 that extend one sequence (the same block table, positions one after the other) are a run: their
 * keys and values are all in the cache once the rotation stage has stored this step's, so each row attending to
 * positions 0..positions[b] of the cache is causal attention over the run. With R >= RUN_ROWS the run's keys
 * 0..L-1 of each kv head are read once into floats, the keys transposed a tile at a time (Kt [Lp / KT][D][KT], Lp =
 * L rounded up to a tile, zeros past L) and the values as stored (V [L][D]), and each row's query heads of a kv head
 * meet them KT keys at a time with an online softmax (flash attention's): the loops over a tile's keys vectorise,
 * where `attend` takes one key at a time. */
/* Runs of up to EXACT_ROWS rows attend row by row, each as it would alone: with qmatmul.c's few-rows products a
 * decode step of one sequence and its draft tokens (speculative decoding) gives every row what a step of that row
 * alone gives, so such a verification never changes a token. */
#define RUN_ROWS (EXACT_ROWS + 1)
#define KT 32 /* keys a tile */
#define HG 4  /* query heads of one kv head taken together */

/* e^x for x <= 0 (0 for x below -87), to ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r (Cephes'
 * coefficients) scaled by 2^n through the exponent bits. Branch-free, so that loops of it vectorise. */
static inline float exp_neg(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    const float n = nearbyintf(clamped * 1.44269504f); /* to nearest, as exp_neg16's conversion */
    const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

/* The D values of the cached vector at element `at` as floats. */
static void kv_read(int type, const void *cache, const float *scales, int64_t at, int64_t D, float *out) {
    switch (type) {
    case KV_F32: memcpy(out, (const float *)cache + at, sizeof(float) * (size_t)D); break;
    case KV_F16: for (int64_t i = 0; i < D; i++) out[i] = f16_load(cache, at + i); break;
    case KV_BF16: for (int64_t i = 0; i < D; i++) out[i] = bf16_load(cache, at + i); break;
    case KV_Q8_0:
        for (int64_t i = 0; i < D; i++) out[i] = (float)((const int8_t *)cache)[at + i] * scales[(at + i) / QK];
        break;
    }
}

typedef struct {
    int64_t first, rows, len, lp; /* its first row, how many, the keys it reaches (last position + 1), len rounded up */
    int64_t at;                   /* where its kt and v start in the step's buffer of gathered floats */
    int64_t rb;                   /* rows attended together (a unit of the attention stage), at most RB */
    float *kt, *v; /* [KVH][lp / KT][D][KT] (a tile of keys transposed, tile after tile) and [KVH][len][D] */
} run;

/* Keys t lo..hi-1 of kv head kvh of run r into its Kt and V (zeros at lp's padding are set by the caller). */
static void run_gather(const run *r, const lamina_layer *L, int type, const int64_t *table, int64_t BS, int64_t KVH,
                       int64_t kvh, int64_t D, int64_t lo, int64_t hi, float *tmp) {
    float *kt = r->kt + kvh * D * r->lp, *v = r->v + kvh * r->len * D;
    for (int64_t t = lo; t < hi; t++) {
        const int64_t at = cached(table, t, BS, KVH, kvh, D);
        kv_read(type, L->k_cache, L->k_scale, at, D, tmp);
        for (int64_t i = 0; i < D; i++) kt[(t / KT * D + i) * KT + t % KT] = tmp[i];
        kv_read(type, L->v_cache, L->v_scale, at, D, v + t * D);
    }
}

#if defined(LAMINA_AVX512)
/* The largest of a 512-bit vector's 16 lanes. */
static inline float hmax16(__m512 v) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    __m256 m8 = _mm256_max_ps(_mm512_castps512_ps256(v), hi);
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}

/* exp_neg on 16 lanes */
static inline __m512 exp_neg16(__m512 x) {
    const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512i ni = _mm512_cvtps_epi32(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504f))); /* to nearest */
    const __m512 n = _mm512_cvtepi32_ps(ni);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                     _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), clamped));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
    return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), p, scale);
}

/* One tile of keys (t0.., `keys` of them, at most KT = 32) for n query heads of one row (n a constant where it is
 * inlined; D a multiple of 16): each head's scores are two vectors (each query value broadcast once for both, each
 * row of Kt's tile loaded once for all heads), then each head's running max m and sum l take the tile in, and the
 * heads' outputs o [n][D], four vectors of D at a time, each of the tile's value vectors loaded once for all heads
 * (loads, not multiply-adds, bound this loop on Zen 4: one 512-bit load a cycle). */
static inline __attribute__((always_inline)) void tile32(const int n, const float *q, const float *kt,
                                                         const float *v, int64_t t0, int keys, int64_t D,
                                                         float scale, float *o, float *m, float *l) {
    const __mmask32 live = keys == KT ? 0xffffffffu : (1u << keys) - 1;
    __m512 lo[HG], hi[HG];
    for (int g = 0; g < n; g++) lo[g] = hi[g] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i++) {
        const __m512 k0 = _mm512_loadu_ps(kt + i * KT), k1 = _mm512_loadu_ps(kt + i * KT + 16);
        for (int g = 0; g < n; g++) {
            const __m512 qi = _mm512_set1_ps(q[g * D + i]);
            lo[g] = _mm512_fmadd_ps(qi, k0, lo[g]);
            hi[g] = _mm512_fmadd_ps(qi, k1, hi[g]);
        }
    }
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY), sv = _mm512_set1_ps(scale);
    float p[HG][KT], alpha[HG];
    for (int g = 0; g < n; g++) {
        const __m512 s0 = _mm512_mask_mul_ps(minus_inf, (__mmask16)live, lo[g], sv);
        const __m512 s1 = _mm512_mask_mul_ps(minus_inf, (__mmask16)(live >> 16), hi[g], sv);
        const float top = fmaxf(m[g], hmax16(_mm512_max_ps(s0, s1)));
        alpha[g] = top > m[g] ? exp_neg(m[g] - top) : 1.0f; /* 0 at the first tile (m = -inf) */
        const __m512 p0 = exp_neg16(_mm512_sub_ps(s0, _mm512_set1_ps(top)));
        const __m512 p1 = exp_neg16(_mm512_sub_ps(s1, _mm512_set1_ps(top)));
        _mm512_storeu_ps(p[g], p0);
        _mm512_storeu_ps(p[g] + 16, p1);
        l[g] = l[g] * alpha[g] + hsum16(_mm512_add_ps(p0, p1)), m[g] = top;
    }
    /* the heads' outputs take the tile's values together: each value vector loaded once for all of them */
    int64_t i = 0;
    for (; i + 64 <= D; i += 64) { /* four vectors of the output at a time (in registers), then one */
        __m512 acc[HG][4];
        for (int g = 0; g < n; g++)
            for (int j = 0; j < 4; j++)
                acc[g][j] = _mm512_mul_ps(_mm512_loadu_ps(o + g * D + i + 16 * j), _mm512_set1_ps(alpha[g]));
        for (int k = 0; k < keys; k++) {
            __m512 vk[4];
            for (int j = 0; j < 4; j++) vk[j] = _mm512_loadu_ps(v + (t0 + k) * D + i + 16 * j);
            for (int g = 0; g < n; g++) {
                const __m512 pk = _mm512_set1_ps(p[g][k]);
                for (int j = 0; j < 4; j++) acc[g][j] = _mm512_fmadd_ps(pk, vk[j], acc[g][j]);
            }
        }
        for (int g = 0; g < n; g++)
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(o + g * D + i + 16 * j, acc[g][j]);
    }
    for (; i < D; i += 16)
        for (int g = 0; g < n; g++) {
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(o + g * D + i), _mm512_set1_ps(alpha[g]));
            for (int k = 0; k < keys; k++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(p[g][k]), _mm512_loadu_ps(v + (t0 + k) * D + i), acc);
            _mm512_storeu_ps(o + g * D + i, acc);
        }
}
#endif

/* One tile of keys for n query heads of one row, as tile32, on any path. */
static void tile_any(int n, const float *q, const float *kt, const float *v, int64_t t0, int keys,
                     int64_t D, float scale, float *o, float *m, float *l) {
#if defined(LAMINA_AVX512)
    if (D % 16 == 0) {
        switch (n) { /* a constant count of heads in each: the accumulators stay in registers */
        case 1: tile32(1, q, kt, v, t0, keys, D, scale, o, m, l); return;
        case 2: tile32(2, q, kt, v, t0, keys, D, scale, o, m, l); return;
        case 3: tile32(3, q, kt, v, t0, keys, D, scale, o, m, l); return;
        default: tile32(4, q, kt, v, t0, keys, D, scale, o, m, l); return;
        }
    }
#endif
    for (int g = 0; g < n; g++) {
        float s[KT], top = m[g];
        for (int k = 0; k < keys; k++) {
            float dot = 0.0f;
            for (int64_t i = 0; i < D; i++) dot += q[g * D + i] * kt[i * KT + k];
            s[k] = dot * scale;
            top = fmaxf(top, s[k]);
        }
        const float alpha = exp_neg(m[g] - top);
        float sum = 0.0f;
        for (int k = 0; k < keys; k++) sum += s[k] = exp_neg(s[k] - top);
        l[g] = l[g] * alpha + sum, m[g] = top;
        for (int64_t i = 0; i < D; i++) {
            float acc = o[g * D + i] * alpha;
            for (int k = 0; k < keys; k++) acc += s[k] * v[(t0 + k) * D + i];
            o[g * D + i] = acc;
        }
    }
}

#ifndef RB
#define RB 32 /* rows of a run attended together, each tile of keys and values read once for them (8: attention 25%
               * slower at 512 tokens on Zen 4) */
#endif

/* Rows b..b+rows-1 (rows <= RB) of run r, every query head of kv head `kvh` (`group` of them, q of row i at
 * qkv + i * QKV + kvh * group * D): att of row i, head kvh * group + g = softmax(q k^T / sqrt(D)) v over the keys
 * 0..positions[i]. o: room for RB * group * D + 2 * RB * group floats. */
static void attend_run(const float *qkv, int64_t QKV, int64_t rows, const int64_t *positions, const run *r,
                       int64_t kvh, int64_t group, int64_t H, int64_t D, float *o, float *att) {
    const float scale = 1.0f / sqrtf((float)D);
    const float *kt = r->kt + kvh * D * r->lp, *v = r->v + kvh * r->len * D;
    float *m = o + RB * group * D, *l = m + RB * group;
    for (int64_t u = 0; u < rows * group; u++) {
        m[u] = -INFINITY, l[u] = 0.0f;
        for (int64_t i = 0; i < D; i++) o[u * D + i] = 0.0f;
    }
    const int64_t last = positions[rows - 1] + 1;
    for (int64_t t0 = 0; t0 < last; t0 += KT)
        for (int64_t i = 0; i < rows; i++) {
            const int64_t len = positions[i] + 1;
            if (t0 >= len) continue;
            const int keys = len - t0 < KT ? (int)(len - t0) : KT;
            for (int64_t g = 0; g < group; g += HG)
                tile_any(group - g < HG ? (int)(group - g) : HG, qkv + i * QKV + (kvh * group + g) * D, kt + t0 * D,
                         v, t0, keys, D, scale, o + (i * group + g) * D, m + i * group + g, l + i * group + g);
        }
    for (int64_t i = 0; i < rows; i++)
        for (int64_t g = 0; g < group; g++)
            for (int64_t j = 0; j < D; j++)
                att[(i * H + kvh * group + g) * D + j] = o[(i * group + g) * D + j] / l[i * group + g];
}

/* As quantize_stage, of silu(gate) * up for gu [B, 2F] (gate and up side by side in each row). */
static void swiglu_stage(const float *gu, int64_t F, int64_t lo, int64_t hi, int16_t *q, float *d, float *s) {
    const int64_t nb = F / QK;
    float tmp[QK];
    for (int64_t u = lo; u < hi; u++) {
        const float *gate = gu + u / nb * 2 * F + u % nb * QK, *up = gate + F;
#if defined(LAMINA_AVX512)
        for (int i = 0; i < QK; i += 16) { /* e^-|x| on 16 lanes; sigmoid(x) = 1 / (1 + e^-x) = e^x / (1 + e^x) */
            const __m512 x = _mm512_loadu_ps(gate + i);
            const __m512 one = _mm512_set1_ps(1.0f);
            const __m512 t = exp_neg16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
            const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
            const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, t), _mm512_add_ps(one, t));
            _mm512_storeu_ps(tmp + i, _mm512_mul_ps(_mm512_mul_ps(x, sigmoid), _mm512_loadu_ps(up + i)));
        }
#else
        for (int i = 0; i < QK; i++) tmp[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
#endif
        lamina_quantize_block(tmp, q + u * QK, d + SCALE_AT(u / nb, u % nb, nb), s + SCALE_AT(u / nb, u % nb, nb));
    }
}

/* h [B, N] += the product of the quantized rows (q, qd, qs) of K columns with `w` [N, K]: in place, or, under
 * tensor parallelism, through `part` [B, N], summed over the ranks first. Called by every thread of the team; sets
 * *failed (and adds nothing) when the sum failed. */
static void residual_product(const lamina_model *m, int32_t qtype, const void *w, int64_t N, int64_t K,
                             const int16_t *q, const float *qd, const float *qs, int64_t B, const void *panels,
                             float *h, float *part, volatile int *failed) {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t lo, hi;
    lamina_split(N, NR, tid, nth, &lo, &hi);
    if (!m->reduce) {
        lamina_matmul_prepared(qtype, w, N, K, q, qd, qs, B, panels, h, N, lo, hi, 1);
        return;
    }
    lamina_matmul_prepared(qtype, w, N, K, q, qd, qs, B, panels, part, N, lo, hi, 0);
#pragma omp barrier
#pragma omp master
    if (m->reduce(part, B * N)) *failed = 1;
#pragma omp barrier
    if (*failed) return;
    lamina_split(B * N, 1, tid, nth, &lo, &hi);
    for (int64_t u = lo; u < hi; u++) h[u] += part[u];
}

/* Columns lo..hi-1 of y [B, N] (row stride N) = x @ [W_0; W_1; W_2]^T, the matrices W_i [rows_i, K] stacked (q, k
 * and v; or gate and up): each thread's share of the stacked columns, cut where one matrix ends and the next
 * begins, so that matrices in different formats still make one stage. */
static void stacked_rows(int parts, const void *const *w, const int32_t *types, const int64_t *rows, int64_t K,
                         const int16_t *q, const float *qd, const float *qs, int64_t B, const void *panels, float *y,
                         int64_t N, int64_t lo, int64_t hi) {
    int64_t first = 0;
    for (int i = 0; i < parts; first += rows[i], i++) {
        const int64_t a = lo > first ? lo : first, b = hi < first + rows[i] ? hi : first + rows[i];
        if (a < b)
            lamina_matmul_prepared(types[i], w[i], rows[i], K, q, qd, qs, B, panels, y + first, N, a - first, b - first,
                                   0);
    }
}

/* One step of B rows: h [B, dim] holds the rows' token embeddings on entry and their final normalised hidden states
 * on return; token b is at `positions[b]` of the sequence whose blocks row b of `tables` [B, width] lists (the caller
 * checks that every block a position needs is there and < num_blocks); rows of one sequence (the same table) attend
 * to each other causally. Every layer's keys and values for the rows are written to the caches. With an output
 * projection in `m` and `logits` not NULL, logits are computed too: [B, vocab_size], or with `logit_rows` not NULL
 * [n_logits, vocab_size] for rows logit_rows[0..n_logits-1] only (a step that also runs prompt chunks wants a
 * chunk's last row, not all of them). Returns 0, -1 when out of memory (nothing is written then), or -2 when a sum
 * over the ranks failed (the step stopped there). */
int lamina_decode(const lamina_model *m, int64_t B, float *h, const int64_t *tables, int64_t width,
                  const int64_t *positions, float *logits, const int64_t *logit_rows, int64_t n_logits) {
    const int64_t dim = m->dim, F = m->hidden_dim, H = m->n_heads, KVH = m->n_kv_heads, D = m->head_dim;
    const int64_t BS = m->block_size, QKV = (H + 2 * KVH) * D, group = H / KVH;
    const int64_t widest = F > dim ? (F > H * D ? F : H * D) : (dim > H * D ? dim : H * D);
    if (B <= 0) return 0;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = positions[b] + 1 > longest ? positions[b] + 1 : longest;
    /* Runs of RUN_ROWS or more rows of one sequence (see run): their rows attend through attend_run. */
    const int threads = omp_get_max_threads();
    int64_t n_runs = 0, run_floats = 0;
    run *runs = malloc(sizeof(run) * (size_t)(B / RUN_ROWS + 1));
    int64_t *run_of = malloc(sizeof(int64_t) * (size_t)B); /* each row's run, or -1 */
    if (!runs || !run_of) {
        free(runs); free(run_of);
        return -1;
    }
    for (int64_t b = 0, e; b < B; b = e) {
        for (e = b + 1; e < B && positions[e] == positions[e - 1] + 1 &&
                        !memcmp(tables + e * width, tables + b * width, sizeof(int64_t) * (size_t)width);
             e++) {}
        const int in_run = e - b >= RUN_ROWS;
        for (int64_t i = b; i < e; i++) run_of[i] = in_run ? n_runs : -1;
        if (in_run) {
            const int64_t len = positions[e - 1] + 1, lp = (len + KT - 1) / KT * KT;
            /* units of at most RB rows, and at least two a thread over the kv heads, or one thread would idle
             * while another attends a whole run's rows (SmolLM2's 3 kv heads on 2 threads) */
            int64_t parts = (e - b + RB - 1) / RB;
            const int64_t enough = (2 * threads + KVH - 1) / KVH;
            if (parts < enough) parts = enough < e - b ? enough : e - b;
            runs[n_runs++] = (run){b, e - b, len, lp, run_floats, (e - b + parts - 1) / parts, NULL, NULL};
            run_floats += KVH * D * (lp + len);
        }
    }
    /* the attention stage's units: the first row of each rb rows of a run, and every other row */
    int64_t n_units = 0, *units = malloc(sizeof(int64_t) * (size_t)B);
    for (int64_t b = 0; units && b < B; b++)
        if (run_of[b] < 0 || (b - runs[run_of[b]].first) % runs[run_of[b]].rb == 0) units[n_units++] = b;
    /* each layer's next unit to take (threads take them as they finish one: a run's units cost more than a row's) */
    int64_t *next_unit = calloc((size_t)m->n_layers, sizeof(int64_t));
    float *gathered = n_runs ? calloc((size_t)run_floats, sizeof(float)) : NULL; /* Kt's padding stays zero */
    for (int64_t r = 0; r < n_runs; r++) {
        runs[r].kt = gathered + runs[r].at;
        runs[r].v = runs[r].kt + KVH * D * runs[r].lp;
    }

    float *qkv = malloc(sizeof(float) * (size_t)(B * QKV));
    float *att = malloc(sizeof(float) * (size_t)(B * H * D));
    float *gu = malloc(sizeof(float) * (size_t)(B * 2 * F));
    float *rot = malloc(sizeof(float) * (size_t)(B * D)); /* per sequence: cos [D/2], sin [D/2] */
    float *scores = malloc(sizeof(float) * (size_t)(threads * longest));
    int16_t *q = malloc(sizeof(int16_t) * (size_t)(B * widest));
    float *qd = calloc((size_t)(SCALE_ROWS(B) * widest / QK), sizeof(float));
    float *qs = calloc((size_t)(SCALE_ROWS(B) * widest / QK), sizeof(float));
    float *part = m->reduce ? malloc(sizeof(float) * (size_t)(B * dim)) : NULL;
    const int64_t per_thread = RB * group * (D + 2) + D; /* a thread's attend_run room, and a read of one vector */
    float *run_tmp = malloc(sizeof(float) * (size_t)(threads * per_thread));
    /* the rows whose logits are asked for, gathered after the final norm (all rows: h itself) */
    const int64_t n_picked = logits && logit_rows ? n_logits : B;
    float *picked = logits && logit_rows ? malloc(sizeof(float) * (size_t)((n_picked ? n_picked : 1) * dim)) : NULL;
    /* many rows: their panels made once a quantize stage for all the products after it (lamina_panel_prepare) */
    const int prepared = lamina_panel_rows() && B >= lamina_panel_rows();
    void *panels = prepared ? aligned_alloc(64, lamina_panel_bytes(B, widest)) : NULL;
    if (!qkv || !att || !gu || !rot || !scores || !q || !qd || !qs || (m->reduce && !part) || !run_tmp || !units ||
        (n_runs && !gathered) || (prepared && !panels) || (logits && logit_rows && !picked) || !next_unit) {
        free(qkv); free(att); free(gu); free(rot); free(scores); free(q); free(qd); free(qs); free(part);
        free(run_tmp); free(gathered); free(runs); free(run_of); free(units); free(panels); free(picked);
        free(next_unit);
        return -1;
    }
    volatile int failed = 0;
    for (int64_t b = 0; b < B; b++) /* angles as lamina.model.rope: float32 position times float32 frequency */
        for (int64_t i = 0; i < D / 2; i++) {
            const float angle = (float)positions[b] * m->inv_freq[i];
            rot[b * D + i] = cosf(angle);
            rot[b * D + D / 2 + i] = sinf(angle);
        }

#pragma omp parallel
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        float *my_scores = scores + tid * longest, *my_o = run_tmp + tid * per_thread, *my_read = my_o + per_thread - D;
        int64_t lo, hi;
#define SPLIT(n, align) lamina_split((n), (align), tid, nth, &lo, &hi)
/* after a quantize stage (and its barrier): the rows' panels, once for every product that reads them */
#define PREPARE(K)                                                                                                  \
    if (panels) {                                                                                                   \
        SPLIT(lamina_panel_groups(B), 1);                                                                           \
        lamina_panel_prepare(q, qd, qs, B, (K), lo, hi, panels);                                                    \
        _Pragma("omp barrier")                                                                                      \
    }
        for (int64_t l = 0; l < m->n_layers; l++) {
            const lamina_layer *L = &m->layers[l];
            SPLIT(B * dim / QK, 1);
            quantize_stage(h, dim, L->attention_norm, m->norm_eps, lo, hi, q, qd, qs);
#pragma omp barrier
            PREPARE(dim);
            SPLIT(QKV, NR);
            {
                const void *w[3] = {L->wq, L->wk, L->wv};
                const int32_t types[3] = {L->wq_type, L->wk_type, L->wv_type};
                const int64_t rows[3] = {H * D, KVH * D, KVH * D};
                stacked_rows(3, w, types, rows, dim, q, qd, qs, B, panels, qkv, QKV, lo, hi);
            }
#pragma omp barrier
            SPLIT(B * (H + KVH), 1); /* rotate q and k heads; store k and v in the cache */
            for (int64_t u = lo; u < hi; u++) {
                const int64_t b = u / (H + KVH), head = u % (H + KVH);
                float *x = qkv + b * QKV + head * D;
                rotate(x, rot + b * D, rot + b * D + D / 2, D);
                if (head >= H) {
                    const int64_t kvh = head - H, at = cached(tables + b * width, positions[b], BS, KVH, kvh, D);
                    kv_store(m->kv_type, L->k_cache, L->k_scale, at, x, D);
                    kv_store(m->kv_type, L->v_cache, L->v_scale, at, qkv + b * QKV + (H + KVH + kvh) * D, D);
                }
            }
#pragma omp barrier
            if (n_runs) { /* the runs' keys and values, read once */
                for (int64_t r = 0; r < n_runs; r++)
                    for (int64_t kvh = 0; kvh < KVH; kvh++) {
                        SPLIT(runs[r].len, 1);
                        run_gather(&runs[r], L, m->kv_type, tables + runs[r].first * width, BS, KVH, kvh, D, lo, hi,
                                   my_read);
                    }
#pragma omp barrier
            }
            /* (rows, kv head) units, each thread taking the next as it finishes one: rb rows of a run at a time,
             * other rows one by one */
            for (int64_t u = __atomic_fetch_add(&next_unit[l], 1, __ATOMIC_RELAXED); u < n_units * KVH;
                 u = __atomic_fetch_add(&next_unit[l], 1, __ATOMIC_RELAXED)) {
                const int64_t b = units[u / KVH], kvh = u % KVH;
                if (run_of[b] >= 0) {
                    const run *r = &runs[run_of[b]];
                    const int64_t rows = r->first + r->rows - b < r->rb ? r->first + r->rows - b : r->rb;
                    attend_run(qkv + b * QKV, QKV, rows, positions + b, r, kvh, group, H, D, my_o, att + b * H * D);
                } else
                    for (int64_t g = 0; g < group; g++)
                        attend(qkv + b * QKV + (kvh * group + g) * D, L, m->kv_type, tables + b * width, BS, KVH, kvh,
                               positions[b] + 1, D, my_scores, att + (b * H + kvh * group + g) * D);
            }
#pragma omp barrier
            SPLIT(B * H * D / QK, 1);
            quantize_stage(att, H * D, NULL, 0.0, lo, hi, q, qd, qs);
#pragma omp barrier
            PREPARE(H * D);
            /* h += attention */
            residual_product(m, L->wo_type, L->wo, dim, H * D, q, qd, qs, B, panels, h, part, &failed);
            if (failed) break;
#pragma omp barrier
            SPLIT(B * dim / QK, 1);
            quantize_stage(h, dim, L->ffn_norm, m->norm_eps, lo, hi, q, qd, qs);
#pragma omp barrier
            PREPARE(dim);
            SPLIT(2 * F, NR);
            {
                const void *w[2] = {L->w1, L->w3};
                const int32_t types[2] = {L->w1_type, L->w3_type};
                const int64_t rows[2] = {F, F};
                stacked_rows(2, w, types, rows, dim, q, qd, qs, B, panels, gu, 2 * F, lo, hi);
            }
#pragma omp barrier
            SPLIT(B * F / QK, 1);
            swiglu_stage(gu, F, lo, hi, q, qd, qs);
#pragma omp barrier
            PREPARE(F);
            /* h += feed-forward */
            residual_product(m, L->w2_type, L->w2, dim, F, q, qd, qs, B, panels, h, part, &failed);
            if (failed) break;
#pragma omp barrier
        }
        if (!failed) { /* the final norm, and the logits */
            SPLIT(B, 1);
            for (int64_t b = lo; b < hi; b++) {
                const float r = inverse_rms(h + b * dim, dim, m->norm_eps);
                for (int64_t i = 0; i < dim; i++) h[b * dim + i] = (h[b * dim + i] * r) * m->norm[i];
            }
            if (m->output && logits && n_picked) {
                const float *x = h;
#pragma omp barrier
                if (picked) {
                    SPLIT(n_picked, 1);
                    for (int64_t i = lo; i < hi; i++)
                        memcpy(picked + i * dim, h + logit_rows[i] * dim, sizeof(float) * (size_t)dim);
                    x = picked;
#pragma omp barrier
                }
                SPLIT(n_picked * dim / QK, 1);
                quantize_stage(x, dim, NULL, 0.0, lo, hi, q, qd, qs);
#pragma omp barrier
                /* panels for these rows where there are enough of them (fewer: the few-rows path, as alone) */
                const void *lp = panels && n_picked >= lamina_panel_rows() ? panels : NULL;
                if (lp) {
                    SPLIT(lamina_panel_groups(n_picked), 1);
                    lamina_panel_prepare(q, qd, qs, n_picked, dim, lo, hi, panels);
#pragma omp barrier
                }
                SPLIT(m->vocab_size, NR);
                lamina_matmul_prepared(m->output_type, m->output, m->vocab_size, dim, q, qd, qs, n_picked, lp, logits,
                                       m->vocab_size, lo, hi, 0);
            }
        }
#undef PREPARE
#undef SPLIT
    }
    free(qkv); free(att); free(gu); free(rot); free(scores); free(q); free(qd); free(qs); free(part);
    free(run_tmp); free(gathered); free(runs); free(run_of); free(units); free(panels); free(picked);
    free(next_unit);
    return failed ? -2 : 0;
}
