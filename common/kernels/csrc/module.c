/* CPython binding: _native.matmul(...) and _native.cpu_has_avx2().
 *
 * Buffers arrive through the buffer protocol (numpy arrays from kernels/__init__.py, which
 * checks dtypes and shapes); their lengths are checked again here, so a wrong call raises
 * ValueError instead of reading past a buffer. The GIL is released while rows are computed. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdlib.h>

#include "dot.h"

typedef struct {
    const product_t *product;
    int row_begin, row_end;
} slice_t;

static void *run_slice(void *arg) {
    const slice_t *slice = arg;
    product_rows(slice->product, slice->row_begin, slice->row_end);
    return NULL;
}

/* n_threads > 1: threads are created for this product and joined (a blocking wait, no spinning). */
static int run_threads(const product_t *p, int n_threads) {
    if (n_threads > p->rows) n_threads = p->rows;
    if (n_threads <= 1) {
        product_rows(p, 0, p->rows);
        return 0;
    }
    pthread_t threads[64];
    slice_t slices[64];
    int running[64] = {0};
    if (n_threads > 64) n_threads = 64;
    for (int i = 0; i < n_threads; i++) {
        slices[i] = (slice_t){p, (int)((long)p->rows * i / n_threads), (int)((long)p->rows * (i + 1) / n_threads)};
        if (i == 0) continue; /* the calling thread computes slice 0 */
        running[i] = pthread_create(&threads[i], NULL, run_slice, &slices[i]) == 0;
        if (!running[i]) run_slice(&slices[i]); /* cannot start a thread: do its rows here */
    }
    run_slice(&slices[0]);
    for (int i = 1; i < n_threads; i++)
        if (running[i]) pthread_join(threads[i], NULL);
    return 0;
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
    run_threads(&p, n_threads);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(xq), free(xscale), free(xsum);
    PyBuffer_Release(&weights), PyBuffer_Release(&wscales), PyBuffer_Release(&x), PyBuffer_Release(&out);
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
    {"dequantize", dequantize, METH_VARARGS,
     "dequantize(format, weights, wscales, group_size, rows, cols, out): rows expanded to float32"},
    {"cpu_has_avx2", has_avx2, METH_NOARGS, "Whether this CPU runs the AVX2+FMA+F16C kernels."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "llmtp block-quantized kernels", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
