/* The float32 op set's element-wise steps (common/model/ops.py) in C, each giving the bits numpy
 * gives on this machine, so moving a step here changes no text. */
#ifndef LLMTP_NUMPY_OPS_H
#define LLMTP_NUMPY_OPS_H

/* out[t] = (x[t] * (1 / sqrt(sum(x[t]^2) / dim + eps))) * weight, x (rows, dim), the sum numpy's
 * pairwise one (np.add.reduce of a contiguous float32 row), every other step one float32 rounding
 * as ops.rmsnorm makes it. out may be x. */
void numpy_rmsnorm(float *out, const float *x, const float *weight, int rows, int dim, float eps);

/* The pairs (2i, 2i+1) of n_heads heads of head_dim floats at vec rotated in place by
 * rotation[i] = (cos, sin): (a, b) -> (fma(a, cos, -(b * sin)), fma(a, sin, b * cos)), numpy's
 * complex64 product with AVX-512 or FMA. AVX2+FMA: call only when cpu_has_avx2(). */
void numpy_rope_avx2(float *vec, int n_heads, int head_dim, const float *rotation);

#endif
