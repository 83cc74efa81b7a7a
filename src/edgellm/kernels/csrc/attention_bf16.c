/* Causal attention for bf16 prefill on CPUs with AVX512-BF16 (no AMX needed), head_dim 64.
 *
 * Built and loaded by edgellm/native.py like dequant_int4.c. Why C: at 512 tokens the torch path
 * (model.blocked_causal_attention: bmm, mask, softmax, bmm per block of queries) spends ~1.2-2 ms per layer
 * of the default model, most of it in small GEMMs with K = 64 or N = 64 and a softmax that rereads the
 * scores; torch's own SDPA kernel runs bf16 at fp32 speed on such CPUs (~4 ms). This is one pass per block
 * of query rows with `vdpbf16ps` dot products, 4 rows sharing each loaded key/value vector.
 *
 * Numerics: q.k in fp32 from bf16 inputs, times `scale`, masked (keys after the query's position), softmax
 * in fp32, probabilities rounded once to bf16, P.V accumulated in fp32 and rounded once to bf16. (The torch
 * path also rounds the scores to bf16 before the softmax, as HF's eager bf16 attention does; this keeps
 * them in fp32, so results differ from it within bf16 rounding.)
 *
 * q: element (b, h, t, d) at q[b*qsb + h*qsh + t*qst + d]; likewise k and v (b, kv head, position j, d) for
 * positions 0..start+T-1 (key j holds position j). out: (B, T, H, 64) contiguous. Query t is at position
 * start + t and sees keys 0..start+t. Heads h use kv head h / (H / Hkv).
 * Packed rows (several sequences sharing a prefix in one row, eval/engine.py): with lo (B, T) and shared (B,) given,
 * query t of row b also skips keys shared[b] <= j < lo[b, t] (the other sequences' tokens); NULL: plain causal.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define D 64
#define ROWS 4   /* query rows sharing each loaded key / value vector */
#define QPOS 16  /* query positions per work item (x G heads each) */

/* e^x on 16 lanes: x = n ln2 + r, degree-6 polynomial for e^r, times 2^n (inputs below -87 give ~0). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 first_n(int64_t n) { /* lanes 0..n-1 */
    return n >= 16 ? (__mmask16)0xFFFF : (n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1));
}

static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

typedef struct {
    const uint16_t *q;
    int64_t qsb, qsh, qst;
    const uint16_t *kp, *vp; /* packed keys / values per (b, kv head) */
    uint16_t *out;
    int64_t B, H, Hkv, T, start, Lk, Lv2; /* Lk: keys rounded to 32 (pairs of 16-key chunks); Lv2: to 2 */
    float scale;
    const int64_t *lo, *shared; /* packed rows, or NULL */
} job_t;

/* keys kb..kb+15 a query at position pos may see: causal, minus the hole [shared, lo) of a packed row */
static inline __mmask16 visible(int64_t kb, int64_t pos, int64_t lo, int64_t shared) {
    return first_n(pos - kb + 1) & (__mmask16)~(first_n(lo - kb) & (__mmask16)~first_n(shared - kb));
}

/* Query positions t0..t1-1 of (b, kv head hk), all G heads: scores, softmax, P.V. s/pb: per-thread scratch. */
static void work_item(const job_t *j, int64_t b, int64_t hk, int64_t t0, int64_t t1, float *s, uint16_t *pb) {
    const int64_t G = j->H / j->Hkv, rows = (t1 - t0) * G, Lk = j->Lk;
    const uint16_t *kp = j->kp + (b * j->Hkv + hk) * Lk * D, *vp = j->vp + (b * j->Hkv + hk) * j->Lv2 * D;
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        const int nr = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
        const uint16_t *qr[ROWS];
        int64_t pos[ROWS], lo[ROWS], shared = j->shared ? j->shared[b] : 0;
        for (int i = 0; i < ROWS; i++) {
            const int64_t r = r0 + (i < nr ? i : 0), t = t0 + r / G, h = hk * G + r % G;
            qr[i] = j->q + b * j->qsb + h * j->qsh + t * j->qst;
            pos[i] = j->start + t;
            lo[i] = j->lo ? j->lo[b * j->T + t] : 0;
        }
        const int64_t last = pos[nr - 1]; /* rows are ordered by position: the last sees the most keys */
        /* scores: 16 keys per vector, (d, d+1) pairs per vdpbf16ps; two 16-key chunks at a time, so each
         * broadcast query pair feeds two dot products (bound by those, not by the broadcasts) */
        for (int64_t c = 0; c * 16 <= last; c += 2) {
            __m512 acc0[ROWS], acc1[ROWS];
            for (int i = 0; i < ROWS; i++) acc0[i] = acc1[i] = _mm512_setzero_ps();
            const uint16_t *kc = kp + c * 16 * D;
            for (int p = 0; p < D / 2; p++) {
                const __m512bh k0 = (__m512bh)_mm512_load_si512(kc + p * 32);
                const __m512bh k1 = (__m512bh)_mm512_load_si512(kc + 16 * D + p * 32);
                for (int i = 0; i < ROWS; i++) {
                    int32_t pair;
                    memcpy(&pair, qr[i] + 2 * p, 4);
                    const __m512bh qp = (__m512bh)_mm512_set1_epi32(pair);
                    acc0[i] = _mm512_dpbf16_ps(acc0[i], k0, qp);
                    acc1[i] = _mm512_dpbf16_ps(acc1[i], k1, qp);
                }
            }
            /* constant trip counts (ROWS, not nr) so the accumulators stay in registers, not a stack array */
#pragma GCC unroll 8
            for (int i = 0; i < ROWS; i++) {
                if (i >= nr) continue;
                float *si = s + (r0 + i) * Lk + c * 16;
                _mm512_store_ps(si, _mm512_mask_blend_ps(visible(c * 16, pos[i], lo[i], shared), _mm512_set1_ps(-INFINITY),
                                                         _mm512_mul_ps(acc0[i], _mm512_set1_ps(j->scale))));
                _mm512_store_ps(si + 16, _mm512_mask_blend_ps(visible(c * 16 + 16, pos[i], lo[i], shared),
                                                              _mm512_set1_ps(-INFINITY),
                                                              _mm512_mul_ps(acc1[i], _mm512_set1_ps(j->scale))));
            }
        }
        /* softmax per row over its keys 0..pos; probabilities to bf16, zero past pos */
        for (int i = 0; i < nr; i++) {
            float *sr = s + (r0 + i) * Lk;
            uint16_t *pr = pb + (r0 + i) * Lk;
            const int64_t n = pos[i] + 1, nvec = (n + 15) / 16;
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int64_t c = 0; c < nvec; c++) mx = _mm512_max_ps(mx, _mm512_load_ps(sr + c * 16));
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            __m512 sum = _mm512_setzero_ps();
            for (int64_t c = 0; c < nvec; c++) {
                const __m512 e = _mm512_maskz_mov_ps(first_n(n - c * 16), exp16(_mm512_sub_ps(_mm512_load_ps(sr + c * 16), m)));
                _mm512_store_ps(sr + c * 16, e);
                sum = _mm512_add_ps(sum, e);
            }
            const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
            for (int64_t c = 0; c < nvec; c++)
                _mm256_store_si256((__m256i *)(pr + c * 16),
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(sr + c * 16), inv)));
            memset(pr + nvec * 16, 0, (size_t)(Lk - nvec * 16) * 2);
        }
        /* out = P V: pairs of keys per vdpbf16ps, 4 chunks of 16 dims */
        __m512 o[ROWS][D / 16];
        for (int i = 0; i < ROWS; i++)
            for (int c = 0; c < D / 16; c++) o[i][c] = _mm512_setzero_ps();
        const uint16_t *pr[ROWS];
        for (int i = 0; i < ROWS; i++) pr[i] = pb + (r0 + (i < nr ? i : 0)) * Lk;
        for (int64_t jp = 0; 2 * jp <= last; jp++) {
            const uint16_t *vj = vp + jp * 2 * D;
            __m512bh vv[D / 16];
            for (int c = 0; c < D / 16; c++) vv[c] = (__m512bh)_mm512_load_si512(vj + 32 * c);
            for (int i = 0; i < ROWS; i++) {
                int32_t pair;
                memcpy(&pair, pr[i] + 2 * jp, 4);
                const __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
                for (int c = 0; c < D / 16; c++) o[i][c] = _mm512_dpbf16_ps(o[i][c], vv[c], pp);
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < ROWS; i++) {
            if (i >= nr) continue;
            const int64_t r = r0 + i, t = t0 + r / G, h = hk * G + r % G;
            uint16_t *op = j->out + ((b * j->T + t) * j->H + h) * D;
            for (int c = 0; c < D / 16; c++)
                _mm256_storeu_si256((__m256i *)(op + 16 * c), (__m256i)_mm512_cvtneps_pbh(o[i][c]));
        }
    }
}

int edgellm_attention_bf16(const uint16_t *q, int64_t qsb, int64_t qsh, int64_t qst,
                           const uint16_t *k, int64_t ksb, int64_t ksh, int64_t kst,
                           const uint16_t *v, int64_t vsb, int64_t vsh, int64_t vst,
                           uint16_t *out, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t start,
                           int64_t head_dim, float scale, const int64_t *lo, const int64_t *shared, int threads) {
    if (head_dim != D || H % Hkv || T < 1 || start < 0) return 1;
    const int64_t L = start + T, Lk = (L + 31) / 32 * 32, Lv2 = (L + 1) / 2 * 2, G = H / Hkv;
    /* keys as [16-key chunk][d pair][16 keys][2]; values as [key pair][d][2] (zero past L) */
    uint16_t *kp = alloc64((size_t)(B * Hkv * Lk * D) * 2), *vp = alloc64((size_t)(B * Hkv * Lv2 * D) * 2);
    if (!kp || !vp) { free(kp); free(vp); return 2; }
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) collapse(2)
    for (int64_t b = 0; b < B; b++)
        for (int64_t hk = 0; hk < Hkv; hk++) {
            const uint16_t *kk = k + b * ksb + hk * ksh, *vv = v + b * vsb + hk * vsh;
            uint16_t *kd = kp + (b * Hkv + hk) * Lk * D, *vd = vp + (b * Hkv + hk) * Lv2 * D;
            for (int64_t jj = 0; jj < Lk; jj++)
                for (int64_t p = 0; p < D / 2; p++) {
                    uint16_t *o = kd + ((jj / 16) * (D / 2) + p) * 32 + (jj % 16) * 2;
                    o[0] = jj < L ? kk[jj * kst + 2 * p] : 0;
                    o[1] = jj < L ? kk[jj * kst + 2 * p + 1] : 0;
                }
            for (int64_t jj = 0; jj < Lv2; jj++)
                for (int64_t d = 0; d < D; d++) vd[(jj / 2) * 2 * D + d * 2 + (jj % 2)] = jj < L ? vv[jj * vst + d] : 0;
        }
    const job_t job = {q, qsb, qsh, qst, kp, vp, out, B, H, Hkv, T, start, Lk, Lv2, scale, lo, shared};
    const int64_t blocks = (T + QPOS - 1) / QPOS;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *s = alloc64((size_t)(QPOS * G) * Lk * 4);
        uint16_t *pb = alloc64((size_t)(QPOS * G) * Lk * 2);
        if (!s || !pb) {
#pragma omp atomic write
            failed = 1;
        }
        /* later blocks see more keys: hand them out first */
#pragma omp for collapse(2) schedule(dynamic)
        for (int64_t bh = 0; bh < B * Hkv; bh++)
            for (int64_t blk = blocks - 1; blk >= 0; blk--)
                if (s && pb)
                    work_item(&job, bh / Hkv, bh % Hkv, blk * QPOS, blk * QPOS + QPOS < T ? blk * QPOS + QPOS : T, s, pb);
        free(s);
        free(pb);
    }
    free(kp);
    free(vp);
    return failed ? 2 : 0;
}

int edgellm_attention_available(void) { return 1; }

#else
/* Built without AVX512-BF16: callers keep the torch path. */
int edgellm_attention_bf16(void) { return 1; }
int edgellm_attention_available(void) { return 0; }
#endif
