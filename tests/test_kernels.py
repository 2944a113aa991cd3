"""llmtp.common.kernels against independent oracles, on every backend this machine runs.

GGUF blocks are made and read back by the `gguf` package (llama.cpp's own Python), so the
layout is checked against code that is not ours; products are compared with float64
dequantize-then-multiply. The llama2.c mode is compared bit for bit with a transliteration
of runq.c's quantize() and matmul() written here in float32 scalars.

Error bound for y = W x when x is quantized to blocks of 32 (scale d_b = max|x_b| / 127):
each activation moves by at most d_b / 2 (round to nearest), so
    |y - W x| <= sum_b d_b / 2 * sum_{j in b} |w_j|            (activation quantization)
              + (n_blocks + 8) * 2^-24 * sum_j a_j (|x_j| + d_b)  (float32 steps)
where a_j = |w_j| (+ 2 |m_b| for Q4_1, whose offset term is summed apart), n_blocks float
additions and a few roundings per block term, and W is gguf's float32 dequantization.
"""

import numpy as np
import pytest

from llmtp.common import kernels

gguf = pytest.importorskip("gguf", reason="gguf not installed (pip install -e '.[test]')")
from gguf import GGMLQuantizationType as QType  # noqa: E402

U = 2.0 ** -24
GGUF = {"q8_0": (QType.Q8_0, kernels.matmul_q8_0), "q4_0": (QType.Q4_0, kernels.matmul_q4_0),
        "q4_1": (QType.Q4_1, kernels.matmul_q4_1)}
# rows not a multiple of 8, one row, one block; the SIMD rows read groups of 8 blocks: one whole group
# (256), a group and a tail of 2 (320), of 7 (480), two groups and a lone block (544)
SHAPES = [(1, 32), (1, 96), (7, 32), (13, 64), (37, 160), (67, 256), (3, 320), (9, 480), (5, 544)]
TOKENS = [1, 3, 5, 8]  # they pass 4 tokens at a time: one pass short, one and a bit, two


def random_weights(rng, rows, cols):
    """Weights with uneven row scales, an all-zero block and a constant block."""
    w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.1, 3.0, (rows, 1)).astype(np.float32)
    w[0, :32] = 0.0
    if rows > 1:
        w[1, :32] = 0.75
    return w


def random_activations(rng, tokens, cols):
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    x[0, :32] *= 50.0  # one block with a much larger scale
    if cols > 32:
        x[-1, 32:64] = 0.0  # an all-zero activation block
    return x


def activation_scales(x):
    """d_b per element: max|x| over its block of 32, / 127, in float64."""
    blocks = np.abs(x.astype(np.float64)).reshape(x.shape[0], -1, 32)
    return np.repeat(blocks.max(axis=2) / 127.0, 32, axis=1)


def error_bound(w, x, offsets=None):
    """The bound of the module doc, (T, rows), from float64 weights w and activations x."""
    d = activation_scales(x)
    a = np.abs(w) if offsets is None else np.abs(w) + 2 * np.abs(offsets)
    n_blocks = w.shape[1] // 32
    quantization = (d / 2) @ np.abs(w).T * (1 + 2.0 ** -10)
    rounding = (n_blocks + 8) * U * ((np.abs(x) + d) @ a.T)
    return quantization + rounding


def q4_1_offsets(blocks, rows, cols):
    """m of every block as float64, repeated over its 32 values (bytes 2-3 of each 20-byte block)."""
    m = blocks.reshape(rows, cols // 32, 20)[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)
    return np.repeat(m, 32, axis=1)


@pytest.mark.parametrize("fmt", sorted(GGUF))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_gguf_product_within_bound_of_float64(backend, fmt, shape, tokens):
    qtype, matmul = GGUF[fmt]
    rng = np.random.default_rng([shape[0], shape[1], tokens, len(fmt)])
    rows, cols = shape
    blocks = gguf.quants.quantize(random_weights(rng, rows, cols), qtype)
    assert blocks.dtype == np.uint8 and blocks.shape == (rows, kernels.row_bytes(fmt, cols))
    w = gguf.quants.dequantize(blocks, qtype).astype(np.float64)
    x = random_activations(rng, tokens, cols)
    y = matmul(blocks, x)
    assert y.shape == (tokens, rows) and y.dtype == np.float32
    offsets = q4_1_offsets(blocks, rows, cols) if fmt == "q4_1" else None
    error = np.abs(y - x.astype(np.float64) @ w.T)
    assert np.all(error <= error_bound(w, x, offsets)), f"max excess {np.max(error - error_bound(w, x, offsets))}"


@pytest.mark.parametrize("fmt", sorted(GGUF))
def test_bound_catches_a_misread_layout(fmt):
    """The bound has teeth: reading the nibbles in the other order (or Q8_0 values shifted by
    one) breaks it."""
    qtype, matmul = GGUF[fmt]
    rng = np.random.default_rng(7)
    rows, cols = 16, 128
    blocks = gguf.quants.quantize(random_weights(rng, rows, cols), qtype)
    w = gguf.quants.dequantize(blocks, qtype).astype(np.float64)
    x = random_activations(rng, 2, cols)
    misread = blocks.reshape(rows, cols // 32, -1).copy()
    header = 2 if fmt != "q4_1" else 4
    if fmt == "q8_0":
        misread[:, :, header:] = np.roll(misread[:, :, header:], 1, axis=2)
    else:
        misread[:, :, header:] = (misread[:, :, header:] >> 4) | (misread[:, :, header:] << 4)
    error = np.abs(matmul(misread.reshape(rows, -1), x) - x.astype(np.float64) @ w.T)
    offsets = q4_1_offsets(blocks, rows, cols) if fmt == "q4_1" else None
    assert np.any(error > error_bound(w, x, offsets))


def test_all_backends_and_thread_counts_agree_within_bound():
    rng = np.random.default_rng(3)
    blocks = gguf.quants.quantize(random_weights(rng, 101, 192), QType.Q4_0)
    x = random_activations(rng, 3, 192)
    w = gguf.quants.dequantize(blocks, QType.Q4_0).astype(np.float64)
    previous = kernels.backend()
    try:
        for name in kernels.available_backends():
            kernels.use_backend(name)
            for threads in (1, 2, 3):
                error = np.abs(kernels.matmul_q4_0(blocks, x, n_threads=threads) - x.astype(np.float64) @ w.T)
                assert np.all(error <= error_bound(w, x)), (name, threads)
    finally:
        kernels.use_backend(previous)


@pytest.mark.parametrize("fmt", sorted(GGUF))
def test_a_token_gets_the_same_bits_alone_batched_and_on_any_thread_count(backend, fmt):
    """Each (row, token) output is summed the same way whatever the other tokens and rows of the
    call: a sequence's logits do not depend on what it is batched with."""
    qtype, matmul = GGUF[fmt]
    rng = np.random.default_rng(5)
    rows, cols = 45, 544
    blocks = gguf.quants.quantize(random_weights(rng, rows, cols), qtype)
    x = random_activations(rng, 8, cols)
    batched = matmul(blocks, x, n_threads=1)
    for tokens in range(1, 9):
        np.testing.assert_array_equal(matmul(blocks, x[:tokens], n_threads=1), batched[:tokens])
    for t in range(8):
        np.testing.assert_array_equal(matmul(blocks, x[t], n_threads=1)[0], batched[t])
    for threads in (2, 3):
        np.testing.assert_array_equal(matmul(blocks, x, n_threads=threads), batched)


def test_activations_round_halves_away_from_zero_on_every_backend(backend):
    """Q8_0 rows that each pick one value with weight 1 read back d_x * q exactly, so this sees the
    activation quantization itself: block scale max|x| / 127 and q = roundf(x / d), halves away from
    zero (2.5 -> 3, -2.5 -> -3, where round-half-even gives 2)."""
    rng = np.random.default_rng(9)
    cols = 320
    x = np.round(rng.uniform(-126, 126, (3, cols)) * 2).astype(np.float32) / 2  # many exact halves
    x[:, ::32] = 127.0  # d = 1 in every block: x / d is x, ties stay ties
    x[2] = rng.standard_normal(cols).astype(np.float32)  # a token with ordinary scales
    blocks = np.zeros((cols, cols // 32, 34), np.uint8)
    blocks[:, :, :2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    blocks[np.arange(cols), np.arange(cols) // 32, 2 + np.arange(cols) % 32] = 1
    y = kernels.matmul_q8_0(blocks.reshape(cols, -1), x)
    d = np.repeat(np.abs(x).reshape(3, -1, 32).max(axis=2) / np.float32(127.0), 32, axis=1).astype(np.float32)
    ratio = (x * (np.float32(1.0) / d)).astype(np.float64)
    q = np.sign(ratio) * np.floor(np.abs(ratio) + 0.5)
    np.testing.assert_array_equal(y, (q * d).astype(np.float32))
    assert np.any(np.abs(x[:2]) % 1 == 0.5)


@pytest.mark.parametrize("fmt", sorted(GGUF))
def test_vnni_rows_give_the_avx2_rows_bits_on_every_byte_value(fmt):
    """The VNNI rows claim the AVX2 rows' int32 lanes exactly (bias and offset, csrc/dot.c):
    random raw blocks reach every byte value (Q8_0's -128 too) against activations at +-127."""
    if not {"vnni", "avx2"} <= set(kernels.available_backends()):
        pytest.skip(f"needs the vnni and avx2 backends ({kernels.backend_info()})")
    rng = np.random.default_rng(11)
    rows, cols = 37, 320
    block = kernels.BLOCK_BYTES[fmt]
    blocks = rng.integers(0, 256, (rows, cols // 32, block), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.1, (rows, cols // 32, 2)).astype(np.float16).view(np.uint8)
    blocks[:, :, :4 if fmt == "q4_1" else 2] = scales.reshape(rows, cols // 32, -1)[:, :, :4 if fmt == "q4_1" else 2]
    blocks = blocks.reshape(rows, -1)
    x = random_activations(rng, 5, cols)
    x[1] = np.where(rng.random(cols) < 0.5, -1.0, 1.0)  # every activation quantizes to +-127
    previous = kernels.backend()
    try:
        products = {}
        for name in ("avx2", "vnni"):
            kernels.use_backend(name)
            products[name] = GGUF[fmt][1](blocks, x, n_threads=2)
    finally:
        kernels.use_backend(previous)
    assert np.all(np.isfinite(products["avx2"]))
    np.testing.assert_array_equal(products["vnni"], products["avx2"])


# ---- llama2.c v2 (runq.c) mode ----

def runq_quantize(x, gs):
    """runq.c quantize(): per group, scale = wmax / 127.0f; q = (int8_t) round(x / scale)."""
    q, s = [], []
    for start in range(0, len(x), gs):
        group = [np.float32(v) for v in x[start:start + gs]]
        wmax = np.float32(0.0)
        for value in group:
            wmax = max(wmax, np.float32(abs(value)))
        scale = np.float32(wmax / np.float32(127.0))
        s.append(scale)
        for value in group:
            ratio = float(np.float32(value / scale)) if scale > 0 else 0.0  # 0/0 casts to 0 on x86-64
            q.append(int(np.copysign(np.floor(abs(ratio) + 0.5), ratio)))
    return q, s


def runq_matmul(values, scales, gs, x):
    """runq.c matmul(): int32 per group; val += ((float) ival) * w->s[..] * x->s[..]."""
    rows, cols = values.shape
    xq, xs = runq_quantize(x, gs)
    out = []
    for i in range(rows):
        val = np.float32(0.0)
        for j in range(0, cols, gs):
            ival = sum(int(values[i, j + k]) * xq[j + k] for k in range(gs))
            val = np.float32(val + np.float32(np.float32(np.float32(ival) * scales[(i * cols + j) // gs]) * xs[j // gs]))
        out.append(val)
    return np.array(out, dtype=np.float32)


def random_llama2c(rng, rows, cols, gs):
    w = random_weights(rng, rows, cols).reshape(-1, gs)
    scales = (np.abs(w).max(axis=1) / np.float32(127.0)).astype(np.float32)
    values = np.rint(w / np.where(scales > 0, scales, 1)[:, None]).astype(np.int8).reshape(rows, cols)
    return values, scales


@pytest.mark.parametrize("gs", [4, 32, 64])
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (13, 128), (37, 192)])
def test_llama2c_mode_is_runq_bit_for_bit(backend, gs, shape):
    rng = np.random.default_rng([gs, *shape])
    values, scales = random_llama2c(rng, *shape, gs)
    x = random_activations(rng, 2, shape[1])
    y = kernels.matmul_llama2c_q8(values, scales, gs, x)
    for t in range(len(x)):
        np.testing.assert_array_equal(y[t], runq_matmul(values, scales, gs, x[t]))


@pytest.mark.parametrize("gs", [16, 32, 64])
def test_llama2c_mode_within_bound_of_float64(backend, gs):
    rng = np.random.default_rng(gs)
    rows, cols = 29, 192
    values, scales = random_llama2c(rng, rows, cols, gs)
    w = (values.reshape(-1, gs).astype(np.float64) * scales[:, None]).reshape(rows, cols)
    x = random_activations(rng, 4, cols)
    groups = np.abs(x.astype(np.float64)).reshape(4, -1, gs).max(axis=2) / 127.0
    d = np.repeat(groups, gs, axis=1)
    bound = (d / 2) @ np.abs(w).T * (1 + 2.0 ** -10) + (cols // gs + 8) * U * ((np.abs(x) + d) @ np.abs(w).T)
    error = np.abs(kernels.matmul_llama2c_q8(values, scales, gs, x, n_threads=2) - x.astype(np.float64) @ w.T)
    assert np.all(error <= bound)


@pytest.mark.parametrize("call", [
    lambda: kernels.matmul_q8_0(np.zeros((2, 33), np.uint8), np.zeros(32, np.float32)),
    lambda: kernels.matmul_q8_0(np.zeros((2, 34), np.uint8), np.zeros(64, np.float32)),
    lambda: kernels.matmul_q4_0(np.zeros((2, 18), np.int8), np.zeros(32, np.float32)),
    lambda: kernels.matmul_q4_1(np.zeros((2, 20), np.uint8), np.zeros(32, np.float32), out=np.zeros((2, 1), np.float32)),
    lambda: kernels.matmul_llama2c_q8(np.zeros((2, 64), np.int8), np.zeros(3, np.float32), 32, np.zeros(64, np.float32)),
    lambda: kernels.matmul_llama2c_q8(np.zeros((2, 64), np.int8), np.zeros(4, np.float32), 48, np.zeros(64, np.float32)),
])
def test_wrong_shapes_are_refused(backend, call):
    with pytest.raises(ValueError):
        call()


def test_backend_is_reported():
    info = kernels.backend_info()
    assert kernels.backend() in info and kernels.backend() in kernels.available_backends()


def _import_report(env_value, block_native):
    import os
    import subprocess
    import sys
    code = ("import sys\n" + ("sys.modules['llmtp.common.kernels._native'] = None\n" if block_native else "")
            + "from llmtp.common import kernels\nprint(kernels.backend())")
    env = dict(os.environ, LLMTP_KERNELS=env_value)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr


def test_env_var_forces_the_portable_path():
    if "portable" not in kernels.available_backends():
        pytest.skip(f"C extension not loaded ({kernels.backend_info()})")
    assert _import_report("portable", block_native=False) == ("portable", "")


def test_without_the_extension_numpy_runs_and_says_so():
    backend, stderr = _import_report("", block_native=True)
    assert backend == "numpy"
    assert "quantized kernels run in numpy" in stderr and stderr.count("\n") == 1
