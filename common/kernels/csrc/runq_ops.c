/* runq.c's element-wise steps; see runq_ops.h. Each loop is runq.c's loop of the same job. */
#include "runq_ops.h"

#include <math.h>
#include <string.h>

void runq_rmsnorm(float *out, const float *x, const float *weight, int rows, int size, float eps) {
    for (int r = 0; r < rows; r++, x += size, out += size) {
        float ss = 0.0f;
        for (int j = 0; j < size; j++) ss += x[j] * x[j];
        ss /= size;
        ss += eps;
        ss = 1.0f / sqrtf(ss);
        for (int j = 0; j < size; j++) out[j] = weight[j] * (ss * x[j]);
    }
}

void runq_rope(float *vec, int tokens, int n_heads, int head_size, const int32_t *positions, float theta) {
    for (int t = 0; t < tokens; t++) {
        int pos = positions[t];
        for (int j = 0; j < head_size; j += 2) {
            float freq = 1.0f / powf(theta, j / (float)head_size);
            float val = pos * freq;
            float fcr = cosf(val), fci = sinf(val);
            for (int h = 0; h < n_heads; h++) {
                float *pair = vec + ((size_t)t * n_heads + h) * head_size + j;
                float v0 = pair[0], v1 = pair[1];
                pair[0] = v0 * fcr - v1 * fci;
                pair[1] = v0 * fci + v1 * fcr;
            }
        }
    }
}

static void softmax(float *x, int size) {
    float max_val = x[0];
    for (int i = 1; i < size; i++)
        if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < size; i++) {
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
    for (int i = 0; i < size; i++) x[i] /= sum;
}

void runq_attention(float *out, const float *q, const float *keys, const float *values, float *att, int tokens,
                    int n_heads, int head_size, const int32_t *kv_of_head, int stride, const int32_t *positions,
                    int item_begin, int item_step) {
    for (int item = item_begin; item < tokens * n_heads; item += item_step) {
        int t = item / n_heads, h = item % n_heads;
        const float *qh = q + ((size_t)t * n_heads + h) * head_size;
        const float *kh = keys + (size_t)kv_of_head[h] * stride * head_size;
        const float *vh = values + (size_t)kv_of_head[h] * stride * head_size;
        int seen = positions[t] + 1;
        for (int p = 0; p < seen; p++) {
            const float *k = kh + (size_t)p * head_size;
            float score = 0.0f;
            for (int i = 0; i < head_size; i++) score += qh[i] * k[i];
            score /= sqrtf(head_size);
            att[p] = score;
        }
        softmax(att, seen);
        float *xb = out + ((size_t)t * n_heads + h) * head_size;
        memset(xb, 0, head_size * sizeof(float));
        for (int p = 0; p < seen; p++) {
            const float *v = vh + (size_t)p * head_size;
            float a = att[p];
            for (int i = 0; i < head_size; i++) xb[i] += a * v[i];
        }
    }
}

void runq_swiglu(float *gate, const float *up, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float val = gate[i];
        val *= (1.0f / (1.0f + expf(-val)));
        val *= up[i];
        gate[i] = val;
    }
}

void runq_ordered_sum(float *out, const float *terms, size_t n, int groups, int from_out) {
    for (size_t i = 0; i < n; i++, terms += groups) {
        float val = from_out ? out[i] : 0.0f;
        for (int g = 0; g < groups; g++) val += terms[g];
        out[i] = val;
    }
}
