/* The per-row kernels: integer dot products per block; one float multiply-add per block (portable,
 * Q4_1, llama2.c), or per group of 8 blocks (Q8_0 and Q4_0 on avx2/vnni, dot_blocks.inc).
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
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

int cpu_has_vnni(void) {
    if (!cpu_has_avx2() || !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vnni"))
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

/* quantize_group's llama.cpp rule for one block of QK, vectorized: the same max, the same scale and
 * product, and roundf's half-away-from-zero (the truncation moved one away where the dropped
 * fraction is at least one half), so the same q. Scalar, a 768-value activation took 2.5 us, a
 * sixth of a 768x768 Q4_0 product on one core. */
AVX2 static int32_t quantize_block_avx2(const float *x, int8_t *q, float *scale, float *sum) {
    const __m256 magnitude_bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4], amax8 = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax8 = _mm256_max_ps(_mm256_and_ps(v[i], magnitude_bits), amax8); /* a NaN is skipped, as there */
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    float d = amax / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
    __m256i n[4], total8 = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        __m256 ratio = _mm256_mul_ps(v[i], _mm256_set1_ps(inverse));
        __m256 whole = _mm256_round_ps(ratio, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        __m256 away = _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(ratio, whole), magnitude_bits), _mm256_set1_ps(0.5f),
                                    _CMP_GE_OQ);
        __m256 step = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_andnot_ps(magnitude_bits, ratio)); /* +-1 */
        n[i] = _mm256_cvttps_epi32(_mm256_add_ps(whole, _mm256_and_ps(away, step)));
        total8 = _mm256_add_epi32(total8, n[i]);
    }
    /* packs interleave 128-bit halves: bytes come out as 0-3 8-11 16-19 24-27 4-7 ...; the dword permute undoes it */
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, bytes);
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total8), _mm256_extracti128_si256(total8, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
    int32_t total = _mm_cvtsi128_si32(_mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1)));
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
    int groups = p->cols / group, bias = block_offset_bias(p), simd = !runq_rule && p->isa != ISA_PORTABLE;
    for (int t = 0; t < p->tokens; t++) {
        for (int g = 0; g < groups; g++) {
            size_t at = (size_t)t * groups + g;
            const float *values = x + (size_t)t * p->cols + (size_t)g * group;
            int8_t *q = xq + (size_t)t * p->cols + (size_t)g * group;
            float *sum = p->format == FMT_Q4_1 ? xsum + at : NULL;
            int32_t total = simd ? quantize_block_avx2(values, q, xscale + at, sum)
                                 : quantize_group(values, group, runq_rule, q, xscale + at, sum);
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

/* runq.c's terms of one row kept apart, each group's (float)ival * w_scale * x_scale, for a product
 * whose groups are summed across workers (common/model/numerics.py): the rows above without their sum. */
static void row_llama2c_terms(const int8_t *w, const float *ws, const int8_t *xq, const float *xs, int cols, int gs,
                              float *terms) {
    for (int j = 0, g = 0; j + gs <= cols; j += gs, g++) {
        int32_t ival = 0;
        for (int k = 0; k < gs; k++) ival += (int32_t)xq[j + k] * (int32_t)w[j + k];
        terms[g] = ((float)ival) * ws[g] * xs[g];
    }
}

AVX2 static void row_llama2c_terms_avx2(const int8_t *w, const float *ws, const int8_t *xq, const float *xs,
                                        int cols, int gs, float *terms) {
    for (int j = 0, g = 0; j + gs <= cols; j += gs, g++) {
        __m256i sums = _mm256_setzero_si256();
        for (int k = 0; k < gs; k += QK)
            sums = _mm256_add_epi32(sums, dot32_avx2(_mm256_loadu_si256((const __m256i *)(w + j + k)),
                                                     _mm256_loadu_si256((const __m256i *)(xq + j + k))));
        terms[g] = ((float)hsum_epi32(sums)) * ws[g] * xs[g];
    }
}

void llama2c_term_rows(const product_t *p, float *terms, int first_group, int total_groups, int row_begin,
                       int row_end) {
    int groups = p->cols / p->group_size, avx2 = p->isa != ISA_PORTABLE && p->group_size % QK == 0;
    for (int r = row_begin; r < row_end; r++) {
        const int8_t *row = (const int8_t *)p->weights + (size_t)r * p->row_bytes;
        const float *ws = p->wscales + (size_t)r * groups;
        for (int t = 0; t < p->tokens; t++) {
            const int8_t *xq = p->xq + (size_t)t * p->cols;
            const float *xs = p->xscale + (size_t)t * groups;
            float *out = terms + ((size_t)t * p->rows + r) * total_groups + first_group;
            if (avx2)
                row_llama2c_terms_avx2(row, ws, xq, xs, p->cols, p->group_size, out);
            else
                row_llama2c_terms(row, ws, xq, xs, p->cols, p->group_size, out);
        }
    }
}

/* ---- the Q8_0 and Q4_0 rows of the SIMD backends (dot_blocks.inc) ---- */

/* The block sums below add lanes by unpack and add, 3 instructions where vphaddd is one: vphaddd
 * issued only once per 2-4 cycles in a 1-core loop on Zen 4 (vpunpckldq 3 per cycle). In the rows
 * the two measured the same; this way does not lean on one slow instruction. */

/* Lanes of a and b that hold the same block side by side -> summed in pairs: for a = [a0 .. a7],
 * b = [b0 .. b7]: [a0+a2, b0+b2, a1+a3, b1+b3 | a4+a6, b4+b6, a5+a7, b5+b7]. */
AVX2 static inline __m256i add_pairs32(__m256i a, __m256i b) {
    return _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
}

/* Four such vectors (two of a, b above, then of their sums) -> [a lanes 0-3 sum, b's, c's, d's |
 * the same of lanes 4-7]. */
AVX2 static inline __m256i add_quads(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = add_pairs32(a, b), cd = add_pairs32(c, d);
    return _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
}

/* Four vectors of pair lanes (lanes 0-3 one block's, 4-7 the next's) -> the 8 block sums in order:
 * add_quads leaves blocks 0 2 4 6 in the low half and 1 3 5 7 in the high one. */
AVX2 static inline __m256i sums_of_pairs(const __m256i *pairs) {
    __m256i mixed = add_quads(pairs[0], pairs[1], pairs[2], pairs[3]);
    return _mm256_permutevar8x32_epi32(mixed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Eight vectors of block lanes -> the 8 block sums in order: add_quads gives blocks 0-3's lanes 0-3
 * sums in the low half and their lanes 4-7 sums in the high one, and the same for blocks 4-7. */
AVX2 static inline __m256i sums_of_blocks(const __m256i *blocks) {
    __m256i low = add_quads(blocks[0], blocks[1], blocks[2], blocks[3]);
    __m256i high = add_quads(blocks[4], blocks[5], blocks[6], blocks[7]);
    return _mm256_add_epi32(_mm256_blend_epi32(low, high, 0xf0), _mm256_permute2x128_si256(low, high, 0x21));
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
#define FULL_SCALES8(group, bytes) scales8_avx2(group, bytes, 8)
#include "dot_blocks.inc"

/* The 8 scales of a whole group by word permutes of the bytes around them, four scales from each
 * 64 (Q4_0) or 128 (Q8_0) bytes. Gathered one by one they took a fifth of a Q4_0 row's time: a
 * one-core harness on the 110M shapes, 18-21 -> 21-24 GB/s; Q8_0 unchanged. */
VNNI static inline __m256 full_scales8_vnni(const uint8_t *group, size_t bytes) {
    /* the first 8 words of each table pick; the rest of the result is ignored */
    static const uint16_t q4_words[32] = {0, 9, 18, 27, 32, 41, 50, 59}, q8_words[32] = {0, 17, 34, 51};
    __m512i halves;
    if (bytes == 2 + QK / 2) { /* scale words 0, 9, 18, 27 of 64 bytes at the group's start and at block 4 */
        halves = _mm512_permutex2var_epi16(_mm512_loadu_si512(group), _mm512_loadu_si512(q4_words),
                                           _mm512_loadu_si512(group + 4 * bytes));
    } else { /* Q8_0: words 0, 17, 34, 51 of 128 bytes, twice */
        __m512i words = _mm512_loadu_si512(q8_words);
        __m512i low = _mm512_permutex2var_epi16(_mm512_loadu_si512(group), words, _mm512_loadu_si512(group + 64));
        __m512i high = _mm512_permutex2var_epi16(_mm512_loadu_si512(group + 4 * bytes), words,
                                                 _mm512_loadu_si512(group + 4 * bytes + 64));
        halves = _mm512_unpacklo_epi64(low, high);
    }
    return _mm256_cvtph_ps(_mm512_castsi512_si128(halves));
}

/* VNNI: vpdpbusd multiplies unsigned by signed bytes and adds each 4 products into an int32 lane,
 * the lanes of maddubs + madd in one instruction. Q8_0's signed w becomes unsigned w + 128 (XOR
 * 0x80), and -128 * the block's activation sum (xoffset) takes the 128 back out. */
#define TARGET VNNI
#define NAME(x) x##_vnni
#define Q4_0_PAIR(lo, hi, xl, xh) _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh)
#define Q8_0_PREPARE(w, a, b) ((a) = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)), (b) = (a))
#define Q8_0_BLOCK(a, b, x) ((void)(b), _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, x))
#define Q8_0_OFFSET 1
#define FULL_SCALES8(group, bytes) full_scales8_vnni(group, bytes)
#include "dot_blocks.inc"

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
    size_t stride = product_out_stride(p);
    for (int r = row_begin; r < row_end; r++)
        for (int t = 0; t < p->tokens; t++)
            p->out[(size_t)t * stride + r] = row_product(p, r, t);
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
