/* One decode (T = 1) or verify (T > 1) step through every layer of a Llama-family model whose linears are all
 * block-quantized (qmatmul.c), in one C call: what the compiled step does, without torch.compile.
 *
 * Why: with the products, attention and norms already in C, what is left of a decode step is gluing ~400 small ops
 * together. Eager torch spends ~15 us an op on that (a 14 ms step for a 6 ms model); inductor removes it but costs
 * ~40 s of compiling per cache size and ~130 MB of memory for its own machinery. Here the glue (RoPE, KV-cache
 * writes, residual adds) is a few loops between calls of the kernels the eager model calls, and their order and
 * rounding follow the eager code (model.py, Attention.decode with the cache kernel) step by step, so the logits
 * equal eager decode_step's bit for bit: bf16 values are rounded wherever torch rounds them, fp32 products are
 * never fused into FMAs (built with -ffp-contract=off).
 *
 * The kernels come in as function pointers (the libraries kernels/native.py and kernels/blockq.py already built
 * and checked), weights and caches as addresses in `layers` (LAYER_FIELDS int64 per layer, see native_step.py):
 *   x (M = B*T, C) in/out: the embedded tokens in, the residual stream after the last layer out;
 *   hidden (M, C): rmsnorm(x) with the final norm's weight, for the caller's lm_head.
 * Activations are fp32 (bf16 = 0) or bf16 (bf16 = 1), like the model's norm weights, biases and KV cache.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int (*qmatmul_t)(int bits, const void *x, int x_bf16, int64_t M, int64_t K, const void *qs,
                         const uint16_t *dm, int64_t N, void *y, int y_bf16, int isa, int threads);
typedef void (*rmsnorm_t)(int bf16, const void *x, const void *w, void *out, int64_t rows, int64_t C, float eps,
                          int threads);
typedef void (*silu_mul_t)(int bf16, const void *gu, void *out, int64_t rows, int64_t I, int threads);
typedef int (*attention_t)(int bf16, const void *q, const void *k, const void *v, void *out, const int64_t *slot_pos,
                           const int64_t *qpos, int64_t window, int64_t B, int64_t T, int64_t H, int64_t Hkv,
                           int64_t S, int64_t D, float scale, int threads);
typedef int (*rows_attention_t)(int bf16, const void *q, const void *k, const void *v, void *out, const int64_t *rows,
                                const int64_t *lo, const int64_t *hi, int64_t B, int64_t H, int64_t Hkv, int64_t S,
                                int64_t D, float scale, int threads);

/* a linear: bits, qs, dm, bias (0: none) */
enum { LIN_BITS, LIN_QS, LIN_DM, LIN_BIAS, LIN_FIELDS };
/* one layer's fields in `layers` */
enum {
    F_NORM1 = 0,
    F_QKV = 1,
    F_O = F_QKV + LIN_FIELDS,
    F_NORM2 = F_O + LIN_FIELDS,
    F_GATE_UP = F_NORM2 + 1,
    F_DOWN = F_GATE_UP + LIN_FIELDS,
    F_K = F_DOWN + LIN_FIELDS, /* cache (>= B, Hkv, S, D) */
    F_V,
    F_SLOT_POS, /* (S,) int64: the position each slot holds, -1 empty */
    LAYER_FIELDS
};
/* dims */
enum { D_BF16, D_ISA, D_B, D_T, D_C, D_H, D_HKV, D_HEAD, D_I, D_LAYERS, D_S, D_ROLLING, D_WINDOW, D_THREADS, DIMS };

int edgellm_step_layer_fields(void) { return LAYER_FIELDS; }
int edgellm_step_dims(void) { return DIMS; }

static inline float from_bf16(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline float load(int bf16, const void *p, int64_t i) {
    return bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(int bf16, void *p, int64_t i, float v) {
    if (bf16)
        ((uint16_t *)p)[i] = to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* the value rounded to the activation dtype, as torch stores an intermediate */
static inline float rnd(int bf16, float v) { return bf16 ? from_bf16(to_bf16(v)) : v; }

/* y (M, N) = x (M, K) @ W^T (+ bias, rounded like torch's y + bias) */
static int linear(qmatmul_t qmatmul, const int64_t *lin, const int64_t *dims, const void *x, int64_t M, int64_t K,
                  int64_t N, void *y) {
    const int bf16 = (int)dims[D_BF16];
    if (qmatmul((int)lin[LIN_BITS], x, bf16, M, K, (const void *)lin[LIN_QS], (const uint16_t *)lin[LIN_DM], N, y,
                bf16, (int)dims[D_ISA], (int)dims[D_THREADS]))
        return 1;
    const void *bias = (const void *)lin[LIN_BIAS];
    if (bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++)
                store(bf16, y, m * N + n, load(bf16, y, m * N + n) + load(bf16, bias, n));
    return 0;
}

/* x += y, rounded (one loop per dtype: the compiler vectorizes them) */
static void residual_add(int bf16, void *x, const void *y, int64_t n) {
    if (bf16) {
        uint16_t *xb = (uint16_t *)x;
        const uint16_t *yb = (const uint16_t *)y;
        for (int64_t i = 0; i < n; i++) xb[i] = to_bf16(from_bf16(xb[i]) + from_bf16(yb[i]));
    } else {
        float *xf = (float *)x;
        const float *yf = (const float *)y;
        for (int64_t i = 0; i < n; i++) xf[i] += yf[i];
    }
}

/* RoPE on one head (HF's half split, model.apply_rope): out = x * cos + rotate_half(x) * sin_signed, each product
 * and the sum rounded like torch's three elementwise ops */
static void rope_head(int bf16, const void *x, int64_t xi, const void *cos, const void *sin, int64_t ti, int64_t D,
                      void *out, int64_t oi) {
    const int64_t h = D / 2;
    if (bf16) { /* each half a loop of its own, per dtype: the compiler vectorizes them (the scalar loop was ~15 %
                 * of an 8-row batched step) */
        const uint16_t *xb = (const uint16_t *)x + xi, *cb = (const uint16_t *)cos + ti, *sb = (const uint16_t *)sin + ti;
        uint16_t *ob = (uint16_t *)out + oi;
        for (int64_t d = 0; d < h; d++)
            ob[d] = to_bf16(rnd(1, from_bf16(xb[d]) * from_bf16(cb[d])) + rnd(1, from_bf16(xb[d + h]) * from_bf16(sb[d])));
        for (int64_t d = h; d < D; d++)
            ob[d] = to_bf16(rnd(1, from_bf16(xb[d]) * from_bf16(cb[d])) + rnd(1, from_bf16(xb[d - h]) * from_bf16(sb[d])));
    } else {
        const float *xf = (const float *)x + xi, *cf = (const float *)cos + ti, *sf = (const float *)sin + ti;
        float *of = (float *)out + oi;
        for (int64_t d = 0; d < h; d++) of[d] = xf[d] * cf[d] + xf[d + h] * sf[d];
        for (int64_t d = h; d < D; d++) of[d] = xf[d] * cf[d] + xf[d - h] * sf[d];
    }
}

/* Two kinds of step:
 * - rows == NULL: B sequences, each with T new tokens at positions pos (T,) (the same for every sequence), cache row
 *   b for sequence b, slot p (or p % S in a rolling cache), slot_pos updated; cos, sin (T, D). Attention: `attention`
 *   (Attention.decode's cache kernel).
 * - rows != NULL (continuous batching, Attention.decode_rows): T = 1, sequence b in cache row rows[b] at its own
 *   position pos[b] (B,), slot == position, keys lo..pos[b] visible; cos, sin (B, D). Attention: `rows_attention`.
 * cos, sin are in the activation dtype. Returns 0, -1 out of memory, else the failing kernel's code. */
int edgellm_decode_step(const int64_t *dims, const int64_t *layers, const void *final_norm, float eps, float scale,
                        void *x, const int64_t *pos, const void *cos, const void *sin, void *hidden,
                        qmatmul_t qmatmul, rmsnorm_t rmsnorm, silu_mul_t silu_mul, attention_t attention,
                        const int64_t *rows, rows_attention_t rows_attention) {
    const int bf16 = (int)dims[D_BF16];
    const int64_t B = dims[D_B], T = dims[D_T], C = dims[D_C], H = dims[D_H], Hkv = dims[D_HKV];
    const int64_t D = dims[D_HEAD], I = dims[D_I], S = dims[D_S], M = B * T, QKV = (H + 2 * Hkv) * D;
    const int64_t window = dims[D_WINDOW];
    const int threads = (int)dims[D_THREADS];
    const size_t es = bf16 ? 2 : 4;
    if (rows && (T != 1 || !rows_attention)) return 3;
    /* scratch: h (M, C) | qkv (M, QKV) | q (M, H D) | att (M, H D) | gu (M, 2 I) | act (M, I) | out (M, C) */
    const int64_t n_h = M * C, n_qkv = M * QKV, n_q = M * H * D, n_gu = M * 2 * I, n_act = M * I;
    const size_t act_bytes = (es * (size_t)(n_h + n_qkv + 2 * n_q + n_gu + n_act + n_h) + 7) / 8 * 8;
    char *buf = malloc(act_bytes + (rows ? 8 * (size_t)B : 0));
    if (!buf) return -1;
    int64_t *lo = (int64_t *)(buf + act_bytes); /* rows: the first key each sequence sees */
    for (int64_t b = 0; rows && b < B; b++) lo[b] = window > 0 && pos[b] + 1 - window > 0 ? pos[b] + 1 - window : 0;
    char *h = buf, *qkv = h + es * n_h, *q = qkv + es * n_qkv, *att = q + es * n_q, *gu = att + es * n_q;
    char *act = gu + es * n_gu, *out = act + es * n_act;
    int rc = 0;
    for (int64_t l = 0; l < dims[D_LAYERS] && !rc; l++) {
        const int64_t *f = layers + l * LAYER_FIELDS;
        char *kc = (char *)f[F_K], *vc = (char *)f[F_V];
        int64_t *slot_pos = (int64_t *)f[F_SLOT_POS];
        rmsnorm(bf16, x, (const void *)f[F_NORM1], h, M, C, eps, threads);
        if ((rc = linear(qmatmul, f + F_QKV, dims, h, M, C, QKV, qkv))) break;
        for (int64_t b = 0; b < B; b++)
            for (int64_t t = 0; t < T; t++) {
                const int64_t m = b * T + t, p = rows ? pos[b] : pos[t], row = rows ? rows[b] : b;
                const int64_t slot = dims[D_ROLLING] ? p % S : p, ti = (rows ? b : t) * D;
                for (int64_t hd = 0; hd < H; hd++) /* q: (B, T, H, D) contiguous for the attention kernel */
                    rope_head(bf16, qkv, m * QKV + hd * D, cos, sin, ti, D, q, (m * H + hd) * D);
                for (int64_t j = 0; j < Hkv; j++) { /* k (rotated) and v into slot `slot` of the sequence's row */
                    const int64_t at = ((row * Hkv + j) * S + slot) * D;
                    rope_head(bf16, qkv, m * QKV + (H + j) * D, cos, sin, ti, D, kc, at);
                    memcpy(vc + es * at, qkv + es * (m * QKV + (H + Hkv + j) * D), es * D);
                }
                if (!rows) slot_pos[slot] = p;
            }
        if (rows ? rows_attention(bf16, q, kc, vc, att, rows, lo, pos, B, H, Hkv, S, D, scale, threads)
                 : attention(bf16, q, kc, vc, att, slot_pos, pos, window, B, T, H, Hkv, S, D, scale, threads)) {
            rc = 2;
            break;
        }
        if ((rc = linear(qmatmul, f + F_O, dims, att, M, H * D, C, out))) break;
        residual_add(bf16, x, out, n_h);
        rmsnorm(bf16, x, (const void *)f[F_NORM2], h, M, C, eps, threads);
        if ((rc = linear(qmatmul, f + F_GATE_UP, dims, h, M, C, 2 * I, gu))) break;
        silu_mul(bf16, gu, act, M, I, threads);
        if ((rc = linear(qmatmul, f + F_DOWN, dims, act, M, I, C, out))) break;
        residual_add(bf16, x, out, n_h);
    }
    if (!rc) rmsnorm(bf16, x, final_norm, hidden, M, C, eps, threads);
    free(buf);
    return rc;
}
