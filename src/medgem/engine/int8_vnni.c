/* int8 weights x int8 activations on AVX-512 VNNI, for decoding on CPUs (see engine/vnni.py).

   y[m, n] = scale[n] * sum_b step[m, b] * sum_{k in block b} q[n, k] * xq[m, k]

   Weights: one int8 row per output, one float scale per row, stored as unsigned bytes (q + 128) in
   panels of 16 rows: [N/16][K/4][16][4], so one 64-byte load holds 4 inputs of 16 rows, the operand
   of one vpdpbusd. Activations: each row cut into blocks of 32, each block rounded to int8 on its
   own scale (as llama.cpp's Q8_0 does), so outliers cost precision only in their own block. The +128
   of the weights adds 128 * sum(xq) to each block's sum, which is subtracted up front.

   Every output row is computed by the same sequence of instructions whatever M is and wherever the
   row sits in the batch, so a row's result never depends on the other rows. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 32
#define PANEL 16

static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void store_bf16(uint16_t *p, __m512 v) { /* round to nearest even, as PyTorch does */
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

/* One activation row: int8 codes, each block's step, and 128 * each block's code sum. */
static void quantize_row(const uint16_t *x, int64_t K, int8_t *xq, float *step, int32_t *bias) {
    for (int64_t b = 0; b < K / BLOCK; b++) {
        __m512 v0 = load_bf16(x + b * BLOCK), v1 = load_bf16(x + b * BLOCK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(xq + b * BLOCK), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + b * BLOCK + 16), _mm512_cvtsepi32_epi8(q1));
        step[b] = d;
        bias[b] = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

static inline void store_row(void *out, int out_f32, int64_t offset, __m512 v) {
    if (out_f32)
        _mm512_storeu_ps((float *)out + offset, v);
    else
        store_bf16((uint16_t *)out + offset, v);
}

/* ROWS activation rows against one panel; each weight load serves all of them (8 rows: 16 of the 32
   vector registers hold sums). */
#define PANEL_ROWS(ROWS)                                                                              \
    static void panel_rows##ROWS(const uint8_t *wp, __m512 scale, const int8_t *xq, const float *step, \
                                 const int32_t *bias, int64_t K, void *out, int out_f32, int64_t N,     \
                                 int64_t n0, int64_t m) {                                               \
        int64_t nb = K / BLOCK;                                                                         \
        __m512 acc[ROWS];                                                                               \
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();                                    \
        for (int64_t b = 0; b < nb; b++) {                                                              \
            const uint8_t *wb = wp + b * BLOCK * PANEL;                                                 \
            __m512i sum[ROWS];                                                                          \
            for (int r = 0; r < ROWS; r++) sum[r] = _mm512_set1_epi32(-bias[(m + r) * nb + b]);        \
            for (int j = 0; j < BLOCK / 4; j++) {                                                       \
                __m512i w = _mm512_loadu_si512(wb + j * 64);                                            \
                for (int r = 0; r < ROWS; r++) {                                                        \
                    int32_t four;                                                                       \
                    __builtin_memcpy(&four, xq + (m + r) * K + b * BLOCK + j * 4, 4);                   \
                    sum[r] = _mm512_dpbusd_epi32(sum[r], w, _mm512_set1_epi32(four));                   \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < ROWS; r++)                                                              \
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_set1_ps(step[(m + r) * nb + b]), acc[r]); \
        }                                                                                               \
        for (int r = 0; r < ROWS; r++) store_row(out, out_f32, (m + r) * N + n0, _mm512_mul_ps(acc[r], scale)); \
    }
PANEL_ROWS(1)
PANEL_ROWS(4)
PANEL_ROWS(8)

/* y = x @ W.T for bf16 x [M, K]; y is float32 when out_f32, else bf16. Returns 0, or -1 when out of memory. */
int medgem_int8_linear(const uint8_t *w, const float *scales, const uint16_t *x, int64_t M, int64_t N, int64_t K,
                       void *out, int out_f32, int threads) {
    int64_t nb = K / BLOCK;
    int8_t *xq = malloc((size_t)(M * K));
    float *step = malloc(sizeof(float) * (size_t)(M * nb));
    int32_t *bias = malloc(sizeof(int32_t) * (size_t)(M * nb));
    if (!xq || !step || !bias) {
        free(xq), free(step), free(bias);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, xq + m * K, step + m * nb, bias + m * nb);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < N / PANEL; p++) {
            const uint8_t *wp = w + p * PANEL * K;
            __m512 scale = _mm512_loadu_ps(scales + p * PANEL);
            int64_t m = 0;
            for (; m + 8 <= M; m += 8) panel_rows8(wp, scale, xq, step, bias, K, out, out_f32, N, p * PANEL, m);
            for (; m + 4 <= M; m += 4) panel_rows4(wp, scale, xq, step, bias, K, out, out_f32, N, p * PANEL, m);
            for (; m < M; m++) panel_rows1(wp, scale, xq, step, bias, K, out, out_f32, N, p * PANEL, m);
        }
    }
    free(xq), free(step), free(bias);
    return 0;
}
