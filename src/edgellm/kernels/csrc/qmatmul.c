/* Low-bit matrix products (decode; on AVX512-VNNI also prefill): 4-bit (Q4) and 8-bit (Q8) weights in blocks of 32,
 * activations quantized to int8 per block of 32, integer dot products. The llama.cpp recipe, our code.
 *
 * Built by edgellm/kernels/native.py for the x86-64-v3 baseline (AVX2, FMA, F16C; -O3 -fopenmp); the VNNI
 * variants are compiled beside it with target attributes and chosen at run time by `isa` (the caller's CPU
 * detection, so EDGELLM_ISA=avx2 really runs the AVX2 code on any machine):
 *   isa 0: AVX2     vpmaddubsw + vpmaddwd       (every x86-64 laptop since ~2013)
 *   isa 1: AVX-VNNI vpdpbusd on ymm (VEX)       (Intel Core 12th gen+, Zen 5 client)
 *   isa 2: AVX512-VNNI vpdpbusd on zmm, on a layout of its own (16-row groups, below)  (Xeon, Zen 4/5)
 *
 * Weight layout of isa 0 and 1 (made once at load, see kernels/blockq.py), rows interleaved by R = 4 so one thread
 * streams one contiguous run of memory and each loaded activation block serves four rows:
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

Q8_GROUP(q8_group_avx2, DOT_AVX2, )
Q8_GROUP(q8_group_avxvnni, DOT_AVXVNNI, __attribute__((target("avxvnni"))))

/* AVX512-VNNI (isa 2) has a layout of its own, 16 rows per group, so that each int32 lane of a zmm holds one row's
 * whole block dot product (vpdpbusd sums 4 bytes per lane; 8 of them cover a block) and the float work of a block
 * (convert, scale, m term) is done once for 16 rows rather than once per row:
 *   Q4: qs uint8 (N/16, nb, 4, 16, 4): chunk i (0..3), row r, byte e holds element 4i + e (low nibble) and element
 *       16 + 4i + e (high nibble); dm fp16 (N/16, nb, 2, 16): d of the 16 rows, then m of the 16 rows.
 *   Q8: qs int8 (N/16, nb, 8, 16, 4): chunk i (0..7), row r, byte e holds element 4i + e; d fp16 (N/16, nb, 16).
 * The activation side of a chunk is 4 bytes broadcast to every lane (an embedded-broadcast operand). A block's
 * integer sum is exact, so rows agree bit for bit however many activation rows are computed together. */
#define AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl,avx512dq")))
#define L16 16
#define MR16 8 /* activation rows per pass over a weight group: 8 accumulators + 8 unpacked chunks in registers */

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* One activation block (32 int8 codes at x) against 16 rows' unpacked chunks w[0..7] (w[i]: elements 4i..4i+3
 * for i < 4, 16 + 4(i-4).. for i >= 4): each int32 lane, one row's exact block dot product. */
AVX512VNNI static inline __attribute__((always_inline)) __m512i block_dot16(const __m512i *w, const int8_t *x) {
    __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(load_i32(x)));
    __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4], _mm512_set1_epi32(load_i32(x + 16)));
    for (int i = 1; i < 4; i++) {
        p0 = _mm512_dpbusd_epi32(p0, w[i], _mm512_set1_epi32(load_i32(x + 4 * i)));
        p1 = _mm512_dpbusd_epi32(p1, w[4 + i], _mm512_set1_epi32(load_i32(x + 16 + 4 * i)));
    }
    return _mm512_add_epi32(p0, p1);
}

/* 16 weight rows (one group) against `rows` (<= MR16) activation rows; out[m] = the 16 rows' products with x_m. */
AVX512VNNI static inline __attribute__((always_inline)) void q4_rows16(const uint8_t *qs, const uint16_t *dm,
                                                                       int64_t nb, const int rows, const int8_t *xq,
                                                                       const float *xd, const float *xs, int64_t K,
                                                                       __m512 *out) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    __m512 acc[MR16];
    for (int m = 0; m < MR16; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = qs + b * 4 * 64;
        for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(q + PREFETCH + 64 * l), _MM_HINT_T0);
        _mm_prefetch((const char *)(dm + b * 2 * L16) + PREFETCH / 4, _MM_HINT_T0);
        __m512i w[8];
        for (int i = 0; i < 4; i++) {
            const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * i));
            w[i] = _mm512_and_si512(v, nib);                          /* elements 4i..4i+3 of each row */
            w[4 + i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib); /* elements 16+4i..16+4i+3 */
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + b * 2 * L16)));
        const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + b * 2 * L16 + L16)));
        for (int m = 0; m < rows; m++) {
            const int64_t xb = m * (K / QK) + b;
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_dot16(w, xq + m * K + b * QK)),
                                     _mm512_mul_ps(d, _mm512_set1_ps(xd[xb])), acc[m]);
            acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[xb]), acc[m]);
        }
    }
    for (int m = 0; m < rows; m++) out[m] = acc[m];
}

/* Signed weights made unsigned (w + 128, an xor; AVX-512 has no vpsignb): dot(w, x) = dot(w + 128, x) - 128 sum(x),
 * the second term from xs = xd sum(x). */
AVX512VNNI static inline __attribute__((always_inline)) void q8_rows16(const int8_t *qs, const uint16_t *dm,
                                                                       int64_t nb, const int rows, const int8_t *xq,
                                                                       const float *xd, const float *xs, int64_t K,
                                                                       __m512 *out) {
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512 acc[MR16];
    for (int m = 0; m < MR16; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *q = qs + b * 8 * 64;
        for (int l = 0; l < 8; l++) _mm_prefetch((const char *)(q + PREFETCH + 64 * l), _MM_HINT_T0);
        __m512i u[8];
        for (int i = 0; i < 8; i++) u[i] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(q + 64 * i)), bias);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + b * L16)));
        for (int m = 0; m < rows; m++) {
            const int64_t xb = m * (K / QK) + b;
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block_dot16(u, xq + m * K + b * QK)),
                                     _mm512_mul_ps(d, _mm512_set1_ps(xd[xb])), acc[m]);
            acc[m] = _mm512_fmadd_ps(d, _mm512_set1_ps(-128.0f * xs[xb]), acc[m]);
        }
    }
    for (int m = 0; m < rows; m++) out[m] = acc[m];
}

/* fn (an always-inline rows kernel) called with its row count a compile-time constant, so its accumulators stay in
 * registers (with a run-time count and an early exit they lived on the stack) */
#define CONST_ROWS16(fn, qs, dm, nb, rows, xq, xd, xs, K, out)                                                     \
    switch ((rows) >= MR16 ? MR16 : (rows)) {                                                                      \
    case 8: fn(qs, dm, nb, 8, xq, xd, xs, K, out); break;                                                           \
    case 7: fn(qs, dm, nb, 7, xq, xd, xs, K, out); break;                                                           \
    case 6: fn(qs, dm, nb, 6, xq, xd, xs, K, out); break;                                                           \
    case 5: fn(qs, dm, nb, 5, xq, xd, xs, K, out); break;                                                           \
    case 4: fn(qs, dm, nb, 4, xq, xd, xs, K, out); break;                                                           \
    case 3: fn(qs, dm, nb, 3, xq, xd, xs, K, out); break;                                                           \
    case 2: fn(qs, dm, nb, 2, xq, xd, xs, K, out); break;                                                           \
    default: fn(qs, dm, nb, 1, xq, xd, xs, K, out); break;                                                          \
    }

/* 16 results of row m (columns n0..n0+15, those below N) stored as fp32 or bf16 (round to nearest even). */
AVX512VNNI static inline void store_row16(void *y, int y_bf16, int64_t off, int64_t n0, int64_t N, __m512 v) {
    const __mmask16 mask = N - n0 >= L16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
    if (y_bf16) {
        __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
        _mm256_mask_storeu_epi16((uint16_t *)y + off + n0, mask, _mm512_cvtepi32_epi16(u));
    } else {
        _mm512_mask_storeu_ps((float *)y + off + n0, mask, v);
    }
}

/* Group g (16 weight rows) against all M activation rows, MR16 at a time (the group's weights stay in L1). */
AVX512VNNI static void group16(int bits, const void *qs, const uint16_t *dm, int64_t g, int64_t nb, int64_t M,
                               const int8_t *xq, const float *xd, const float *xs, int64_t K, int64_t N, void *y,
                               int y_bf16) {
    for (int64_t m0 = 0; m0 < M; m0 += MR16) {
        __m512 acc[MR16];
        const int64_t rows = M - m0, o = m0 * K, ob = m0 * nb;
        if (bits == 4) {
            const uint8_t *q = (const uint8_t *)qs + g * nb * 4 * 64;
            CONST_ROWS16(q4_rows16, q, dm + g * nb * 2 * L16, nb, rows, xq + o, xd + ob, xs + ob, K, acc);
        } else {
            const int8_t *q = (const int8_t *)qs + g * nb * 8 * 64;
            CONST_ROWS16(q8_rows16, q, dm + g * nb * L16, nb, rows, xq + o, xd + ob, xs + ob, K, acc);
        }
        for (int64_t m = m0; m < M && m < m0 + MR16; m++) store_row16(y, y_bf16, m * N, g * L16, N, acc[m - m0]);
    }
}

/* Weight group g (4 rows) against up to MR2 activation rows (AVX2): the rows functions above. */
static void group_rows_avx2(int bits, const void *qs, const uint16_t *dm, int64_t g, int64_t nb, int64_t rows,
                            const int8_t *xq, const float *xd, const float *xs, int64_t K, __m128 *acc) {
    if (bits == 4)
        q4_group_rows_avx2((const uint8_t *)qs + g * nb * R * 16, dm + g * nb * 2 * R, nb, rows, xq, xd, xs, K, acc);
    else
        q8_group_rows_avx2((const int8_t *)qs + g * nb * R * QK, dm + g * nb * R, nb, rows, xq, xd, xs, K, acc);
}

/* y (M, N) = x (M, K) @ W^T for W in the Q4 (bits 4) or Q8 (bits 8) layout of its isa (16-row groups for isa 2,
 * 4-row groups otherwise); K % 32 == 0. x and y are fp32 or bf16. Returns 0, or -1 if out of memory. */
int edgellm_qmatmul(int bits, const void *x, int x_bf16, int64_t M, int64_t K, const void *qs, const uint16_t *dm,
                    int64_t N, void *y, int y_bf16, int isa, int threads) {
    const int64_t nb = K / QK, lanes = isa == 2 ? L16 : R, groups = (N + lanes - 1) / lanes;
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
#ifdef _OPENMP
    if (threads < 1) threads = omp_get_max_threads(); /* torch.set_num_threads sets this (same libgomp) */
#endif
    const size_t x_row = (size_t)K * (x_bf16 ? 2 : 4);
    const int qthreads = threads > 1 && M * K >= (1 << 16) ? threads : 1; /* prefill-sized inputs: in parallel */
#pragma omp parallel for num_threads(qthreads) schedule(static)
    for (int64_t m = 0; m < M; m++)
        quantize_row((const char *)x + m * x_row, x_bf16, K, xq + m * K, xd + m * nb, xs + m * nb);
    if (threads < 1 || groups < 2 * threads) threads = 1; /* too little work to split */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        if (isa == 2) { /* every activation row against the group, the weights loaded and unpacked once per MR16 */
            group16(bits, qs, dm, g, nb, M, xq, xd, xs, K, N, y, y_bf16);
            continue;
        }
        if (M > 1 && isa == 0) { /* several rows: each weight block loaded (and unpacked) once */
            for (int64_t m0 = 0; m0 < M; m0 += MR2) {
                __m128 acc[MR2];
                group_rows_avx2(bits, qs, dm, g, nb, M - m0, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, K, acc);
                for (int64_t m = m0; m < M && m < m0 + MR2; m++) store4(y, y_bf16, m * N, g * R, N, acc[m - m0]);
            }
            continue;
        }
        for (int64_t m = 0; m < M; m++) {
            __m128 acc;
            if (bits == 4) {
                const uint8_t *q = (const uint8_t *)qs + g * nb * R * 16;
                const uint16_t *s = dm + g * nb * 2 * R;
                acc = isa == 1 ? q4_group_avxvnni(q, s, nb, xq + m * K, xd + m * nb, xs + m * nb)
                               : q4_group_avx2(q, s, nb, xq + m * K, xd + m * nb, xs + m * nb);
            } else {
                const int8_t *q = (const int8_t *)qs + g * nb * R * QK;
                const uint16_t *s = dm + g * nb * R;
                acc = isa == 1 ? q8_group_avxvnni(q, s, nb, xq + m * K, xd + m * nb)
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

/* 16 weights of a row stored as fp32 or bf16 (isa 2); the same values as the ymm loop in
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

/* Four chunks (16 rows x 4 bytes each) -> each row's 16 bytes (chunk 0..3 in order) at tmp + 64 (r % 4) + 16 (r / 4):
 * a 4 x 4 transpose of dwords within each 128-bit lane. */
AVX512VNNI static inline void rows_of_chunks(const uint8_t *q, uint8_t *tmp) {
    const __m512i c0 = _mm512_loadu_si512((const void *)q), c1 = _mm512_loadu_si512((const void *)(q + 64));
    const __m512i c2 = _mm512_loadu_si512((const void *)(q + 128)), c3 = _mm512_loadu_si512((const void *)(q + 192));
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    _mm512_storeu_si512((void *)tmp, _mm512_unpacklo_epi64(t0, t2));
    _mm512_storeu_si512((void *)(tmp + 64), _mm512_unpackhi_epi64(t0, t2));
    _mm512_storeu_si512((void *)(tmp + 128), _mm512_unpacklo_epi64(t1, t3));
    _mm512_storeu_si512((void *)(tmp + 192), _mm512_unpackhi_epi64(t1, t3));
}

/* Rows r0..r1-1 of 16-row group g (isa 2's layout), each written at out + (row - r0) * K + block offset. */
AVX512VNNI static void dequant_group_avx512(int bits, const void *qs, const uint16_t *dm, int64_t nb, int64_t K,
                                            int64_t g, int r0, int r1, void *out, int out_bf16) {
    _Alignas(64) uint8_t tmp[2][256];
    const __m128i nib = _mm_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        if (bits == 4) {
            rows_of_chunks((const uint8_t *)qs + (g * nb + b) * 4 * 64, tmp[0]);
            const uint16_t *s = dm + (g * nb + b) * 2 * L16;
            for (int r = r0; r < r1; r++) {
                const int64_t o = (r - r0) * K + b * QK;
                const __m512 d = _mm512_set1_ps(_cvtsh_ss(s[r])), mn = _mm512_set1_ps(_cvtsh_ss(s[L16 + r]));
                const __m128i v = _mm_load_si128((const __m128i *)(tmp[0] + 64 * (r % 4) + 16 * (r / 4)));
                const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
                store16(out, out_bf16, o, _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo))), mn));
                store16(out, out_bf16, o + 16,
                        _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi))), mn));
            }
        } else {
            const uint8_t *q = (const uint8_t *)qs + (g * nb + b) * 8 * 64;
            rows_of_chunks(q, tmp[0]);       /* elements 0..15 */
            rows_of_chunks(q + 256, tmp[1]); /* elements 16..31 */
            for (int r = r0; r < r1; r++) {
                const int64_t o = (r - r0) * K + b * QK;
                const __m512 d = _mm512_set1_ps(_cvtsh_ss(dm[(g * nb + b) * L16 + r]));
                for (int i = 0; i < 2; i++) {
                    const __m128i v = _mm_load_si128((const __m128i *)(tmp[i] + 64 * (r % 4) + 16 * (r / 4)));
                    store16(out, out_bf16, o + 16 * i, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))));
                }
            }
        }
    }
}

/* Rows n0:n1 (n0 a multiple of the group size) of W dequantized exactly (d * q + m, or d * q: every product of an fp16 scale and a
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
    if (isa == 2) { /* 16-row groups: a group's blocks transposed back to rows once for all its rows */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t g = n0 / L16; g < (n1 + L16 - 1) / L16; g++) {
            const int64_t first = g * L16 > n0 ? g * L16 : n0, last = (g + 1) * L16 < n1 ? (g + 1) * L16 : n1;
            char *o = (char *)out + (first - n0) * K * (out_bf16 ? 2 : 4);
            dequant_group_avx512(bits, qs, dm, nb, K, g, (int)(first - g * L16), (int)(last - g * L16), o, out_bf16);
        }
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const int64_t g = n / R, r = n % R, row = (n - n0) * K;
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
