/* runq.c's element-wise steps (llama2.c's int8 engine, commit 350e04f), in its order and
 * rounding: float32 sums left to right, glibc's expf/cosf/sinf/powf/sqrtf. Compiled with
 * -ffp-contract=off, so no multiply-add is fused where runq.c (built without -march) has none. */
#ifndef LLMTP_RUNQ_OPS_H
#define LLMTP_RUNQ_OPS_H

#include <stddef.h>
#include <stdint.h>

/* out[t] = weight * (ss * x[t]), ss = 1 / sqrtf(sum x^2 / size + eps), x (rows, size). */
void runq_rmsnorm(float *out, const float *x, const float *weight, int rows, int size, float eps);

/* vec (tokens, n_heads, head_size) rotated in place: pair (j, j+1) of every head by
 * pos * (1 / powf(theta, j / (float)head_size)), pos = positions[t]. */
void runq_rope(float *vec, int tokens, int n_heads, int head_size, const int32_t *positions, float theta);

/* out (tokens, n_heads, head_size): query head h of token t against keys/values
 * (n_kv, stride, head_size) of kv head kv_of_head[h], positions 0..positions[t], for the items
 * (t * n_heads + h) item_begin, item_begin + item_step, ... (runq.c splits heads over its OpenMP
 * threads; each item is computed alone, so any split gives the same bits).
 * att: scratch of positions[t] + 1 floats (the largest). */
void runq_attention(float *out, const float *q, const float *keys, const float *values, float *att, int tokens,
                    int n_heads, int head_size, const int32_t *kv_of_head, int stride, const int32_t *positions,
                    int item_begin, int item_step);

/* gate[i] = gate[i] * (1 / (1 + expf(-gate[i]))) * up[i]. */
void runq_swiglu(float *gate, const float *up, size_t n);

/* out[i] = ((s + terms[i, 0]) + terms[i, 1]) + ..., n sums of `groups` terms each, where s is 0 or,
 * with from_out, out[i] itself (a sum carried on from the groups before these). */
void runq_ordered_sum(float *out, const float *terms, size_t n, int groups, int from_out);

#endif
