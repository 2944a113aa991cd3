/* Products of block-quantized weight rows with Q8-quantized activations. */
#ifndef LLMTP_DOT_H
#define LLMTP_DOT_H

#include <stddef.h>
#include <stdint.h>

enum { FMT_Q8_0 = 0, FMT_Q4_0 = 1, FMT_Q4_1 = 2, FMT_LLAMA2C_Q8 = 3 };
enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_VNNI = 2 }; /* VNNI: AVX2, with AVX-512 VNNI for the 4-bit rows */
enum { QK = 32 }; /* values per GGUF block and per activation block */

/* One product out[t, r] = sum_j W[r, j] * x[t, j], with x already quantized. */
typedef struct {
    int format, isa;
    const uint8_t *weights;  /* rows * row_bytes */
    const float *wscales;    /* llama2.c only: rows * cols / group_size */
    size_t row_bytes;
    int rows, cols, tokens, group_size;
    const int8_t *xq;        /* (tokens, cols); Q4_0 on avx2/vnni: pair order, see quantize_activations */
    const float *xscale;     /* (tokens, cols / group) */
    const float *xsum;       /* (tokens, cols / QK): scale * sum(q), for Q4_1 */
    float *out;              /* (tokens, rows) */
    const int32_t *xoffset;  /* (tokens, cols / QK) when block_offset_bias() > 0, see quantize_activations */
    size_t out_stride;       /* floats between tokens' outputs; 0: rows (several products stacked by rows
                              * write their outputs side by side, see module.c's matmul_stack) */
} product_t;

static inline size_t product_out_stride(const product_t *p) { return p->out_stride ? p->out_stride : (size_t)p->rows; }

int cpu_has_avx2(void);
int cpu_has_vnni(void); /* AVX2's set, AVX-512 VL and VNNI, and the OS saving AVX-512 state */
size_t block_bytes(int format);
/* The bias b a SIMD row adds to every weight value of a block (Q4_0's nibble is q + 8; the VNNI Q8_0
 * row reads w + 128), taken back out through xoffset; 0: no xoffset. */
int block_offset_bias(const product_t *p);
/* Quantize x (tokens, cols) for `format`: groups of QK (GGUF) or group_size (llama2.c, runq.c's rule).
 * xoffset (when block_offset_bias(p) > 0, else unused): -b * the sum of each block's q. Q4_0 on the
 * SIMD backends stores xq in pair order: in each 64 values of two blocks, values 16-31 of the first
 * and 0-15 of the second trade places, so a vector of the two blocks' 16 low-nibble bytes meets the
 * values 0-15 of both and their high nibbles the values 16-31 (a lone last block stays as it is). */
void quantize_activations(const product_t *p, const float *x, int8_t *xq, float *xscale, float *xsum,
                          int32_t *xoffset);
void product_rows(const product_t *p, int row_begin, int row_end);
/* llama2.c rows row_begin..row_end: each group's term of runq.c's sum (the product before its sum),
 * into terms (tokens, rows, total_groups) at first_group.. (see runq_group_terms). */
void llama2c_term_rows(const product_t *p, float *terms, int first_group, int total_groups, int row_begin,
                       int row_end);
/* Expand rows row_begin..row_end of p->weights to float32 out ((row_end - row_begin), cols): for
 * prefill, one tile at a time into a small buffer a BLAS product then reads. */
void dequantize_rows(const product_t *p, int row_begin, int row_end, float *out);

#endif
