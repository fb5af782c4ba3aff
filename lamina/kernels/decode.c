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

typedef struct {
    const void *wqkv, *wo, *w13, *w2;      /* blocks: [(H + 2 KVH) D, dim], [dim, H D], [2 F, dim], [dim, F] */
    int32_t qkv_type, o_type, w13_type, w2_type; /* 0: Q4_1, 1: Q8_0 */
    const float *attention_norm, *ffn_norm; /* [dim] */
    float *k_cache, *v_cache;              /* [slots, KVH, max_seq_len, D] */
} lamina_layer;

typedef struct {
    int64_t n_layers, dim, hidden_dim, n_heads, n_kv_heads, head_dim, slots, max_seq_len;
    double norm_eps;
    const float *inv_freq; /* [D / 2] rotation frequencies */
    const float *norm;     /* [dim] final norm */
    const lamina_layer *layers;
} lamina_model;

/* out = x / rms(x) * w over one row of n (out may be x). */
static void rms_norm(const float *x, const float *w, int64_t n, double eps, float *out) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] * r) * w[i];
}

/* Rotate the adjacent pairs of one head of D by the angles whose cos/sin are given. */
static void rotate(float *x, const float *cos, const float *sin, int64_t D) {
    for (int64_t i = 0; i < D / 2; i++) {
        const float x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * cos[i] - x1 * sin[i];
        x[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
    }
}

/* One query head against positions 0..len-1 of its key/value rows: out [D] = softmax(q k^T / sqrt(D)) v. */
static void attend(const float *q, const float *keys, const float *values, int64_t len, int64_t D, float *scores,
                   float *out) {
    const float scale = 1.0f / sqrtf((float)D);
    float max = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        const float *k = keys + t * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < D; i++) dot += q[i] * k[i];
        scores[t] = dot * scale;
        max = fmaxf(max, scores[t]);
    }
    float total = 0.0f;
    for (int64_t t = 0; t < len; t++) total += scores[t] = expf(scores[t] - max);
    for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        const float p = scores[t] / total, *v = values + t * D;
#pragma omp simd
        for (int64_t i = 0; i < D; i++) out[i] += p * v[i];
    }
}

/* Norm rows [lo, hi) of h and quantize them for the next product. */
static void norm_and_quantize(const float *h, const float *w, int64_t dim, double eps, int64_t lo, int64_t hi,
                              float *xn, int16_t *q, float *d, float *s) {
    const int64_t nb = dim / QK;
    for (int64_t b = lo; b < hi; b++) {
        rms_norm(h + b * dim, w, dim, eps, xn + b * dim);
        lamina_quantize_rows(xn + b * dim, 1, dim, q + b * dim, d + b * nb, s + b * nb);
    }
}

/* One decode step for B sequences: h [B, dim] holds the new tokens' embeddings on entry and their final normalised
 * hidden states on return; token b is at `positions[b]` of cache row `slots[b]` (each < max_seq_len, < slots; the
 * caller checks). Every layer's keys and values for the new tokens are written to the caches.
 * Returns 0, or -1 when out of memory (nothing is written then). */
int lamina_decode(const lamina_model *m, int64_t B, float *h, const int64_t *slots, const int64_t *positions) {
    const int64_t dim = m->dim, F = m->hidden_dim, H = m->n_heads, KVH = m->n_kv_heads, D = m->head_dim;
    const int64_t S = m->max_seq_len, QKV = (H + 2 * KVH) * D, group = H / KVH;
    const int64_t widest = F > dim ? (F > H * D ? F : H * D) : (dim > H * D ? dim : H * D);
    if (B <= 0) return 0;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = positions[b] + 1 > longest ? positions[b] + 1 : longest;

    const int threads = omp_get_max_threads();
    float *xn = malloc(sizeof(float) * (size_t)(B * widest));
    float *qkv = malloc(sizeof(float) * (size_t)(B * QKV));
    float *att = malloc(sizeof(float) * (size_t)(B * H * D));
    float *gu = malloc(sizeof(float) * (size_t)(B * 2 * F));
    float *rot = malloc(sizeof(float) * (size_t)(B * D)); /* per sequence: cos [D/2], sin [D/2] */
    float *scores = malloc(sizeof(float) * (size_t)(threads * longest));
    int16_t *q = malloc(sizeof(int16_t) * (size_t)(B * widest));
    float *qd = malloc(sizeof(float) * (size_t)(B * widest / QK)), *qs = malloc(sizeof(float) * (size_t)(B * widest / QK));
    if (!xn || !qkv || !att || !gu || !rot || !scores || !q || !qd || !qs) {
        free(xn); free(qkv); free(att); free(gu); free(rot); free(scores); free(q); free(qd); free(qs);
        return -1;
    }
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
        int64_t lo, hi, rlo, rhi;
        lamina_split(B, 1, tid, nth, &rlo, &rhi); /* this thread's sequences, for per-row work */
        for (int64_t l = 0; l < m->n_layers; l++) {
            const lamina_layer *L = &m->layers[l];
            norm_and_quantize(h, L->attention_norm, dim, m->norm_eps, rlo, rhi, xn, q, qd, qs);
#pragma omp barrier
            lamina_split(QKV, NR, tid, nth, &lo, &hi);
            lamina_matmul_rows(L->qkv_type, L->wqkv, QKV, dim, q, qd, qs, B, qkv, lo, hi, 0);
#pragma omp barrier
            /* rotate q and k heads; store k and v in the cache */
            lamina_split(B * (H + KVH), 1, tid, nth, &lo, &hi);
            for (int64_t u = lo; u < hi; u++) {
                const int64_t b = u / (H + KVH), head = u % (H + KVH);
                float *x = qkv + b * QKV + head * D;
                rotate(x, rot + b * D, rot + b * D + D / 2, D);
                if (head >= H) {
                    const int64_t kvh = head - H, at = ((slots[b] * KVH + kvh) * S + positions[b]) * D;
                    const float *v = qkv + b * QKV + (H + KVH + kvh) * D;
                    for (int64_t i = 0; i < D; i++) L->k_cache[at + i] = x[i], L->v_cache[at + i] = v[i];
                }
            }
#pragma omp barrier
            lamina_split(B * H, 1, tid, nth, &lo, &hi);
            for (int64_t u = lo; u < hi; u++) {
                const int64_t b = u / H, head = u % H, kvh = head / group;
                const int64_t row = (slots[b] * KVH + kvh) * S * D;
                attend(qkv + b * QKV + head * D, L->k_cache + row, L->v_cache + row, positions[b] + 1, D, my_scores,
                       att + (b * H + head) * D);
            }
#pragma omp barrier
            for (int64_t b = rlo; b < rhi; b++)
                lamina_quantize_rows(att + b * H * D, 1, H * D, q + b * H * D, qd + b * H * D / QK, qs + b * H * D / QK);
#pragma omp barrier
            lamina_split(dim, NR, tid, nth, &lo, &hi);
            lamina_matmul_rows(L->o_type, L->wo, dim, H * D, q, qd, qs, B, h, lo, hi, 1); /* h += attention */
#pragma omp barrier
            norm_and_quantize(h, L->ffn_norm, dim, m->norm_eps, rlo, rhi, xn, q, qd, qs);
#pragma omp barrier
            lamina_split(2 * F, NR, tid, nth, &lo, &hi);
            lamina_matmul_rows(L->w13_type, L->w13, 2 * F, dim, q, qd, qs, B, gu, lo, hi, 0);
#pragma omp barrier
            for (int64_t b = rlo; b < rhi; b++) { /* silu(gate) * up, then quantized for w2 */
                const float *gate = gu + b * 2 * F, *up = gate + F;
                float *a = xn + b * F;
                for (int64_t i = 0; i < F; i++) a[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
                lamina_quantize_rows(a, 1, F, q + b * F, qd + b * F / QK, qs + b * F / QK);
            }
#pragma omp barrier
            lamina_split(dim, NR, tid, nth, &lo, &hi);
            lamina_matmul_rows(L->w2_type, L->w2, dim, F, q, qd, qs, B, h, lo, hi, 1); /* h += feed-forward */
#pragma omp barrier
        }
        for (int64_t b = rlo; b < rhi; b++) rms_norm(h + b * dim, m->norm, dim, m->norm_eps, h + b * dim);
    }
    free(xn); free(qkv); free(att); free(gu); free(rot); free(scores); free(q); free(qd); free(qs);
    return 0;
}
