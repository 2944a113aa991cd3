"""runq.c's forward() for a llama2.c version 2 file, with llmtp's llama2.c-mode kernel.

Every matrix product goes through kernels.matmul_llama2c_q8 (activations quantized per group
as runq.c does, int32 group sums, runq.c's float order). The rest follows runq.c's loops in
float32: sums that runq.c runs left to right (rmsnorm's sum of squares, attention scores,
softmax's denominator, the weighted sum of values) are sequential here too (cumsum), and
exp/cos/sin/pow are rounded once from float64 as glibc's expf/cosf/sinf/powf round.
The engine's runq.c op set (common/model/numerics.py, common/kernels' runq_* ops) is checked
against runq.c's recorded text directly; this independent transliteration stays as the oracle
of the logit-level tests.
"""

import numpy as np

from llmtp.common import kernels

F32 = np.float32
# single bytes runq.c's safe_printf prints: isprint() or isspace() in the C locale
PRINTED_BYTES = {bytes([b]) for b in range(0x20, 0x7F)} | {bytes([b]) for b in b"\t\n\v\f\r"}


def sequential_sum(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """sum += v[i], left to right in float32 (numpy's own sum is pairwise)."""
    return np.take(np.cumsum(values, axis=axis, dtype=F32), -1, axis=axis)


def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    ss = sequential_sum(x * x) / F32(len(x)) + F32(1e-5)
    ss = F32(1.0) / F32(np.sqrt(ss))
    return weight * (ss * x)


def matmul(x: np.ndarray, w) -> np.ndarray:
    return kernels.matmul_llama2c_q8(w.values, w.scales, w.group_size, x)[0]


def f32(function, x):
    return function(np.asarray(x, dtype=np.float64)).astype(F32)


class RunqTransformer:
    def __init__(self, config, weights):
        self.config, self.weights = config, weights
        self.head_size = config.dim // config.n_heads
        self.kv_dim = self.head_size * config.n_kv_heads
        self.keys = np.zeros((config.n_layers, config.seq_len, self.kv_dim), F32)
        self.values = np.zeros_like(self.keys)
        # runq.c: freq = 1.0f / powf(10000.0f, head_dim / (float)head_size), head_dim = i % head_size
        pair = (np.arange(0, config.dim, 2) % self.head_size).astype(F32) / F32(self.head_size)
        self.freq = F32(1.0) / f32(lambda p: np.power(10000.0, p), pair)

    def rope(self, vec: np.ndarray, pos: int) -> None:
        val = F32(pos) * self.freq[:len(vec) // 2]
        fcr, fci = f32(np.cos, val), f32(np.sin, val)
        v0, v1 = vec[0::2].copy(), vec[1::2].copy()
        vec[0::2] = v0 * fcr - v1 * fci
        vec[1::2] = v0 * fci + v1 * fcr

    def attention(self, q: np.ndarray, layer: int, pos: int) -> np.ndarray:
        c, hs = self.config, self.head_size
        kv_mul = c.n_heads // c.n_kv_heads
        out = np.empty(c.dim, F32)
        for h in range(c.n_heads):
            kv = (h // kv_mul) * hs
            keys = self.keys[layer, :pos + 1, kv:kv + hs]
            att = sequential_sum(q[h * hs:(h + 1) * hs][None, :] * keys) / F32(np.sqrt(F32(hs)))
            att = f32(np.exp, att - np.max(att))
            att = att / sequential_sum(att)
            out[h * hs:(h + 1) * hs] = sequential_sum(att[:, None] * self.values[layer, :pos + 1, kv:kv + hs], axis=0)
        return out

    def forward(self, token: int, pos: int) -> np.ndarray:
        w = self.weights
        x = w.token_embedding.dequantize_rows(np.array([token]))[0]
        for layer_index, layer in enumerate(w.layers):
            xb = rmsnorm(x, layer.attn_norm)
            q, k, v = matmul(xb, layer.wq), matmul(xb, layer.wk), matmul(xb, layer.wv)
            self.rope(q, pos)
            self.rope(k, pos)
            self.keys[layer_index, pos], self.values[layer_index, pos] = k, v
            x = x + matmul(self.attention(q, layer_index, pos), layer.wo)
            xb = rmsnorm(x, layer.ffn_norm)
            hb, hb2 = matmul(xb, layer.w1), matmul(xb, layer.w3)
            hb = hb * (F32(1.0) / (F32(1.0) + f32(np.exp, -hb))) * hb2  # SwiGLU as runq.c rounds it
            x = x + matmul(hb, layer.w2)
        return matmul(rmsnorm(x, w.final_norm), w.classifier)


def greedy_stdout(config, weights, tokenizer, prompt: str, steps: int) -> bytes:
    """What runq.c prints with -t 0 -n steps -i prompt: the prompt, the greedy text, a newline."""
    model = RunqTransformer(config, weights)
    tokens = tokenizer.encode(prompt, bos=True)
    printed, token = [], tokens[0]
    for pos in range(steps):
        logits = model.forward(token, pos)
        following = tokens[pos + 1] if pos + 1 < len(tokens) else int(np.argmax(logits))
        if following == tokenizer.bos_id:
            break
        piece = tokenizer.piece_bytes(following, token)
        if len(piece) != 1 or piece in PRINTED_BYTES:  # runq.c's safe_printf drops other lone bytes
            printed.append(piece)
        token = following
    return b"".join(printed) + b"\n"
