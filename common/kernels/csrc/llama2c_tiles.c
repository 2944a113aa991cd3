/* See llama2c_tiles.h. Compiled with -ffp-contract=off, like dot.c: each lane's float steps are
 * runq.c's two products and one sum, never a fused multiply-add.
 *
 * The row-by-row kernels end every group with a horizontal sum of one (row, token) pair, and read
 * the row and the activations again for each pair: a 110M v2 prefill ran at 0.40-0.52x of
 * float32's (BLAS sgemm). Here a block of TILE_ROWS rows is first copied so that 4 columns of all its
 * rows sit side by side (one int32 lane per row); 4 activation bytes of one token, broadcast, then
 * meet a whole vector of rows in one instruction, the sums land one row per lane with nothing to
 * add across lanes, and the block is read once per few tokens from L1 instead of once per pair.
 * 128-token prefill, 110M, v2 / float32 (medians of 5 interleaved rounds, a shared 2-core Zen 4):
 * vnni 1.45x and 1.68x, avx2 0.86x and 1.03x; one (128 x 768) @ (768 x 2048) product on one
 * thread runs at ~2x sgemm's speed (vnni). */
#include "llama2c_tiles.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#include "pool.h"

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
#define INLINE __attribute__((always_inline)) static inline

enum {
    TILE_ROWS = 32,  /* rows per packed block: two AVX-512 vectors, four AVX2 ones */
    VNNI_TOKENS = 6, /* tokens per pass: 12 int32 and 12 float accumulators in 32 registers */
    AVX2_TOKENS = 3, /* per 16 rows: 6 int32 accumulators beside the rows in 16 registers */
    STEP_BYTES = TILE_ROWS * 4,
    /* 2048 x 768, one thread, medians of 15: 2 tokens 0.16-0.27 ms by rows, 0.17-0.30 ms in tiles
     * (the packing costs what the second token saves); 3 tokens 0.24-0.39 against 0.17-0.31 ms */
    TILE_MIN_TOKENS = 3,
};

typedef struct {
    const product_t *p;
    const int32_t *xoffset; /* vnni: (tokens, groups), -128 * the sum of a group's activations */
    uint8_t *packed;        /* each part's packed block, then its scales (part_bytes) */
    size_t part_bytes;
    float *terms;           /* NULL, or runq_group_terms' (tokens, rows, total_groups) at first_group */
    int total_groups;
} tiles_t;

/* One packed block and what its kernels read. */
typedef struct {
    const uint8_t *w;       /* cols / 4 steps of STEP_BYTES: step s holds columns 4s..4s+3 of every row */
    const float *ws;        /* (groups, TILE_ROWS) weight scales, 0 past the last row */
    const int8_t *xq;       /* (tokens, cols) */
    const float *xs;        /* (tokens, groups) */
    const int32_t *xoffset;
    float *out;             /* out of the block's first row, token 0; tokens `out_stride` apart */
    float *terms;           /* or the block's first row's first term, token 0 (then out is unused) */
    int rows, cols, groups, steps_per_group, rows_here, total_groups;
    size_t out_stride;
} block_t;

int llama2c_tiles_apply(const product_t *p) {
    return p->format == FMT_LLAMA2C_Q8 && p->tokens >= TILE_MIN_TOKENS && llama2c_tiles_apply_terms(p);
}

/* vnni's sums run through -128 * sum(x) + sum((w + 128) * x): within int32 up to groups of ~44,000
 * values; larger ones (no file has them) take the row kernels. */
int llama2c_tiles_apply_terms(const product_t *p) {
    return p->isa != ISA_PORTABLE && p->group_size % 4 == 0 && p->group_size <= 1 << 14;
}

/* vnni's unsigned operand is the weight: w ^ 0x80 = w + 128, undone by xoffset. Columns go 16 at a
 * time through 4 x 4 transposes of 4-byte words (SSE2, in every x86-64): copying a word at a time
 * cost ~0.45 ms per 2048 x 768 matrix, more than the products of 2 to 4 tokens. */
static void pack_block(const product_t *p, int first_row, int rows_here, uint8_t *w, float *ws) {
    int groups = p->cols / p->group_size, wide = p->cols / 16 * 16;
    uint32_t flip = p->isa == ISA_VNNI ? 0x80808080u : 0;
    __m128i flips = _mm_set1_epi32((int)flip);
    for (int r = 0; r < TILE_ROWS; r += 4) {
        const int8_t *rows[4];
        for (int i = 0; i < 4; i++)
            rows[i] = r + i < rows_here ? (const int8_t *)p->weights + (size_t)(first_row + r + i) * p->cols : NULL;
        for (int j = 0; j < wide; j += 16) {
            __m128i v[4];
            for (int i = 0; i < 4; i++)
                v[i] = rows[i] ? _mm_loadu_si128((const __m128i *)(rows[i] + j)) : _mm_setzero_si128();
            __m128i low01 = _mm_unpacklo_epi32(v[0], v[1]), high01 = _mm_unpackhi_epi32(v[0], v[1]);
            __m128i low23 = _mm_unpacklo_epi32(v[2], v[3]), high23 = _mm_unpackhi_epi32(v[2], v[3]);
            __m128i steps[4] = {_mm_unpacklo_epi64(low01, low23), _mm_unpackhi_epi64(low01, low23),
                                _mm_unpacklo_epi64(high01, high23), _mm_unpackhi_epi64(high01, high23)};
            for (int k = 0; k < 4; k++)
                _mm_storeu_si128((__m128i *)(w + (size_t)(j / 4 + k) * STEP_BYTES + 4 * r), _mm_xor_si128(steps[k], flips));
        }
        for (int i = 0; i < 4; i++)
            for (int s = wide / 4; s < p->cols / 4; s++) {
                uint32_t word = 0;
                if (rows[i]) memcpy(&word, rows[i] + 4 * s, 4);
                word ^= flip;
                memcpy(w + (size_t)s * STEP_BYTES + 4 * (r + i), &word, 4);
            }
    }
    for (int r = 0; r < TILE_ROWS; r++)
        for (int g = 0; g < groups; g++)
            ws[g * TILE_ROWS + r] = r < rows_here ? p->wscales[(size_t)(first_row + r) * groups + g] : 0.0f;
}

static int32_t word_at(const int8_t *bytes) {
    int32_t word;
    memcpy(&word, bytes, 4);
    return word;
}

/* ---- vnni: 32 rows (two vectors) x up to VNNI_TOKENS tokens ---- */

VNNI INLINE void tokens_vnni(const block_t *b, int t0, const int nt, const int keep_terms) {
    __m512 val[VNNI_TOKENS][2];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) val[t][0] = val[t][1] = _mm512_setzero_ps();
    const uint8_t *w = b->w;
    const int8_t *x0 = b->xq + (size_t)t0 * b->cols;
    int low = b->rows_here < 16 ? b->rows_here : 16, high = b->rows_here - low;
    __mmask16 first = (__mmask16)((1u << low) - 1), second = (__mmask16)((1u << high) - 1);
    __m512i lane_terms = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(b->total_groups));
    for (int g = 0; g < b->groups; g++) {
        __m512i acc[VNNI_TOKENS][2];
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++)
            acc[t][0] = acc[t][1] = _mm512_set1_epi32(b->xoffset[(size_t)(t0 + t) * b->groups + g]);
        const int8_t *x = x0 + (size_t)g * b->steps_per_group * 4;
        for (int s = 0; s < b->steps_per_group; s++, w += STEP_BYTES, x += 4) {
            __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                __m512i xt = _mm512_set1_epi32(word_at(x + (size_t)t * b->cols));
                acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], w0, xt);
                acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], w1, xt);
            }
        }
        __m512 ws0 = _mm512_loadu_ps(b->ws + g * TILE_ROWS), ws1 = _mm512_loadu_ps(b->ws + g * TILE_ROWS + 16);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            __m512 xs = _mm512_set1_ps(b->xs[(size_t)(t0 + t) * b->groups + g]);
            __m512 term0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[t][0]), ws0), xs);
            __m512 term1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[t][1]), ws1), xs);
            if (keep_terms) {
                float *at = b->terms + (size_t)(t0 + t) * b->rows * b->total_groups + g;
                _mm512_mask_i32scatter_ps(at, first, lane_terms, term0, 4);
                _mm512_mask_i32scatter_ps(at + (size_t)16 * b->total_groups, second, lane_terms, term1, 4);
            } else {
                val[t][0] = _mm512_add_ps(val[t][0], term0);
                val[t][1] = _mm512_add_ps(val[t][1], term1);
            }
        }
    }
    if (keep_terms) return;
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) {
        float *out = b->out + (size_t)(t0 + t) * b->out_stride;
        _mm512_mask_storeu_ps(out, first, val[t][0]);
        _mm512_mask_storeu_ps(out + 16, second, val[t][1]);
    }
}

VNNI INLINE void passes_vnni(const block_t *b, int tokens, const int keep_terms) {
    int t0 = 0;
    for (; t0 + VNNI_TOKENS <= tokens; t0 += VNNI_TOKENS) tokens_vnni(b, t0, VNNI_TOKENS, keep_terms);
    switch (tokens - t0) {
    case 5: tokens_vnni(b, t0, 5, keep_terms); break;
    case 4: tokens_vnni(b, t0, 4, keep_terms); break;
    case 3: tokens_vnni(b, t0, 3, keep_terms); break;
    case 2: tokens_vnni(b, t0, 2, keep_terms); break;
    case 1: tokens_vnni(b, t0, 1, keep_terms); break;
    default: break;
    }
}

VNNI static void block_vnni(const block_t *b, int tokens) {
    if (b->terms)
        passes_vnni(b, tokens, 1);
    else
        passes_vnni(b, tokens, 0);
}

/* ---- avx2: 16 rows (two vectors) x up to AVX2_TOKENS tokens, the float sums in a small tile ---- */

AVX2 INLINE __m256i dot4_avx2(__m256i w, __m256i w_magnitude, __m256i x) {
    /* maddubs takes unsigned x signed bytes: w's sign moves onto x; |w| <= 128, |x| <= 127 keep the
     * int16 pair sums below 32768 */
    __m256i pairs = _mm256_maddubs_epi16(w_magnitude, _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

AVX2 INLINE void tokens_avx2(const block_t *b, int half, int t0, const int nt, const int keep_terms) {
    float val[AVX2_TOKENS][16] = {{0}};
    const uint8_t *w = b->w + 64 * half;
    const float *ws = b->ws + 16 * half;
    const int8_t *x0 = b->xq + (size_t)t0 * b->cols;
    int here = b->rows_here - 16 * half < 16 ? b->rows_here - 16 * half : 16;
    for (int g = 0; g < b->groups; g++) {
        __m256i acc[AVX2_TOKENS][2];
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
        const int8_t *x = x0 + (size_t)g * b->steps_per_group * 4;
        for (int s = 0; s < b->steps_per_group; s++, w += STEP_BYTES, x += 4) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)w), w1 = _mm256_loadu_si256((const __m256i *)(w + 32));
            __m256i m0 = _mm256_sign_epi8(w0, w0), m1 = _mm256_sign_epi8(w1, w1);
#pragma GCC unroll 4
            for (int t = 0; t < nt; t++) {
                __m256i xt = _mm256_set1_epi32(word_at(x + (size_t)t * b->cols));
                acc[t][0] = _mm256_add_epi32(acc[t][0], dot4_avx2(w0, m0, xt));
                acc[t][1] = _mm256_add_epi32(acc[t][1], dot4_avx2(w1, m1, xt));
            }
        }
        __m256 ws0 = _mm256_loadu_ps(ws + g * TILE_ROWS), ws1 = _mm256_loadu_ps(ws + g * TILE_ROWS + 8);
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            __m256 xs = _mm256_set1_ps(b->xs[(size_t)(t0 + t) * b->groups + g]);
            __m256 term0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[t][0]), ws0), xs);
            __m256 term1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[t][1]), ws1), xs);
            if (keep_terms) {
                float lanes[16], *at = b->terms + ((size_t)(t0 + t) * b->rows + 16 * half) * b->total_groups + g;
                _mm256_storeu_ps(lanes, term0);
                _mm256_storeu_ps(lanes + 8, term1);
                for (int r = 0; r < here; r++) at[(size_t)r * b->total_groups] = lanes[r];
            } else {
                _mm256_storeu_ps(val[t], _mm256_add_ps(_mm256_loadu_ps(val[t]), term0));
                _mm256_storeu_ps(val[t] + 8, _mm256_add_ps(_mm256_loadu_ps(val[t] + 8), term1));
            }
        }
    }
    if (keep_terms) return;
    for (int t = 0; t < nt; t++)
        memcpy(b->out + (size_t)(t0 + t) * b->out_stride + 16 * half, val[t], sizeof(float) * here);
}

AVX2 INLINE void passes_avx2(const block_t *b, int tokens, const int keep_terms) {
    for (int half = 0; half < 2 && 16 * half < b->rows_here; half++) {
        int t0 = 0;
        for (; t0 + AVX2_TOKENS <= tokens; t0 += AVX2_TOKENS) tokens_avx2(b, half, t0, AVX2_TOKENS, keep_terms);
        if (tokens - t0 == 2) tokens_avx2(b, half, t0, 2, keep_terms);
        if (tokens - t0 == 1) tokens_avx2(b, half, t0, 1, keep_terms);
    }
}

AVX2 static void block_avx2(const block_t *b, int tokens) {
    if (b->terms)
        passes_avx2(b, tokens, 1);
    else
        passes_avx2(b, tokens, 0);
}

/* ---- rows over the pool ---- */

static void tiles_part(void *context, int index, int count) {
    const tiles_t *tiles = context;
    const product_t *p = tiles->p;
    int blocks = (p->rows + TILE_ROWS - 1) / TILE_ROWS, groups = p->cols / p->group_size;
    int first = (int)((long)blocks * index / count), last = (int)((long)blocks * (index + 1) / count);
    uint8_t *w = tiles->packed + tiles->part_bytes * index;
    float *ws = (float *)(w + (size_t)p->cols * TILE_ROWS);
    for (int k = first; k < last; k++) {
        int row = k * TILE_ROWS, here = p->rows - row < TILE_ROWS ? p->rows - row : TILE_ROWS;
        pack_block(p, row, here, w, ws);
        block_t b = {w, ws, p->xq, p->xscale, tiles->xoffset, p->out ? p->out + row : NULL,
                     tiles->terms ? tiles->terms + (size_t)row * tiles->total_groups : NULL, p->rows, p->cols,
                     groups, p->group_size / 4, here, tiles->total_groups, product_out_stride(p)};
        if (p->isa == ISA_VNNI)
            block_vnni(&b, p->tokens);
        else
            block_avx2(&b, p->tokens);
    }
}

/* ---- activations ---- */

typedef struct {
    const product_t *p;
    const float *x;
    int8_t *xq;
    float *xscale;
    int32_t *xoffset; /* NULL on avx2 */
} quantize_t;

/* quantize_activations' runq.c rule (dot.c's quantize_group), 8 values at a time: q = roundf(x / d),
 * d = max|x| / 127. The maximum and the quotients are exact in any order, and roundf (half away
 * from zero) is rebuilt exactly: |x / d| < 2^23, so x / d - trunc(x / d) has no rounding error. */
AVX2 static void quantize_group_avx2(const float *x, int n, int8_t *q, float *scale, int32_t *sum) {
    __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), amax8 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) /* max_ps(a, b) is a > b ? a : b, the scalar loop's test */
        amax8 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), magnitude), amax8);
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, amax8);
    for (int k = 0; k < 8; k++)
        if (lanes[k] > amax) amax = lanes[k];
    for (int k = i; k < n; k++)
        if (fabsf(x[k]) > amax) amax = fabsf(x[k]);
    float d = amax / 127.0f;
    __m256 divisor = _mm256_set1_ps(d), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    __m256i total = _mm256_setzero_si256();
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 ratio = d > 0.0f ? _mm256_div_ps(_mm256_loadu_ps(x + i), divisor) : _mm256_setzero_ps();
        __m256 whole = _mm256_round_ps(ratio, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        __m256 away = _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(ratio, whole), magnitude), half, _CMP_GE_OQ);
        __m256 step = _mm256_or_ps(_mm256_and_ps(one, away), _mm256_andnot_ps(magnitude, ratio)); /* +-1 or +-0 */
        __m256i values = _mm256_cvtps_epi32(_mm256_add_ps(whole, _mm256_and_ps(step, away)));
        total = _mm256_add_epi32(total, values);
        __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(values), _mm256_extracti128_si256(values, 1));
        _mm_storel_epi64((__m128i *)(q + i), _mm_packs_epi16(words, words));
    }
    int32_t totals[8], count = 0;
    _mm256_storeu_si256((__m256i *)totals, total);
    for (int k = 0; k < 8; k++) count += totals[k];
    for (int k = i; k < n; k++) {
        q[k] = (int8_t)roundf(d > 0.0f ? x[k] / d : 0.0f);
        count += q[k];
    }
    *scale = d;
    if (sum) *sum = -128 * count;
}

AVX2 static void quantize_part(void *context, int index, int count) {
    const quantize_t *a = context;
    const product_t *p = a->p;
    int groups = p->cols / p->group_size;
    size_t first = (size_t)p->tokens * index / count * groups, last = (size_t)p->tokens * (index + 1) / count * groups;
    for (size_t i = first; i < last; i++)
        quantize_group_avx2(a->x + i * p->group_size, p->group_size, a->xq + i * p->group_size, a->xscale + i,
                            a->xoffset ? a->xoffset + i : NULL);
}

static int run(const product_t *p, const float *x, int8_t *xq, float *xscale, float *terms, int total_groups,
               int parts) {
    int groups = p->cols / p->group_size, blocks = (p->rows + TILE_ROWS - 1) / TILE_ROWS;
    if (parts > blocks) parts = blocks;
    /* 64-byte multiples keep every part's block on its own cache lines */
    size_t part_bytes = ((size_t)p->cols * TILE_ROWS + sizeof(float) * groups * TILE_ROWS + 63) / 64 * 64;
    int32_t *xoffset = p->isa == ISA_VNNI ? malloc(sizeof(int32_t) * (size_t)p->tokens * groups) : NULL;
    uint8_t *packed = aligned_alloc(64, part_bytes * parts);
    if (!packed || (p->isa == ISA_VNNI && !xoffset)) {
        free(xoffset), free(packed);
        return -1;
    }
    quantize_t activations = {p, x, xq, xscale, xoffset};
    pool_run(quantize_part, &activations, parts < p->tokens ? parts : p->tokens);
    tiles_t tiles = {p, xoffset, packed, part_bytes, terms, total_groups};
    pool_run(tiles_part, &tiles, parts);
    free(xoffset), free(packed);
    return 0;
}

int llama2c_tiles_product(const product_t *p, const float *x, int8_t *xq, float *xscale, int parts) {
    return run(p, x, xq, xscale, NULL, 0, parts);
}

int llama2c_tiles_terms(const product_t *p, const float *x, int8_t *xq, float *xscale, float *terms,
                        int first_group, int total_groups, int parts) {
    return run(p, x, xq, xscale, terms + first_group, total_groups, parts);
}
