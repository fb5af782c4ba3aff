/* The panel kernel of qmatmul.c and its store, for one vector width: qmatmul.c includes this file twice on AVX-512,
 * with PK_LANES 8 (256-bit vectors) and 16 (512-bit), defining panel_kernel8 / panel_store8 and panel_kernel16 /
 * panel_store16. A vector's lanes are activation rows; the prepared rows are laid out in groups of PG = 16 (pairs
 * [group][K / 2][16], scales and sums [group][nb][16]), so the 8-lane kernel reads the first half of a group (a group
 * of 8 rows or fewer, whose second half is zeros): 16 rows take one 512-bit multiply-add where 8 take a 256-bit one
 * (on Zen 4, which runs 512 bits as two halves, 8 rows in 512-bit vectors would cost as much as 16).
 *
 * panel_kernel: a panel (w, S, O, O2 of panel_unpack, n chunks) against one group's rows (a, d, s, lo of that
 * group): out[c] += the rows' products with weight row c (zeroed by the caller: zeroing them here measured ~15%
 * slower at 8 rows on Zen 4; the code GCC made was not examined). Q6_K's weights (up to 4096 in size with their
 * sub-scales) convert after each 16 products, as 32 could overflow an int32. */
#define PK_CAT(a, b) a##b
#define PK_NAMED(a, b) PK_CAT(a, b)
#if PK_LANES == 8
#define PK_VF __m256
#define PK_VI __m256i
#define PK(op) _mm256_##op
#define PK_LOADI(p) _mm256_loadu_si256((const __m256i *)(p))
#define PK_ZEROI() _mm256_setzero_si256()
#else
#define PK_VF __m512
#define PK_VI __m512i
#define PK(op) _mm512_##op
#define PK_LOADI(p) _mm512_loadu_si512((const void *)(p))
#define PK_ZEROI() _mm512_setzero_si512()
#endif

static inline __attribute__((always_inline)) void PK_NAMED(panel_kernel, PK_LANES)(
    const int t, const int16_t *w, const float *S, const float *O, const float *O2, int64_t n, const int32_t *a,
    const float *d, const float *s, const float *lo, PK_VF *out) {
    const int has_off = t == T_Q4_1 || t == T_Q5_1 || t == T_Q4_K || t == T_Q5_K;
    PK_VF f[PC];
    for (int c = 0; c < PC; c++) f[c] = out[c];
    for (int64_t b = 0; b < n; b++) {
        const int32_t *ab = a + b * (QK / 2) * PG;
        const PK_VF db = PK(loadu_ps)(d + b * PG);
        PK_VI acc[PC];
        for (int c = 0; c < PC; c++) acc[c] = PK_ZEROI();
#if defined(LAMINA_SIMDE) /* emulated (tests): unrolled, the 512-bit kernel takes GCC minutes to compile */
#pragma GCC unroll 1
#else
#pragma GCC unroll 16
#endif
        for (int p = 0; p < QK / 2; p++) {
            if (t == T_Q6_K && p == QK / 4) /* the first 16 products, before an int32 could overflow */
                for (int c = 0; c < PC; c++) {
                    f[c] = PK(fmadd_ps)(PK(cvtepi32_ps)(acc[c]), PK(mul_ps)(db, PK(set1_ps)(S[b * PC + c])), f[c]);
                    acc[c] = PK_ZEROI();
                }
            const PK_VI av = PK_LOADI(ab + p * PG);
            for (int c = 0; c < PC; c++) {
                int32_t pair;
                memcpy(&pair, w + (b * PC + c) * QK + 2 * p, 4);
                acc[c] = PK(dpwssd_epi32)(acc[c], av, PK(set1_epi32)(pair));
            }
        }
        for (int c = 0; c < PC; c++)
            f[c] = PK(fmadd_ps)(PK(cvtepi32_ps)(acc[c]), PK(mul_ps)(db, PK(set1_ps)(S[b * PC + c])), f[c]);
        if (has_off) {
            const PK_VF sb = PK(loadu_ps)(s + b * PG);
            for (int c = 0; c < PC; c++) f[c] = PK(fmadd_ps)(sb, PK(set1_ps)(O[b * PC + c]), f[c]);
        } else if (t == T_Q2_K) { /* each half's offset times its half's sum */
            const PK_VF first = PK(loadu_ps)(lo + b * PG), second = PK(sub_ps)(PK(loadu_ps)(s + b * PG), first);
            for (int c = 0; c < PC; c++)
                f[c] = PK(fmadd_ps)(second, PK(set1_ps)(O2[b * PC + c]),
                                    PK(fmadd_ps)(first, PK(set1_ps)(O[b * PC + c]), f[c]));
        }
    }
    for (int c = 0; c < PC; c++) out[c] = f[c];
}

/* Rows g * PG .. (at most PK_LANES of them) of y, columns n..n + cols - 1, from the sums f of panel_kernel. */
static inline void PK_NAMED(panel_store, PK_LANES)(const PK_VF *f, int64_t M, int64_t g, float *y, int64_t ldy,
                                                   int64_t n, int cols, int accumulate) {
    float o[PC][PK_LANES];
    for (int c = 0; c < PC; c++) PK(storeu_ps)(o[c], f[c]);
    const int rows = M - g * PG < PK_LANES ? (int)(M - g * PG) : PK_LANES;
    for (int i = 0; i < rows; i++) {
        float *yr = y + (g * PG + i) * ldy + n;
        for (int c = 0; c < cols; c++) yr[c] = o[c][i] + (accumulate ? yr[c] : 0.0f);
    }
}

#undef PK_CAT
#undef PK_NAMED
#undef PK_VF
#undef PK_VI
#undef PK
#undef PK_LOADI
#undef PK_ZEROI
