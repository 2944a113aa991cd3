/* See f32.h. Decode reads every weight once per step, so the product is bound by memory: the
 * kernel streams each weight row once for all the step's tokens (OpenBLAS's sgemm packs the
 * whole matrix for a few rows and ran at a quarter of sgemv's speed here).
 *
 * One row at a time: the rows of a part are read front to back as a single sequential stream,
 * which the hardware prefetcher follows best. Blocks of 8 rows read side by side (8 streams
 * 3 KB apart) streamed 19.5 GB/s on one core of this machine's EPYC against 28.9 for one row with
 * two accumulators, and 27 against 32 GB/s on two (cols 768, the 110M model's). */
#include "f32.h"

#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))

/* With 3 or more tokens a row takes long enough that the hardware prefetcher falls behind:
 * asking for the weights 2 KB ahead made 8 tokens 1.2x faster (6.1 -> 8.4-9.3 GB/s on one core,
 * 11.4 -> 15.6 on two); with 1 or 2 tokens it slowed them, so they do without. A prefetch past
 * the end of the matrix is harmless (it never faults). */
enum { PREFETCH_FLOATS = 512 };

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row times T tokens from `token`. Every output is summed the same way whatever T is: two
 * 8-lane chains over alternate 8-column chunks of each 16 (two so that a multiply-add does not
 * wait on the previous one), a last 8-column chunk on the first chain, the chains added, the
 * lanes added, then the remaining columns one by one. */
#define DEFINE_ROW(T)                                                                                 \
    AVX2 static void row_x##T(const f32_product_t *p, int row, int token) {                          \
        __m256 even[T], odd[T];                                                                       \
        const float *w = p->weights + (long)row * p->row_stride;                                      \
        const float *x[T];                                                                            \
        _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                                        \
            even[t] = _mm256_setzero_ps(), odd[t] = _mm256_setzero_ps();                              \
            x[t] = p->x + (long)(token + t) * p->cols;                                                \
        }                                                                                             \
        int j = 0, cols = p->cols;                                                                    \
        for (; j + 16 <= cols; j += 16) {                                                             \
            if (T > 2) _mm_prefetch((const char *)(w + j + PREFETCH_FLOATS), _MM_HINT_T0);            \
            __m256 w0 = _mm256_loadu_ps(w + j), w1 = _mm256_loadu_ps(w + j + 8);                     \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                                    \
                even[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + j), even[t]);                    \
                odd[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[t] + j + 8), odd[t]);                  \
            }                                                                                         \
        }                                                                                             \
        if (j + 8 <= cols) {                                                                          \
            __m256 w0 = _mm256_loadu_ps(w + j);                                                       \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++)                                      \
                even[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + j), even[t]);                    \
            j += 8;                                                                                   \
        }                                                                                             \
        _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                                        \
            float sum = hsum8(_mm256_add_ps(even[t], odd[t]));                                        \
            for (int k = j; k < cols; k++) sum += w[k] * x[t][k];                                     \
            p->out[(long)(token + t) * p->rows + row] = sum;                                          \
        }                                                                                             \
    }

DEFINE_ROW(1)
DEFINE_ROW(2)
DEFINE_ROW(3)
DEFINE_ROW(4)

typedef void (*row_fn)(const f32_product_t *, int, int);

/* At most 4 tokens per pass: 8 accumulators, two weight vectors and a token's x fill the 16
 * registers; 5..8 tokens run as two passes over the same row, which is still in L1 for the
 * second. */
static const row_fn row_of_tokens[5] = {NULL, row_x1, row_x2, row_x3, row_x4};

void f32_rows_avx2(const f32_product_t *p, int row_begin, int row_end) {
    int tokens = p->tokens;
    for (int row = row_begin; row < row_end; row++)
        for (int token = 0; token < tokens; token += 4)
            row_of_tokens[tokens - token < 4 ? tokens - token : 4](p, row, token);
}
