/* Low-bit matrix products for short inputs (decode): 4-bit (Q4) and 8-bit (Q8) weights in blocks of 32,
 * activations quantized to int8 per block of 32, integer dot products. The llama.cpp recipe, our code.
 *
 * Built by edgellm/kernels/native.py for the x86-64-v3 baseline (AVX2, FMA, F16C; -O3 -fopenmp); the VNNI
 * variants are compiled beside it with target attributes and chosen at run time by `isa` (the caller's CPU
 * detection, so EDGELLM_ISA=avx2 really runs the AVX2 code on any machine):
 *   isa 0: AVX2     vpmaddubsw + vpmaddwd       (every x86-64 laptop since ~2013)
 *   isa 1: AVX-VNNI vpdpbusd on ymm (VEX)       (Intel Core 12th gen+, Zen 5 client)
 *   isa 2: AVX512-VNNI vpdpbusd on zmm; one Q8 row on ymm  (Xeon, Zen 4/5)
 *
 * Weight layout (made once at load, see kernels/blockq.py), rows interleaved by R = 4 so one thread streams
 * one contiguous run of memory and each loaded activation block serves four rows:
 *   Q4: qs uint8 (N/4, nb, 4, 16): block b of row r; byte j holds element j (low nibble) and j+16 (high nibble),
 *       GGML's order. dm fp16 (N/4, nb, 2, 4): d of the 4 rows, then m of the 4 rows. w = d * q + m, q in 0..15
 *       (Q4_1 exactly; Q4_0 has m = -8d; an integer zero point z gives m = -z d).
 *   Q8: qs int8 (N/4, nb, 4, 32); d fp16 (N/4, nb, 4). w = d * q.
 * Activations: xd = max|x| / 127 per block, xq = round(x / xd) in -127..127, xs = xd * sum(xq) (for the m term):
 *   dot(w_block, x_block) ~= d * xd * sum(q * xq) + m * xs.
 * Every row's result is the same whatever the thread count (each row is summed by one thread, in block order).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32
#define R 4
/* Software prefetch distance in bytes of the weight stream: decode reads each weight once from DRAM. Measured
 * on the 2-vCPU Zen 5 VM (AVX512-VNNI variant, the default model's 121 products per token, 40 interleaved
 * rounds, four runs): median 3.78-4.61 ms with it against 3.75-4.82 ms without: a few % in three runs of four. */
#ifndef PREFETCH
#define PREFETCH 1024
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* One row of K activations (fp32 or bf16) -> nb blocks of int8 codes, scale, scale * sum. */
static void quantize_row(const void *x, int x_bf16, int64_t K, int8_t *xq, float *xd, float *xs) {
    float buf[QK];
    for (int64_t b = 0; b < K / QK; b++) {
        const float *v;
        if (x_bf16) {
            const uint16_t *h = (const uint16_t *)x + b * QK;
            for (int i = 0; i < QK; i++) buf[i] = bf16_to_float(h[i]);
            v = buf;
        } else {
            v = (const float *)x + b * QK;
        }
        __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 a0 = _mm256_andnot_ps(sign, _mm256_loadu_ps(v)), a1 = _mm256_andnot_ps(sign, _mm256_loadu_ps(v + 8));
        __m256 a2 = _mm256_andnot_ps(sign, _mm256_loadu_ps(v + 16)), a3 = _mm256_andnot_ps(sign, _mm256_loadu_ps(v + 24));
        __m256 m = _mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256 vid = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v), vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 8), vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 16), vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 24), vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        /* pack 32-bit -> 16-bit -> 8-bit; the packs interleave 128-bit lanes, the permute restores order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + b * QK), p);
        xd[b] = d;
        xs[b] = d * (float)_mm_cvtsi128_si32(s4);
    }
}

/* Four rows' int32 partial sums (8 lanes each) -> their totals, one lane per row. */
static inline __m128 sum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_hadd_epi32(a, b), cd = _mm256_hadd_epi32(c, d);
    __m256i abcd = _mm256_hadd_epi32(ab, cd); /* lanes: a b c d (low half), a b c d (high half) */
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
    return _mm_cvtepi32_ps(s);
}

static inline void store_out(void *y, int y_bf16, int64_t idx, float v) {
    if (y_bf16)
        ((uint16_t *)y)[idx] = float_to_bf16(v);
    else
        ((float *)y)[idx] = v;
}

static inline void store4(void *y, int y_bf16, int64_t row_off, int64_t n0, int64_t N, __m128 acc) {
    float o[R];
    _mm_storeu_ps(o, acc);
    for (int r = 0; r < R && n0 + r < N; r++) store_out(y, y_bf16, row_off + n0 + r, o[r]);
}

/* The integer dot product of 32 unsigned bytes with 32 signed bytes, as 8 int32 partial sums. */
#define DOT_AVX2(w, x) _mm256_madd_epi16(_mm256_maddubs_epi16((w), (x)), _mm256_set1_epi16(1))
#define DOT_AVXVNNI(w, x) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), (w), (x))

/* One group of 4 weight rows against one quantized activation row. Two rows' 16-byte blocks are one 32-byte
 * load; their low nibbles (elements 0..15 of each row) meet the activation's first 16 bytes broadcast to both
 * 128-bit lanes, the high nibbles its last 16: lanes 0-3 of the result sum row r, lanes 4-7 row r + 1. */
#define Q4_GROUP(NAME, DOT2, TARGET)                                                                           \
    TARGET static __m128 NAME(const uint8_t *qs, const uint16_t *dm, int64_t nb, const int8_t *xq,            \
                              const float *xd, const float *xs) {                                             \
        const __m256i nib = _mm256_set1_epi8(0x0F);                                                           \
        const __m256i sel01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);                                      \
        const __m256i sel23 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);                                      \
        __m256 acc01 = _mm256_setzero_ps(), acc23 = _mm256_setzero_ps();                                      \
        __m128 accm = _mm_setzero_ps();                                                                       \
        for (int64_t b = 0; b < nb; b++) {                                                                    \
            const uint8_t *q = qs + b * R * 16;                                                               \
            _mm_prefetch((const char *)(q + PREFETCH), _MM_HINT_T0);                                          \
            _mm_prefetch((const char *)(dm + b * 2 * R) + PREFETCH / 4, _MM_HINT_T0);                         \
            __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + b * QK)));       \
            __m256i xhi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + b * QK + 16)));  \
            __m256i v01 = _mm256_loadu_si256((const __m256i *)q);                                             \
            __m256i v23 = _mm256_loadu_si256((const __m256i *)(q + 32));                                      \
            __m256i p01 = DOT2(_mm256_and_si256(v01, nib), xlo, _mm256_and_si256(_mm256_srli_epi16(v01, 4), nib), xhi); \
            __m256i p23 = DOT2(_mm256_and_si256(v23, nib), xlo, _mm256_and_si256(_mm256_srli_epi16(v23, 4), nib), xhi); \
            __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + b * 2 * R))); /* d0..3 m0..3 */ \
            __m256 ds = _mm256_mul_ps(f, _mm256_set1_ps(xd[b]));                                              \
            acc01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p01), _mm256_permutevar8x32_ps(ds, sel01), acc01);     \
            acc23 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p23), _mm256_permutevar8x32_ps(ds, sel23), acc23);     \
            accm = _mm_fmadd_ps(_mm256_extractf128_ps(f, 1), _mm_set1_ps(xs[b]), accm);                       \
        }                                                                                                     \
        /* hadd twice: lanes (r0 r2 r0 r2 | r1 r3 r1 r3) -> add halves after a shuffle to (r0 r1 r2 r3) */    \
        __m256 h = _mm256_hadd_ps(acc01, acc23);  /* r0 r0 r2 r2 | r1 r1 r3 r3 */                            \
        h = _mm256_hadd_ps(h, h);                 /* r0 r2 r0 r2 | r1 r3 r1 r3 */                            \
        __m128 lo = _mm256_castps256_ps128(h), hi = _mm256_extractf128_ps(h, 1);                             \
        return _mm_add_ps(_mm_unpacklo_ps(lo, hi), accm); /* r0 r1 r2 r3 */                                  \
    }

#define DOT2_AVX2(a, x, b, y)                                                                                  \
    _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16((a), (x)), _mm256_maddubs_epi16((b), (y))),     \
                      _mm256_set1_epi16(1))
#define DOT2_AVXVNNI(a, x, b, y) _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), (a), (x)), (b), (y))

/* Signed x signed: |w| as unsigned, x carrying w's sign (llama.cpp's trick; |-128| = 128 fits a u8). */
#define Q8_GROUP(NAME, DOT, TARGET)                                                                            \
    TARGET static __m128 NAME(const int8_t *qs, const uint16_t *d, int64_t nb, const int8_t *xq,              \
                              const float *xd) {                                                              \
        __m128 acc = _mm_setzero_ps();                                                                        \
        __m256i p[R];                                                                                          \
        for (int64_t b = 0; b < nb; b++) {                                                                    \
            const int8_t *q = qs + b * R * QK;                                                                \
            _mm_prefetch((const char *)(q + PREFETCH), _MM_HINT_T0);                                          \
            _mm_prefetch((const char *)(q + PREFETCH + 64), _MM_HINT_T0);                                     \
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * QK));                                   \
            for (int r = 0; r < R; r++) {                                                                     \
                __m256i w = _mm256_loadu_si256((const __m256i *)(q + r * QK));                                \
                p[r] = DOT(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));                                   \
            }                                                                                                 \
            __m128 s = sum4(p[0], p[1], p[2], p[3]);                                                          \
            __m128 f = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(d + b * R)));                           \
            acc = _mm_fmadd_ps(s, _mm_mul_ps(f, _mm_set1_ps(xd[b])), acc);                                    \
        }                                                                                                     \
        return acc;                                                                                           \
    }

Q4_GROUP(q4_group_avx2, DOT2_AVX2, )
Q4_GROUP(q4_group_avxvnni, DOT2_AVXVNNI, __attribute__((target("avxvnni"))))

/* Q4_GROUP(DOT2_AVX2) and Q8_GROUP(DOT_AVX2) for MR2 activation rows at a time (speculative verification, batched
 * decode on AVX2 CPUs): the block's weights are loaded and unpacked (nibbles; |w|) once for all rows. Each row's
 * lanes see exactly the operations of the one-row function, in the same order, so its result is bit-identical to
 * it. Two rows, not four: AVX2 has 16 vector registers. */
#define MR2 2
static inline __attribute__((always_inline)) void q4_rows_avx2(const uint8_t *qs, const uint16_t *dm, int64_t nb,
                                                               const int rows, const int8_t *xq, const float *xd,
                                                               const float *xs, int64_t K, __m128 *out) {
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const __m256i sel01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i sel23 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    __m256 acc01[MR2], acc23[MR2];
    __m128 accm[MR2];
    for (int m = 0; m < MR2; m++) acc01[m] = acc23[m] = _mm256_setzero_ps(), accm[m] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = qs + b * R * 16;
        _mm_prefetch((const char *)(q + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(dm + b * 2 * R) + PREFETCH / 4, _MM_HINT_T0);
        const __m256i v01 = _mm256_loadu_si256((const __m256i *)q), v23 = _mm256_loadu_si256((const __m256i *)(q + 32));
        const __m256i lo01 = _mm256_and_si256(v01, nib), hi01 = _mm256_and_si256(_mm256_srli_epi16(v01, 4), nib);
        const __m256i lo23 = _mm256_and_si256(v23, nib), hi23 = _mm256_and_si256(_mm256_srli_epi16(v23, 4), nib);
        const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + b * 2 * R))); /* d0..3 m0..3 */
        for (int m = 0; m < rows; m++) {
            const int8_t *x = xq + m * K + b * QK;
            const __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)x));
            const __m256i xhi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(x + 16)));
            const __m256i p01 = DOT2_AVX2(lo01, xlo, hi01, xhi), p23 = DOT2_AVX2(lo23, xlo, hi23, xhi);
            const __m256 ds = _mm256_mul_ps(f, _mm256_set1_ps(xd[m * (K / QK) + b]));
            acc01[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p01), _mm256_permutevar8x32_ps(ds, sel01), acc01[m]);
            acc23[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p23), _mm256_permutevar8x32_ps(ds, sel23), acc23[m]);
            accm[m] = _mm_fmadd_ps(_mm256_extractf128_ps(f, 1), _mm_set1_ps(xs[m * (K / QK) + b]), accm[m]);
        }
    }
    for (int m = 0; m < rows; m++) { /* Q4_GROUP's reduction */
        __m256 h = _mm256_hadd_ps(acc01[m], acc23[m]);
        h = _mm256_hadd_ps(h, h);
        const __m128 lo = _mm256_castps256_ps128(h), hi = _mm256_extractf128_ps(h, 1);
        out[m] = _mm_add_ps(_mm_unpacklo_ps(lo, hi), accm[m]);
    }
}

static inline __attribute__((always_inline)) void q8_rows_avx2(const int8_t *qs, const uint16_t *d, int64_t nb,
                                                               const int rows, const int8_t *xq, const float *xd,
                                                               int64_t K, __m128 *out) {
    __m128 acc[MR2];
    for (int m = 0; m < MR2; m++) acc[m] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *q = qs + b * R * QK;
        _mm_prefetch((const char *)(q + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(q + PREFETCH + 64), _MM_HINT_T0);
        __m256i w[R], aw[R];
        for (int r = 0; r < R; r++) {
            w[r] = _mm256_loadu_si256((const __m256i *)(q + r * QK));
            aw[r] = _mm256_sign_epi8(w[r], w[r]);
        }
        const __m128 f = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(d + b * R)));
        for (int m = 0; m < rows; m++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + m * K + b * QK));
            const __m128 sm = sum4(DOT_AVX2(aw[0], _mm256_sign_epi8(x, w[0])), DOT_AVX2(aw[1], _mm256_sign_epi8(x, w[1])),
                                   DOT_AVX2(aw[2], _mm256_sign_epi8(x, w[2])), DOT_AVX2(aw[3], _mm256_sign_epi8(x, w[3])));
            acc[m] = _mm_fmadd_ps(sm, _mm_mul_ps(f, _mm_set1_ps(xd[m * (K / QK) + b])), acc[m]);
        }
    }
    for (int m = 0; m < rows; m++) out[m] = acc[m];
}

/* the AVX2 rows functions with the row count a constant (accumulators in registers) */
static void q4_group_rows_avx2(const uint8_t *qs, const uint16_t *dm, int64_t nb, int64_t rows, const int8_t *xq,
                               const float *xd, const float *xs, int64_t K, __m128 *out) {
    if (rows >= MR2)
        q4_rows_avx2(qs, dm, nb, MR2, xq, xd, xs, K, out);
    else
        q4_rows_avx2(qs, dm, nb, 1, xq, xd, xs, K, out);
}

static void q8_group_rows_avx2(const int8_t *qs, const uint16_t *d, int64_t nb, int64_t rows, const int8_t *xq,
                               const float *xd, const float *xs, int64_t K, __m128 *out) {
    (void)xs; /* Q8 has no m term; the signature matches the other row functions */
    if (rows >= MR2)
        q8_rows_avx2(qs, d, nb, MR2, xq, xd, K, out);
    else
        q8_rows_avx2(qs, d, nb, 1, xq, xd, K, out);
}

/* AVX512-VNNI on zmm: a block's four 16-byte rows are one 64-byte load, and each 128-bit lane meets the
 * activation's 16 bytes broadcast to all four lanes, so one vpdpbusd pair does what two pairs do on ymm. Each
 * int32 lane holds the same partial sum as in Q4_GROUP and is scaled and accumulated in the same order, so the
 * result is bit-identical to the ymm variants; ~35 % fewer instructions per block. */
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl"))) static __m128 q4_group_avx512vnni(
    const uint8_t *qs, const uint16_t *dm, int64_t nb, const int8_t *xq, const float *xd, const float *xs) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc = _mm512_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = qs + b * R * 16;
        _mm_prefetch((const char *)(q + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(dm + b * 2 * R) + PREFETCH / 4, _MM_HINT_T0);
        const __m512i xlo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + b * QK)));
        const __m512i xhi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + b * QK + 16)));
        const __m512i v = _mm512_loadu_si512((const void *)q); /* rows 0..3, 16 bytes each */
        __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, nib), xlo);
        p = _mm512_dpbusd_epi32(p, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib), xhi);
        const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + b * 2 * R))); /* d0..3 m0..3 */
        const __m256 ds = _mm256_mul_ps(f, _mm256_set1_ps(xd[b]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(sel, _mm512_castps256_ps512(ds)), acc);
        accm = _mm_fmadd_ps(_mm256_extractf128_ps(f, 1), _mm_set1_ps(xs[b]), accm);
    }
    /* lanes 0-7 are Q4_GROUP's acc01 (rows 0, 1), lanes 8-15 its acc23: the same reduction */
    __m256 h = _mm256_hadd_ps(_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
    h = _mm256_hadd_ps(h, h);
    __m128 lo = _mm256_castps256_ps128(h), hi = _mm256_extractf128_ps(h, 1);
    return _mm_add_ps(_mm_unpacklo_ps(lo, hi), accm);
}
/* q4_group_avx512vnni for MR activation rows at once (speculative verification, batched decode): the block's
 * weights are loaded and unpacked once for all rows. Each row's lanes see exactly the operations of the one-row
 * function, in the same order, so every row's result is bit-identical to it. */
#define MR 4
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl"))) static inline __attribute__((always_inline)) void
q4_rows(const uint8_t *qs, const uint16_t *dm, int64_t nb, const int rows, const int8_t *xq, const float *xd,
        const float *xs, int64_t K, __m128 *out) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[MR];
    __m128 accm[MR];
    for (int m = 0; m < MR; m++) acc[m] = _mm512_setzero_ps(), accm[m] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = qs + b * R * 16;
        _mm_prefetch((const char *)(q + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(dm + b * 2 * R) + PREFETCH / 4, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512((const void *)q);
        const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + b * 2 * R)));
        const __m128 fm = _mm256_extractf128_ps(f, 1);
        /* d of each lane's row, permuted once for all rows (d_r * xd per lane: the same product as permuting after) */
        const __m512 fd = _mm512_permutexvar_ps(sel, _mm512_castps256_ps512(f));
        for (int m = 0; m < rows; m++) {
            const int8_t *x = xq + m * K + b * QK;
            const __m512i xlo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)x));
            const __m512i xhi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(x + 16)));
            const __m512i p = _mm512_add_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo),
                                               _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xhi));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(fd, _mm512_set1_ps(xd[m * (K / QK) + b])),
                                     acc[m]);
            accm[m] = _mm_fmadd_ps(fm, _mm_set1_ps(xs[m * (K / QK) + b]), accm[m]);
        }
    }
    for (int m = 0; m < rows; m++) {
        __m256 h = _mm256_hadd_ps(_mm512_castps512_ps256(acc[m]),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[m]), 1)));
        h = _mm256_hadd_ps(h, h);
        __m128 l = _mm256_castps256_ps128(h), u = _mm256_extractf128_ps(h, 1);
        out[m] = _mm_add_ps(_mm_unpacklo_ps(l, u), accm[m]);
    }
}

/* fn (an always-inline rows kernel) called with its row count a compile-time constant, so its accumulators stay in
 * registers (with a run-time count and an early exit they lived on the stack) */
#define CONST_ROWS(fn, qs, scales, nb, rows, xq, xd, xs, K, out)                     \
    do {                                                                             \
        if ((rows) >= MR)                                                            \
            fn(qs, scales, nb, MR, xq, xd, xs, K, out);                              \
        else if ((rows) == 3)                                                        \
            fn(qs, scales, nb, 3, xq, xd, xs, K, out);                               \
        else if ((rows) == 2)                                                        \
            fn(qs, scales, nb, 2, xq, xd, xs, K, out);                               \
        else                                                                         \
            fn(qs, scales, nb, 1, xq, xd, xs, K, out);                               \
    } while (0)

__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl"))) static void q4_group_rows_avx512vnni(
    const uint8_t *qs, const uint16_t *dm, int64_t nb, int64_t rows, const int8_t *xq, const float *xd,
    const float *xs, int64_t K, __m128 *out) {
    CONST_ROWS(q4_rows, qs, dm, nb, rows, xq, xd, xs, K, out);
}

Q8_GROUP(q8_group_avx2, DOT_AVX2, )
Q8_GROUP(q8_group_avxvnni, DOT_AVXVNNI, __attribute__((target("avxvnni"))))

/* Q8 with AVX512-VNNI. AVX-512 has no vpsignb, so the weights are made unsigned instead (w + 128, an xor):
 * dot(w, x) = dot(w + 128, x) - 128 sum(x), the second term from xs = xd sum(x). Each int32 lane's partial sum
 * (4 bytes) is scaled per block and accumulated in float in its lane; the lanes are reduced once per group (not once
 * per block as in Q8_GROUP). The one-row function works on ymm, the MR-row one on zmm (one weight load and xor for
 * every row); both give each lane the same operations in the same order and reduce it with the same tree, so a row's
 * result is bit-identical whatever M is (speculative verification and batched serving rest on that). */
#define AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl")))

/* rows 0..3 (8 lanes each) -> their totals (r0 r1 r2 r3): ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)) */
AVX512VNNI static inline __m128 reduce4(__m256 r0, __m256 r1, __m256 r2, __m256 r3) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(r0, r1), _mm256_hadd_ps(r2, r3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

AVX512VNNI static __m128 q8_group_avx512vnni(const int8_t *qs, const uint16_t *d, int64_t nb, const int8_t *xq,
                                             const float *xd, const float *xs) {
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    __m256 acc[R];
    __m128 corr = _mm_setzero_ps();
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *q = qs + b * R * QK;
        _mm_prefetch((const char *)(q + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(q + PREFETCH + 64), _MM_HINT_T0);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        const __m128 dw = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(d + b * R)));
        const __m128 ds = _mm_mul_ps(dw, _mm_set1_ps(xd[b]));
        const __m256 ds8 = _mm256_castps128_ps256(ds);
        for (int r = 0; r < R; r++) {
            const __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(q + r * QK)), bias);
            const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(ds8, _mm256_set1_epi32(r)),
                                     acc[r]);
        }
        corr = _mm_fmadd_ps(dw, _mm_set1_ps(-128.0f * xs[b]), corr);
    }
    return _mm_add_ps(reduce4(acc[0], acc[1], acc[2], acc[3]), corr);
}

AVX512VNNI static inline __attribute__((always_inline)) void q8_rows(
    const int8_t *qs, const uint16_t *d, int64_t nb, const int rows, const int8_t *xq, const float *xd,
    const float *xs, int64_t K, __m128 *out) {
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    const __m512i sel01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i sel23 = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    __m512 acc01[MR], acc23[MR]; /* row 0 | row 1 (8 lanes each), row 2 | row 3 */
    __m128 corr[MR];
    for (int m = 0; m < MR; m++) acc01[m] = acc23[m] = _mm512_setzero_ps(), corr[m] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *q = qs + b * R * QK;
        _mm_prefetch((const char *)(q + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(q + PREFETCH + 64), _MM_HINT_T0);
        const __m512i u01 = _mm512_xor_si512(_mm512_loadu_si512((const void *)q), bias);
        const __m512i u23 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(q + 64)), bias);
        const __m128 dw = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(d + b * R)));
        for (int m = 0; m < rows; m++) {
            const int64_t xb = m * (K / QK) + b;
            const __m512i x = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xq + m * K + b * QK)));
            const __m512 ds = _mm512_castps128_ps512(_mm_mul_ps(dw, _mm_set1_ps(xd[xb])));
            const __m512i p01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u01, x);
            const __m512i p23 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u23, x);
            acc01[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p01), _mm512_permutexvar_ps(sel01, ds), acc01[m]);
            acc23[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p23), _mm512_permutexvar_ps(sel23, ds), acc23[m]);
            corr[m] = _mm_fmadd_ps(dw, _mm_set1_ps(-128.0f * xs[xb]), corr[m]);
        }
    }
    for (int m = 0; m < rows; m++) {
        const __m256 r1 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc01[m]), 1));
        const __m256 r3 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc23[m]), 1));
        out[m] = _mm_add_ps(reduce4(_mm512_castps512_ps256(acc01[m]), r1, _mm512_castps512_ps256(acc23[m]), r3),
                            corr[m]);
    }
}

AVX512VNNI static void q8_group_rows_avx512vnni(const int8_t *qs, const uint16_t *d, int64_t nb, int64_t rows,
                                                const int8_t *xq, const float *xd, const float *xs, int64_t K,
                                                __m128 *out) {
    CONST_ROWS(q8_rows, qs, d, nb, rows, xq, xd, xs, K, out);
}

/* Weight group g (4 rows) against up to MR (AVX512-VNNI) or MR2 (AVX2) activation rows: the rows functions above. */
static void group_rows(int isa, int bits, const void *qs, const uint16_t *dm, int64_t g, int64_t nb, int64_t rows,
                       const int8_t *xq, const float *xd, const float *xs, int64_t K, __m128 *acc) {
    if (bits == 4) {
        const uint8_t *q = (const uint8_t *)qs + g * nb * R * 16;
        const uint16_t *s = dm + g * nb * 2 * R;
        (isa == 2 ? q4_group_rows_avx512vnni : q4_group_rows_avx2)(q, s, nb, rows, xq, xd, xs, K, acc);
    } else {
        const int8_t *q = (const int8_t *)qs + g * nb * R * QK;
        const uint16_t *s = dm + g * nb * R;
        (isa == 2 ? q8_group_rows_avx512vnni : q8_group_rows_avx2)(q, s, nb, rows, xq, xd, xs, K, acc);
    }
}

/* y (M, N) = x (M, K) @ W^T for W in the Q4 (bits 4) or Q8 (bits 8) layout above; K % 32 == 0, N_pad = N
 * rounded up to 4. x and y are fp32 or bf16. Returns 0, or -1 if out of memory. */
int edgellm_qmatmul(int bits, const void *x, int x_bf16, int64_t M, int64_t K, const void *qs, const uint16_t *dm,
                    int64_t N, void *y, int y_bf16, int isa, int threads) {
    const int64_t nb = K / QK, groups = (N + R - 1) / R;
    /* decode's few rows fit on the stack (no allocator call per product); prefill-sized inputs go to the heap */
    enum { STACK_BYTES = 64 * 1024 };
    _Alignas(64) int8_t stack_q[STACK_BYTES];
    _Alignas(64) float stack_f[2 * STACK_BYTES / QK];
    const int small = M * K <= STACK_BYTES;
    int8_t *xq = small ? stack_q : malloc((size_t)(M * K));
    float *xd = small ? stack_f : malloc((size_t)(M * nb) * sizeof(float));
    float *xs = small ? stack_f + STACK_BYTES / QK : malloc((size_t)(M * nb) * sizeof(float));
    if (!xq || !xd || !xs) {
        if (!small) free(xq), free(xd), free(xs);
        return -1;
    }
    const size_t x_row = (size_t)K * (x_bf16 ? 2 : 4);
    for (int64_t m = 0; m < M; m++)
        quantize_row((const char *)x + m * x_row, x_bf16, K, xq + m * K, xd + m * nb, xs + m * nb);
#ifdef _OPENMP
    if (threads < 1) threads = omp_get_max_threads(); /* torch.set_num_threads sets this (same libgomp) */
#endif
    if (threads < 1 || groups < 2 * threads) threads = 1; /* too little work to split */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        if (M > 1 && (isa == 2 || isa == 0)) { /* several rows: each weight block loaded (and unpacked) once */
            const int64_t step = isa == 2 ? MR : MR2;
            for (int64_t m0 = 0; m0 < M; m0 += step) {
                __m128 acc[MR];
                group_rows(isa, bits, qs, dm, g, nb, M - m0, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, K, acc);
                for (int64_t m = m0; m < M && m < m0 + step; m++) store4(y, y_bf16, m * N, g * R, N, acc[m - m0]);
            }
            continue;
        }
        for (int64_t m = 0; m < M; m++) {
            __m128 acc;
            if (bits == 4) {
                const uint8_t *q = (const uint8_t *)qs + g * nb * R * 16;
                const uint16_t *s = dm + g * nb * 2 * R;
                acc = isa == 2   ? q4_group_avx512vnni(q, s, nb, xq + m * K, xd + m * nb, xs + m * nb)
                      : isa == 1 ? q4_group_avxvnni(q, s, nb, xq + m * K, xd + m * nb, xs + m * nb)
                                 : q4_group_avx2(q, s, nb, xq + m * K, xd + m * nb, xs + m * nb);
            } else {
                const int8_t *q = (const int8_t *)qs + g * nb * R * QK;
                const uint16_t *s = dm + g * nb * R;
                acc = isa == 2   ? q8_group_avx512vnni(q, s, nb, xq + m * K, xd + m * nb, xs + m * nb)
                      : isa == 1 ? q8_group_avxvnni(q, s, nb, xq + m * K, xd + m * nb)
                                 : q8_group_avx2(q, s, nb, xq + m * K, xd + m * nb);
            }
            store4(y, y_bf16, m * N, g * R, N, acc);
        }
    }
    if (!small) free(xq), free(xd), free(xs);
    return 0;
}

/* 8 fp32 -> 8 bf16 stored at dst, rounding to nearest even like float_to_bf16 (and torch). */
static inline void store8_bf16(uint16_t *dst, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)dst, packed);
}

static inline void store8(void *out, int out_bf16, int64_t idx, __m256 v) {
    if (out_bf16)
        store8_bf16((uint16_t *)out + idx, v);
    else
        _mm256_storeu_ps((float *)out + idx, v);
}

/* One row of W dequantized on zmm (isa 2), 32 weights per step; the same values as the ymm loop in
 * edgellm_qdequant (d * q is exact, so one rounding either way; bf16 by the same round-to-nearest-even). */
static inline AVX512VNNI void store16(void *out, int out_bf16, int64_t idx, __m512 v) {
    if (out_bf16) {
        __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + idx), _mm512_cvtepi32_epi16(u));
    } else {
        _mm512_storeu_ps((float *)out + idx, v);
    }
}

AVX512VNNI static void dequant_row_avx512(int bits, const void *qs, const uint16_t *dm, int64_t nb, int64_t g,
                                          int64_t r, void *out, int64_t o, int out_bf16) {
    for (int64_t b = 0; b < nb; b++, o += QK) {
        if (bits == 4) {
            const uint8_t *q = (const uint8_t *)qs + ((g * nb + b) * R + r) * 16;
            const uint16_t *s = dm + (g * nb + b) * 2 * R;
            const __m512 d = _mm512_set1_ps(_cvtsh_ss(s[r])), mn = _mm512_set1_ps(_cvtsh_ss(s[R + r]));
            const __m128i v = _mm_loadu_si128((const __m128i *)q), nib = _mm_set1_epi8(0x0F);
            const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
            store16(out, out_bf16, o, _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo))), mn));
            store16(out, out_bf16, o + 16,
                    _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi))), mn));
        } else {
            const int8_t *q = (const int8_t *)qs + ((g * nb + b) * R + r) * QK;
            const __m512 d = _mm512_set1_ps(_cvtsh_ss(dm[(g * nb + b) * R + r]));
            for (int i = 0; i < 2; i++) {
                const __m512i c = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * i)));
                store16(out, out_bf16, o + 16 * i, _mm512_mul_ps(d, _mm512_cvtepi32_ps(c)));
            }
        }
    }
}

/* Rows n0:n1 (n0 % 4 == 0) of W dequantized exactly (d * q + m, or d * q: every product of an fp16 scale and a
 * code up to 8 bits is exact in fp32, so one rounding at most), written as out (n1 - n0, K) in fp32 or bf16
 * (rounded once), for the prefill path's dense GEMM. Vectorised (zmm for isa 2, else ymm): this runs over every
 * weight once per prefill, so it must cost a small fraction of the GEMM that follows. */
void edgellm_qdequant(int bits, const void *qs, const uint16_t *dm, int64_t K, int64_t n0, int64_t n1, void *out,
                      int out_bf16, int isa, int threads) {
    const int64_t nb = K / QK;
#ifdef _OPENMP
    if (threads < 1) threads = omp_get_max_threads();
#endif
    if (threads < 1 || (n1 - n0) * K < 65536) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const int64_t g = n / R, r = n % R, row = (n - n0) * K;
        if (isa == 2) {
            dequant_row_avx512(bits, qs, dm, nb, g, r, out, row, out_bf16);
            continue;
        }
        for (int64_t b = 0; b < nb; b++) {
            const int64_t o = row + b * QK;
            if (bits == 4) {
                const uint8_t *q = (const uint8_t *)qs + ((g * nb + b) * R + r) * 16;
                const uint16_t *s = dm + (g * nb + b) * 2 * R;
                __m256 d = _mm256_set1_ps(_cvtsh_ss(s[r])), mn = _mm256_set1_ps(_cvtsh_ss(s[R + r]));
                __m128i v = _mm_loadu_si128((const __m128i *)q), nib = _mm_set1_epi8(0x0F);
                __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
                __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
                for (int i = 0; i < 4; i++) {
                    __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
                    store8(out, out_bf16, o + 8 * i, _mm256_add_ps(_mm256_mul_ps(d, f), mn));
                }
            } else {
                const int8_t *q = (const int8_t *)qs + ((g * nb + b) * R + r) * QK;
                __m256 d = _mm256_set1_ps(_cvtsh_ss(dm[(g * nb + b) * R + r]));
                for (int i = 0; i < 4; i++) {
                    __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i)));
                    store8(out, out_bf16, o + 8 * i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(c)));
                }
            }
        }
    }
}
