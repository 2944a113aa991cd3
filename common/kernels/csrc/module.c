/* CPython binding: _native.matmul(...) and _native.cpu_has_avx2().
 *
 * Buffers arrive through the buffer protocol (numpy arrays from kernels/__init__.py, which
 * checks dtypes and shapes); their lengths are checked again here, so a wrong call raises
 * ValueError instead of reading past a buffer. The GIL is released while rows are computed, on
 * the calling thread and the pool's (pool.c). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#include "dot.h"
#include "f32.h"
#include "pool.h"

/* Rows split evenly over the pool's threads; part i of n computes its share of the rows. */
static void quantized_part(void *context, int index, int count) {
    const product_t *p = context;
    product_rows(p, (int)((long)p->rows * index / count), (int)((long)p->rows * (index + 1) / count));
}

static void f32_part(void *context, int index, int count) {
    const f32_product_t *p = context;
    int groups = (p->rows + 7) / 8; /* whole blocks of 8 rows per part, so every part runs wide blocks */
    int begin = (int)((long)groups * index / count) * 8, end = (int)((long)groups * (index + 1) / count) * 8;
    f32_rows_avx2(p, begin, end < p->rows ? end : p->rows);
}

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

static PyObject *matmul(PyObject *self, PyObject *args) {
    (void)self;
    int format, isa, group_size, rows, cols, tokens, n_threads;
    Py_buffer weights = {0}, wscales = {0}, x = {0}, out = {0};
    if (!PyArg_ParseTuple(args, "iiy*y*iiiy*iw*i", &format, &isa, &weights, &wscales, &group_size, &rows, &cols,
                          &x, &tokens, &out, &n_threads))
        return NULL;
    PyObject *result = NULL;
    int8_t *xq = NULL;
    float *xscale = NULL, *xsum = NULL;
    product_t p = {format, isa, weights.buf, wscales.buf, 0, rows, cols, tokens, group_size, NULL, NULL, NULL, out.buf};
    int group = format == FMT_LLAMA2C_Q8 ? group_size : QK;
    if (format < FMT_Q8_0 || format > FMT_LLAMA2C_Q8 || rows < 1 || cols < 1 || tokens < 1 || group < 1 ||
        cols % group || (isa == ISA_AVX2 && !cpu_has_avx2())) {
        PyErr_SetString(PyExc_ValueError, "bad format, isa or shape");
        goto done;
    }
    p.row_bytes = format == FMT_LLAMA2C_Q8 ? (size_t)cols : (size_t)(cols / QK) * block_bytes(format);
    if (check_length(&weights, p.row_bytes * rows, "weights") ||
        (format == FMT_LLAMA2C_Q8 && check_length(&wscales, sizeof(float) * rows * (size_t)(cols / group), "scales")) ||
        check_length(&x, sizeof(float) * (size_t)tokens * cols, "x") ||
        check_length(&out, sizeof(float) * (size_t)tokens * rows, "out"))
        goto done;
    size_t groups = (size_t)tokens * (cols / group);
    xq = malloc((size_t)tokens * cols);
    xscale = malloc(sizeof(float) * groups);
    xsum = malloc(sizeof(float) * groups);
    if (!xq || !xscale || !xsum) {
        PyErr_NoMemory();
        goto done;
    }
    p.xq = xq, p.xscale = xscale, p.xsum = xsum;
    Py_BEGIN_ALLOW_THREADS
    quantize_activations(&p, x.buf, xq, xscale, xsum);
    pool_run(quantized_part, &p, parts_for(n_threads, rows));
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(xq), free(xscale), free(xsum);
    PyBuffer_Release(&weights), PyBuffer_Release(&wscales), PyBuffer_Release(&x), PyBuffer_Release(&out);
    return result;
}

static PyObject *matmul_f32(PyObject *self, PyObject *args) {
    (void)self;
    int rows, cols, tokens, n_threads;
    Py_ssize_t row_stride;
    Py_buffer weights = {0}, x = {0}, out = {0};
    if (!PyArg_ParseTuple(args, "y*niiy*iw*i", &weights, &row_stride, &rows, &cols, &x, &tokens, &out, &n_threads))
        return NULL;
    PyObject *result = NULL;
    if (rows < 1 || cols < 1 || tokens < 1 || tokens > F32_MAX_TOKENS || row_stride < cols || !cpu_has_avx2()) {
        PyErr_SetString(PyExc_ValueError, "bad shape, or no AVX2 here");
        goto done;
    }
    if (check_length(&weights, sizeof(float) * ((size_t)(rows - 1) * row_stride + cols), "weights") ||
        check_length(&x, sizeof(float) * (size_t)tokens * cols, "x") ||
        check_length(&out, sizeof(float) * (size_t)tokens * rows, "out"))
        goto done;
    f32_product_t p = {weights.buf, row_stride, rows, cols, tokens, x.buf, out.buf};
    Py_BEGIN_ALLOW_THREADS
    pool_run(f32_part, &p, parts_for(n_threads, (rows + 7) / 8));
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&weights), PyBuffer_Release(&x), PyBuffer_Release(&out);
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

static PyMethodDef methods[] = {
    {"matmul", matmul, METH_VARARGS,
     "matmul(format, isa, weights, wscales, group_size, rows, cols, x, tokens, out, n_threads)"},
    {"matmul_f32", matmul_f32, METH_VARARGS,
     "matmul_f32(weights, row_stride, rows, cols, x, tokens, out, n_threads): float32, at most 8 tokens, AVX2"},
    {"dequantize", dequantize, METH_VARARGS,
     "dequantize(format, weights, wscales, group_size, rows, cols, out): rows expanded to float32"},
    {"cpu_has_avx2", has_avx2, METH_NOARGS, "Whether this CPU runs the AVX2+FMA+F16C kernels."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "llmtp block-quantized kernels", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
