/* The decode step of a Llama model whose projections are GGML blocks, as one call: every layer's RMSNorm, fused
 * q/k/v projection, rotary embedding, KV-cache write, grouped-query attention over each sequence's filled cache,
 * output projection, SwiGLU feed-forward and residuals, for B sequences of one new token each.
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

/* As quantize_stage, of silu(gate) * up for gu [B, 2F] (gate and up side by side in each row). */
static void swiglu_stage(const float *gu, int64_t F, int64_t lo, int64_t hi, int16_t *q, float *d, float *s) {
    const int64_t nb = F / QK;
    float tmp[QK];
    for (int64_t u = lo; u < hi; u++) {
        const float *gate = gu + u / nb * 2 * F + u % nb * QK, *up = gate + F;
        for (int i = 0; i < QK; i++) tmp[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        lamina_quantize_block(tmp, q + u * QK, d + SCALE_AT(u / nb, u % nb, nb), s + SCALE_AT(u / nb, u % nb, nb));
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

/* h [B, N] += the product of the quantized rows (q, qd, qs) of K columns with `w` [N, K]: in place, or, under
 * tensor parallelism, through `part` [B, N], summed over the ranks first. Called by every thread of the team; sets
 * *failed (and adds nothing) when the sum failed. */
static void residual_product(const lamina_model *m, int32_t qtype, const void *w, int64_t N, int64_t K,
                             const int16_t *q, const float *qd, const float *qs, int64_t B, float *h, float *part,
                             volatile int *failed) {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t lo, hi;
    lamina_split(N, NR, tid, nth, &lo, &hi);
    if (!m->reduce) {
        lamina_matmul_rows(qtype, w, N, K, q, qd, qs, B, h, N, lo, hi, 1);
        return;
    }
    lamina_matmul_rows(qtype, w, N, K, q, qd, qs, B, part, N, lo, hi, 0);
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
                         const int16_t *q, const float *qd, const float *qs, int64_t B, float *y, int64_t N,
                         int64_t lo, int64_t hi) {
    int64_t first = 0;
    for (int i = 0; i < parts; first += rows[i], i++) {
        const int64_t a = lo > first ? lo : first, b = hi < first + rows[i] ? hi : first + rows[i];
        if (a < b) lamina_matmul_rows(types[i], w[i], rows[i], K, q, qd, qs, B, y + first, N, a - first, b - first, 0);
    }
}

/* One decode step for B sequences: h [B, dim] holds the new tokens' embeddings on entry and their final normalised
 * hidden states on return; token b is at `positions[b]` of the sequence whose blocks row b of `tables` [B, width]
 * lists (the caller checks that every block a position needs is there and < num_blocks). Every layer's keys and
 * values for the new tokens are written to the caches. With an output projection in `m` and `logits` not NULL,
 * logits [B, vocab_size] are computed too. Returns 0, -1 when out of memory (nothing is written then), or -2 when a
 * sum over the ranks failed (the step stopped there). */
int lamina_decode(const lamina_model *m, int64_t B, float *h, const int64_t *tables, int64_t width,
                  const int64_t *positions, float *logits) {
    const int64_t dim = m->dim, F = m->hidden_dim, H = m->n_heads, KVH = m->n_kv_heads, D = m->head_dim;
    const int64_t BS = m->block_size, QKV = (H + 2 * KVH) * D, group = H / KVH;
    const int64_t widest = F > dim ? (F > H * D ? F : H * D) : (dim > H * D ? dim : H * D);
    if (B <= 0) return 0;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = positions[b] + 1 > longest ? positions[b] + 1 : longest;

    const int threads = omp_get_max_threads();
    float *qkv = malloc(sizeof(float) * (size_t)(B * QKV));
    float *att = malloc(sizeof(float) * (size_t)(B * H * D));
    float *gu = malloc(sizeof(float) * (size_t)(B * 2 * F));
    float *rot = malloc(sizeof(float) * (size_t)(B * D)); /* per sequence: cos [D/2], sin [D/2] */
    float *scores = malloc(sizeof(float) * (size_t)(threads * longest));
    int16_t *q = malloc(sizeof(int16_t) * (size_t)(B * widest));
    float *qd = calloc((size_t)(SCALE_ROWS(B) * widest / QK), sizeof(float));
    float *qs = calloc((size_t)(SCALE_ROWS(B) * widest / QK), sizeof(float));
    float *part = m->reduce ? malloc(sizeof(float) * (size_t)(B * dim)) : NULL;
    if (!qkv || !att || !gu || !rot || !scores || !q || !qd || !qs || (m->reduce && !part)) {
        free(qkv); free(att); free(gu); free(rot); free(scores); free(q); free(qd); free(qs); free(part);
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
        float *my_scores = scores + tid * longest;
        int64_t lo, hi;
#define SPLIT(n, align) lamina_split((n), (align), tid, nth, &lo, &hi)
        for (int64_t l = 0; l < m->n_layers; l++) {
            const lamina_layer *L = &m->layers[l];
            SPLIT(B * dim / QK, 1);
            quantize_stage(h, dim, L->attention_norm, m->norm_eps, lo, hi, q, qd, qs);
#pragma omp barrier
            SPLIT(QKV, NR);
            {
                const void *w[3] = {L->wq, L->wk, L->wv};
                const int32_t types[3] = {L->wq_type, L->wk_type, L->wv_type};
                const int64_t rows[3] = {H * D, KVH * D, KVH * D};
                stacked_rows(3, w, types, rows, dim, q, qd, qs, B, qkv, QKV, lo, hi);
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
            SPLIT(B * H, 1);
            for (int64_t u = lo; u < hi; u++) {
                const int64_t b = u / H, head = u % H;
                attend(qkv + b * QKV + head * D, L, m->kv_type, tables + b * width, BS, KVH, head / group,
                       positions[b] + 1, D, my_scores, att + u * D);
            }
#pragma omp barrier
            SPLIT(B * H * D / QK, 1);
            quantize_stage(att, H * D, NULL, 0.0, lo, hi, q, qd, qs);
#pragma omp barrier
            residual_product(m, L->wo_type, L->wo, dim, H * D, q, qd, qs, B, h, part, &failed); /* h += attention */
            if (failed) break;
#pragma omp barrier
            SPLIT(B * dim / QK, 1);
            quantize_stage(h, dim, L->ffn_norm, m->norm_eps, lo, hi, q, qd, qs);
#pragma omp barrier
            SPLIT(2 * F, NR);
            {
                const void *w[2] = {L->w1, L->w3};
                const int32_t types[2] = {L->w1_type, L->w3_type};
                const int64_t rows[2] = {F, F};
                stacked_rows(2, w, types, rows, dim, q, qd, qs, B, gu, 2 * F, lo, hi);
            }
#pragma omp barrier
            SPLIT(B * F / QK, 1);
            swiglu_stage(gu, F, lo, hi, q, qd, qs);
#pragma omp barrier
            residual_product(m, L->w2_type, L->w2, dim, F, q, qd, qs, B, h, part, &failed); /* h += feed-forward */
            if (failed) break;
#pragma omp barrier
        }
        if (!failed) { /* the final norm, and the logits */
            SPLIT(B, 1);
            for (int64_t b = lo; b < hi; b++) {
                const float r = inverse_rms(h + b * dim, dim, m->norm_eps);
                for (int64_t i = 0; i < dim; i++) h[b * dim + i] = (h[b * dim + i] * r) * m->norm[i];
            }
            if (m->output && logits) {
#pragma omp barrier
                SPLIT(B * dim / QK, 1);
                quantize_stage(h, dim, NULL, 0.0, lo, hi, q, qd, qs);
#pragma omp barrier
                SPLIT(m->vocab_size, NR);
                lamina_matmul_rows(m->output_type, m->output, m->vocab_size, dim, q, qd, qs, B, logits, m->vocab_size,
                                   lo, hi, 0);
            }
        }
#undef SPLIT
    }
    free(qkv); free(att); free(gu); free(rot); free(scores); free(q); free(qd); free(qs); free(part);
    return failed ? -2 : 0;
}
