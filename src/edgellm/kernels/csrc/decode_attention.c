/* One decode step of attention for a batch of sequences held in rows of a pooled KV cache (continuous
 * batching in `edgellm serve`). Sequence b is cache row rows[b]; its query attends to keys lo[b]..hi[b].
 *
 * Why a kernel: the torch path is one attention call per sequence per layer (each repacks its keys), ~8x the
 * launches of everything else in the step. Here one call per layer does every (sequence, kv head) pair, reading
 * the cache in place. Each sequence's arithmetic depends only on its own keys (fixed loop order, no work
 * sharing inside a pair), so a batched answer equals the same sequence decoded alone, bit for bit.
 *
 * Plain C: the compiler vectorizes the head-dim loops (`omp simd`, a fixed reduction order for a given build).
 * Layouts: q and out (B, H, D); cache k, v (P, Hkv, S, D); all contiguous, fp32 (dtype 0) or bf16 (dtype 1).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

int edgellm_decode_attention(int bf16, const void *q, const void *k, const void *v, void *out,
                             const int64_t *rows, const int64_t *lo, const int64_t *hi,
                             int64_t B, int64_t H, int64_t Hkv, int64_t S, int64_t D, float scale, int threads) {
    if (H % Hkv || D > 256 || D < 1) return 1;
    for (int64_t b = 0; b < B; b++)
        if (lo[b] < 0 || hi[b] < lo[b] || hi[b] >= S) return 1;
    const int64_t G = H / Hkv;
    int failed = 0;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t job = 0; job < B * Hkv; job++) {
        const int64_t b = job / Hkv, hk = job % Hkv, L = hi[b] - lo[b] + 1;
        const int64_t base = (rows[b] * Hkv + hk) * S + lo[b]; /* row index of key lo[b] in (P*Hkv*S, D) */
        float *s = malloc((size_t)(G * L + G * D + D) * 4);
        if (!s) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        float *qf = s + G * L, *kv = qf + G * D;
        for (int64_t g = 0; g < G; g++) load_row(bf16, q, b * H + hk * G + g, D, qf + g * D);
        for (int64_t j = 0; j < L; j++) { /* scores: every head of the group against key j */
            load_row(bf16, k, base + j, D, kv);
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
#pragma omp atomic write
            failed = 1;
            continue;
        }
        memset(o, 0, (size_t)(G * D) * 4);
        for (int64_t j = 0; j < L; j++) { /* out = P V */
            load_row(bf16, v, base + j, D, kv);
            for (int64_t g = 0; g < G; g++) {
                float *og = o + g * D;
                const float p = s[g * L + j];
#pragma omp simd
                for (int64_t d = 0; d < D; d++) og[d] += p * kv[d];
            }
        }
        for (int64_t g = 0; g < G; g++) {
            const int64_t at = (b * H + hk * G + g) * D;
            if (bf16)
                for (int64_t d = 0; d < D; d++) ((uint16_t *)out)[at + d] = to_bf16(o[g * D + d]);
            else
                memcpy((float *)out + at, o + g * D, (size_t)D * 4);
        }
        if (o != acc) free(o);
        free(s);
    }
    return failed ? 2 : 0;
}
