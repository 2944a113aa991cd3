"""An independent, loop-based oracle: llama2.c run.c's forward(transformer, token, pos), transliterated.

One token at a time, explicit loops over layers, heads, key positions and RoPE pairs, in
float64 so that its own rounding is far below the tolerance the runtime is held to. It shares
no code with the runtime: nothing is imported from `common/`. It only receives the weight
arrays (a ModelConfig-like object with dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len, and a ModelWeights-like object with token_embedding, layers[i].{attn_norm,
wq, wk, wv, wo, ffn_norm, w1, w2, w3}, final_norm, classifier). A Q8_0 matrix (anything with
`values`, `scales` and `group_size`) is expanded here by its own code.

Matrices are llama2.c's (out_features, in_features): run.c's matmul(xout, x, w, n, d) is
xout = w @ x, one matrix-vector product.
"""

import math

import numpy as np

NORM_EPS = 1e-5  # run.c rmsnorm; a config with norm_eps says otherwise (GGUF, Hugging Face)
ROPE_THETA = 10000.0  # run.c: powf(10000.0f, ...); likewise rope_theta


def expand(matrix) -> np.ndarray:
    """A weight as a float64 array; Q8_0 groups (int8 values, one scale per group_size
    consecutive values in row-major order) become values * scale."""
    if hasattr(matrix, "scales"):
        values = np.asarray(matrix.values, dtype=np.float64)
        scales = np.asarray(matrix.scales, dtype=np.float64)
        groups = values.reshape(-1, matrix.group_size) * scales.reshape(-1, 1)
        return groups.reshape(values.shape)
    return np.asarray(matrix, dtype=np.float64)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    """run.c rmsnorm: weight * x / sqrt(mean(x^2) + eps)."""
    ss = 0.0
    for value in x:
        ss += value * value
    ss = 1.0 / math.sqrt(ss / len(x) + eps)
    return weight * (ss * x)


def softmax(x: np.ndarray) -> np.ndarray:
    """run.c softmax over the whole vector, max subtracted first."""
    largest = max(x)
    exps = np.array([math.exp(value - largest) for value in x])
    return exps / exps.sum()


def rope(q: np.ndarray, k: np.ndarray, pos: int, head_size: int, theta: float = ROPE_THETA) -> None:
    """run.c's RoPE, in place: rotate pair (i, i+1) of q always, of k while i < kv_dim."""
    kv_dim = len(k)
    for i in range(0, len(q), 2):
        head_dim = i % head_size
        freq = 1.0 / theta ** (head_dim / head_size)
        val = pos * freq
        fcr, fci = math.cos(val), math.sin(val)
        for vec in ((q, k) if i < kv_dim else (q,)):
            v0, v1 = vec[i], vec[i + 1]
            vec[i] = v0 * fcr - v1 * fci
            vec[i + 1] = v0 * fci + v1 * fcr


def silu(x: float) -> float:
    return x * (1.0 / (1.0 + math.exp(-x)))


class ReferenceTransformer:
    """run.c's Transformer: weights expanded to float64 once, a KV cache, forward(token, pos)."""

    def __init__(self, config, weights, int8_inputs: int | None = None):
        """int8_inputs: a group size; every matrix product then first rounds its input to int8 per
        group of that many values (scale max|x| / 127, x / scale rounded half away from zero), as
        runq.c (a version 2 file) and llama.cpp's Q8_0 / Q4 kernels (groups of 32) do."""
        self.dim = config.dim
        self.hidden_dim = config.hidden_dim
        self.n_layers = config.n_layers
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.vocab_size = config.vocab_size
        self.seq_len = config.seq_len
        self.norm_eps = getattr(config, "norm_eps", NORM_EPS)
        self.rope_theta = getattr(config, "rope_theta", ROPE_THETA)
        self.head_size = self.dim // self.n_heads
        self.kv_dim = self.dim * self.n_kv_heads // self.n_heads
        self.kv_mul = self.n_heads // self.n_kv_heads

        self.token_embedding = expand(weights.token_embedding)
        self.layers = [{name: expand(getattr(layer, name))
                        for name in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")}
                       for layer in weights.layers]
        self.final_norm = expand(weights.final_norm)
        self.classifier = expand(weights.classifier)  # the embedding itself when shared
        if int8_inputs:
            for layer in self.layers:
                for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
                    layer[name] = Int8Inputs(layer[name], int8_inputs)
            self.classifier = Int8Inputs(self.classifier, int8_inputs)
        assert len(self.layers) == self.n_layers
        assert self.token_embedding.shape == (self.vocab_size, self.dim)
        assert self.classifier.shape == (self.vocab_size, self.dim)

        # key_cache[l][t] is the (kv_dim,) key of position t in layer l
        self.key_cache = np.zeros((self.n_layers, self.seq_len, self.kv_dim))
        self.value_cache = np.zeros((self.n_layers, self.seq_len, self.kv_dim))

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab_size,) of `token` at position `pos`; positions 0..pos-1 must have run."""
        assert 0 <= token < self.vocab_size and 0 <= pos < self.seq_len
        x = self.token_embedding[token].copy()
        for l in range(self.n_layers):
            x = x + self.attention(l, x, pos)
            x = x + self.ffn(l, x)
        x = rmsnorm(x, self.final_norm, self.norm_eps)
        return self.classifier @ x

    def attention(self, l: int, x: np.ndarray, pos: int) -> np.ndarray:
        w = self.layers[l]
        xb = rmsnorm(x, w["attn_norm"], self.norm_eps)
        q = w["wq"] @ xb  # (dim,)
        k = w["wk"] @ xb  # (kv_dim,)
        v = w["wv"] @ xb  # (kv_dim,)
        rope(q, k, pos, self.head_size, self.rope_theta)
        self.key_cache[l, pos] = k
        self.value_cache[l, pos] = v

        hs = self.head_size
        out = np.zeros(self.dim)
        for h in range(self.n_heads):
            q_head = q[h * hs:(h + 1) * hs]
            kv_offset = (h // self.kv_mul) * hs  # grouped-query attention
            att = np.zeros(pos + 1)
            for t in range(pos + 1):
                k_t = self.key_cache[l, t, kv_offset:kv_offset + hs]
                att[t] = np.dot(q_head, k_t) / math.sqrt(hs)
            att = softmax(att)
            out_head = out[h * hs:(h + 1) * hs]  # a view: accumulated in place
            for t in range(pos + 1):
                out_head += att[t] * self.value_cache[l, t, kv_offset:kv_offset + hs]
        return w["wo"] @ out

    def ffn(self, l: int, x: np.ndarray) -> np.ndarray:
        w = self.layers[l]
        xb = rmsnorm(x, w["ffn_norm"], self.norm_eps)
        hb = w["w1"] @ xb  # (hidden_dim,)
        hb2 = w["w3"] @ xb
        gated = np.array([silu(hb[i]) * hb2[i] for i in range(self.hidden_dim)])  # SwiGLU
        return w["w2"] @ gated


class Int8Inputs:
    """A float64 matrix whose product `w @ x` first rounds x to int8 per group of `group` values."""

    def __init__(self, w: np.ndarray, group: int):
        self.w, self.group, self.shape = w, group, w.shape

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        groups = x.reshape(-1, self.group)
        scale = np.abs(groups).max(axis=1, keepdims=True) / 127.0
        ratio = np.divide(groups, scale, out=np.zeros_like(groups), where=scale > 0)
        rounded = np.copysign(np.floor(np.abs(ratio) + 0.5), ratio)
        return self.w @ (rounded * scale).reshape(x.shape)


def reference_logits(config, weights, tokens, int8_inputs: int | None = None) -> np.ndarray:
    """(T,) token ids fed at positions 0..T-1 -> (T, vocab_size) float64 logits."""
    model = ReferenceTransformer(config, weights, int8_inputs)
    return np.stack([model.forward(int(token), pos) for pos, token in enumerate(tokens)])
