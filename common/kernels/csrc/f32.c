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

#include "lanes.h"

#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx2,fma,avx512f")))

/* With 3 or more tokens a row takes long enough that the hardware prefetcher falls behind:
 * asking for the weights 2 KB ahead made 8 tokens 1.2x faster (6.1 -> 8.4-9.3 GB/s on one core,
 * 11.4 -> 15.6 on two); with 1 or 2 tokens it slowed them, so they do without. A prefetch past
 * the end of the matrix is harmless (it never faults). */
enum { PREFETCH_FLOATS = 512 };

/* The AVX-512 rows below read two rows at a time, and a pair takes twice as long: they ask for
 * weights 4 KB ahead (2 KB gave 15-18 GB/s with 8 tokens on two cores, 4 KB 21.5). */
enum { PREFETCH_FLOATS_WIDE = 1024 };

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
            p->out[(long)(token + t) * p->out_stride + row] = sum;                                          \
        }                                                                                             \
    }

DEFINE_ROW(1)
DEFINE_ROW(2)
DEFINE_ROW(3)
DEFINE_ROW(4)

/* The same sums with both chains in one 16-lane register: lanes 0-7 are the even chain (the first
 * 8 columns of each 16), lanes 8-15 the odd one, so every lane does the multiply-adds of the AVX2
 * rows, in their order (same bits). With many tokens the AVX2 rows are bound by loads (a core
 * loads 64 bytes a cycle, and every multiply-add there loads its token's x): here two rows share
 * each load of x, and 32 registers hold two rows' chains for up to 8 tokens in one pass. Used from
 * WIDE_FROM_TOKENS on: 110M shapes, 8 tokens, two cores, weights from memory, 1.2-1.3x the AVX2
 * rows (21.5 against 16-18.6 GB/s); with 4 tokens the two streams of a pair were slower. */
#define DEFINE_ROWS512(R, T)                                                                          \
    AVX512 static void rows512_##R##x##T(const f32_product_t *p, int row) {                          \
        __m512 chains[R][T];                                                                          \
        const float *w[R], *x[T];                                                                     \
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {                                        \
            w[r] = p->weights + (long)(row + r) * p->row_stride;                                      \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) chains[r][t] = _mm512_setzero_ps();  \
        }                                                                                             \
        _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) x[t] = p->x + (long)t * p->cols;         \
        int j = 0, cols = p->cols;                                                                    \
        for (; j + 16 <= cols; j += 16) {                                                             \
            __m512 w16[R];                                                                            \
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {                                    \
                _mm_prefetch((const char *)(w[r] + j + PREFETCH_FLOATS_WIDE), _MM_HINT_T0);                   \
                w16[r] = _mm512_loadu_ps(w[r] + j);                                                   \
            }                                                                                         \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                                    \
                __m512 x16 = _mm512_loadu_ps(x[t] + j);                                               \
                if (R > 1) __asm__("" : "+v"(x16)); /* one load for both rows, not one folded into each */ \
                _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)                                  \
                    chains[r][t] = _mm512_fmadd_ps(w16[r], x16, chains[r][t]);                        \
            }                                                                                         \
        }                                                                                             \
        int last_chunk = j + 8 <= cols;                                                               \
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)                                          \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                                    \
                __m256 even = _mm512_castps512_ps256(chains[r][t]);                                   \
                __m256 odd = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(chains[r][t]), 1)); \
                if (last_chunk)                                                                       \
                    even = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + j), _mm256_loadu_ps(x[t] + j), even);   \
                float sum = hsum8(_mm256_add_ps(even, odd));                                          \
                for (int k = j + 8 * last_chunk; k < cols; k++) sum += w[r][k] * x[t][k];             \
                p->out[(long)t * p->out_stride + row + r] = sum;                                            \
            }                                                                                         \
    }

#define DEFINE_ROWS512_BOTH(T) DEFINE_ROWS512(1, T) DEFINE_ROWS512(2, T)
DEFINE_ROWS512_BOTH(5)
DEFINE_ROWS512_BOTH(6)
DEFINE_ROWS512_BOTH(7)
DEFINE_ROWS512_BOTH(8)

enum { WIDE_FROM_TOKENS = 5 };

typedef void (*rows512_fn)(const f32_product_t *, int);

static const rows512_fn pair_of_tokens[9] = {NULL, NULL, NULL, NULL, NULL, rows512_2x5,
                                             rows512_2x6, rows512_2x7, rows512_2x8};
static const rows512_fn row512_of_tokens[9] = {NULL, NULL, NULL, NULL, NULL, rows512_1x5,
                                               rows512_1x6, rows512_1x7, rows512_1x8};

typedef void (*row_fn)(const f32_product_t *, int, int);

/* At most 4 tokens per pass: 8 accumulators, two weight vectors and a token's x fill the 16
 * registers; 5..8 tokens run as two passes over the same row, which is still in L1 for the
 * second. */
static const row_fn row_of_tokens[5] = {NULL, row_x1, row_x2, row_x3, row_x4};

void f32_rows_avx2(const f32_product_t *p, int row_begin, int row_end) {
    int tokens = p->tokens;
    if (p->wide && tokens >= WIDE_FROM_TOKENS) {
        int row = row_begin;
        for (; row + 2 <= row_end; row += 2) pair_of_tokens[tokens](p, row);
        if (row < row_end) row512_of_tokens[tokens](p, row);
        return;
    }
    for (int row = row_begin; row < row_end; row++)
        for (int token = 0; token < tokens; token += 4)
            row_of_tokens[tokens - token < 4 ? tokens - token : 4](p, row, token);
}
