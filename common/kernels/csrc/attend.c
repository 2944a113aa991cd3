/* See attend.h. numpy's attention cost one call of ~110 us per sequence and layer (a 110M step
 * of 8 decoding sequences spent 12 ms of 54 there) and, in a prefill, a (heads, tokens, positions)
 * score array per layer; here one call per layer does every sequence, and an item needs a row of
 * scores only.
 *
 * Per item: scores (q . k_p) / sqrt(head_dim) for p = 0..position, eight positions at a time;
 * softmax with max subtracted and a polynomial exp; then the weighted sum of value rows, divided
 * by the sum of weights once at the end. */
#include "attend.h"

#include <immintrin.h>
#include <math.h>

#include "lanes.h"

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The lane sums of a[0..7] as one vector (lane i = sum of a[i]'s lanes). */
AVX2 static inline __m256 lane_sums8(const __m256 a[8]) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* e^x within 2 ulp for x in [-87.3, 88] (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7
 * polynomial in r, times 2^n through the exponent bits); 0 below, where e^x leaves float's normal
 * range (and for -inf: the padding of a score row). */
AVX2 static inline __m256 exp8(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.33654f);
    __m256 in_range = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lowest), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln 2 in two parts: exact n * high */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(two_to_n)), in_range);
}

/* scores[p] = (q . keys[p]) * scale for p < n: eight positions share each load of q. */
AVX2 static void item_scores(const float *q, const float *keys, int n, int head_dim, float scale, float *scores) {
    int vector_dims = head_dim & ~7, p = 0;
    for (; p + 8 <= n; p += 8) {
        const float *k = keys + (long)p * head_dim;
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (int d = 0; d < vector_dims; d += 8) {
            __m256 qd = _mm256_loadu_ps(q + d);
            for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k + (long)i * head_dim + d), acc[i]);
        }
        __m256 sums = lane_sums8(acc);
        if (vector_dims < head_dim) {
            float tails[8];
            for (int i = 0; i < 8; i++) {
                tails[i] = 0.0f;
                for (int d = vector_dims; d < head_dim; d++) tails[i] += q[d] * k[(long)i * head_dim + d];
            }
            sums = _mm256_add_ps(sums, _mm256_loadu_ps(tails));
        }
        _mm256_storeu_ps(scores + p, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
    }
    for (; p < n; p++) {
        const float *k = keys + (long)p * head_dim;
        __m256 acc = _mm256_setzero_ps();
        for (int d = 0; d < vector_dims; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
        float sum = hsum8(acc);
        for (int d = vector_dims; d < head_dim; d++) sum += q[d] * k[d];
        scores[p] = sum * scale;
    }
}

/* scores[0..n) -> exp(score - max), padded with zeros to a multiple of 8; returns their sum. */
AVX2 static float exp_weights(float *scores, int n) {
    int padded = (n + 7) & ~7;
    for (int p = n; p < padded; p++) scores[p] = -INFINITY;
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (int p = 0; p < padded; p += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(scores + p));
    __m256 max = _mm256_set1_ps(hmax8(top)), total = _mm256_setzero_ps();
    for (int p = 0; p < padded; p += 8) {
        __m256 w = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + p), max));
        _mm256_storeu_ps(scores + p, w);
        total = _mm256_add_ps(total, w);
    }
    return hsum8(total);
}

/* out = scale * sum_p weights[p] * values[p], two chains (even and odd p) per 8 dims. */
AVX2 static void weighted_values(const float *values, const float *weights, int n, int head_dim, float scale,
                                 float *out) {
    int d = 0;
    for (; d + 16 <= head_dim; d += 16) {
        __m256 even0 = _mm256_setzero_ps(), even1 = _mm256_setzero_ps();
        __m256 odd0 = _mm256_setzero_ps(), odd1 = _mm256_setzero_ps();
        int p = 0;
        for (; p + 2 <= n; p += 2) {
            const float *v = values + (long)p * head_dim + d;
            __m256 w0 = _mm256_broadcast_ss(weights + p), w1 = _mm256_broadcast_ss(weights + p + 1);
            even0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v), even0);
            even1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v + 8), even1);
            odd0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(v + head_dim), odd0);
            odd1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(v + head_dim + 8), odd1);
        }
        if (p < n) {
            const float *v = values + (long)p * head_dim + d;
            __m256 w0 = _mm256_broadcast_ss(weights + p);
            even0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v), even0);
            even1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v + 8), even1);
        }
        __m256 s = _mm256_set1_ps(scale);
        _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_add_ps(even0, odd0), s));
        _mm256_storeu_ps(out + d + 8, _mm256_mul_ps(_mm256_add_ps(even1, odd1), s));
    }
    for (; d + 8 <= head_dim; d += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int p = 0; p < n; p++)
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + p), _mm256_loadu_ps(values + (long)p * head_dim + d), acc);
        _mm256_storeu_ps(out + d, _mm256_mul_ps(acc, _mm256_set1_ps(scale)));
    }
    for (; d < head_dim; d++) {
        float acc = 0.0f;
        for (int p = 0; p < n; p++) acc += weights[p] * values[(long)p * head_dim + d];
        out[d] = acc * scale;
    }
}

void attend_items_avx2(const attend_t *a, float *scores, int item_begin, int step) {
    int items = a->tokens * a->n_heads, head_dim = a->head_dim;
    float scale = (float)(1.0 / sqrt((double)head_dim)); /* numpy's float32(1 / sqrt(D)) */
    for (int item = item_begin; item < items; item += step) {
        int token = item / a->n_heads, head = item % a->n_heads;
        long kv_offset = ((long)a->token_slot[token] * a->n_kv + a->kv_of_head[head]) * a->seq_len * head_dim;
        int n = a->token_position[token] + 1;
        item_scores(a->q + token * a->q_stride + (long)head * head_dim, a->keys + kv_offset, n, head_dim, scale, scores);
        float total = exp_weights(scores, n);
        weighted_values(a->values + kv_offset, scores, n, head_dim, 1.0f / total, a->out + (long)item * head_dim);
    }
}
