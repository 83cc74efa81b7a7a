/* Dequantize torch's packed int4 CPU layout to a transposed bf16 weight, for the int4 prefill path.
 *
 * Built once per machine by edgellm/native.py (cc -O3 -march=native -fopenmp) and called via ctypes.
 * Why C: eager PyTorch needs ~6 passes over fp32 temporaries (unpack, transpose, convert, subtract, multiply,
 * round) and spends ~45 ms per 512-token prefill of the default model on it; this is one pass (~10 ms).
 *
 * Input layout (torch 2.5+ `_convert_weight_to_int4pack_for_cpu`, checked against torch by native.py): blocks
 * of 64 output rows, each stored as K_pad x 32 bytes; byte (k, i) of block b holds row 64b+i in its low
 * nibble and row 64b+32+i in its high nibble. So reading a block front to back yields W^T (K, 64): the
 * output is written as W^T (K, n1-n0), contiguous along n, and the caller computes x @ W^T.
 *
 * Values are exactly QuantizedWeight.dequantize(): (q - z) * s in fp32 with the float16 scale, rounded once
 * to bf16 (round to nearest even). Codes are stored shifted by `shift` (3-bit weights are centred on 8).
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0 && man == 0) {
        bits = sign;
    } else if (exp == 0) { /* subnormal half: normalise */
        exp = 127 - 15 + 1;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#ifdef __AVX512F__
static inline __m256i bf16x16(__m512 f) { /* float_to_bf16 on 16 lanes */
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}
#endif

typedef struct {
    const uint8_t *packed;   /* (n_pad, k_pad / 2) */
    const uint16_t *scales;  /* float16 bits, (n, ng) */
    const uint8_t *zeros;    /* (n, ng) */
    uint16_t *out;           /* bf16 bits, (k, n1 - n0) */
    int64_t k, k_pad, n0, n1, n, ng, group, shift;
} job_t;

static void dequant_blocks(const job_t *j, int64_t b0, int64_t b1) {
    const int64_t width = j->n1 - j->n0;
    float sc[64], zc[64];
    for (int64_t b = b0; b < b1; b++) {
        const int64_t r0 = b * 64, cols = j->n1 - r0 < 64 ? j->n1 - r0 : 64;
        for (int64_t k0 = 0; k0 < j->k; k0 += j->group) {
            const int64_t g = k0 / j->group, k1 = k0 + j->group < j->k ? k0 + j->group : j->k;
            for (int i = 0; i < 64; i++) {
                const int64_t r = r0 + i < j->n ? r0 + i : j->n - 1; /* rows past n are never written */
                sc[i] = half_to_float(j->scales[r * j->ng + g]);
                zc[i] = (float)j->zeros[r * j->ng + g] + (float)j->shift;
            }
#ifdef __AVX512F__
            __m512 sv[4], zv[4];
            for (int i = 0; i < 4; i++) {
                sv[i] = _mm512_loadu_ps(sc + 16 * i);
                zv[i] = _mm512_loadu_ps(zc + 16 * i);
            }
#endif
            for (int64_t kk = k0; kk < k1; kk++) {
                const uint8_t *src = j->packed + (b * j->k_pad + kk) * 32;
                uint16_t *dst = j->out + kk * width + (r0 - j->n0);
                if (cols == 64) {
#ifdef __AVX512F__
                    for (int h = 0; h < 2; h++) { /* bytes 16h..16h+15: rows 16h.. (low) and 32+16h.. (high) */
                        __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + 16 * h)));
                        __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(15)));
                        __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
                        lo = _mm512_mul_ps(_mm512_sub_ps(lo, zv[h]), sv[h]);
                        hi = _mm512_mul_ps(_mm512_sub_ps(hi, zv[2 + h]), sv[2 + h]);
                        _mm256_storeu_si256((__m256i *)(dst + 16 * h), bf16x16(lo));
                        _mm256_storeu_si256((__m256i *)(dst + 32 + 16 * h), bf16x16(hi));
                    }
#else
                    for (int i = 0; i < 32; i++) {
                        dst[i] = float_to_bf16(((float)(src[i] & 15) - zc[i]) * sc[i]);
                        dst[i + 32] = float_to_bf16(((float)(src[i] >> 4) - zc[i + 32]) * sc[i + 32]);
                    }
#endif
                } else { /* the last, partial block */
                    for (int i = 0; i < cols; i++) {
                        const int c = i < 32 ? (src[i] & 15) : (src[i - 32] >> 4);
                        dst[i] = float_to_bf16(((float)c - zc[i]) * sc[i]);
                    }
                }
            }
        }
    }
}

/* Output rows n0..n1-1 of the weight (n0 a multiple of 64) as W^T: out is (k, n1 - n0) bf16. */
void edgellm_dequant_int4_t(const uint8_t *packed, const uint16_t *scales, const uint8_t *zeros, uint16_t *out,
                            int64_t k, int64_t k_pad, int64_t n0, int64_t n1, int64_t n, int64_t ng,
                            int64_t group, int64_t shift, int threads) {
    const job_t job = {packed, scales, zeros, out, k, k_pad, n0, n1, n, ng, group, shift};
    const int64_t first = n0 / 64, blocks = (n1 - n0 + 63) / 64;
    if (threads < 1) threads = 1;
    if (threads > blocks) threads = (int)blocks;
#ifdef _OPENMP
    /* torch's own libgomp is already loaded (same soname), so this reuses its thread pool */
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        dequant_blocks(&job, first + blocks * t / nt, first + blocks * (t + 1) / nt);
    }
#else
    (void)threads;
    dequant_blocks(&job, first, first + blocks);
#endif
}
