/* Causal attention of one layer for every token of a step, float32 (the numpy op set's decode and
 * prefill): each query head against its kv head's cached positions 0..its own position. */
#ifndef LLMTP_ATTEND_H
#define LLMTP_ATTEND_H

#include <stdint.h>

typedef struct {
    float *out;                    /* (tokens, n_heads, head_dim) */
    const float *q;                /* (tokens, n_heads, head_dim) with RoPE applied, tokens q_stride floats apart */
    const float *keys, *values;    /* one layer's cache: (n_slots, n_kv, seq_len, head_dim) */
    const int32_t *kv_of_head;     /* (n_heads,) the kv head each query head reads */
    const int32_t *token_slot;     /* (tokens,) the cache slot of each token's sequence */
    const int32_t *token_position; /* (tokens,) its position: it sees positions 0..this */
    int tokens, n_heads, n_kv, seq_len, head_dim;
    float *scores; /* scratch: one row of seq_len rounded up to 8 floats per part */
    int scores_stride;
    long q_stride; /* n_heads * head_dim, or more where q is a part of each row of a wider array (q|k|v) */
} attend_t;

/* Items item_begin, item_begin + step, ... below tokens * n_heads (item = token * n_heads + head),
 * with `scores` this part's scratch row. Every item is computed alone, the same way whatever the
 * step holds and however items are split over threads: a sequence gets the same bits alone, batched
 * and in a prefill chunk of any size. AVX2+FMA: call only when cpu_has_avx2(). */
void attend_items_avx2(const attend_t *a, float *scores, int item_begin, int step);

#endif
