/* The per-row kernels: integer dot products per block, one float multiply-add per block.
 *
 * Every AVX2 function carries its own target attribute and is only called after
 * cpu_has_avx2(), so the same binary runs on CPUs without AVX2. The file is compiled with
 * -ffp-contract=off: the llama2.c mode must round (float)ival * ws * xs exactly as runq.c's
 * C source does (two products, then the sum), never through a fused multiply-add. */
#include "dot.h"

#include <math.h>
#include <string.h>
#include <immintrin.h>

#include "lanes.h"

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))

int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

int cpu_has_vnni(void) {
    if (!cpu_has_avx2() || !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512vnni"))
        return 0;
    /* EVEX-encoded instructions fault unless the OS saves the opmask and upper vector state */
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (eax & 0xe6) == 0xe6;
}

size_t block_bytes(int format) {
    switch (format) {
    case FMT_Q8_0: return 2 + QK;
    case FMT_Q4_0: return 2 + QK / 2;
    case FMT_Q4_1: return 4 + QK / 2;
    default: return 0;
    }
}

static float fp16_to_float(const uint8_t *bytes) {
    uint16_t h = (uint16_t)(bytes[0] | (bytes[1] << 8)); /* GGUF is little-endian */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0) {
        float magnitude = (float)mantissa * (1.0f / 16777216.0f); /* subnormal: mantissa * 2^-24 */
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31)
        bits = sign | 0x7f800000u | (mantissa << 13);
    else
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* ---- activations ---- */

static int32_t quantize_group(const float *x, int n, int runq_rule, int8_t *q, float *scale, float *sum) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) {
        float magnitude = fabsf(x[i]);
        if (magnitude > amax) amax = magnitude;
    }
    float d = amax / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
    int32_t total = 0;
    for (int i = 0; i < n; i++) {
        /* runq.c divides by the scale (0/0 there gives 0 after the int8 cast); llama.cpp multiplies */
        float ratio = runq_rule ? (d > 0.0f ? x[i] / d : 0.0f) : x[i] * inverse;
        q[i] = (int8_t)roundf(ratio);
        total += q[i];
    }
    *scale = d;
    if (sum) *sum = d * (float)total;
    return total;
}

int block_offset_bias(const product_t *p) {
    if (p->isa == ISA_PORTABLE) return 0;
    if (p->format == FMT_Q4_0) return 8;
    return p->format == FMT_Q8_0 && p->isa == ISA_VNNI ? 128 : 0;
}

/* Pair order (dot.h): in every 64 values of two blocks, swap the second 16 with the third. */
static void to_pair_order(int8_t *q, int cols) {
    for (int j = 0; j + 2 * QK <= cols; j += 2 * QK) {
        int8_t middle[QK / 2];
        memcpy(middle, q + j + QK / 2, QK / 2);
        memcpy(q + j + QK / 2, q + j + QK, QK / 2);
        memcpy(q + j + QK, middle, QK / 2);
    }
}

void quantize_activations(const product_t *p, const float *x, int8_t *xq, float *xscale, float *xsum,
                          int32_t *xoffset) {
    int runq_rule = p->format == FMT_LLAMA2C_Q8, group = runq_rule ? p->group_size : QK;
    int groups = p->cols / group, bias = block_offset_bias(p);
    for (int t = 0; t < p->tokens; t++) {
        for (int g = 0; g < groups; g++) {
            size_t at = (size_t)t * groups + g;
            int32_t total = quantize_group(x + (size_t)t * p->cols + (size_t)g * group, group, runq_rule,
                                           xq + (size_t)t * p->cols + (size_t)g * group, xscale + at,
                                           p->format == FMT_Q4_1 ? xsum + at : NULL);
            if (bias) xoffset[at] = -bias * total;
        }
        if (bias && p->format == FMT_Q4_0) to_pair_order(xq + (size_t)t * p->cols, p->cols);
    }
}

/* ---- portable rows ---- */

static float row_q8_0(const uint8_t *row, const int8_t *xq, const float *xs, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, row += 2 + QK, xq += QK) {
        const int8_t *w = (const int8_t *)(row + 2);
        int32_t isum = 0;
        for (int k = 0; k < QK; k++) isum += (int32_t)w[k] * xq[k];
        acc += fp16_to_float(row) * xs[b] * (float)isum;
    }
    return acc;
}

/* Q4_0 and Q4_1: byte k holds value k in its low nibble and value k + 16 in its high one. */
static int32_t nibble_dot(const uint8_t *nibbles, const int8_t *xq, int offset) {
    int32_t isum = 0;
    for (int k = 0; k < QK / 2; k++)
        isum += ((nibbles[k] & 0x0f) - offset) * xq[k] + ((nibbles[k] >> 4) - offset) * xq[k + QK / 2];
    return isum;
}

static float row_q4_0(const uint8_t *row, const int8_t *xq, const float *xs, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, row += 2 + QK / 2, xq += QK)
        acc += fp16_to_float(row) * xs[b] * (float)nibble_dot(row + 2, xq, 8);
    return acc;
}

static float row_q4_1(const uint8_t *row, const int8_t *xq, const float *xs, const float *xsum, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, row += 4 + QK / 2, xq += QK)
        acc += fp16_to_float(row) * xs[b] * (float)nibble_dot(row + 4, xq, 0) + fp16_to_float(row + 2) * xsum[b];
    return acc;
}

/* runq.c's matmul, one row: int32 sum per group, then val += (float)ival * ws * xs in group order. */
static float row_llama2c(const int8_t *w, const float *ws, const int8_t *xq, const float *xs, int cols, int gs) {
    float val = 0.0f;
    for (int j = 0, g = 0; j + gs <= cols; j += gs, g++) {
        int32_t ival = 0;
        for (int k = 0; k < gs; k++) ival += (int32_t)xq[j + k] * (int32_t)w[j + k];
        val += ((float)ival) * ws[g] * xs[g];
    }
    return val;
}

/* ---- AVX2 rows ---- */

AVX2 static inline __m256i dot32_avx2(__m256i w, __m256i x) {
    /* maddubs wants unsigned x signed: move w's sign onto x. |w| <= 128, |x| <= 127: no int16 overflow. */
    __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

AVX2 static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

AVX2 static inline float half_avx2(const uint8_t *bytes) {
    uint16_t h;
    memcpy(&h, bytes, 2);
    return _cvtsh_ss(h);
}

AVX2 static inline __m256i nibbles_avx2(const uint8_t *bytes) {
    __m128i raw = _mm_loadu_si128((const __m128i *)bytes), low4 = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
}

AVX2 static float row_q4_1_avx2(const uint8_t *row, const int8_t *xq, const float *xs, const float *xsum, int nb) {
    __m256 acc = _mm256_setzero_ps();
    float offsets = 0.0f;
    for (int b = 0; b < nb; b++, row += 4 + QK / 2, xq += QK) {
        __m256i x = _mm256_loadu_si256((const __m256i *)xq);
        __m256i pairs = _mm256_maddubs_epi16(nibbles_avx2(row + 4), x); /* nibbles are unsigned */
        __m256i sums = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_avx2(row) * xs[b]), _mm256_cvtepi32_ps(sums), acc);
        offsets += half_avx2(row + 2) * xsum[b];
    }
    return hsum8(acc) + offsets;
}

/* Same rounding as row_llama2c: the int32 group sums are exact in any order. */
AVX2 static float row_llama2c_avx2(const int8_t *w, const float *ws, const int8_t *xq, const float *xs,
                                   int cols, int gs) {
    float val = 0.0f;
    for (int j = 0, g = 0; j + gs <= cols; j += gs, g++) {
        __m256i sums = _mm256_setzero_si256();
        for (int k = 0; k < gs; k += QK)
            sums = _mm256_add_epi32(sums, dot32_avx2(_mm256_loadu_si256((const __m256i *)(w + j + k)),
                                                     _mm256_loadu_si256((const __m256i *)(xq + j + k))));
        int32_t ival = hsum_epi32(sums);
        val += ((float)ival) * ws[g] * xs[g];
    }
    return val;
}

/* ---- the Q8_0 and Q4_0 rows of the SIMD backends (dot_blocks.inc) ---- */

/* Four vectors of pair lanes (lanes 0-3 one block's, 4-7 the next's) -> the 8 block sums in order.
 * hadd works within 128-bit halves: after two levels the halves hold blocks 0 2 4 6 and 1 3 5 7. */
AVX2 static inline __m256i sums_of_pairs(const __m256i *pairs) {
    __m256i mixed = _mm256_hadd_epi32(_mm256_hadd_epi32(pairs[0], pairs[1]), _mm256_hadd_epi32(pairs[2], pairs[3]));
    return _mm256_permutevar8x32_epi32(mixed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Eight vectors of block lanes -> the 8 block sums in order (two levels leave blocks 0-3's lanes
 * 0-3 sums in the low half, their lanes 4-7 sums in the high half). */
AVX2 static inline __m256i sums_of_blocks(const __m256i *blocks) {
    __m256i low = _mm256_hadd_epi32(_mm256_hadd_epi32(blocks[0], blocks[1]), _mm256_hadd_epi32(blocks[2], blocks[3]));
    __m256i high = _mm256_hadd_epi32(_mm256_hadd_epi32(blocks[4], blocks[5]), _mm256_hadd_epi32(blocks[6], blocks[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20), _mm256_permute2x128_si256(low, high, 0x31));
}

#define MAX_TOKENS 4

/* AVX2: maddubs wants unsigned x signed bytes. A nibble is unsigned (Q4_0's value is q - 8, the -8
 * comes back as xoffset); each int16 holds at most 2 * 2 * 15 * 127. Q8_0 moves w's sign onto x. */
#define TARGET AVX2
#define NAME(x) x##_avx2
#define Q4_0_PAIR(lo, hi, xl, xh)                                                                        \
    _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)), \
                      _mm256_set1_epi16(1))
#define Q8_0_PREPARE(w, a, b) ((a) = _mm256_sign_epi8(w, w), (b) = (w))
#define Q8_0_BLOCK(a, b, x) _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(x, b)), _mm256_set1_epi16(1))
#define Q8_0_OFFSET 0
#include "dot_blocks.inc"
#undef TARGET
#undef NAME
#undef Q4_0_PAIR
#undef Q8_0_PREPARE
#undef Q8_0_BLOCK
#undef Q8_0_OFFSET

/* VNNI: vpdpbusd multiplies unsigned by signed bytes and adds each 4 products into an int32 lane,
 * the lanes of maddubs + madd in one instruction. Q8_0's signed w becomes unsigned w + 128 (XOR
 * 0x80), and -128 * the block's activation sum (xoffset) takes the 128 back out. */
#define TARGET VNNI
#define NAME(x) x##_vnni
#define Q4_0_PAIR(lo, hi, xl, xh) _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh)
#define Q8_0_PREPARE(w, a, b) ((a) = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)), (b) = (a))
#define Q8_0_BLOCK(a, b, x) ((void)(b), _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, x))
#define Q8_0_OFFSET 1
#include "dot_blocks.inc"
#undef TARGET
#undef NAME
#undef Q4_0_PAIR
#undef Q8_0_PREPARE
#undef Q8_0_BLOCK
#undef Q8_0_OFFSET

/* ---- VNNI rows (Q4_1) ---- */

VNNI static float row_q4_1_vnni(const uint8_t *row, const int8_t *xq, const float *xs, const float *xsum, int nb) {
    __m256 acc = _mm256_setzero_ps();
    float offsets = 0.0f;
    for (int b = 0; b < nb; b++, row += 4 + QK / 2, xq += QK) {
        __m256i sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), nibbles_avx2(row + 4),
                                           _mm256_loadu_si256((const __m256i *)xq));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_avx2(row) * xs[b]), _mm256_cvtepi32_ps(sums), acc);
        offsets += half_avx2(row + 2) * xsum[b];
    }
    return hsum8(acc) + offsets;
}

/* ---- dispatch ---- */

static float row_product(const product_t *p, int r, int t) {
    const uint8_t *row = p->weights + (size_t)r * p->row_bytes;
    const int8_t *xq = p->xq + (size_t)t * p->cols;
    int avx2 = p->isa != ISA_PORTABLE, nb = p->cols / QK;
    const float *xs = p->xscale + (size_t)t * (p->cols / (p->format == FMT_LLAMA2C_Q8 ? p->group_size : QK));
    if (p->isa == ISA_VNNI && p->format == FMT_Q4_1)
        return row_q4_1_vnni(row, xq, xs, p->xsum + (size_t)t * nb, nb);
    switch (p->format) {
    case FMT_Q8_0: return row_q8_0(row, xq, xs, nb);
    case FMT_Q4_0: return row_q4_0(row, xq, xs, nb);
    case FMT_Q4_1: {
        const float *xsum = p->xsum + (size_t)t * nb;
        return avx2 ? row_q4_1_avx2(row, xq, xs, xsum, nb) : row_q4_1(row, xq, xs, xsum, nb);
    }
    default: {
        const float *ws = p->wscales + (size_t)r * (p->cols / p->group_size);
        if (avx2 && p->group_size % QK == 0)
            return row_llama2c_avx2((const int8_t *)row, ws, xq, xs, p->cols, p->group_size);
        return row_llama2c((const int8_t *)row, ws, xq, xs, p->cols, p->group_size);
    }
    }
}

void product_rows(const product_t *p, int row_begin, int row_end) {
    if (p->isa != ISA_PORTABLE && (p->format == FMT_Q8_0 || p->format == FMT_Q4_0)) {
        if (p->isa == ISA_VNNI)
            block_rows_vnni(p, row_begin, row_end);
        else
            block_rows_avx2(p, row_begin, row_end);
        return;
    }
    /* rows outer, tokens inner: a weight row is read from memory once for all T tokens */
    for (int r = row_begin; r < row_end; r++)
        for (int t = 0; t < p->tokens; t++)
            p->out[(size_t)t * p->rows + r] = row_product(p, r, t);
}

/* ---- expansion (prefill tiles) ---- */

void dequantize_rows(const product_t *p, int row_begin, int row_end, float *out) {
    int nb = p->cols / QK;
    for (int r = row_begin; r < row_end; r++, out += p->cols) {
        const uint8_t *row = p->weights + (size_t)r * p->row_bytes;
        if (p->format == FMT_LLAMA2C_Q8) {
            const int8_t *w = (const int8_t *)row;
            const float *ws = p->wscales + (size_t)r * (p->cols / p->group_size);
            for (int j = 0; j < p->cols; j++) out[j] = (float)w[j] * ws[j / p->group_size];
            continue;
        }
        size_t bytes = block_bytes(p->format);
        for (int b = 0; b < nb; b++, row += bytes) {
            float d = fp16_to_float(row), *o = out + (size_t)b * QK;
            if (p->format == FMT_Q8_0) {
                const int8_t *q = (const int8_t *)(row + 2);
                for (int k = 0; k < QK; k++) o[k] = d * (float)q[k];
            } else if (p->format == FMT_Q4_0) {
                for (int k = 0; k < QK / 2; k++) {
                    o[k] = d * (float)((row[2 + k] & 0x0f) - 8);
                    o[k + QK / 2] = d * (float)((row[2 + k] >> 4) - 8);
                }
            } else {
                float m = fp16_to_float(row + 2);
                for (int k = 0; k < QK / 2; k++) {
                    o[k] = d * (float)(row[4 + k] & 0x0f) + m;
                    o[k + QK / 2] = d * (float)(row[4 + k] >> 4) + m;
                }
            }
        }
    }
}
