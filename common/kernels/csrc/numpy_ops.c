/* See numpy_ops.h. Built with -ffp-contract=off: every multiply-add below is fused only where it
 * is written as one. */
#include "numpy_ops.h"

#include <immintrin.h>
#include <math.h>

/* numpy's pairwise sum of x[j]^2 (loops_utils.h's order): fewer than 8 values one by one from -0;
 * up to 128, eight partial sums over interleaved values, added ((0+1)+(2+3))+((4+5)+(6+7)), then
 * the rest one by one; more, the two halves summed so (the first a multiple of 8 long) and added. */
static float pairwise_squares(const float *x, long n) {
    if (n < 8) {
        float sum = -0.0f;
        for (long j = 0; j < n; j++) sum += x[j] * x[j];
        return sum;
    }
    if (n <= 128) {
        float r[8];
        for (int k = 0; k < 8; k++) r[k] = x[k] * x[k];
        long j = 8;
        for (; j < n - n % 8; j += 8)
            for (int k = 0; k < 8; k++) r[k] += x[j + k] * x[j + k];
        float sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; j < n; j++) sum += x[j] * x[j];
        return sum;
    }
    long half = n / 2;
    half -= half % 8;
    return pairwise_squares(x, half) + pairwise_squares(x + half, n - half);
}

void numpy_rmsnorm(float *out, const float *x, const float *weight, int rows, int dim, float eps) {
    for (int r = 0; r < rows; r++, x += dim, out += dim) {
        float mean_square = pairwise_squares(x, dim) / (float)dim + eps;
        float inverse_rms = 1.0f / sqrtf(mean_square);
        for (int j = 0; j < dim; j++) out[j] = (x[j] * inverse_rms) * weight[j];
    }
}

__attribute__((target("avx2,fma"))) void numpy_rope_avx2(float *vec, int n_heads, int head_dim,
                                                          const float *rotation) {
    for (int h = 0; h < n_heads; h++, vec += head_dim) {
        int j = 0;
        for (; j + 8 <= head_dim; j += 8) {
            __m256 ab = _mm256_loadu_ps(vec + j), cs = _mm256_loadu_ps(rotation + j);
            __m256 a = _mm256_moveldup_ps(ab), b = _mm256_movehdup_ps(ab);
            __m256 b_sc = _mm256_mul_ps(b, _mm256_permute_ps(cs, 0xB1)); /* (b sin, b cos) */
            _mm256_storeu_ps(vec + j, _mm256_fmaddsub_ps(a, cs, b_sc));  /* (a cos - b sin, a sin + b cos) */
        }
        for (; j < head_dim; j += 2) {
            __m128 a = _mm_set_ss(vec[j]), b = _mm_set_ss(vec[j + 1]);
            __m128 c = _mm_set_ss(rotation[j]), s = _mm_set_ss(rotation[j + 1]);
            vec[j] = _mm_cvtss_f32(_mm_fmsub_ss(a, c, _mm_mul_ss(b, s)));
            vec[j + 1] = _mm_cvtss_f32(_mm_fmadd_ss(a, s, _mm_mul_ss(b, c)));
        }
    }
}
