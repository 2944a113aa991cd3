/* float32 products for a few tokens at a time (decode, a batch of decoding sequences). */
#ifndef LLMTP_F32_H
#define LLMTP_F32_H

enum { F32_MAX_TOKENS = 8 };

typedef struct {
    const float *weights; /* rows x cols, rows `row_stride` floats apart */
    long row_stride;
    int rows, cols, tokens; /* 1 <= tokens <= F32_MAX_TOKENS */
    const float *x;       /* (tokens, cols) */
    float *out;           /* (tokens, rows), tokens out_stride floats apart */
    int wide;             /* 5+ tokens in 16-lane registers, two rows at a time (AVX-512F: only where cpu_has_vnni()) */
    long out_stride;      /* >= rows: several products stacked by rows write their outputs side by side */
} f32_product_t;

/* out[t, r] = sum_j weights[r, j] * x[t, j] for rows row_begin..row_end, AVX2+FMA (call only when
 * cpu_has_avx2()). Rows are taken one at a time; each output is two chains of 8-lane
 * multiply-adds over alternate 8-column chunks, summed the same way whatever `tokens` is and
 * however rows are split over threads: a sequence gets the same bits alone and in a batch. */
void f32_rows_avx2(const f32_product_t *p, int row_begin, int row_end);

#endif
