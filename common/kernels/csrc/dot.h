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
    const int8_t *xq;        /* (tokens, cols) */
    const float *xscale;     /* (tokens, cols / group) */
    const float *xsum;       /* (tokens, cols / QK): scale * sum(q), for Q4_1 */
    float *out;              /* (tokens, rows) */
    const int32_t *xoffset;  /* VNNI Q4_0 only: (tokens, cols / QK, 8), see quantize_activations */
} product_t;

int cpu_has_avx2(void);
int cpu_has_vnni(void); /* AVX2's set, AVX-512 VL and VNNI, and the OS saving AVX-512 state */
size_t block_bytes(int format);
/* Quantize x (tokens, cols) for `format`: groups of QK (GGUF) or group_size (llama2.c, runq.c's rule).
 * xoffset (VNNI, else NULL; Q4_0 only): for each QK values and each 4 of them, -8 * their sum (a
 * Q4_0 nibble is q + 8). */
void quantize_activations(const product_t *p, const float *x, int8_t *xq, float *xscale, float *xsum,
                          int32_t *xoffset);
void product_rows(const product_t *p, int row_begin, int row_end);
/* Expand rows row_begin..row_end of p->weights to float32 out ((row_end - row_begin), cols): for
 * prefill, one tile at a time into a small buffer a BLAS product then reads. */
void dequantize_rows(const product_t *p, int row_begin, int row_end, float *out);

#endif
