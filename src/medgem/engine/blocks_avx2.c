/* Matmuls on llama.cpp's quantized weight blocks, as a GGUF file stores them, on AVX2 (see engine/blocks.py).

   y[m, n] = sum over 32-weight groups g of  wscale[n, g] * xstep[m, g] * (integer dot of codes)
             + the group's offset term (Q4_K mins, Q4_1 lows, the -8/-16/-32 centre of Q4_0/Q5_0/Q6_K)

   Weights stay in the file's own blocks (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K): no re-rounding, no copy.
   Activations are rounded to int8 in blocks of 32, each with its own float step (llama.cpp's Q8_0),
   and each block's code sums are kept (times the step) for the offset terms. Integer dots use
   vpmaddubsw (unsigned weight codes x signed activation codes), then vpmaddwd to 32 bits; every
   group's sum is scaled in float32.

   Up to 4 activation rows share each decoded weight block (prefill); every output is computed by the
   same instructions in the same order whatever M is and wherever the row sits in its batch, so a
   row's result never depends on the other rows. Several weight tensors ("segments": q, k and v) can
   be multiplied in one call, their outputs side by side. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14 }; /* ggml's type numbers */
#define MAX_ROWS 4      /* activation rows per pass over a weight row (8 measured slower on AVX-512 too) */
#define AHEAD 2         /* weight rows prefetched ahead of the one being multiplied */
#define CHUNK_BYTES (2 << 20) /* activation rows quantized and reused per pass over the weights: fits L3 */

typedef struct {  /* M activation rows of K, block-rounded in the two forms the weight types pair with */
    const int8_t *q;  /* [M][K] codes in blocks of 32 (for Q4_0, Q4_1, Q5_0, Q8_0: llama.cpp's Q8_0) */
    const float *step; /* [M][K/32] */
    const float *sum16; /* [M][K/16] step * sum of 16 codes */
    const int8_t *qk;  /* [M][K] codes in blocks of 256 (for Q4_K, Q6_K: llama.cpp's Q8_K) */
    const float *stepk; /* [M][K/256] */
    const int16_t *isum16; /* [M][K/16] sum of 16 codes */
    int64_t K;
} Acts;

static inline float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* One 32-weight group of one row: unsigned codes u times activation codes x, in 8 lanes of 32 bits
   (pairs of 16-bit sums weighted by w16: ones, or Q6_K's scales). */
static inline __m256i isum(__m256i u, const int8_t *x, __m256i w16) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)x)), w16);
}

/* acc + p0 * f0 + p1 * f1 for two groups' sums: the accumulator waits on one add per 64 weights instead
   of two dependent fused multiply-adds, the bound of a single row. */
static inline __m256 pair(__m256 acc, __m256i p0, float f0, __m256i p1, float f1) {
    __m256 both = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(f0),
                                  _mm256_mul_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(f1)));
    return _mm256_add_ps(acc, both);
}

#define ROWS_LOOP for (int r = 0; r < R; r++)
/* The rows' pointers in locals: the weight decoding stores bytes, which C lets alias anything behind `a`,
   so reading a->K inside the loops would mean reloading it (and dividing) at every group. */
#define ROW_POINTERS                                                                      \
    const int64_t K = a->K;                                                               \
    const int8_t *xr[MAX_ROWS];                                                           \
    const float *st[MAX_ROWS], *s16[MAX_ROWS];                                            \
    ROWS_LOOP xr[r] = a->q + (m + r) * K, st[r] = a->step + (m + r) * (K / 32), s16[r] = a->sum16 + (m + r) * (K / 16);
#define ROW_POINTERS_K                                                                    \
    const int64_t K = a->K;                                                               \
    const int8_t *xr[MAX_ROWS];                                                           \
    const float *st[MAX_ROWS];                                                            \
    const int16_t *s16[MAX_ROWS];                                                         \
    ROWS_LOOP xr[r] = a->qk + (m + r) * K, st[r] = a->stepk + (m + r) * (K / 256), s16[r] = a->isum16 + (m + r) * (K / 16);
#define X(r, g) (xr[r] + (int64_t)(g) * 32)
#define STEP(r, g) (st[r][g])
#define SUM16(r, g) (s16[r][g])

/* K-quants pair with activations rounded per 256 (one step a superblock, as llama.cpp's Q8_K does), so a
   superblock's groups sum in integers with their 6- or 8-bit scales and meet a float once. The scales and
   the offset terms (Q4_K's mins, Q6_K's centre of 32) stay in vectors: scalar work per superblock cost as
   much as the dots themselves. */
static inline __m256i pair_of(__m256i scales16, int i) { /* int16 scale i in all 16 lanes */
    return _mm256_shuffle_epi8(scales16, _mm256_set1_epi16((short)(0x0100 + 0x0202 * i)));
}

/* A Q4_K superblock's 12 bytes of 6-bit scales and mins (words u0 u1 u2) -> int16 lanes 0-7 the scales,
   8-15 the mins, as llama.cpp unpacks them, in one register: a detour through memory would stall store
   forwarding. */
static inline __m256i q4_k_scales_and_mins(const uint8_t *w) {
    const __m128i u = _mm_loadu_si128((const __m128i *)(w + 4)); /* its 4th word is codes, unused */
    const __m128i low = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(u, 0x98), _mm_setr_epi32(0, 0, 0, 4)),
                                      _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    const __m128i top = _mm_and_si128(_mm_slli_epi32(_mm_srli_epi32(_mm_shuffle_epi32(u, 0x50), 6), 4),
                                      _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    return _mm256_cvtepu8_epi16(_mm_or_si128(low, top));
}

/* offs + scale * (mins times the sums of each 32 activation codes): a superblock's offset term, in 4 lanes. */
static inline __m128 q4_k_offsets(__m128 offs, __m128i mins, const int16_t *sums16, float scale) {
    __m256i b = _mm256_loadu_si256((const __m256i *)sums16);
    __m128i sums32 = _mm_hadd_epi16(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    return _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(mins, sums32)), _mm_set1_ps(scale), offs);
}

static inline __attribute__((always_inline)) void dot_q4_k(const uint8_t *w, const Acts *a, int64_t m, int R,
                                                            float *res) {
    __m256 acc[MAX_ROWS];
    __m128 offs[MAX_ROWS];
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    ROW_POINTERS_K
    ROWS_LOOP acc[r] = _mm256_setzero_ps(), offs[r] = _mm_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; sb++, w += 144) {
        float d = half(w), dmin = half(w + 2);
        const __m256i both = q4_k_scales_and_mins(w);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(both));
        const __m128i mins = _mm256_extracti128_si256(both, 1);
        __m256i sum[MAX_ROWS];
        ROWS_LOOP sum[r] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * c));
            __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            __m256i s_lo = pair_of(scales, 2 * c), s_hi = pair_of(scales, 2 * c + 1);
            const int64_t g = sb * 8 + 2 * c;
            ROWS_LOOP sum[r] = _mm256_add_epi32(sum[r], _mm256_add_epi32(isum(lo, X(r, g), s_lo), isum(hi, X(r, g + 1), s_hi)));
        }
        ROWS_LOOP {
            float dx = st[r][sb];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(d * dx), acc[r]);
            offs[r] = q4_k_offsets(offs[r], mins, s16[r] + sb * 16, dmin * dx);
        }
    }
    ROWS_LOOP res[r] = hsum(acc[r]) - hsum(_mm256_castps128_ps256(offs[r]));
}

static inline __attribute__((always_inline)) void dot_q6_k(const uint8_t *w, const Acts *a, int64_t m, int R,
                                                            float *res) {
    __m256 acc[MAX_ROWS], offs[MAX_ROWS];
    const __m256i low4 = _mm256_set1_epi8(0x0F), high2 = _mm256_set1_epi8(0x30);
    ROW_POINTERS_K
    ROWS_LOOP acc[r] = _mm256_setzero_ps(), offs[r] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; sb++, w += 210) {
        const uint8_t *ql = w, *qh = w + 128;
        const __m128i all_scales = _mm_loadu_si128((const __m128i *)(w + 192));
        const __m256i scales16 = _mm256_cvtepi8_epi16(all_scales);
        /* scales 0-7 and 8-15 as int16 in both lanes: group p takes scale 2p in its low lane, 2p+1 in its high */
        const __m256i first = _mm256_permute2x128_si256(scales16, scales16, 0x00);
        const __m256i second = _mm256_permute2x128_si256(scales16, scales16, 0x11);
        float d = half(w + 208);
        __m256i sum[MAX_ROWS];
        ROWS_LOOP sum[r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i A = _mm256_loadu_si256((const __m256i *)(ql + 64 * h));
            __m256i B = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32));
            __m256i H = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
            __m256i q[4];  /* low 4 bits from A or B, bits 4-5 from H's 2-bit fields */
            q[0] = _mm256_or_si256(_mm256_and_si256(A, low4), _mm256_and_si256(_mm256_slli_epi16(H, 4), high2));
            q[1] = _mm256_or_si256(_mm256_and_si256(B, low4), _mm256_and_si256(_mm256_slli_epi16(H, 2), high2));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), low4), _mm256_and_si256(H, high2));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), low4),
                                   _mm256_and_si256(_mm256_srli_epi16(H, 2), high2));
            for (int c = 0; c < 4; c++) {  /* one scale for each 16 weights */
                const int p = h * 4 + c;
                const int i = 2 * (p % 4);
                __m256i scales = _mm256_shuffle_epi8(p < 4 ? first : second,
                                                     _mm256_setr_epi8(2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1,
                                                                      2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1,
                                                                      2 * i + 2, 2 * i + 3, 2 * i + 2, 2 * i + 3, 2 * i + 2, 2 * i + 3, 2 * i + 2, 2 * i + 3,
                                                                      2 * i + 2, 2 * i + 3, 2 * i + 2, 2 * i + 3, 2 * i + 2, 2 * i + 3, 2 * i + 2, 2 * i + 3));
                const int64_t g = sb * 8 + p;
                ROWS_LOOP sum[r] = _mm256_add_epi32(sum[r], isum(q[c], X(r, g), scales));
            }
        }
        ROWS_LOOP {  /* the codes are stored + 32: subtract 32 * scale * (sum of each 16 activation codes) */
            __m256i centre = _mm256_madd_epi16(scales16, _mm256_loadu_si256((const __m256i *)(s16[r] + sb * 16)));
            float dx = st[r][sb];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(d * dx), acc[r]);
            offs[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centre), _mm256_set1_ps(32.0f * d * dx), offs[r]);
        }
    }
    ROWS_LOOP res[r] = hsum(acc[r]) - hsum(offs[r]);
}

static inline __attribute__((always_inline)) void dot_q8_0(const uint8_t *w, const Acts *a, int64_t m, int R,
                                                            float *res) {
    __m256 acc[MAX_ROWS];
    const __m256i ones = _mm256_set1_epi16(1);
    ROW_POINTERS
    (void)s16;
    ROWS_LOOP acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g + 2 <= K / 32; g += 2, w += 68) {  /* K / 32 is even wherever K is a multiple of 64 */
        float d0 = half(w), d1 = half(w + 34);
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + 2)), v1 = _mm256_loadu_si256((const __m256i *)(w + 36));
        __m256i u0 = _mm256_abs_epi8(v0), u1 = _mm256_abs_epi8(v1);
        ROWS_LOOP {  /* signed x signed: |w| times x with w's sign */
            __m256i x0 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)X(r, g)), v0);
            __m256i x1 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)X(r, g + 1)), v1);
            acc[r] = pair(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, x0), ones), d0 * STEP(r, g),
                          _mm256_madd_epi16(_mm256_maddubs_epi16(u1, x1), ones), d1 * STEP(r, g + 1));
        }
    }
    if (K / 32 % 2) {  /* an odd last block: paired with nothing */
        int64_t g = K / 32 - 1;
        float d0 = half(w);
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + 2)), u0 = _mm256_abs_epi8(v0);
        ROWS_LOOP {
            __m256i x0 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)X(r, g)), v0);
            acc[r] = pair(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, x0), ones), d0 * STEP(r, g),
                          _mm256_setzero_si256(), 0.0f);
        }
    }
    ROWS_LOOP res[r] = hsum(acc[r]);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
/* The same arithmetic in 512-bit registers where the CPU has AVX-512 VNNI (the build blocks.py makes
   there): 64 weights an instruction, and vpdpwssd folds the 16-bit scale products into the 32-bit sums
   (one instruction where AVX2 needs vpmaddwd and vpaddd). Integer sums are the same exact integers as
   the AVX2 code's; only the float32 order of the final sums differs. Q4_0, Q4_1 and Q5_0 keep AVX2. */
#define WIDE 1

static const int16_t Q4K_SCALE_INDEX[4][32] = {  /* 64 weights = groups 2c, 2c+1: 16 lanes of each */
    {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
    {2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5},
    {6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7}};
static const int16_t Q6K_SCALE_INDEX[4][32] = {  /* 64 weights = four 16-weight scales, 8 lanes each */
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9, 10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13, 14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15}};

static inline __m512i index16(const int16_t *lanes) { return _mm512_loadu_si512((const void *)lanes); }
static inline __m512i halves16(short low, short high) { /* low in the first 16 int16 lanes, high in the rest */
    return _mm512_inserti64x4(_mm512_set1_epi16(low), _mm256_set1_epi16(high), 1);
}
static inline __m512 halves_ps(float low, float high) {
    return _mm512_insertf32x8(_mm512_set1_ps(low), _mm256_set1_ps(high), 1);
}

static inline __attribute__((always_inline)) void dot_q4_k_wide(const uint8_t *w, const Acts *a, int64_t m, int R,
                                                                 float *res) {
    __m512 acc[MAX_ROWS];
    __m128 offs[MAX_ROWS];
    const __m512i low4 = _mm512_set1_epi8(0x0F), nibble = halves16(0, 4);
    ROW_POINTERS_K
    ROWS_LOOP acc[r] = _mm512_setzero_ps(), offs[r] = _mm_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; sb++, w += 144) {
        float d = half(w), dmin = half(w + 2);
        const __m256i both = q4_k_scales_and_mins(w);
        const __m512i scales = _mm512_castsi256_si512(both);
        const __m128i mins = _mm256_extracti128_si256(both, 1);
        __m512i sum[MAX_ROWS];
        ROWS_LOOP sum[r] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {  /* 32 code bytes: low nibbles group 2c, high nibbles group 2c+1 */
            __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + 16 + 32 * c)));
            __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(v, nibble), low4);
            __m512i s = _mm512_permutexvar_epi16(index16(Q4K_SCALE_INDEX[c]), scales);
            const int64_t g = sb * 8 + 2 * c;
            ROWS_LOOP sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_maddubs_epi16(codes, _mm512_loadu_si512((const void *)X(r, g))), s);
        }
        ROWS_LOOP {
            float dx = st[r][sb];
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_set1_ps(d * dx), acc[r]);
            offs[r] = q4_k_offsets(offs[r], mins, s16[r] + sb * 16, dmin * dx);
        }
    }
    ROWS_LOOP res[r] = _mm512_reduce_add_ps(acc[r]) - hsum(_mm256_castps128_ps256(offs[r]));
}

static inline __attribute__((always_inline)) void dot_q6_k_wide(const uint8_t *w, const Acts *a, int64_t m, int R,
                                                                 float *res) {
    __m512 acc[MAX_ROWS];
    __m256 offs[MAX_ROWS];
    const __m512i low4 = _mm512_set1_epi8(0x0F), high2 = _mm512_set1_epi8(0x30);
    const __m512i up = halves16(4, 2), down = halves16(0, 2); /* where each half's 2 high bits sit in qh */
    ROW_POINTERS_K
    ROWS_LOOP acc[r] = _mm512_setzero_ps(), offs[r] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; sb++, w += 210) {
        const uint8_t *ql = w, *qh = w + 128;
        const __m256i scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 192)));
        const __m512i scales = _mm512_castsi256_si512(scales16);
        float d = half(w + 208);
        __m512i sum[MAX_ROWS];
        ROWS_LOOP sum[r] = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {  /* 128 weights: 64 low nibbles of ql, then its 64 high nibbles */
            __m512i AB = _mm512_loadu_si512((const void *)(ql + 64 * h));
            __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qh + 32 * h)));
            __m512i first = _mm512_or_si512(_mm512_and_si512(AB, low4), _mm512_and_si512(_mm512_sllv_epi16(H, up), high2));
            __m512i second = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(AB, 4), low4),
                                             _mm512_and_si512(_mm512_srlv_epi16(H, down), high2));
            __m512i s0 = _mm512_permutexvar_epi16(index16(Q6K_SCALE_INDEX[2 * h]), scales);
            __m512i s1 = _mm512_permutexvar_epi16(index16(Q6K_SCALE_INDEX[2 * h + 1]), scales);
            const int64_t g = sb * 8 + 4 * h;
            ROWS_LOOP {
                sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_maddubs_epi16(first, _mm512_loadu_si512((const void *)X(r, g))), s0);
                sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_maddubs_epi16(second, _mm512_loadu_si512((const void *)X(r, g + 2))), s1);
            }
        }
        ROWS_LOOP {
            __m256i centre = _mm256_madd_epi16(scales16, _mm256_loadu_si256((const __m256i *)(s16[r] + sb * 16)));
            float dx = st[r][sb];
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_set1_ps(d * dx), acc[r]);
            offs[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centre), _mm256_set1_ps(32.0f * d * dx), offs[r]);
        }
    }
    ROWS_LOOP res[r] = _mm512_reduce_add_ps(acc[r]) - hsum(offs[r]);
}

static inline __attribute__((always_inline)) void dot_q8_0_wide(const uint8_t *w, const Acts *a, int64_t m, int R,
                                                                 float *res) {
    /* Signed x signed through vpdpbusd (unsigned x signed): the activation codes + 128 as unsigned bytes,
       and the accumulator starts at -128 x (the weights' sums, 4 to a lane), so each lane is exact. */
    __m512 acc[MAX_ROWS];
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    ROW_POINTERS
    (void)s16;
    ROWS_LOOP acc[r] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= K / 32; g += 2, w += 68) {
        __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w + 2))),
                                       _mm256_loadu_si256((const __m256i *)(w + 36)), 1);
        __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, v));
        __m512 d = halves_ps(half(w), half(w + 34));
        ROWS_LOOP {
            __m512i x = _mm512_xor_si512(_mm512_loadu_si512((const void *)X(r, g)), flip);
            __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, x, v)), d);
            acc[r] = _mm512_fmadd_ps(dot, halves_ps(STEP(r, g), STEP(r, g + 1)), acc[r]);
        }
    }
    if (g < K / 32) {  /* an odd last block: the upper half is zero */
        __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w + 2)));
        v = _mm512_inserti64x4(v, _mm256_setzero_si256(), 1);
        __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, v));
        __m512 d = halves_ps(half(w), 0.0f);
        ROWS_LOOP {
            __m256i x0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)X(r, g)), _mm256_set1_epi8((char)0x80));
            __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(x0), _mm256_setzero_si256(), 1);
            __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, x, v)), d);
            acc[r] = _mm512_fmadd_ps(dot, halves_ps(STEP(r, g), 0.0f), acc[r]);
        }
    }
    ROWS_LOOP res[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

/* Q4_0, Q4_1 and Q5_0: 32 weights a block, low nibbles first, then high; Q5_0 adds a fifth bit.
   Returns the unsigned codes; each weight is code * d + low. */
static inline __m256i small_codes(const uint8_t *w, int type, int bytes, float *d, float *low) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    *d = half(w);
    *low = type == Q4_0 ? -8.0f * *d : type == Q4_1 ? half(w + 2) : -16.0f * *d;
    __m128i packed = _mm_loadu_si128((const __m128i *)(w + bytes - 16));
    __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
    if (type == Q5_0) {  /* bit j of qh is the fifth bit of weight j */
        uint32_t qh;
        memcpy(&qh, w + 2, 4);
        __m256i bytes_of = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread);
        __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes_of, bit), bit);
        u = _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi8(16)));
    }
    return u;
}

static inline __attribute__((always_inline)) void dot_small(const uint8_t *w, int type, const Acts *a, int64_t m,
                                                             int R, float *res) {
    __m256 acc[MAX_ROWS];
    float off[MAX_ROWS];
    const __m256i ones = _mm256_set1_epi16(1), none = _mm256_setzero_si256();
    const int bytes = type == Q4_0 ? 18 : type == Q4_1 ? 20 : 22;
    ROW_POINTERS
    ROWS_LOOP acc[r] = _mm256_setzero_ps(), off[r] = 0.0f;
    for (int64_t g = 0; g < K / 32; g += 2, w += 2 * bytes) {
        int second = g + 1 < K / 32;  /* an odd last block is paired with nothing */
        float d0, low0, d1 = 0.0f, low1 = 0.0f;
        __m256i u0 = small_codes(w, type, bytes, &d0, &low0);
        __m256i u1 = second ? small_codes(w + bytes, type, bytes, &d1, &low1) : none;
        ROWS_LOOP {
            __m256i p1 = second ? isum(u1, X(r, g + 1), ones) : none;
            acc[r] = pair(acc[r], isum(u0, X(r, g), ones), d0 * STEP(r, g), p1, second ? d1 * STEP(r, g + 1) : 0.0f);
            off[r] += low0 * (SUM16(r, 2 * g) + SUM16(r, 2 * g + 1));
            if (second) off[r] += low1 * (SUM16(r, 2 * g + 2) + SUM16(r, 2 * g + 3));
        }
    }
    ROWS_LOOP res[r] = hsum(acc[r]) + off[r];
}

static inline __attribute__((always_inline)) void dot(const uint8_t *w, int type, const Acts *a, int64_t m, int R,
                                                       float *res) {
    switch (type) {
#ifdef WIDE
        case Q4_K: dot_q4_k_wide(w, a, m, R, res); break;
        case Q6_K: dot_q6_k_wide(w, a, m, R, res); break;
        case Q8_0: dot_q8_0_wide(w, a, m, R, res); break;
#else
        case Q4_K: dot_q4_k(w, a, m, R, res); break;
        case Q6_K: dot_q6_k(w, a, m, R, res); break;
        case Q8_0: dot_q8_0(w, a, m, R, res); break;
#endif
        default: dot_small(w, type, a, m, R, res); break;
    }
}

static void dot1(const uint8_t *w, int type, const Acts *a, int64_t m, float *res) { dot(w, type, a, m, 1, res); }
static void dot_rows(const uint8_t *w, int type, const Acts *a, int64_t m, float *res) {
    dot(w, type, a, m, MAX_ROWS, res);
}

static inline __m256 load8(const void *x, int bf16, int64_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* One activation row -> codes, steps and step * (sum of each 16 codes). */
static void quantize_row(const void *x, int bf16, int64_t K, int8_t *q, float *step, float *sum16) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < K / 32; b++) {
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) v[i] = load8(x, bf16, b * 32 + 8 * i), amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        float d = top / 127.0f, inv = top > 0.0f ? 127.0f / top : 0.0f;
        __m256i c[4];
        for (int i = 0; i < 4; i++) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
        _mm256_storeu_si256((__m256i *)(q + b * 32), _mm256_permutevar8x32_epi32(packed, order));
        step[b] = d;
        sum16[2 * b] = d * (float)hsum_i32(_mm256_add_epi32(c[0], c[1]));
        sum16[2 * b + 1] = d * (float)hsum_i32(_mm256_add_epi32(c[2], c[3]));
    }
}

/* One activation row -> codes rounded per 256 (one step each) and the integer sum of each 16 codes. */
static void quantize_row_k(const void *x, int bf16, int64_t K, int8_t *q, float *step, int16_t *sum16) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t sb = 0; sb < K / 256; sb++) {
        __m256 amax = _mm256_setzero_ps();
        for (int i = 0; i < 32; i++) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load8(x, bf16, sb * 256 + 8 * i)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        float inv = top > 0.0f ? 127.0f / top : 0.0f;
        step[sb] = top / 127.0f;
        for (int b = 0; b < 8; b++) {
            __m256i c[4];
            for (int i = 0; i < 4; i++)
                c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, bf16, sb * 256 + b * 32 + 8 * i), _mm256_set1_ps(inv)));
            __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
            _mm256_storeu_si256((__m256i *)(q + sb * 256 + b * 32), _mm256_permutevar8x32_epi32(packed, order));
            sum16[sb * 16 + 2 * b] = (int16_t)hsum_i32(_mm256_add_epi32(c[0], c[1]));
            sum16[sb * 16 + 2 * b + 1] = (int16_t)hsum_i32(_mm256_add_epi32(c[2], c[3]));
        }
    }
}

static int64_t row_bytes(int type, int64_t K) {
    switch (type) {
        case Q4_0: return K / 32 * 18;
        case Q4_1: return K / 32 * 20;
        case Q5_0: return K / 32 * 22;
        case Q8_0: return K / 32 * 34;
        case Q4_K: return K / 256 * 144;
        case Q6_K: return K / 256 * 210;
        default: return -1;
    }
}

static inline void store(void *out, int out_f32, int64_t i, float v) {
    if (out_f32) {
        ((float *)out)[i] = v;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits += 0x7fff + ((bits >> 16) & 1); /* round to nearest even, as PyTorch does */
    ((uint16_t *)out)[i] = (uint16_t)(bits >> 16);
}

/* Dequantizing to bf16, for prefill (blocks.py: many activation rows amortize one pass over the weights,
   and a bf16 GEMM on CPUs with AVX512-BF16 outruns the integer dots). Each weight is computed by the float32
   operations gguf's numpy dequantizers use, in their order (Q4_K: (d*sc)*q - dmin*m; Q4_1: d*q + m; the
   others d*q, Q6_K (d*sc)*q), then rounded to bf16 to nearest even: bitwise gguf's weights in bf16. */
static inline void store_bf16x16(uint16_t *out, __m128i v8, float a, float c, int add) {
    __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v8)), _mm256_set1_ps(a));
    __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v8, 8))), _mm256_set1_ps(a));
    if (add) lo = _mm256_add_ps(lo, _mm256_set1_ps(c)), hi = _mm256_add_ps(hi, _mm256_set1_ps(c));
    const __m256i half_ulp = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    __m256i b0 = _mm256_castps_si256(lo), b1 = _mm256_castps_si256(hi);
    b0 = _mm256_srli_epi32(_mm256_add_epi32(b0, _mm256_add_epi32(half_ulp, _mm256_and_si256(_mm256_srli_epi32(b0, 16), one))), 16);
    b1 = _mm256_srli_epi32(_mm256_add_epi32(b1, _mm256_add_epi32(half_ulp, _mm256_and_si256(_mm256_srli_epi32(b1, 16), one))), 16);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b0, b1), 0xd8);
    _mm256_storeu_si256((__m256i *)out, packed);
}

static inline void store_group(uint16_t *out, __m256i v, float a, float c, int add) { /* 32 int8 codes */
    store_bf16x16(out, _mm256_castsi256_si128(v), a, c, add);
    store_bf16x16(out + 16, _mm256_extracti128_si256(v, 1), a, c, add);
}

static void dequantize_row(const uint8_t *w, int type, int64_t K, uint16_t *out) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    if (type == Q4_K) {
        for (int64_t sb = 0; sb < K / 256; sb++, w += 144, out += 256) {
            const float d = half(w), dmin = half(w + 2);
            const uint8_t *q = w + 4;
            for (int j = 0; j < 8; j++) {  /* llama.cpp's get_scale_min_k4 */
                int sc = j < 4 ? q[j] & 63 : (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
                int mn = j < 4 ? q[j + 4] & 63 : (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * (j / 2)));
                v = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, low4);
                store_group(out + 32 * j, v, d * (float)sc, -(dmin * (float)mn), 1);
            }
        }
    } else if (type == Q6_K) {
        for (int64_t sb = 0; sb < K / 256; sb++, w += 210, out += 256) {
            const float d = half(w + 208);
            const int8_t *scales = (const int8_t *)(w + 192);
            for (int h = 0; h < 2; h++)
                for (int part = 0; part < 4; part++) {  /* weights 128h + 32 part .. + 31 */
                    __m256i l = _mm256_loadu_si256((const __m256i *)(w + 64 * h + 32 * (part & 1)));
                    l = _mm256_and_si256(part >> 1 ? _mm256_srli_epi16(l, 4) : l, low4);
                    __m256i H = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * h));
                    H = _mm256_and_si256(_mm256_srl_epi16(H, _mm_cvtsi32_si128(2 * part)), _mm256_set1_epi8(3));
                    __m256i v = _mm256_sub_epi8(_mm256_or_si256(l, _mm256_slli_epi16(H, 4)), _mm256_set1_epi8(32));
                    const int i = 8 * h + 2 * part;  /* the scale of each 16 */
                    store_bf16x16(out + 128 * h + 32 * part, _mm256_castsi256_si128(v), d * (float)scales[i], 0, 0);
                    store_bf16x16(out + 128 * h + 32 * part + 16, _mm256_extracti128_si256(v, 1), d * (float)scales[i + 1], 0, 0);
                }
        }
    } else if (type == Q8_0) {
        for (int64_t g = 0; g < K / 32; g++, w += 34, out += 32)
            store_group(out, _mm256_loadu_si256((const __m256i *)(w + 2)), half(w), 0, 0);
    } else {  /* Q4_0, Q4_1, Q5_0 */
        const int bytes = type == Q4_0 ? 18 : type == Q4_1 ? 20 : 22;
        for (int64_t g = 0; g < K / 32; g++, w += bytes, out += 32) {
            float d, low;
            __m256i u = small_codes(w, type, bytes, &d, &low);
            if (type == Q4_1) store_group(out, u, d, half(w + 2), 1);
            else store_group(out, _mm256_sub_epi8(u, _mm256_set1_epi8(type == Q4_0 ? 8 : 16)), d, 0, 0);
        }
    }
}

/* rows x K weights of one type -> bf16 [rows, K]. Returns 0, or -2 for a type or K the kernel cannot take. */
int medgem_block_dequantize(const void *weights, int type, int64_t rows, int64_t K, uint16_t *out, int threads) {
    const int64_t bytes = row_bytes(type, K);
    if (bytes < 0 || K % 32 || ((type == Q4_K || type == Q6_K) && K % 256)) return -2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < rows; n++) dequantize_row((const uint8_t *)weights + n * bytes, type, K, out + n * K);
    return 0;
}

/* out[M, N] = x[M, K] @ W.T, W the segments' rows stacked (N = sum of rows). x is bf16 or float32,
   out float32 or bf16. Returns 0, -1 when out of memory, -2 for a type or K the kernel cannot take. */
int medgem_block_linear(const void *x, int x_bf16, int64_t M, int64_t K, int nseg, const int64_t *weights,
                        const int64_t *rows, const int32_t *types, void *out, int out_f32, int threads) {
    int64_t N = 0;
    int blocks32 = 0, blocks256 = 0;  /* which activation forms the segments need */
    if (K % 32) return -2;
    for (int s = 0; s < nseg; s++) {
        int k_quant = types[s] == Q4_K || types[s] == Q6_K;
        if (row_bytes(types[s], K) < 0 || (k_quant && K % 256)) return -2;
        blocks256 |= k_quant, blocks32 |= !k_quant;
        N += rows[s];
    }
    int64_t chunk = CHUNK_BYTES / K < MAX_ROWS ? MAX_ROWS : CHUNK_BYTES / K / MAX_ROWS * MAX_ROWS;
    if (chunk > M) chunk = M;
    int8_t *q = malloc((size_t)(chunk * K)), *qk = malloc((size_t)(chunk * K));
    float *step = malloc(sizeof(float) * (size_t)(chunk * (K / 32)));
    float *sum16 = malloc(sizeof(float) * (size_t)(chunk * (K / 16)));
    float *stepk = malloc(sizeof(float) * (size_t)(chunk * (K / 256) + 1));
    int16_t *isum16 = malloc(sizeof(int16_t) * (size_t)(chunk * (K / 16)) + 32);
    if (!q || !qk || !step || !sum16 || !stepk || !isum16) {
        free(q), free(qk), free(step), free(sum16), free(stepk), free(isum16);
        return -1;
    }
    Acts acts = {q, step, sum16, qk, stepk, isum16, K};
    const size_t item = x_bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        int64_t mc = M - m0 < chunk ? M - m0 : chunk;
        const char *xs = (const char *)x + (size_t)(m0 * K) * item;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < mc; m++) {
            const char *row = xs + (size_t)(m * K) * item;
            if (blocks32) quantize_row(row, x_bf16, K, q + m * K, step + m * (K / 32), sum16 + m * (K / 16));
            if (blocks256) quantize_row_k(row, x_bf16, K, qk + m * K, stepk + m * (K / 256), isum16 + m * (K / 16));
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            int s = 0;
            int64_t local = n;
            while (local >= rows[s]) local -= rows[s++];
            const int64_t bytes = row_bytes(types[s], K);
            const uint8_t *w = (const uint8_t *)weights[s] + local * bytes;
            if (local + AHEAD < rows[s])  /* the hardware prefetcher stops at each 4 KiB page of the map */
                for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)(w + AHEAD * bytes + b), _MM_HINT_T0);
            float res[MAX_ROWS];
            int64_t m = 0;
            for (; m + MAX_ROWS <= mc; m += MAX_ROWS) {
                dot_rows(w, types[s], &acts, m, res);
                for (int r = 0; r < MAX_ROWS; r++) store(out, out_f32, (m0 + m + r) * N + n, res[r]);
            }
            for (; m < mc; m++) {
                dot1(w, types[s], &acts, m, res);
                store(out, out_f32, (m0 + m) * N + n, res[0]);
            }
        }
    }
    free(q), free(qk), free(step), free(sum16), free(stepk), free(isum16);
    return 0;
}
