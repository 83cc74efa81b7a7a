/* Attention of new tokens' queries over a KV cache, two entry points with the same per-query arithmetic:
 * - edgellm_decode_attention: one decode step for a batch of sequences held in rows of a pooled KV cache
 *   (continuous batching in `edgellm serve`). Sequence b is cache row rows[b]; its query attends to keys
 *   lo[b]..hi[b].
 * - edgellm_cache_attention: T new tokens per sequence over a whole static cache (the compiled decode step,
 *   T = 1, and the speculative verify step, T > 1; called as a torch operator, decode_attention_op.cpp). A
 *   query sees the slots whose position is <= its own (and inside the window): rejected drafts left behind
 *   and later tokens of the same call are skipped, so a query's result is the same whatever T is.
 *
 * Why a kernel: the torch path is one attention call per sequence per layer (each repacks its keys), ~8x the
 * launches of everything else in the step. Here one call per layer does every (sequence, kv head) pair, reading
 * the cache in place. Each sequence's arithmetic depends only on its own keys (fixed loop order; a list longer
 * than KEY_CHUNK keys is split at fixed places, whatever the threads), so a batched answer equals the same sequence
 * decoded alone, bit for bit.
 *
 * Built for the x86-64-v3 baseline: AVX2 + FMA code (bf16 rows widened by a shift, a vectorized exp) for head dims
 * that are a multiple of 8; plain C elsewhere (the compiler vectorizes the head-dim loops, `omp simd`). Either way
 * a fixed reduction order for a given build.
 * Layouts (all contiguous, fp32 or bf16): decode_attention q and out (B, H, D), cache k, v (P, Hkv, S, D);
 * cache_attention q and out (B, T, H, D), cache k, v (>= B, Hkv, S, D), slot_pos (S,), qpos (T,).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float from_bf16(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does (inputs are finite) */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline void load_row(int bf16, const void *base, int64_t index, int64_t D, float *dst) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)base + index * D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) dst[d] = from_bf16(s[d]);
    } else {
        memcpy(dst, (const float *)base + index * D, (size_t)D * 4);
    }
}


#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

static inline __m256 load8(int bf16, const void *base, int64_t elem) { /* 8 elements as fp32 */
    if (bf16) {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + elem));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)base + elem);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* exp of softmax arguments (x <= 0; below -87, -inf included, gives 0): Cephes' expf, range reduction by ln 2
 * in two parts, a degree-5 polynomial, 2^n through the exponent bits. Within 2 ulp of expf. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 zero = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(zero, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* 8 outputs times 1/sum, stored as bf16 (round to nearest even) or fp32 at element `at` of out. */
static inline void store8_scaled(int bf16, void *out, int64_t at, __m256 v, __m256 inv) {
    const __m256 y = _mm256_mul_ps(v, inv);
    if (bf16) {
        float t[8];
        _mm256_storeu_ps(t, y);
        for (int i = 0; i < 8; i++) ((uint16_t *)out)[at + i] = to_bf16(t[i]);
    } else {
        _mm256_storeu_ps((float *)out + at, y);
    }
}

/* attend_group (below) with AVX2 + FMA, for D a multiple of 8 (<= 256) and G <= 8. */
static int attend_group_avx2(int bf16, const void *q, const void *k, const void *v, void *out, int64_t q_row,
                             int64_t kv_base, const int64_t *slots, int64_t L, int64_t G, int64_t D, float scale) {
    const int64_t Lp = (L + 7) & ~(int64_t)7, nc = D / 8;
    float *s = malloc((size_t)(G * Lp + 2 * G * D + D) * 4);
    if (!s) return 1;
    float *qf = s + G * Lp, *o = qf + G * D, *kv = o + G * D;
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < nc; c++) _mm256_storeu_ps(qf + g * D + 8 * c, load8(bf16, q, (q_row + g) * D + 8 * c));
    for (int64_t j = 0; j < L; j++) { /* scores: every head of the group against key j */
        const int64_t row = kv_base + (slots ? slots[j] : j);
        for (int64_t c = 0; c < nc; c++) _mm256_storeu_ps(kv + 8 * c, load8(bf16, k, row * D + 8 * c));
        for (int64_t g = 0; g < G; g++) {
            const float *qg = qf + g * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t c = 0;
            for (; c + 1 < nc; c += 2) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), _mm256_loadu_ps(kv + 8 * c), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c + 8), _mm256_loadu_ps(kv + 8 * c + 8), a1);
            }
            if (c < nc) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), _mm256_loadu_ps(kv + 8 * c), a0);
            s[g * Lp + j] = hsum8(_mm256_add_ps(a0, a1)) * scale;
        }
    }
    float inv[8];
    for (int64_t g = 0; g < G; g++) { /* softmax in fp32; the 1/sum is applied to the output */
        float *sg = s + g * Lp;
        for (int64_t j = L; j < Lp; j++) sg[j] = -INFINITY;
        __m256 mv = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < Lp; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sg + j));
        const __m256 m = _mm256_set1_ps(hmax8(mv));
        for (int64_t j = 0; j < Lp; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), m));
            _mm256_storeu_ps(sg + j, e);
            sum = _mm256_add_ps(sum, e);
        }
        inv[g] = 1.f / hsum8(sum);
    }
    memset(o, 0, (size_t)(G * D) * 4);
    for (int64_t j = 0; j < L; j++) { /* out = P V */
        const int64_t row = kv_base + (slots ? slots[j] : j);
        for (int64_t c = 0; c < nc; c++) _mm256_storeu_ps(kv + 8 * c, load8(bf16, v, row * D + 8 * c));
        for (int64_t g = 0; g < G; g++) {
            const __m256 p = _mm256_set1_ps(s[g * Lp + j]);
            float *og = o + g * D;
            for (int64_t c = 0; c < nc; c++)
                _mm256_storeu_ps(og + 8 * c, _mm256_fmadd_ps(p, _mm256_loadu_ps(kv + 8 * c), _mm256_loadu_ps(og + 8 * c)));
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const __m256 iv = _mm256_set1_ps(inv[g]);
        for (int64_t c = 0; c < nc; c++)
            store8_scaled(bf16, out, (q_row + g) * D + 8 * c, _mm256_loadu_ps(o + g * D + 8 * c), iv);
    }
    free(s);
    return 0;
}

/* The cache's rows come from DRAM each step (the weights stream through the caches between two steps): ask for
 * key j + PREFETCH_KEYS's block and this key's value block (for the values pass) ahead of use. Measured on the Zen 5
 * (AVX-512 loops, bf16 cache): an 8-row batched step 4.12 -> 3.90 ms, one row at 1,000 keys 2.60 -> 2.36 ms. */
#define PREFETCH_KEYS 8
static inline __attribute__((always_inline)) void prefetch_rows(int bf16, const void *k, const void *v,
                                                              const int64_t *rows, int64_t j, int64_t L, int64_t at,
                                                              int64_t blk) {
    const int64_t es = bf16 ? 2 : 4;
    if (j + PREFETCH_KEYS < L) {
        const char *kn = (const char *)k + es * (rows[j + PREFETCH_KEYS] + 64 * blk);
        for (int64_t line = 0; line < 64 * es; line += 64) _mm_prefetch(kn + line, _MM_HINT_T0);
    }
    const char *vn = (const char *)v + es * at;
    for (int64_t line = 0; line < 64 * es; line += 64) _mm_prefetch(vn + line, _MM_HINT_T1);
}

/* D = 64 * nb (head dims 64, 128, ...). Up to GN = 3 query heads of the group go through the keys together, so each
 * key (and value) row is loaded and widened once for all of them (not once per head): per head, four keys at a time
 * are dotted with the head's 64-wide query block (one horizontal reduction for the four), and the output block
 * accumulates over all keys, 32 dims at a time. Each head's arithmetic is the one-head loop's, in the same order:
 * same inputs, same result, whatever T, the batch or the number of heads sharing the loads. */
static inline __attribute__((always_inline)) void scores_d64(int bf16, const void *v, const float *qf,
                                                           const void *k, const int64_t *rows, int64_t L, int64_t blk,
                                                           float *s, int64_t Lp, const int GN) {
    int64_t j = 0;
    for (; j + 4 <= L; j += 4) {
        __m256 a[3][4];
        for (int u = 0; u < 4; u++) {
            const int64_t at = rows[j + u] + 64 * blk;
            prefetch_rows(bf16, k, v, rows, j + u, L, at, blk);
            __m256 kc = load8(bf16, k, at);
            for (int g = 0; g < GN; g++) a[g][u] = _mm256_mul_ps(_mm256_load_ps(qf + 64 * g), kc);
            for (int c = 1; c < 8; c++) {
                kc = load8(bf16, k, at + 8 * c);
                for (int g = 0; g < GN; g++) a[g][u] = _mm256_fmadd_ps(_mm256_load_ps(qf + 64 * g + 8 * c), kc, a[g][u]);
            }
        }
        for (int g = 0; g < GN; g++) {
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[g][0], a[g][1]), _mm256_hadd_ps(a[g][2], a[g][3]));
            __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)); /* keys j..j+3 */
            float *sg = s + g * Lp;
            if (blk) r4 = _mm_add_ps(_mm_loadu_ps(sg + j), r4);
            _mm_storeu_ps(sg + j, r4);
        }
    }
    for (; j < L; j++) {
        const int64_t at = rows[j] + 64 * blk;
        __m256 a[3], kc = load8(bf16, k, at);
        for (int g = 0; g < GN; g++) a[g] = _mm256_mul_ps(_mm256_load_ps(qf + 64 * g), kc);
        for (int c = 1; c < 8; c++) {
            kc = load8(bf16, k, at + 8 * c);
            for (int g = 0; g < GN; g++) a[g] = _mm256_fmadd_ps(_mm256_load_ps(qf + 64 * g + 8 * c), kc, a[g]);
        }
        for (int g = 0; g < GN; g++) s[g * Lp + j] = blk ? s[g * Lp + j] + hsum8(a[g]) : hsum8(a[g]);
    }
}

static inline __attribute__((always_inline)) void values_d64(int bf16, const void *v, const int64_t *rows, int64_t L,
                                                           int64_t blk, const float *s, int64_t Lp, int out_bf16,
                                                           void *out, int64_t q_row, int64_t D, const float *inv,
                                                           const int GN) {
    for (int half = 0; half < 2; half++) {
        __m256 o[3][4];
        for (int g = 0; g < GN; g++)
            for (int c = 0; c < 4; c++) o[g][c] = _mm256_setzero_ps();
        for (int64_t j = 0; j < L; j++) {
            const int64_t at = rows[j] + 64 * blk + 32 * half;
            __m256 p[3];
            for (int g = 0; g < GN; g++) p[g] = _mm256_broadcast_ss(s + g * Lp + j);
            for (int c = 0; c < 4; c++) {
                const __m256 vc = load8(bf16, v, at + 8 * c);
                for (int g = 0; g < GN; g++) o[g][c] = _mm256_fmadd_ps(p[g], vc, o[g][c]);
            }
        }
        for (int g = 0; g < GN; g++)
            for (int c = 0; c < 4; c++)
                store8_scaled(out_bf16, out, (q_row + g) * D + 64 * blk + 32 * half + 8 * c, o[g][c],
                              _mm256_set1_ps(inv[g]));
    }
}

/* The same two loops on AVX-512 (16 lanes: a 64-wide head block is 4 registers, half the instructions), for CPUs
 * that have it unless EDGELLM_ISA caps them away (edgellm_attention_use_avx512, set once by kernels/native.py).
 * Their sums are grouped differently from the AVX2 loops' (each still in a fixed order), so a machine's results
 * depend on the path it takes, never on the batch, T or the threads. Measured on a 2-vCPU Zen 5, bf16 cache, the
 * default model, both loop sets prefetching, alternated in one process: an 8-row batched step (~100 keys a row)
 * 3.60 -> 3.38 ms, one row at ~1,000 keys 2.27 -> 2.06 ms, 8 rows at ~420 keys 5.28 -> 4.69 ms. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
static int use_avx512 = 0;

void edgellm_attention_use_avx512(int on) {
    __builtin_cpu_init();
    use_avx512 = on && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

int edgellm_attention_avx512(void) { return use_avx512; }

AVX512 static inline __m512 load16(int bf16, const void *base, int64_t elem) { /* 16 elements as fp32 */
    if (bf16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + elem));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)base + elem);
}

/* four registers -> their four sums, in lanes 0..3 */
AVX512 static inline __m128 hsum4x16(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m256 b0 = _mm256_add_ps(_mm512_castps512_ps256(a0), _mm512_extractf32x8_ps(a0, 1));
    const __m256 b1 = _mm256_add_ps(_mm512_castps512_ps256(a1), _mm512_extractf32x8_ps(a1, 1));
    const __m256 b2 = _mm256_add_ps(_mm512_castps512_ps256(a2), _mm512_extractf32x8_ps(a2, 1));
    const __m256 b3 = _mm256_add_ps(_mm512_castps512_ps256(a3), _mm512_extractf32x8_ps(a3, 1));
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

AVX512 static inline __attribute__((always_inline)) void scores_d64_w(int bf16, const void *v, const float *qf,
                                                                     const void *k, const int64_t *rows, int64_t L,
                                                                     int64_t blk, float *s, int64_t Lp, const int GN) {
    int64_t j = 0;
    for (; j + 4 <= L; j += 4) {
        __m512 a[3][4];
        for (int u = 0; u < 4; u++) {
            const int64_t at = rows[j + u] + 64 * blk;
            prefetch_rows(bf16, k, v, rows, j + u, L, at, blk);
            __m512 kc = load16(bf16, k, at);
            for (int g = 0; g < GN; g++) a[g][u] = _mm512_mul_ps(_mm512_load_ps(qf + 64 * g), kc);
            for (int c = 1; c < 4; c++) {
                kc = load16(bf16, k, at + 16 * c);
                for (int g = 0; g < GN; g++)
                    a[g][u] = _mm512_fmadd_ps(_mm512_load_ps(qf + 64 * g + 16 * c), kc, a[g][u]);
            }
        }
        for (int g = 0; g < GN; g++) {
            __m128 r4 = hsum4x16(a[g][0], a[g][1], a[g][2], a[g][3]); /* keys j..j+3 */
            float *sg = s + g * Lp;
            if (blk) r4 = _mm_add_ps(_mm_loadu_ps(sg + j), r4);
            _mm_storeu_ps(sg + j, r4);
        }
    }
    for (; j < L; j++) {
        const int64_t at = rows[j] + 64 * blk;
        __m512 a[3], kc = load16(bf16, k, at);
        for (int g = 0; g < GN; g++) a[g] = _mm512_mul_ps(_mm512_load_ps(qf + 64 * g), kc);
        for (int c = 1; c < 4; c++) {
            kc = load16(bf16, k, at + 16 * c);
            for (int g = 0; g < GN; g++) a[g] = _mm512_fmadd_ps(_mm512_load_ps(qf + 64 * g + 16 * c), kc, a[g]);
        }
        for (int g = 0; g < GN; g++) {
            const float r = _mm_cvtss_f32(hsum4x16(a[g], a[g], a[g], a[g]));
            s[g * Lp + j] = blk ? s[g * Lp + j] + r : r;
        }
    }
}

AVX512 static void scores_d64_wide(int bf16, const void *v, const float *qf, const void *k, const int64_t *rows,
                                   int64_t L, int64_t blk, float *s, int64_t Lp, int gn) {
    if (gn == 3)
        scores_d64_w(bf16, v, qf, k, rows, L, blk, s, Lp, 3);
    else if (gn == 2)
        scores_d64_w(bf16, v, qf, k, rows, L, blk, s, Lp, 2);
    else
        scores_d64_w(bf16, v, qf, k, rows, L, blk, s, Lp, 1);
}

/* 16 outputs times 1/sum, stored as bf16 (round to nearest even, like to_bf16) or fp32 at element `at` of out */
AVX512 static inline void store16_scaled(int bf16, void *out, int64_t at, __m512 v, __m512 inv) {
    const __m512 y = _mm512_mul_ps(v, inv);
    if (bf16) {
        __m512i u = _mm512_castps_si512(y);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), _mm512_cvtepi32_epi16(u));
    } else {
        _mm512_storeu_ps((float *)out + at, y);
    }
}

AVX512 static inline __attribute__((always_inline)) void values_d64_w(int bf16, const void *v, const int64_t *rows,
                                                                     int64_t L, int64_t blk, const float *s,
                                                                     int64_t Lp, int out_bf16, void *out,
                                                                     int64_t q_row, int64_t D, const float *inv,
                                                                     const int GN) {
    __m512 o[3][4];
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < 4; c++) o[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j++) {
        const int64_t at = rows[j] + 64 * blk;
        __m512 p[3];
        for (int g = 0; g < GN; g++) p[g] = _mm512_set1_ps(s[g * Lp + j]);
        for (int c = 0; c < 4; c++) {
            const __m512 vc = load16(bf16, v, at + 16 * c);
            for (int g = 0; g < GN; g++) o[g][c] = _mm512_fmadd_ps(p[g], vc, o[g][c]);
        }
    }
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < 4; c++)
            store16_scaled(out_bf16, out, (q_row + g) * D + 64 * blk + 16 * c, o[g][c], _mm512_set1_ps(inv[g]));
}

AVX512 static void values_d64_wide(int bf16, const void *v, const int64_t *rows, int64_t L, int64_t blk,
                                   const float *s, int64_t Lp, int out_bf16, void *out, int64_t q_row, int64_t D,
                                   const float *inv, int gn) {
    if (gn == 3)
        values_d64_w(bf16, v, rows, L, blk, s, Lp, out_bf16, out, q_row, D, inv, 3);
    else if (gn == 2)
        values_d64_w(bf16, v, rows, L, blk, s, Lp, out_bf16, out, q_row, D, inv, 2);
    else
        values_d64_w(bf16, v, rows, L, blk, s, Lp, out_bf16, out, q_row, D, inv, 1);
}

/* part != NULL: one chunk of a longer key list (see KEY_CHUNK): the unnormalized output, each head's max score and
 * sum of exp into part (G D + 2 G floats: o | max | sum), fp32, instead of the normalized output into out. */
static int attend_group_d64(int bf16, const void *q, const void *k, const void *v, void *out, int64_t q_row,
                            int64_t kv_base, const int64_t *slots, int64_t L, int64_t G, int64_t D, float scale,
                            float *part) {
    const int64_t Lp = (L + 7) & ~(int64_t)7, nb = D / 64;
    int64_t *rows = malloc((size_t)L * 8 + (size_t)(G * Lp + G) * 4); /* element offset of each key row */
    if (!rows) return 1;
    float *s = (float *)(rows + L), *inv = s + G * Lp;
    for (int64_t j = 0; j < L; j++) rows[j] = (kv_base + (slots ? slots[j] : j)) * D;
    _Alignas(64) float qf[3 * 64];
    for (int64_t g0 = 0; g0 < G; g0 += 3) { /* scores, up to three heads at a time */
        const int gn = G - g0 < 3 ? (int)(G - g0) : 3;
        for (int64_t blk = 0; blk < nb; blk++) {
            for (int g = 0; g < gn; g++)
                for (int c = 0; c < 8; c++)
                    _mm256_store_ps(qf + 64 * g + 8 * c, load8(bf16, q, (q_row + g0 + g) * D + 64 * blk + 8 * c));
            if (use_avx512)
                scores_d64_wide(bf16, v, qf, k, rows, L, blk, s + g0 * Lp, Lp, gn);
            else if (gn == 3)
                scores_d64(bf16, v, qf, k, rows, L, blk, s + g0 * Lp, Lp, 3);
            else if (gn == 2)
                scores_d64(bf16, v, qf, k, rows, L, blk, s + g0 * Lp, Lp, 2);
            else
                scores_d64(bf16, v, qf, k, rows, L, blk, s + g0 * Lp, Lp, 1);
        }
    }
    for (int64_t g = 0; g < G; g++) { /* softmax in fp32 (the 1/sum is applied to the output) */
        float *sg = s + g * Lp;
        const __m256 sc = _mm256_set1_ps(scale);
        for (int64_t j = L; j < Lp; j++) sg[j] = -INFINITY;
        __m256 mv = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < Lp; j += 8) {
            const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(sg + j), sc);
            _mm256_storeu_ps(sg + j, x);
            mv = _mm256_max_ps(mv, x);
        }
        const float mx = hmax8(mv);
        const __m256 m = _mm256_set1_ps(mx);
        for (int64_t j = 0; j < Lp; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), m));
            _mm256_storeu_ps(sg + j, e);
            sum = _mm256_add_ps(sum, e);
        }
        if (part) {
            part[G * D + g] = mx;
            part[G * D + G + g] = hsum8(sum);
            inv[g] = 1.f;
        } else {
            inv[g] = 1.f / hsum8(sum);
        }
    }
    const int out_bf16 = part ? 0 : bf16;
    void *dst = part ? (void *)part : out;
    const int64_t dst_row = part ? 0 : q_row;
    for (int64_t g0 = 0; g0 < G; g0 += 3) { /* out = P V, up to three heads at a time */
        const int gn = G - g0 < 3 ? (int)(G - g0) : 3;
        for (int64_t blk = 0; blk < nb; blk++) {
            if (use_avx512)
                values_d64_wide(bf16, v, rows, L, blk, s + g0 * Lp, Lp, out_bf16, dst, dst_row + g0, D, inv + g0, gn);
            else if (gn == 3)
                values_d64(bf16, v, rows, L, blk, s + g0 * Lp, Lp, out_bf16, dst, dst_row + g0, D, inv + g0, 3);
            else if (gn == 2)
                values_d64(bf16, v, rows, L, blk, s + g0 * Lp, Lp, out_bf16, dst, dst_row + g0, D, inv + g0, 2);
            else
                values_d64(bf16, v, rows, L, blk, s + g0 * Lp, Lp, out_bf16, dst, dst_row + g0, D, inv + g0, 1);
        }
    }
    free(rows);
    return 0;
}
#endif

/* The G query heads of one kv head (query rows q_row .. q_row + G - 1 of (.., D)) against L keys of the cache
 * (rows kv_base + slots[n] of (.., D), or kv_base + n when slots is NULL), written to out rows q_row.. .
 * Fixed loop order: the result depends only on these inputs. 0, or 1 when out of memory. */
static int attend_group(int bf16, const void *q, const void *k, const void *v, void *out, int64_t q_row,
                        int64_t kv_base, const int64_t *slots, int64_t L, int64_t G, int64_t D, float scale,
                        float *part) {
#ifdef HAVE_AVX2_PATH
    if (D % 64 == 0)
        return attend_group_d64(bf16, q, k, v, out, q_row, kv_base, slots, L, G, D, scale, part);
    if (D % 8 == 0 && D <= 256 && G <= 8)
        return attend_group_avx2(bf16, q, k, v, out, q_row, kv_base, slots, L, G, D, scale);
#endif
    float *s = malloc((size_t)(G * L + G * D + D) * 4);
    if (!s) return 1;
    float *qf = s + G * L, *kv = qf + G * D;
    for (int64_t g = 0; g < G; g++) load_row(bf16, q, q_row + g, D, qf + g * D);
    for (int64_t j = 0; j < L; j++) { /* scores: every head of the group against key j */
        load_row(bf16, k, kv_base + (slots ? slots[j] : j), D, kv);
        for (int64_t g = 0; g < G; g++) {
            const float *qg = qf + g * D;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < D; d++) acc += qg[d] * kv[d];
            s[g * L + j] = acc * scale;
        }
    }
    for (int64_t g = 0; g < G; g++) { /* softmax in fp32 */
        float *sg = s + g * L, m = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < L; j++) m = sg[j] > m ? sg[j] : m;
        for (int64_t j = 0; j < L; j++) {
            sg[j] = expf(sg[j] - m);
            sum += sg[j];
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < L; j++) sg[j] *= inv;
    }
    float acc[256 * 8];
    float *o = G <= 8 ? acc : malloc((size_t)(G * D) * 4);
    if (!o) {
        free(s);
        return 1;
    }
    memset(o, 0, (size_t)(G * D) * 4);
    for (int64_t j = 0; j < L; j++) { /* out = P V */
        load_row(bf16, v, kv_base + (slots ? slots[j] : j), D, kv);
        for (int64_t g = 0; g < G; g++) {
            float *og = o + g * D;
            const float p = s[g * L + j];
#pragma omp simd
            for (int64_t d = 0; d < D; d++) og[d] += p * kv[d];
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const int64_t at = (q_row + g) * D;
        if (bf16)
            for (int64_t d = 0; d < D; d++) ((uint16_t *)out)[at + d] = to_bf16(o[g * D + d]);
        else
            memcpy((float *)out + at, o + g * D, (size_t)D * 4);
    }
    if (o != acc) free(o);
    free(s);
    return 0;
}

/* Long key lists are split into chunks of KEY_CHUNK keys (by index in the query's list of visible keys), attended
 * to as separate jobs and combined (each chunk's output rescaled by exp(its max - the overall max), in chunk order):
 * one decode query has only Hkv (sequence, kv head) jobs, 3 for the default model, which leaves a thread idle on
 * 2 cores and serializes long contexts. The split depends only on the number of keys (not on threads, T or the
 * batch), so a query's result still depends only on its own keys; up to KEY_CHUNK keys nothing changes. Only the
 * register-blocked path (head dims that are multiples of 64) splits. */
#define KEY_CHUNK 256

static int64_t chunks_of(int64_t L, int64_t D) {
#ifdef HAVE_AVX2_PATH
    if (D % 64 == 0 && L > KEY_CHUNK) return (L + KEY_CHUNK - 1) / KEY_CHUNK;
#endif
    (void)D;
    return 1;
}

/* out rows q_row.. (G heads) from n chunks' partials (G D + 2 G floats each) */
static void combine(int bf16, void *out, int64_t q_row, const float *parts, int64_t n, int64_t G, int64_t D) {
    const int64_t stride = G * D + 2 * G;
    float acc[256];
    for (int64_t g = 0; g < G; g++) {
        float mx = -INFINITY;
        for (int64_t c = 0; c < n; c++) mx = fmaxf(mx, parts[c * stride + G * D + g]);
        float den = 0.f;
        for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
        for (int64_t c = 0; c < n; c++) {
            const float *pc = parts + c * stride;
            const float w = expf(pc[G * D + g] - mx);
            den += w * pc[G * D + G + g];
            for (int64_t d = 0; d < D; d++) acc[d] += w * pc[g * D + d];
        }
        const float inv = 1.f / den;
        for (int64_t d = 0; d < D; d++) {
            const float y = acc[d] * inv;
            if (bf16)
                ((uint16_t *)out)[(q_row + g) * D + d] = to_bf16(y);
            else
                ((float *)out)[(q_row + g) * D + d] = y;
        }
    }
}

/* One (query, kv head) job: its G query heads (rows q_row..) against L keys (kv_base + slots[n], or kv_base + n),
 * one or several chunks. */
typedef struct {
    int64_t q_row, kv_base, L, chunks, first; /* first: index of its first work item */
    const int64_t *slots;
} job_t;

/* Every job's chunks as work items over the team (dynamic: items differ in length), then the combines. Called
 * inside a parallel region by every thread; parts has room for every item of a multi-chunk job. */
static void run_jobs(int bf16, const void *q, const void *k, const void *v, void *out, const job_t *jobs,
                     int64_t n_jobs, int64_t items, const int64_t *item_job, float *parts, int64_t G, int64_t D,
                     float scale, int *failed) {
    const int64_t stride = G * D + 2 * G;
#pragma omp for schedule(dynamic) nowait
    for (int64_t it = 0; it < items; it++) {
        const job_t *j = jobs + item_job[it];
        const int64_t c = it - j->first, at = c * KEY_CHUNK;
        const int64_t L = j->L - at < KEY_CHUNK || j->chunks == 1 ? j->L - at : KEY_CHUNK;
        if (L <= 0 || attend_group(bf16, q, k, v, out, j->q_row, j->slots ? j->kv_base : j->kv_base + at,
                                   j->slots ? j->slots + at : NULL, L, G, D, scale,
                                   j->chunks > 1 ? parts + it * stride : NULL)) {
#pragma omp atomic write
            *failed = 1;
        }
    }
    if (!parts) return; /* nothing was split */
#pragma omp barrier
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < n_jobs; n++)
        if (jobs[n].chunks > 1) combine(bf16, out, jobs[n].q_row, parts + jobs[n].first * stride, jobs[n].chunks, G, D);
}

/* jobs[].chunks and .first from .L; the item -> job map; parts for multi-chunk jobs. Returns the item count, or -1
 * when out of memory (*item_job, *parts: free them). */
static int64_t plan(job_t *jobs, int64_t n_jobs, int64_t G, int64_t D, int64_t **item_job, float **parts) {
    int64_t items = 0, split = 0;
    for (int64_t n = 0; n < n_jobs; n++) {
        jobs[n].chunks = chunks_of(jobs[n].L, D);
        jobs[n].first = items;
        items += jobs[n].chunks;
        split |= jobs[n].chunks > 1;
    }
    *item_job = malloc((size_t)items * 8);
    *parts = split ? malloc((size_t)items * (size_t)(G * D + 2 * G) * 4) : NULL;
    if (!*item_job || (split && !*parts)) return -1;
    for (int64_t n = 0; n < n_jobs; n++)
        for (int64_t c = 0; c < jobs[n].chunks; c++) (*item_job)[jobs[n].first + c] = n;
    return items;
}

/* plan() and run_jobs() over a team of at most `threads`: 0, or 2 when out of memory or a job failed */
static int run_all(int bf16, const void *q, const void *k, const void *v, void *out, job_t *jobs, int64_t n_jobs,
                   int64_t G, int64_t D, float scale, int threads) {
    int64_t *item_job = NULL;
    float *parts = NULL;
    const int64_t items = plan(jobs, n_jobs, G, D, &item_job, &parts);
    int failed = items < 0;
    if (threads < 1) threads = 1;
    if (threads > items) threads = (int)(items > 0 ? items : 1);
    if (!failed) {
#pragma omp parallel num_threads(threads)
        run_jobs(bf16, q, k, v, out, jobs, n_jobs, items, item_job, parts, G, D, scale, &failed);
    }
    free(item_job);
    free(parts);
    return failed ? 2 : 0;
}

int edgellm_decode_attention(int bf16, const void *q, const void *k, const void *v, void *out,
                             const int64_t *rows, const int64_t *lo, const int64_t *hi,
                             int64_t B, int64_t H, int64_t Hkv, int64_t S, int64_t D, float scale, int threads) {
    if (H % Hkv || D > 256 || D < 1) return 1;
    for (int64_t b = 0; b < B; b++)
        if (lo[b] < 0 || hi[b] < lo[b] || hi[b] >= S) return 1;
    const int64_t G = H / Hkv, n_jobs = B * Hkv;
    job_t *jobs = malloc((size_t)n_jobs * sizeof(job_t));
    if (!jobs) return 2;
    for (int64_t n = 0; n < n_jobs; n++) {
        const int64_t b = n / Hkv, hk = n % Hkv;
        /* key lo[b] of (row, kv head) is row (rows[b] * Hkv + hk) * S + lo[b] of (P*Hkv*S, D) */
        jobs[n] = (job_t){b * H + hk * G, (rows[b] * Hkv + hk) * S + lo[b], hi[b] - lo[b] + 1, 1, 0, NULL};
    }
    const int rc = run_all(bf16, q, k, v, out, jobs, n_jobs, G, D, scale, threads);
    free(jobs);
    return rc;
}

int edgellm_cache_attention(int bf16, const void *q, const void *k, const void *v, void *out,
                            const int64_t *slot_pos, const int64_t *qpos, int64_t window, int64_t B, int64_t T,
                            int64_t H, int64_t Hkv, int64_t S, int64_t D, float scale, int threads) {
    if (H % Hkv || D > 256 || D < 1 || S < 1) return 1;
    const int64_t G = H / Hkv, n_jobs = B * T * Hkv;
    int failed = 0;
#ifdef _OPENMP
    if (threads < 1) threads = omp_get_max_threads(); /* torch.set_num_threads sets this (same libgomp) */
#endif
    if (threads < 1) threads = 1;
    int64_t *slots = malloc((size_t)(T * S + T) * 8); /* per query t: the slots it sees, in slot order; their count */
    job_t *jobs = malloc((size_t)n_jobs * sizeof(job_t));
    if (!slots || !jobs) {
        free(slots);
        free(jobs);
        return 2;
    }
    int64_t *count = slots + T * S;
    for (int64_t t = 0; t < T; t++) { /* once per query, shared by every (sequence, kv head) */
        const int64_t p = qpos[t];
        int64_t L = 0;
        for (int64_t j = 0; j < S; j++) {
            const int64_t sp = slot_pos[j];
            if (sp >= 0 && sp <= p && (window <= 0 || sp > p - window)) slots[t * S + L++] = j;
        }
        count[t] = L;
        if (L == 0) failed = 1;
    }
    for (int64_t n = 0; n < n_jobs; n++) {
        const int64_t b = n / (T * Hkv), t = n / Hkv % T, hk = n % Hkv;
        jobs[n] = (job_t){(b * T + t) * H + hk * G, (b * Hkv + hk) * S, count[t], 1, 0, slots + t * S};
    }
    const int rc = failed ? 2 : run_all(bf16, q, k, v, out, jobs, n_jobs, G, D, scale, threads);
    free(jobs);
    free(slots);
    return rc;
}
