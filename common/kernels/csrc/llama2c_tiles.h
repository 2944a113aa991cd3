/* Prefill products of llama2.c v2 (grouped int8) rows: several rows times several tokens at once.
 *
 * Same bits as product_rows (runq.c's matmul): the int32 sum of a group is exact in any order, and
 * each (row, token) output is still val = val + ((float)ival * ws) * xs group by group in float32,
 * one output per vector lane. */
#ifndef LLMTP_LLAMA2C_TILES_H
#define LLMTP_LLAMA2C_TILES_H

#include "dot.h"

/* Whether llama2c_tiles_product takes p: llama2.c format, 3+ tokens (fewer: the row kernels are
 * as fast), the avx2 or vnni backend, group_size a multiple of 4 (the kernels step through a group
 * 4 columns at a time) up to 2^14. */
int llama2c_tiles_apply(const product_t *p);
/* Whether llama2c_tiles_terms takes p (any token count). */
int llama2c_tiles_apply_terms(const product_t *p);

/* out = the product of x (tokens, cols): x quantized into xq and xscale (p->xq, p->xscale) as
 * quantize_activations does, then rows split over up to `parts` parts of the pool (pool.c).
 * Returns -1 when out of memory, else 0. */
int llama2c_tiles_product(const product_t *p, const float *x, int8_t *xq, float *xscale, int parts);

/* runq_group_terms (module.c; dot.h's llama2c_term_rows takes 1-2 tokens) of x, p->out unused: terms
 * (tokens, rows, total_groups), zeroed by the caller, group g at first_group + g, the same bits. */
int llama2c_tiles_terms(const product_t *p, const float *x, int8_t *xq, float *xscale, float *terms,
                        int first_group, int total_groups, int parts);

#endif
