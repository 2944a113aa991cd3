/* See f32.h. Decode reads every weight once per step, so the product is bound by memory: the
 * kernel streams each weight row once for all the step's tokens (OpenBLAS's sgemm packs the
 * whole matrix for a few rows and ran at a quarter of sgemv's speed here), keeping up to 8
 * accumulators (rows x tokens) in registers. */
#include "f32.h"

#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* R rows from `row` times T tokens from `token`: every (r, t) its own accumulator. */
#define DEFINE_BLOCK(R, T)                                                                            \
    AVX2 static void block_##R##x##T(const f32_product_t *p, int row, int token) {                   \
        __m256 acc[R][T];                                                                             \
        const float *w[R];                                                                            \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                        \
            w[r] = p->weights + (long)(row + r) * p->row_stride;                                      \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();     \
        }                                                                                             \
        int j = 0, cols = p->cols;                                                                    \
        for (; j + 8 <= cols; j += 8) {                                                               \
            __m256 xv[T];                                                                             \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_ps(p->x + (long)(token + t) * cols + j); \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                    \
                __m256 wv = _mm256_loadu_ps(w[r] + j);                                                \
                _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]); \
            }                                                                                         \
        }                                                                                             \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                          \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                                    \
                float sum = hsum8(acc[r][t]);                                                         \
                for (int k = j; k < cols; k++) sum += w[r][k] * p->x[(long)(token + t) * cols + k];            \
                p->out[(long)(token + t) * p->rows + row + r] = sum;                                            \
            }                                                                                         \
    }

DEFINE_BLOCK(8, 1)
DEFINE_BLOCK(4, 2)
DEFINE_BLOCK(2, 1)
DEFINE_BLOCK(2, 2)
DEFINE_BLOCK(2, 3)
DEFINE_BLOCK(2, 4)
DEFINE_BLOCK(1, 1)
DEFINE_BLOCK(1, 2)
DEFINE_BLOCK(1, 3)
DEFINE_BLOCK(1, 4)

typedef void (*block_fn)(const f32_product_t *, int, int);

/* Blocks of at most 4 tokens: beyond that, loading every token's x per weight vector outweighs
 * the multiply-adds (more than one load per FMA); 5..8 tokens run as two blocks over the same
 * rows, which are still in L1 for the second. */
static const block_fn one_row[5] = {NULL, block_1x1, block_1x2, block_1x3, block_1x4};
static const block_fn two_rows[5] = {NULL, block_2x1, block_2x2, block_2x3, block_2x4};

static void rows_of_tokens(const f32_product_t *p, int row, int token, int tokens, int n_rows) {
    if (n_rows == 2) two_rows[tokens](p, row, token);
    else one_row[tokens](p, row, token);
}

void f32_rows_avx2(const f32_product_t *p, int row_begin, int row_end) {
    int tokens = p->tokens, row = row_begin;
    if (tokens == 1) {
        for (; row + 8 <= row_end; row += 8) block_8x1(p, row, 0);
    } else if (tokens == 2) {
        for (; row + 4 <= row_end; row += 4) block_4x2(p, row, 0);
    }
    for (; row < row_end; row += 2) {
        int n_rows = row + 2 <= row_end ? 2 : 1;
        for (int token = 0; token < tokens; token += 4)
            rows_of_tokens(p, row, token, tokens - token < 4 ? tokens - token : 4, n_rows);
    }
}
