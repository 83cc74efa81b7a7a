/* The pointwise parts of a prefill layer in one pass each: RMSNorm, SiLU(gate) * up, and RoPE.
 *
 * Why a kernel: in eager torch each is 4-7 separate passes over the activations (casts, pow, mean, rsqrt,
 * multiplies; silu then mul), ~10 % of a 512-token prefill of the default model once the GEMMs are fast.
 * Here each row is read once and written once. Rounding follows torch's eager code step by step, so the result
 * equals it except in the last bit of an fp32 sum (our summation order) or of exp (our polynomial, ~1 ulp):
 *   rmsnorm: y = w * bf16(x * rsqrt(mean(x^2) + eps))   (x^2 and the mean in fp32, as HF's LlamaRMSNorm)
 *   silu_mul: out = bf16(bf16(g / (1 + exp(-g))) * u)   (fp32: no rounding steps)
 *   rope: x = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))   (model.apply_rope's three ops; bit-identical,
 *         fp32 too: built with -ffp-contract=off, so no product is fused into the sum)
 * Rows are independent (fixed order inside a row), so a row's result never depends on the others.
 *
 * Plain C that the compiler vectorizes (`omp simd`); layouts: x, out (rows, C); gu (rows, 2 I) = [gate | up],
 * out (rows, I); all contiguous, fp32 (bf16 = 0) or bf16 (bf16 = 1).
 */
#include <math.h>
#include <stdint.h>
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

static inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

/* exp(x) for x in [-87, 88] (callers clamp): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 Taylor-like
 * minimax polynomial (Cephes expf): within ~1 ulp of the correctly rounded value. Branch-free so it vectorizes. */
static inline float exp_approx(float x) {
    const float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, 4);
    bits += (int32_t)n << 23;
    memcpy(&p, &bits, 4);
    return p;
}

static inline float silu(float g) { /* exp(-g) overflows to inf past 88, as torch's does: silu(-500) = -0 */
    const float a = -g < -87.f ? -87.f : (-g > 88.f ? 88.f : -g);
    const float e = -g > 88.f ? INFINITY : exp_approx(a);
    return g / (1.f + e);
}

void edgellm_rmsnorm(int bf16, const void *x, const void *w, void *out, int64_t rows, int64_t C, float eps,
                     int threads) {
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float ss = 0.f;
        if (bf16) {
            const uint16_t *xr = (const uint16_t *)x + r * C, *wr = (const uint16_t *)w;
            uint16_t *o = (uint16_t *)out + r * C;
#pragma omp simd reduction(+ : ss)
            for (int64_t c = 0; c < C; c++) ss += from_bf16(xr[c]) * from_bf16(xr[c]);
            const float inv = 1.f / sqrtf(ss / (float)C + eps);
#pragma omp simd
            for (int64_t c = 0; c < C; c++) o[c] = to_bf16(from_bf16(wr[c]) * round_bf16(from_bf16(xr[c]) * inv));
        } else {
            const float *xr = (const float *)x + r * C, *wr = (const float *)w;
            float *o = (float *)out + r * C;
#pragma omp simd reduction(+ : ss)
            for (int64_t c = 0; c < C; c++) ss += xr[c] * xr[c];
            const float inv = 1.f / sqrtf(ss / (float)C + eps);
#pragma omp simd
            for (int64_t c = 0; c < C; c++) o[c] = wr[c] * (xr[c] * inv);
        }
    }
}

void edgellm_silu_mul(int bf16, const void *gu, void *out, int64_t rows, int64_t I, int threads) {
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (bf16) {
            const uint16_t *g = (const uint16_t *)gu + r * 2 * I, *u = g + I;
            uint16_t *o = (uint16_t *)out + r * I;
#pragma omp simd
            for (int64_t i = 0; i < I; i++) o[i] = to_bf16(round_bf16(silu(from_bf16(g[i]))) * from_bf16(u[i]));
        } else {
            const float *g = (const float *)gu + r * 2 * I, *u = g + I;
            float *o = (float *)out + r * I;
#pragma omp simd
            for (int64_t i = 0; i < I; i++) o[i] = silu(g[i]) * u[i];
        }
    }
}

/* RoPE in place on the q and k heads of a fused projection (model.apply_rope, HF's half split): row r = b T + t
 * holds `heads` heads of D values at x + r * stride (the q heads, then the k heads: v follows, untouched);
 * cos, sin (T, D) in x's dtype, sin carrying rotate_half's sign ([-sin, sin]), row r % T for row r (T = rows: a
 * table row per token, for packed rows). Each head's halves are read before either is written, so in place is
 * safe. */
void edgellm_rope(int bf16, void *x, int64_t rows, int64_t T, int64_t heads, int64_t stride, int64_t D,
                  const void *cos, const void *sin, int threads) {
    const int64_t h = D / 2;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = r % T;
        for (int64_t hd = 0; hd < heads; hd++) {
            if (bf16) {
                uint16_t *x1 = (uint16_t *)x + r * stride + hd * D, *x2 = x1 + h;
                const uint16_t *c = (const uint16_t *)cos + t * D, *s = (const uint16_t *)sin + t * D;
#pragma omp simd
                for (int64_t d = 0; d < h; d++) {
                    const float a = from_bf16(x1[d]), b = from_bf16(x2[d]);
                    x1[d] = to_bf16(round_bf16(a * from_bf16(c[d])) + round_bf16(b * from_bf16(s[d])));
                    x2[d] = to_bf16(round_bf16(b * from_bf16(c[d + h])) + round_bf16(a * from_bf16(s[d + h])));
                }
            } else {
                float *x1 = (float *)x + r * stride + hd * D, *x2 = x1 + h;
                const float *c = (const float *)cos + t * D, *s = (const float *)sin + t * D;
#pragma omp simd
                for (int64_t d = 0; d < h; d++) {
                    const float a = x1[d], b = x2[d];
                    x1[d] = a * c[d] + b * s[d];
                    x2[d] = b * c[d + h] + a * s[d + h];
                }
            }
        }
    }
}

/* Backward passes for training (kernels/train_ops.py), fp32 inside a row, one rounding at the end:
 *   rmsnorm_backward: dx = inv * g - x * inv^3 * sum(g * x) / C, g = gy * w, inv = 1 / sqrt(mean(x^2) + eps)
 *                     (the weight is frozen: no dw);
 *   silu_mul_backward: d gate = ga * u * s * (1 + gate * (1 - s)), d up = ga * silu(gate), s = sigmoid(gate),
 *                      written as dgu (rows, 2 I) = [d gate | d up].
 * Torch's autograd rounds its bf16 intermediates (gy * w, ga * u, ...) on the way; these do not, so they differ
 * from it by about a bf16 rounding step in bf16 and by float noise in fp32. */
void edgellm_rmsnorm_backward(int bf16, const void *x, const void *w, const void *gy, void *dx, int64_t rows,
                              int64_t C, float eps, int threads) {
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float ss = 0.f, dot = 0.f;
        if (bf16) {
            const uint16_t *xr = (const uint16_t *)x + r * C, *wr = (const uint16_t *)w, *gr = (const uint16_t *)gy + r * C;
            uint16_t *o = (uint16_t *)dx + r * C;
#pragma omp simd reduction(+ : ss, dot)
            for (int64_t c = 0; c < C; c++) {
                const float xc = from_bf16(xr[c]);
                ss += xc * xc;
                dot += from_bf16(gr[c]) * from_bf16(wr[c]) * xc;
            }
            const float inv = 1.f / sqrtf(ss / (float)C + eps), k = inv * inv * inv * dot / (float)C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++)
                o[c] = to_bf16(inv * from_bf16(gr[c]) * from_bf16(wr[c]) - from_bf16(xr[c]) * k);
        } else {
            const float *xr = (const float *)x + r * C, *wr = (const float *)w, *gr = (const float *)gy + r * C;
            float *o = (float *)dx + r * C;
#pragma omp simd reduction(+ : ss, dot)
            for (int64_t c = 0; c < C; c++) {
                ss += xr[c] * xr[c];
                dot += gr[c] * wr[c] * xr[c];
            }
            const float inv = 1.f / sqrtf(ss / (float)C + eps), k = inv * inv * inv * dot / (float)C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) o[c] = inv * gr[c] * wr[c] - xr[c] * k;
        }
    }
}

static inline float sigmoid(float g) { /* 1 / (1 + exp(-g)), exp clamped as silu's */
    const float a = -g < -87.f ? -87.f : (-g > 88.f ? 88.f : -g);
    const float e = -g > 88.f ? INFINITY : exp_approx(a);
    return 1.f / (1.f + e);
}

void edgellm_silu_mul_backward(int bf16, const void *gu, const void *ga, void *dgu, int64_t rows, int64_t I,
                               int threads) {
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (bf16) {
            const uint16_t *g = (const uint16_t *)gu + r * 2 * I, *u = g + I, *a = (const uint16_t *)ga + r * I;
            uint16_t *dg = (uint16_t *)dgu + r * 2 * I, *du = dg + I;
#pragma omp simd
            for (int64_t i = 0; i < I; i++) {
                const float gi = from_bf16(g[i]), s = sigmoid(gi), ai = from_bf16(a[i]);
                dg[i] = to_bf16(ai * from_bf16(u[i]) * s * (1.f + gi * (1.f - s)));
                du[i] = to_bf16(ai * gi * s);
            }
        } else {
            const float *g = (const float *)gu + r * 2 * I, *u = g + I, *a = (const float *)ga + r * I;
            float *dg = (float *)dgu + r * 2 * I, *du = dg + I;
#pragma omp simd
            for (int64_t i = 0; i < I; i++) {
                const float s = sigmoid(g[i]);
                dg[i] = a[i] * u[i] * s * (1.f + g[i] * (1.f - s));
                du[i] = a[i] * g[i] * s;
            }
        }
    }
}

/* Dropout with a mask that is a function of (seed, element index), so the backward recomputes it instead of
 * keeping it: element i is kept when hash(seed, i) >= threshold (threshold = round(p 2^32): P(drop) = p within
 * 2^-32) and then scaled by `scale` (1 / (1 - p)), rounded once. hash: Chris Wellons' lowbias32 of
 * i * golden ratio + seed (well mixed, vectorizes: 32-bit multiplies and shifts). out may be x (in place). */
static inline uint32_t mask_hash(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

void edgellm_dropout(int bf16, const void *x, void *out, int64_t n, uint32_t seed, uint32_t threshold, float scale,
                     int threads) {
    const int64_t chunk = 1 << 16, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
        if (bf16) {
            const uint16_t *xi = (const uint16_t *)x;
            uint16_t *o = (uint16_t *)out;
#pragma omp simd
            for (int64_t i = c * chunk; i < end; i++) {
                const float keep = mask_hash((uint32_t)i * 0x9E3779B9U + seed) >= threshold ? scale : 0.f;
                o[i] = to_bf16(from_bf16(xi[i]) * keep);
            }
        } else {
            const float *xi = (const float *)x;
            float *o = (float *)out;
#pragma omp simd
            for (int64_t i = c * chunk; i < end; i++) {
                const float keep = mask_hash((uint32_t)i * 0x9E3779B9U + seed) >= threshold ? scale : 0.f;
                o[i] = xi[i] * keep;
            }
        }
    }
}

/* Cross-entropy of each row of logits (rows, V) against its label, with its gradient: loss[r] = logsumexp(row) -
 * row[label] and grad = softmax(row) - onehot(label), both in fp32 from the (fp32 or bf16) logits, the gradient
 * stored in the logits' dtype at grad (which may be the logits themselves). Two passes over a row: max and the sum
 * of exponentials, then the gradient. Returns 0, or 1 if a label is outside 0..V-1. */
int edgellm_cross_entropy(int bf16, const void *logits, int64_t rows, int64_t V, const int64_t *labels, float *loss,
                          void *grad, int threads) {
    int bad = 0;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t y = labels[r];
        if (y < 0 || y >= V) {
#pragma omp atomic write
            bad = 1;
            continue;
        }
        float m = -INFINITY, s = 0.f;
        if (bf16) {
            const uint16_t *l = (const uint16_t *)logits + r * V;
            uint16_t *g = (uint16_t *)grad + r * V;
#pragma omp simd reduction(max : m)
            for (int64_t j = 0; j < V; j++) m = from_bf16(l[j]) > m ? from_bf16(l[j]) : m;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < V; j++) s += exp_approx(from_bf16(l[j]) - m < -87.f ? -87.f : from_bf16(l[j]) - m);
            const float ly = from_bf16(l[y]), inv = 1.f / s;
            loss[r] = logf(s) + m - ly;
#pragma omp simd
            for (int64_t j = 0; j < V; j++)
                g[j] = to_bf16(exp_approx(from_bf16(l[j]) - m < -87.f ? -87.f : from_bf16(l[j]) - m) * inv);
            g[y] = to_bf16(exp_approx(ly - m < -87.f ? -87.f : ly - m) * inv - 1.f);
        } else {
            const float *l = (const float *)logits + r * V;
            float *g = (float *)grad + r * V;
#pragma omp simd reduction(max : m)
            for (int64_t j = 0; j < V; j++) m = l[j] > m ? l[j] : m;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < V; j++) s += exp_approx(l[j] - m < -87.f ? -87.f : l[j] - m);
            const float ly = l[y], inv = 1.f / s;
            loss[r] = logf(s) + m - ly;
#pragma omp simd
            for (int64_t j = 0; j < V; j++) g[j] = exp_approx(l[j] - m < -87.f ? -87.f : l[j] - m) * inv;
            g[y] = exp_approx(ly - m < -87.f ? -87.f : ly - m) * inv - 1.f;
        }
    }
    return bad;
}
