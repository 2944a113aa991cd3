/* Horizontal sums shared by the AVX2 kernels: one order of adding a vector's 8 lanes, so every
 * kernel that ends a dot product this way rounds it the same way. */
#ifndef LLMTP_LANES_H
#define LLMTP_LANES_H

#include <immintrin.h>

/* ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) */
__attribute__((target("avx2"))) static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
