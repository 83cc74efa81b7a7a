/* Causal attention for fp32 prefill with AVX2 + FMA (every x86-64 laptop since ~2013), head_dim 64.
 *
 * The fp32 sibling of attention_bf16.c, for CPUs without native bf16 where `--dtype auto` computes in fp32.
 * Why C: torch's SDPA (its CPU flash-attention kernel) takes ~5 ms per layer of the default model at 512
 * tokens on 2 cores with AVX2, ~15 % of a whole prefill. This is one pass per block of query rows: scores
 * for 4 query rows per loaded key vector (8 keys per vector), an fp32 softmax, then P.V with 4 rows per loaded
 * value vector. Built by kernels/native.py for the x86-64-v3 baseline (AVX2, FMA).
 *
 * Numerics: everything in fp32; e^x by a degree-6 polynomial (relative error ~1e-7), so results match torch's
 * SDPA to ~1e-6, not bit for bit.
 *
 * q: element (b, h, t, d) at q[b*qsb + h*qsh + t*qst + d]; likewise k and v (b, kv head, position j, d) for
 * positions 0..start+T-1 (key j holds position j). out: (B, T, H, 64) contiguous. Query t is at position
 * start + t and sees keys 0..start+t. Heads h use kv head h / (H / Hkv). Packed rows: as attention_bf16.c (with
 * lo (B, T) and shared (B,), query t of row b also skips keys shared[b] <= j < lo[b, t]).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define D 64
#define ROWS 6   /* query rows sharing each loaded key / value vector (12 accumulators of the 16 registers) */
#define QPOS 16  /* query positions per work item (x G heads each) */

/* e^x on 8 lanes: x = n ln2 + r, degree-6 polynomial for e^r, times 2^n built in the exponent bits. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
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
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e)); /* n >= -126 here: 2^n is a normal float */
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float hsum8(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

/* Lanes 0..n-1 all ones (a blend mask). */
static inline __m256 first_n(int64_t n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? (n < 0 ? 0 : n) : 8)), idx));
}

static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

typedef struct {
    const float *q;
    int64_t qsb, qsh, qst;
    const float *kp, *vp; /* packed keys per (b, kv head); values copied contiguous (L, 64) */
    float *out;
    int64_t B, H, Hkv, T, start, Lk, L;
    float scale;
    const int64_t *lo, *shared; /* packed rows, or NULL */
} job_t;

/* keys kb..kb+7 a query at position pos may see: causal, minus the hole [shared, lo) of a packed row */
static inline __m256 visible(int64_t kb, int64_t pos, int64_t lo, int64_t shared) {
    return _mm256_andnot_ps(_mm256_andnot_ps(first_n(shared - kb), first_n(lo - kb)), first_n(pos - kb + 1));
}

/* Query positions t0..t1-1 of (b, kv head hk), all G heads. s: per-thread (rows, Lk) scratch. */
static void work_item(const job_t *j, int64_t b, int64_t hk, int64_t t0, int64_t t1, float *s) {
    const int64_t G = j->H / j->Hkv, rows = (t1 - t0) * G, Lk = j->Lk;
    const float *kp = j->kp + (b * j->Hkv + hk) * Lk * D, *vp = j->vp + (b * j->Hkv + hk) * j->L * D;
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        const int nr = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
        const float *qr[ROWS];
        int64_t pos[ROWS], lo[ROWS], shared = j->shared ? j->shared[b] : 0;
        for (int i = 0; i < ROWS; i++) {
            const int64_t r = r0 + (i < nr ? i : 0), t = t0 + r / G, h = hk * G + r % G;
            qr[i] = j->q + b * j->qsb + h * j->qsh + t * j->qst;
            pos[i] = j->start + t;
            lo[i] = j->lo ? j->lo[b * j->T + t] : 0;
        }
        const int64_t last = pos[nr - 1]; /* rows are ordered by position: the last sees the most keys */
        /* scores: keys packed [8-key chunk][d][8 keys]; two chunks at a time, so each broadcast query element
         * feeds two FMAs (16 keys) and the loop is bound by FMAs rather than loads */
        for (int64_t c = 0; c * 8 <= last; c += 2) {
            __m256 acc0[ROWS], acc1[ROWS];
            for (int i = 0; i < ROWS; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
            const float *kc = kp + c * 8 * D;
            for (int d = 0; d < D; d++) {
                const __m256 k0 = _mm256_load_ps(kc + d * 8), k1 = _mm256_load_ps(kc + 8 * D + d * 8);
                for (int i = 0; i < ROWS; i++) {
                    const __m256 qd = _mm256_broadcast_ss(qr[i] + d);
                    acc0[i] = _mm256_fmadd_ps(k0, qd, acc0[i]);
                    acc1[i] = _mm256_fmadd_ps(k1, qd, acc1[i]);
                }
            }
            /* constant trip counts (ROWS, not nr) so the accumulators stay in registers, not a stack array */
#pragma GCC unroll 8
            for (int i = 0; i < ROWS; i++) {
                if (i >= nr) continue;
                float *si = s + (r0 + i) * Lk + c * 8;
                _mm256_store_ps(si, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_mul_ps(acc0[i], _mm256_set1_ps(j->scale)),
                                                     visible(c * 8, pos[i], lo[i], shared)));
                _mm256_store_ps(si + 8, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_mul_ps(acc1[i], _mm256_set1_ps(j->scale)),
                                                         visible(c * 8 + 8, pos[i], lo[i], shared)));
            }
        }
        /* softmax per row over its keys 0..pos, probabilities left in s (zero past pos up to the last row's) */
        for (int i = 0; i < nr; i++) {
            float *sr = s + (r0 + i) * Lk;
            const int64_t n = pos[i] + 1, nvec = (n + 7) / 8, lvec = (last + 8) / 8;
            __m256 mx = _mm256_set1_ps(-INFINITY);
            for (int64_t c = 0; c < nvec; c++) mx = _mm256_max_ps(mx, _mm256_load_ps(sr + c * 8));
            const __m256 m = _mm256_set1_ps(hmax8(mx));
            __m256 sum = _mm256_setzero_ps();
            for (int64_t c = 0; c < nvec; c++) {
                const __m256 e = _mm256_and_ps(first_n(n - c * 8), exp8(_mm256_sub_ps(_mm256_load_ps(sr + c * 8), m)));
                _mm256_store_ps(sr + c * 8, e);
                sum = _mm256_add_ps(sum, e);
            }
            const __m256 inv = _mm256_set1_ps(1.0f / hsum8(sum));
            for (int64_t c = 0; c < nvec; c++) _mm256_store_ps(sr + c * 8, _mm256_mul_ps(_mm256_load_ps(sr + c * 8), inv));
            for (int64_t c = nvec; c < lvec; c++) _mm256_store_ps(sr + c * 8, _mm256_setzero_ps());
        }
        /* out = P V, 16 dims at a time: 4 rows x 2 vectors of accumulators, each loaded value serves 4 rows */
        for (int h0 = 0; h0 < D; h0 += 16) {
            __m256 o[ROWS][2];
            for (int i = 0; i < ROWS; i++) o[i][0] = o[i][1] = _mm256_setzero_ps();
            const float *pr[ROWS];
            for (int i = 0; i < ROWS; i++) pr[i] = s + (r0 + (i < nr ? i : 0)) * Lk;
            for (int64_t jj = 0; jj <= last; jj++) {
                const __m256 v0 = _mm256_loadu_ps(vp + jj * D + h0), v1 = _mm256_loadu_ps(vp + jj * D + h0 + 8);
                for (int i = 0; i < ROWS; i++) {
                    const __m256 p = _mm256_broadcast_ss(pr[i] + jj);
                    o[i][0] = _mm256_fmadd_ps(v0, p, o[i][0]);
                    o[i][1] = _mm256_fmadd_ps(v1, p, o[i][1]);
                }
            }
#pragma GCC unroll 8
            for (int i = 0; i < ROWS; i++) {
                if (i >= nr) continue;
                const int64_t r = r0 + i, t = t0 + r / G, h = hk * G + r % G;
                float *op = j->out + ((b * j->T + t) * j->H + h) * D + h0;
                _mm256_storeu_ps(op, o[i][0]);
                _mm256_storeu_ps(op + 8, o[i][1]);
            }
        }
    }
}

int edgellm_attention_f32(const float *q, int64_t qsb, int64_t qsh, int64_t qst,
                          const float *k, int64_t ksb, int64_t ksh, int64_t kst,
                          const float *v, int64_t vsb, int64_t vsh, int64_t vst,
                          float *out, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t start,
                          int64_t head_dim, float scale, const int64_t *lo, const int64_t *shared, int threads) {
    if (head_dim != D || H % Hkv || T < 1 || start < 0) return 1;
    const int64_t L = start + T, Lk = (L + 15) / 16 * 16, G = H / Hkv;
    /* keys as [8-key chunk][d][8 keys] (zero past L, to a whole pair of chunks); values contiguous (L, d) */
    float *kp = alloc64((size_t)(B * Hkv * Lk * D) * 4), *vp = alloc64((size_t)(B * Hkv * L * D) * 4);
    if (!kp || !vp) { free(kp); free(vp); return 2; }
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) collapse(2)
    for (int64_t b = 0; b < B; b++)
        for (int64_t hk = 0; hk < Hkv; hk++) {
            const float *kk = k + b * ksb + hk * ksh, *vv = v + b * vsb + hk * vsh;
            float *kd = kp + (b * Hkv + hk) * Lk * D, *vd = vp + (b * Hkv + hk) * L * D;
            for (int64_t jj = 0; jj < Lk; jj++)
                for (int64_t d = 0; d < D; d++) kd[(jj / 8) * 8 * D + d * 8 + jj % 8] = jj < L ? kk[jj * kst + d] : 0.0f;
            for (int64_t jj = 0; jj < L; jj++) memcpy(vd + jj * D, vv + jj * vst, D * sizeof(float));
        }
    const job_t job = {q, qsb, qsh, qst, kp, vp, out, B, H, Hkv, T, start, Lk, L, scale, lo, shared};
    const int64_t blocks = (T + QPOS - 1) / QPOS;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *s = alloc64((size_t)(QPOS * G) * Lk * 4);
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
        /* later blocks see more keys: hand them out first */
#pragma omp for collapse(2) schedule(dynamic)
        for (int64_t bh = 0; bh < B * Hkv; bh++)
            for (int64_t blk = blocks - 1; blk >= 0; blk--)
                if (s) work_item(&job, bh / Hkv, bh % Hkv, blk * QPOS, blk * QPOS + QPOS < T ? blk * QPOS + QPOS : T, s);
        free(s);
    }
    free(kp);
    free(vp);
    return failed ? 2 : 0;
}

int edgellm_attention_available(void) { return 1; }
