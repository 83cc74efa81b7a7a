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
