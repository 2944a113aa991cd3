/* CPython binding: _native.matmul_stack(...), matmul_f32(...), attend(...), _native.cpu_has_avx2() and cpu_has_vnni().
 *
 * Buffers arrive through the buffer protocol (numpy arrays from kernels/__init__.py, which
 * checks dtypes and shapes); their lengths are checked again here, so a wrong call raises
 * ValueError instead of reading past a buffer. The GIL is released while rows are computed, on
 * the calling thread and the pool's (pool.c). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "attend.h"
#include "dot.h"
#include "f32.h"
#include "llama2c_tiles.h"
#include "numpy_ops.h"
#include "pool.h"
#include "runq_ops.h"

static int parts_for(int n_threads, int rows) {
    if (n_threads > rows) n_threads = rows;
    if (n_threads > POOL_MAX_THREADS) n_threads = POOL_MAX_THREADS;
    return n_threads < 1 ? 1 : n_threads;
}

static int check_length(const Py_buffer *buffer, size_t expected, const char *name) {
    if ((size_t)buffer->len != expected) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zu", name, buffer->len, expected);
        return -1;
    }
    return 0;
}

/* Quantized matrices of one format and cols multiplied as one stacked by rows (a layer's q|k|v or
 * w1|w3 where their storage does not lie back to back; one matrix is a stack of one): x quantized
 * once, one pool dispatch over the stacked rows, each matrix's outputs in its columns of out. */
enum { QUANTIZED_MAX_STACK = 8 };

typedef struct {
    product_t parts[QUANTIZED_MAX_STACK];
    int first_row[QUANTIZED_MAX_STACK + 1]; /* each part's first row in the stack, then the total */
    int count;
} quantized_stack_t;

/* Part `index` of `count` of a stack's rows (split evenly over the stacked rows), matrix by matrix:
 * rows(parts, m, lo, hi) for each matrix m with rows lo..hi of its own in the part. */
typedef void (*stack_rows_fn)(const void *parts, int m, int lo, int hi);

static void stack_part(const int *first_row, int n_matrices, int index, int count, stack_rows_fn rows,
                       const void *parts) {
    long total = first_row[n_matrices];
    int begin = (int)(total * index / count), end = (int)(total * (index + 1) / count);
    for (int m = 0; m < n_matrices; m++) {
        int lo = begin > first_row[m] ? begin : first_row[m];
        int hi = end < first_row[m + 1] ? end : first_row[m + 1];
        if (lo < hi) rows(parts, m, lo - first_row[m], hi - first_row[m]);
    }
}

/* first_row[m + 1] from matrix m's buffer, whole rows of row_bytes; -1 with a ValueError otherwise. */
static int stack_rows_of(int *first_row, int m, const Py_buffer *weights, size_t row_bytes) {
    Py_ssize_t rows = weights->len / (Py_ssize_t)row_bytes;
    if (rows < 1 || (size_t)weights->len % row_bytes || rows > INT_MAX - first_row[m]) {
        PyErr_Format(PyExc_ValueError, "weights %d hold %zd bytes, not whole rows of %zu bytes", m, weights->len,
                     row_bytes);
        return -1;
    }
    first_row[m + 1] = first_row[m] + (int)rows;
    return 0;
}

static void quantized_rows(const void *parts, int m, int lo, int hi) {
    product_rows((const product_t *)parts + m, lo, hi);
}

static void quantized_stack_part(void *context, int index, int count) {
    const quantized_stack_t *s = context;
    stack_part(s->first_row, s->count, index, count, quantized_rows, s->parts);
}

/* The products of s's parts (filled but for the activations) into their columns of out; -1 (and
 * a Python error) when memory runs out. Called with the GIL held; releases it for the rows. */
static int run_quantized_stack(quantized_stack_t *s, const float *x, int n_threads) {
    const product_t *first = &s->parts[0];
    int tokens = first->tokens, cols = first->cols, total = s->first_row[s->count];
    int group = first->format == FMT_LLAMA2C_Q8 ? first->group_size : QK;
    size_t groups = (size_t)tokens * (cols / group);
    int8_t *xq = malloc((size_t)tokens * cols);
    float *xscale = malloc(sizeof(float) * groups), *xsum = malloc(sizeof(float) * groups);
    int offsets = block_offset_bias(first) > 0, failed = 0;
    int32_t *xoffset = offsets ? malloc(sizeof(int32_t) * (size_t)tokens * (cols / QK)) : NULL;
    if (!xq || !xscale || !xsum || (offsets && !xoffset)) {
        free(xq), free(xscale), free(xsum), free(xoffset);
        PyErr_NoMemory();
        return -1;
    }
    for (int m = 0; m < s->count; m++)
        s->parts[m].xq = xq, s->parts[m].xscale = xscale, s->parts[m].xsum = xsum, s->parts[m].xoffset = xoffset;
    Py_BEGIN_ALLOW_THREADS
    if (llama2c_tiles_apply(first)) { /* 3+ tokens of a v2 file: each matrix in its own tiles */
        for (int m = 0; m < s->count && !failed; m++)
            failed = llama2c_tiles_product(&s->parts[m], x, xq, xscale, parts_for(n_threads, s->parts[m].rows));
    } else {
        quantize_activations(first, x, xq, xscale, xsum, xoffset);
        pool_run(quantized_stack_part, s, parts_for(n_threads, total));
    }
    Py_END_ALLOW_THREADS
    free(xq), free(xscale), free(xsum), free(xoffset);
    if (failed) PyErr_NoMemory();
    return failed ? -1 : 0;
}

/* matmul_stack(format, isa, group_size, cols, ((weights, wscales), ...), x, tokens, out, n_threads) */
static PyObject *matmul_stack(PyObject *self, PyObject *args) {
    (void)self;
    int format, isa, group_size, cols, tokens, n_threads, held = 0;
    PyObject *stack;
    Py_buffer weights[QUANTIZED_MAX_STACK], wscales[QUANTIZED_MAX_STACK], x = {0}, out = {0};
    if (!PyArg_ParseTuple(args, "iiiiO!y*iw*i", &format, &isa, &group_size, &cols, &PyTuple_Type, &stack, &x, &tokens,
                          &out, &n_threads))
        return NULL;
    PyObject *result = NULL;
    quantized_stack_t s;
    s.count = (int)PyTuple_GET_SIZE(stack);
    s.first_row[0] = 0;
    int group = format == FMT_LLAMA2C_Q8 ? group_size : QK;
    if (format < FMT_Q8_0 || format > FMT_LLAMA2C_Q8 || s.count < 1 || s.count > QUANTIZED_MAX_STACK || cols < 1 ||
        tokens < 1 || group < 1 || cols % group || isa < ISA_PORTABLE || isa > ISA_VNNI ||
        (isa == ISA_AVX2 && !cpu_has_avx2()) || (isa == ISA_VNNI && !cpu_has_vnni())) {
        PyErr_SetString(PyExc_ValueError, "bad format, isa, stack or shape");
        goto done;
    }
    size_t row_bytes = format == FMT_LLAMA2C_Q8 ? (size_t)cols : (size_t)(cols / QK) * block_bytes(format);
    while (held < s.count) { /* held: buffers to release */
        PyObject *pair = PyTuple_GET_ITEM(stack, held);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_ValueError, "each stacked matrix is a (weights, scales) pair");
            goto done;
        }
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(pair, 0), &weights[held], PyBUF_SIMPLE) < 0) goto done;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(pair, 1), &wscales[held], PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&weights[held]);
            goto done;
        }
        held++;
        if (stack_rows_of(s.first_row, held - 1, &weights[held - 1], row_bytes) ||
            (format == FMT_LLAMA2C_Q8 &&
             check_length(&wscales[held - 1], sizeof(float) * (size_t)(s.first_row[held] - s.first_row[held - 1]) *
                                                  (size_t)(cols / group), "scales")))
            goto done;
    }
    int total = s.first_row[s.count];
    if (check_length(&x, sizeof(float) * (size_t)tokens * cols, "x") ||
        check_length(&out, sizeof(float) * (size_t)tokens * total, "out"))
        goto done;
    for (int m = 0; m < s.count; m++) {
        product_t p = {format, isa, weights[m].buf, wscales[m].buf, row_bytes, s.first_row[m + 1] - s.first_row[m],
                       cols, tokens, group_size, NULL, NULL, NULL, (float *)out.buf + s.first_row[m], NULL,
                       (size_t)total};
        s.parts[m] = p;
    }
    if (run_quantized_stack(&s, x.buf, n_threads) == 0) {
        result = Py_None;
        Py_INCREF(result);
    }
done:
    for (int m = 0; m < held; m++) PyBuffer_Release(&weights[m]), PyBuffer_Release(&wscales[m]);
    PyBuffer_Release(&x), PyBuffer_Release(&out);
    return result;
}

/* Several float32 matrices multiplied as one stacked by rows (a layer's q|k|v or w1|w3 where their
 * storage does not lie back to back): one pool dispatch, the stacked rows split evenly over it. */
enum { F32_MAX_STACK = 8 };

typedef struct {
    f32_product_t parts[F32_MAX_STACK];
    int first_row[F32_MAX_STACK + 1]; /* each part's first row in the stack, then the total */
    int count;
} f32_stack_t;

static void f32_rows(const void *parts, int m, int lo, int hi) {
    f32_rows_avx2((const f32_product_t *)parts + m, lo, hi);
}

static void f32_stack_part(void *context, int index, int count) {
    const f32_stack_t *s = context;
    stack_part(s->first_row, s->count, index, count, f32_rows, s->parts);
}

static PyObject *matmul_f32(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *stack;
    int cols, tokens, n_threads, isa, held = 0;
    Py_buffer weights[F32_MAX_STACK], x = {0}, out = {0};
    if (!PyArg_ParseTuple(args, "O!iy*iw*ii", &PyTuple_Type, &stack, &cols, &x, &tokens, &out, &n_threads, &isa))
        return NULL;
    PyObject *result = NULL;
    f32_stack_t s;
    s.count = (int)PyTuple_GET_SIZE(stack);
    s.first_row[0] = 0;
    if (s.count < 1 || s.count > F32_MAX_STACK || cols < 1 || tokens < 1 || tokens > F32_MAX_TOKENS ||
        !cpu_has_avx2() || (isa != ISA_AVX2 && isa != ISA_VNNI) || (isa == ISA_VNNI && !cpu_has_vnni())) {
        PyErr_SetString(PyExc_ValueError, "bad shape or stack, or no AVX2 here");
        goto done;
    }
    while (held < s.count) { /* held: buffers to release */
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(stack, held), &weights[held], PyBUF_SIMPLE) < 0) goto done;
        held++;
        if (stack_rows_of(s.first_row, held - 1, &weights[held - 1], sizeof(float) * (size_t)cols)) goto done;
    }
    int total = s.first_row[s.count];
    if (check_length(&x, sizeof(float) * (size_t)tokens * cols, "x") ||
        check_length(&out, sizeof(float) * (size_t)tokens * total, "out"))
        goto done;
    for (int m = 0; m < s.count; m++) {
        f32_product_t p = {weights[m].buf, cols, s.first_row[m + 1] - s.first_row[m], cols, tokens, x.buf,
                           (float *)out.buf + s.first_row[m], isa == ISA_VNNI, total};
        s.parts[m] = p;
    }
    Py_BEGIN_ALLOW_THREADS
    pool_run(f32_stack_part, &s, parts_for(n_threads, total));
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (int m = 0; m < held; m++) PyBuffer_Release(&weights[m]);
    PyBuffer_Release(&x), PyBuffer_Release(&out);
    return result;
}

static PyObject *dequantize(PyObject *self, PyObject *args) {
    (void)self;
    int format, group_size, rows, cols;
    Py_buffer weights = {0}, wscales = {0}, out = {0};
    if (!PyArg_ParseTuple(args, "iy*y*iiiw*", &format, &weights, &wscales, &group_size, &rows, &cols, &out))
        return NULL;
    PyObject *result = NULL;
    product_t p = {format, ISA_PORTABLE, weights.buf, wscales.buf, 0, rows, cols, 1, group_size,
                   NULL, NULL, NULL, NULL};
    int group = format == FMT_LLAMA2C_Q8 ? group_size : QK;
    if (format < FMT_Q8_0 || format > FMT_LLAMA2C_Q8 || rows < 0 || cols < 1 || group < 1 || cols % group) {
        PyErr_SetString(PyExc_ValueError, "bad format or shape");
        goto done;
    }
    p.row_bytes = format == FMT_LLAMA2C_Q8 ? (size_t)cols : (size_t)(cols / QK) * block_bytes(format);
    if (check_length(&weights, p.row_bytes * rows, "weights") ||
        (format == FMT_LLAMA2C_Q8 && check_length(&wscales, sizeof(float) * rows * (size_t)(cols / group), "scales")) ||
        check_length(&out, sizeof(float) * (size_t)rows * cols, "out"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    dequantize_rows(&p, 0, rows, out.buf);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&weights), PyBuffer_Release(&wscales), PyBuffer_Release(&out);
    return result;
}

static PyObject *has_avx2(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyBool_FromLong(cpu_has_avx2());
}

static PyObject *has_vnni(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyBool_FromLong(cpu_has_vnni());
}

/* ---- runq.c's element-wise steps (runq_ops.c); kernels/__init__.py checks dtypes and shapes ---- */

typedef void (*rmsnorm_fn)(float *out, const float *x, const float *weight, int rows, int size, float eps);

/* (x, weight, out, rows, size, eps) -> norm(out, x, weight, rows, size, eps), lengths checked. */
static PyObject *rmsnorm_call(PyObject *args, rmsnorm_fn norm) {
    int rows, size;
    float eps;
    Py_buffer x = {0}, weight = {0}, out = {0};
    if (!PyArg_ParseTuple(args, "y*y*w*iif", &x, &weight, &out, &rows, &size, &eps)) return NULL;
    PyObject *result = NULL;
    size_t n = sizeof(float) * (size_t)rows * size;
    if (rows < 0 || size < 1 || check_length(&x, n, "x") || check_length(&weight, sizeof(float) * size, "weight") ||
        check_length(&out, n, "out"))
        goto done;
    norm(out.buf, x.buf, weight.buf, rows, size, eps); /* a few rows: not worth releasing the GIL */
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&x), PyBuffer_Release(&weight), PyBuffer_Release(&out);
    return result;
}

static PyObject *py_runq_rmsnorm(PyObject *self, PyObject *args) {
    (void)self;
    return rmsnorm_call(args, runq_rmsnorm);
}

static PyObject *py_runq_rope(PyObject *self, PyObject *args) {
    (void)self;
    int tokens, n_heads, head_size;
    float theta;
    Py_buffer vec = {0}, positions = {0};
    if (!PyArg_ParseTuple(args, "w*y*iiif", &vec, &positions, &tokens, &n_heads, &head_size, &theta)) return NULL;
    PyObject *result = NULL;
    if (tokens < 0 || n_heads < 0 || head_size < 2 || head_size % 2 ||
        check_length(&vec, sizeof(float) * (size_t)tokens * n_heads * head_size, "vec") ||
        check_length(&positions, sizeof(int32_t) * (size_t)tokens, "positions"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    runq_rope(vec.buf, tokens, n_heads, head_size, positions.buf, theta);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&vec), PyBuffer_Release(&positions);
    return result;
}

typedef struct {
    float *out, *att; /* att: one row of `stride` floats per part */
    const float *q, *keys, *values;
    const int32_t *kv_of_head, *positions;
    int tokens, n_heads, head_size, stride;
} runq_attention_t;

static void runq_attention_part(void *context, int index, int count) {
    const runq_attention_t *a = context;
    runq_attention(a->out, a->q, a->keys, a->values, a->att + (size_t)index * a->stride, a->tokens, a->n_heads,
                   a->head_size, a->kv_of_head, a->stride, a->positions, index, count);
}

static PyObject *py_runq_attention(PyObject *self, PyObject *args) {
    (void)self;
    int tokens, n_heads, head_size, n_kv, stride, n_threads;
    Py_buffer out = {0}, q = {0}, keys = {0}, values = {0}, kv_of_head = {0}, positions = {0};
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*iiiiii", &out, &q, &keys, &values, &kv_of_head, &positions, &tokens,
                          &n_heads, &head_size, &n_kv, &stride, &n_threads))
        return NULL;
    PyObject *result = NULL;
    float *att = NULL;
    size_t qn = sizeof(float) * (size_t)tokens * n_heads * head_size, kvn = sizeof(float) * (size_t)n_kv * stride * head_size;
    if (tokens < 1 || n_heads < 1 || head_size < 1 || n_kv < 1 || stride < 1 || check_length(&out, qn, "out") ||
        check_length(&q, qn, "q") || check_length(&keys, kvn, "keys") || check_length(&values, kvn, "values") ||
        check_length(&kv_of_head, sizeof(int32_t) * n_heads, "kv_of_head") ||
        check_length(&positions, sizeof(int32_t) * (size_t)tokens, "positions"))
        goto done;
    for (int h = 0; h < n_heads; h++)
        if (((const int32_t *)kv_of_head.buf)[h] < 0 || ((const int32_t *)kv_of_head.buf)[h] >= n_kv) {
            PyErr_SetString(PyExc_ValueError, "kv_of_head outside the kv heads");
            goto done;
        }
    for (int t = 0; t < tokens; t++)
        if (((const int32_t *)positions.buf)[t] < 0 || ((const int32_t *)positions.buf)[t] >= stride) {
            PyErr_SetString(PyExc_ValueError, "position outside the cache");
            goto done;
        }
    int parts = parts_for(n_threads, tokens * n_heads);
    att = malloc(sizeof(float) * stride * (size_t)parts);
    if (!att) {
        PyErr_NoMemory();
        goto done;
    }
    runq_attention_t a = {out.buf, att, q.buf, keys.buf, values.buf, kv_of_head.buf, positions.buf, tokens, n_heads,
                          head_size, stride};
    Py_BEGIN_ALLOW_THREADS
    pool_run(runq_attention_part, &a, parts);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(att);
    PyBuffer_Release(&out), PyBuffer_Release(&q), PyBuffer_Release(&keys), PyBuffer_Release(&values);
    PyBuffer_Release(&kv_of_head), PyBuffer_Release(&positions);
    return result;
}

static PyObject *py_runq_swiglu(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t n;
    Py_buffer gate = {0}, up = {0};
    if (!PyArg_ParseTuple(args, "w*y*n", &gate, &up, &n)) return NULL;
    PyObject *result = NULL;
    if (n < 0 || check_length(&gate, sizeof(float) * (size_t)n, "gate") || check_length(&up, sizeof(float) * (size_t)n, "up"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    runq_swiglu(gate.buf, up.buf, (size_t)n);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&gate), PyBuffer_Release(&up);
    return result;
}

typedef struct {
    const product_t *p;
    float *terms;
    int first_group, total_groups;
} term_rows_t;

static void term_rows_part(void *context, int index, int count) {
    const term_rows_t *job = context;
    int rows = job->p->rows;
    llama2c_term_rows(job->p, job->terms, job->first_group, job->total_groups, (int)((long)rows * index / count),
                      (int)((long)rows * (index + 1) / count));
}

static PyObject *py_runq_group_terms(PyObject *self, PyObject *args) {
    (void)self;
    int rows, cols, tokens, group_size, first_group, total_groups, isa, n_threads;
    Py_buffer terms = {0}, weights = {0}, wscales = {0}, x = {0};
    if (!PyArg_ParseTuple(args, "w*y*y*y*iiiiiiii", &terms, &weights, &wscales, &x, &rows, &cols, &tokens, &group_size,
                          &first_group, &total_groups, &isa, &n_threads))
        return NULL;
    PyObject *result = NULL;
    int8_t *xq = NULL;
    float *xscale = NULL;
    if (rows < 1 || cols < 1 || tokens < 1 || group_size < 1 || cols % group_size || first_group < 0 ||
        first_group + cols / group_size > total_groups || isa < ISA_PORTABLE || isa > ISA_VNNI ||
        (isa == ISA_AVX2 && !cpu_has_avx2()) || (isa == ISA_VNNI && !cpu_has_vnni())) {
        PyErr_SetString(PyExc_ValueError, "bad shape, group range or isa");
        goto done;
    }
    if (check_length(&terms, sizeof(float) * (size_t)tokens * rows * total_groups, "terms") ||
        check_length(&weights, (size_t)rows * cols, "weights") ||
        check_length(&wscales, sizeof(float) * (size_t)rows * (cols / group_size), "scales") ||
        check_length(&x, sizeof(float) * (size_t)tokens * cols, "x"))
        goto done;
    xq = malloc((size_t)tokens * cols);
    xscale = malloc(sizeof(float) * (size_t)tokens * (cols / group_size));
    if (!xq || !xscale) {
        PyErr_NoMemory();
        goto done;
    }
    product_t p = {FMT_LLAMA2C_Q8, isa, weights.buf, wscales.buf, (size_t)cols, rows, cols, tokens,
                   group_size, xq, xscale, NULL, NULL};
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (llama2c_tiles_apply(&p)) { /* 3+ tokens: the rows below for decode's 1 or 2 (no packing) */
        failed = llama2c_tiles_terms(&p, x.buf, xq, xscale, terms.buf, first_group, total_groups,
                                     parts_for(n_threads, rows));
    } else {
        quantize_activations(&p, x.buf, xq, xscale, NULL, NULL);
        term_rows_t job = {&p, terms.buf, first_group, total_groups};
        pool_run(term_rows_part, &job, parts_for(n_threads, rows));
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    free(xq), free(xscale);
    PyBuffer_Release(&terms), PyBuffer_Release(&weights), PyBuffer_Release(&wscales), PyBuffer_Release(&x);
    return result;
}

static PyObject *py_runq_ordered_sum(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t n;
    int groups, from_out;
    Py_buffer out = {0}, terms = {0};
    if (!PyArg_ParseTuple(args, "w*y*nip", &out, &terms, &n, &groups, &from_out)) return NULL;
    PyObject *result = NULL;
    if (n < 0 || groups < 1 || check_length(&out, sizeof(float) * (size_t)n, "out") ||
        check_length(&terms, sizeof(float) * (size_t)n * groups, "terms"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    runq_ordered_sum(out.buf, terms.buf, (size_t)n, groups, from_out);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&out), PyBuffer_Release(&terms);
    return result;
}

/* ---- one layer's attention for every token of a step (attend.c) ---- */

static void attend_part(void *context, int index, int count) {
    const attend_t *a = context;
    attend_items_avx2(a, a->scores + (long)index * a->scores_stride, index, count);
}

/* The product of the factors; 0 when one is negative or the product overflows (no buffer is 0 bytes
 * long here, so the caller's check fails). */
static size_t size_product(int n, const int *factors) {
    size_t total = 1;
    for (int i = 0; i < n; i++)
        if (factors[i] < 0 || __builtin_mul_overflow(total, (size_t)factors[i], &total)) return 0;
    return total;
}

static int check_indices(const Py_buffer *buffer, int limit, const char *what) {
    const int32_t *values = buffer->buf;
    for (size_t i = 0; i < (size_t)buffer->len / sizeof(int32_t); i++)
        if (values[i] < 0 || values[i] >= limit) {
            PyErr_Format(PyExc_ValueError, "%s %d outside 0..%d", what, values[i], limit - 1);
            return -1;
        }
    return 0;
}

/* The cache and index arguments both attention entries share: lengths and index ranges checked. */
static int check_attention(const Py_buffer *keys, const Py_buffer *values, const Py_buffer *kv_of_head,
                           const Py_buffer *token_slot, const Py_buffer *token_position, int tokens, int n_heads,
                           int n_kv, int n_slots, int seq_len, int head_dim) {
    int cache_shape[] = {n_slots, n_kv, seq_len, head_dim, (int)sizeof(float)};
    size_t cache_bytes = size_product(5, cache_shape);
    if (tokens < 1 || n_heads < 1 || n_kv < 1 || n_slots < 1 || seq_len < 1 || head_dim < 1 || !cache_bytes ||
        seq_len > INT32_MAX - 8 || !cpu_has_avx2()) {
        PyErr_SetString(PyExc_ValueError, "bad shape, or no AVX2 here");
        return -1;
    }
    return check_length(keys, cache_bytes, "keys") || check_length(values, cache_bytes, "values") ||
                   check_length(kv_of_head, sizeof(int32_t) * (size_t)n_heads, "kv_of_head") ||
                   check_length(token_slot, sizeof(int32_t) * (size_t)tokens, "token_slot") ||
                   check_length(token_position, sizeof(int32_t) * (size_t)tokens, "token_position") ||
                   check_indices(kv_of_head, n_kv, "kv head") || check_indices(token_slot, n_slots, "slot") ||
                   check_indices(token_position, seq_len, "position")
               ? -1
               : 0;
}

/* The step's keys and values (token t, kv head j at k + t * kv_stride + j * head_dim) into the
 * cache, then every item of `a` over the pool: every key and value of the step is in the cache
 * before any query reads it. Called without the GIL; `a->scores` holds `parts` rows. */
static void attend_with_cache(attend_t *a, float *keys, float *values, const float *k, const float *v,
                              long kv_stride, int parts) {
    size_t row_bytes = sizeof(float) * (size_t)a->head_dim;
    for (int t = 0; t < a->tokens; t++)
        for (int j = 0; j < a->n_kv; j++) {
            size_t at = (((size_t)a->token_slot[t] * a->n_kv + j) * a->seq_len + a->token_position[t]) * a->head_dim;
            size_t from = (size_t)t * kv_stride + (size_t)j * a->head_dim;
            memcpy(keys + at, k + from, row_bytes);
            memcpy(values + at, v + from, row_bytes);
        }
    pool_run(attend_part, a, parts);
}

static float *score_rows(int n_threads, int items, int seq_len, int *parts, int *stride) {
    *parts = parts_for(n_threads, items), *stride = (seq_len + 7) & ~7;
    float *scores = malloc(sizeof(float) * (size_t)*parts * *stride);
    if (!scores) PyErr_NoMemory();
    return scores;
}

static PyObject *py_attend(PyObject *self, PyObject *args) {
    (void)self;
    int tokens, n_heads, n_kv, n_slots, seq_len, head_dim, n_threads;
    Py_buffer out = {0}, q = {0}, k = {0}, v = {0}, keys = {0}, values = {0}, kv_of_head = {0}, token_slot = {0},
              token_position = {0};
    if (!PyArg_ParseTuple(args, "w*y*y*y*w*w*y*y*y*iiiiiii", &out, &q, &k, &v, &keys, &values, &kv_of_head,
                          &token_slot, &token_position, &tokens, &n_heads, &n_kv, &n_slots, &seq_len, &head_dim,
                          &n_threads))
        return NULL;
    PyObject *result = NULL;
    float *scores = NULL;
    int q_shape[] = {tokens, n_heads, head_dim, (int)sizeof(float)}, kv_shape[] = {tokens, n_kv, head_dim, (int)sizeof(float)};
    size_t q_bytes = size_product(4, q_shape), kv_bytes = size_product(4, kv_shape);
    if (check_attention(&keys, &values, &kv_of_head, &token_slot, &token_position, tokens, n_heads, n_kv, n_slots,
                        seq_len, head_dim))
        goto done;
    if (!q_bytes || !kv_bytes || check_length(&out, q_bytes, "out") || check_length(&q, q_bytes, "q") ||
        check_length(&k, kv_bytes, "k") || check_length(&v, kv_bytes, "v"))
        goto done;
    int parts, stride;
    if (!(scores = score_rows(n_threads, tokens * n_heads, seq_len, &parts, &stride))) goto done;
    attend_t a = {out.buf, q.buf, keys.buf, values.buf, kv_of_head.buf, token_slot.buf, token_position.buf,
                  tokens, n_heads, n_kv, seq_len, head_dim, scores, stride, (long)n_heads * head_dim};
    Py_BEGIN_ALLOW_THREADS
    attend_with_cache(&a, keys.buf, values.buf, k.buf, v.buf, (long)n_kv * head_dim, parts);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(scores);
    PyBuffer_Release(&out), PyBuffer_Release(&q), PyBuffer_Release(&k), PyBuffer_Release(&v);
    PyBuffer_Release(&keys), PyBuffer_Release(&values), PyBuffer_Release(&kv_of_head);
    PyBuffer_Release(&token_slot), PyBuffer_Release(&token_position);
    return result;
}

/* attend() on a product's q|k|v rows (tokens, (n_heads + 2 n_kv) head_dim), RoPE first: q and k
 * rotated in place by rotations[token_position[t]] ((seq_len, head_dim / 2) cos, sin pairs), one
 * call where the numpy op set made eight (slices, reshapes, two complex products, copies). */
static PyObject *py_attend_qkv(PyObject *self, PyObject *args) {
    (void)self;
    int tokens, n_heads, n_kv, n_slots, seq_len, head_dim, n_threads;
    Py_buffer out = {0}, qkv = {0}, rotations = {0}, keys = {0}, values = {0}, kv_of_head = {0}, token_slot = {0},
              token_position = {0};
    if (!PyArg_ParseTuple(args, "w*w*y*w*w*y*y*y*iiiiiii", &out, &qkv, &rotations, &keys, &values, &kv_of_head,
                          &token_slot, &token_position, &tokens, &n_heads, &n_kv, &n_slots, &seq_len, &head_dim,
                          &n_threads))
        return NULL;
    PyObject *result = NULL;
    float *scores = NULL;
    int q_shape[] = {tokens, n_heads, head_dim, (int)sizeof(float)};
    int qkv_shape[] = {tokens, n_heads + 2 * n_kv, head_dim, (int)sizeof(float)};
    int rotation_shape[] = {seq_len, head_dim, (int)sizeof(float)};
    size_t q_bytes = size_product(4, q_shape), qkv_bytes = size_product(4, qkv_shape);
    if (check_attention(&keys, &values, &kv_of_head, &token_slot, &token_position, tokens, n_heads, n_kv, n_slots,
                        seq_len, head_dim))
        goto done;
    if (head_dim % 2 || n_heads > INT_MAX / 4 - n_kv || !q_bytes || !qkv_bytes ||
        check_length(&out, q_bytes, "out") || check_length(&qkv, qkv_bytes, "qkv") ||
        check_length(&rotations, size_product(3, rotation_shape), "rotations")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "head_dim must be even");
        goto done;
    }
    int parts, stride;
    if (!(scores = score_rows(n_threads, tokens * n_heads, seq_len, &parts, &stride))) goto done;
    long row = (long)(n_heads + 2 * n_kv) * head_dim;
    float *q = qkv.buf;
    attend_t a = {out.buf, q, keys.buf, values.buf, kv_of_head.buf, token_slot.buf, token_position.buf,
                  tokens, n_heads, n_kv, seq_len, head_dim, scores, stride, row};
    const int32_t *positions = token_position.buf;
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < tokens; t++) /* q's and k's heads lie side by side */
        numpy_rope_avx2(q + t * row, n_heads + n_kv, head_dim, (const float *)rotations.buf + (long)positions[t] * head_dim);
    attend_with_cache(&a, keys.buf, values.buf, q + (long)n_heads * head_dim, q + (long)(n_heads + n_kv) * head_dim,
                      row, parts);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(scores);
    PyBuffer_Release(&out), PyBuffer_Release(&qkv), PyBuffer_Release(&rotations);
    PyBuffer_Release(&keys), PyBuffer_Release(&values), PyBuffer_Release(&kv_of_head);
    PyBuffer_Release(&token_slot), PyBuffer_Release(&token_position);
    return result;
}

/* ---- the float32 op set's RMSNorm (numpy_ops.c) ---- */

static PyObject *py_numpy_rmsnorm(PyObject *self, PyObject *args) {
    (void)self;
    return rmsnorm_call(args, numpy_rmsnorm);
}

static PyMethodDef methods[] = {
    {"matmul_stack", matmul_stack, METH_VARARGS,
     "matmul_stack(format, isa, group_size, cols, ((weights, wscales), ...), x, tokens, out, n_threads): quantized "
     "matrices stacked by rows (one: a plain product)"},
    {"matmul_f32", matmul_f32, METH_VARARGS,
     "matmul_f32((weights, ...), cols, x, tokens, out, n_threads, isa): float32 matrices stacked by rows, at most 8 tokens, "
     "AVX2 (isa 1), 3+ tokens in AVX-512 registers (isa 2)"},
    {"dequantize", dequantize, METH_VARARGS,
     "dequantize(format, weights, wscales, group_size, rows, cols, out): rows expanded to float32"},
    {"attend", py_attend, METH_VARARGS,
     "attend(out, q, k, v, keys, values, kv_of_head, token_slot, token_position, tokens, n_heads, n_kv, n_slots, "
     "seq_len, head_dim, n_threads): k, v into the cache, then causal attention, AVX2"},
    {"attend_qkv", py_attend_qkv, METH_VARARGS,
     "attend_qkv(out, qkv, rotations, keys, values, kv_of_head, token_slot, token_position, tokens, n_heads, n_kv, "
     "n_slots, seq_len, head_dim, n_threads): RoPE on q|k|v rows in place, then attend(), AVX2"},
    {"numpy_rmsnorm", py_numpy_rmsnorm, METH_VARARGS, "numpy_rmsnorm(x, weight, out, rows, dim, eps): numpy's bits"},
    {"runq_rmsnorm", py_runq_rmsnorm, METH_VARARGS, "runq_rmsnorm(x, weight, out, rows, size, eps)"},
    {"runq_rope", py_runq_rope, METH_VARARGS, "runq_rope(vec, positions, tokens, n_heads, head_size, theta)"},
    {"runq_attention", py_runq_attention, METH_VARARGS,
     "runq_attention(out, q, keys, values, kv_of_head, positions, tokens, n_heads, head_size, n_kv, stride, n_threads)"},
    {"runq_swiglu", py_runq_swiglu, METH_VARARGS, "runq_swiglu(gate, up, n)"},
    {"runq_group_terms", py_runq_group_terms, METH_VARARGS,
     "runq_group_terms(terms, weights, wscales, x, rows, cols, tokens, group_size, first_group, total_groups, isa, "
     "n_threads)"},
    {"runq_ordered_sum", py_runq_ordered_sum, METH_VARARGS, "runq_ordered_sum(out, terms, n, groups, from_out)"},
    {"cpu_has_avx2", has_avx2, METH_NOARGS, "Whether this CPU runs the AVX2+FMA+F16C kernels."},
    {"cpu_has_vnni", has_vnni, METH_NOARGS, "Whether it also runs the AVX-512 VNNI block rows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "llmtp block-quantized kernels", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
