"""run.c's sampler: greedy, or temperature + softmax + top-p (+ optional top-k),
drawn from the same xorshift64* generator, so one seed gives run.c's tokens."""

from dataclasses import dataclass

import numpy as np

_MASK64 = (1 << 64) - 1


class XorShiftRng:
    """run.c's random_u32 / random_f32 (xorshift64*)."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def next_u32(self) -> int:
        state = self.state
        state ^= state >> 12
        state ^= (state << 25) & _MASK64
        state ^= state >> 27
        self.state = state
        return ((state * 0x2545F4914F6CDD1D) & _MASK64) >> 32

    def next_f32(self) -> np.float32:
        return np.float32((self.next_u32() >> 8) / 16777216.0)


@dataclass
class SamplerConfig:
    temperature: float = 1.0
    topp: float = 0.9
    topk: int = 0  # 0 = off
    seed: int = 0


class Sampler:
    def __init__(self, config: SamplerConfig):
        self.config = config
        self.rng = XorShiftRng(config.seed)

    def sample(self, logits: np.ndarray) -> int:
        """logits: (vocab,) -> next token id. Consumes one random number unless greedy."""
        if self.config.temperature == 0.0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float32) / np.float32(self.config.temperature)
        probs = softmax_sequential(scaled)
        coin = self.rng.next_f32()
        if 0 < self.config.topk < probs.size:
            return sample_topk_topp(probs, self.config.topk, self.config.topp, coin)
        topp = np.float32(self.config.topp)
        if topp <= 0 or topp >= 1:
            return sample_mult(probs, coin)
        return sample_topp(probs, topp, coin)


def softmax_sequential(x: np.ndarray) -> np.ndarray:
    """float32 softmax whose sum runs left to right, as run.c's loop does."""
    exps = np.exp(x - np.max(x)).astype(np.float32)
    total = np.cumsum(exps, dtype=np.float32)[-1]
    return exps / total


def sample_mult(probs: np.ndarray, coin: np.float32) -> int:
    """First index whose running (float32) cdf exceeds coin."""
    cdf = np.cumsum(probs, dtype=np.float32)
    hits = np.nonzero(coin < cdf)[0]
    return int(hits[0]) if hits.size else probs.size - 1


def sample_topp(probs: np.ndarray, topp: np.float32, coin: np.float32) -> int:
    """run.c's sample_topp: drop tokens under (1-topp)/(n-1), sort the rest by probability
    (glibc's qsort is a stable merge sort here), keep the smallest prefix whose mass
    exceeds topp, and draw from it."""
    cutoff = (np.float32(1.0) - topp) / np.float32(probs.size - 1)
    candidates = np.nonzero(probs >= cutoff)[0]
    order = candidates[np.argsort(-probs[candidates], kind="stable")]
    return _draw_from_prefix(probs[order], order, topp, coin)


def sample_topk_topp(probs: np.ndarray, topk: int, topp: np.float32, coin: np.float32) -> int:
    """Keep the k most likely tokens, then apply top-p within them (topp >= 1 keeps all k)."""
    order = np.argsort(-probs, kind="stable")[:topk]
    if topp <= 0 or topp >= 1:
        topp = np.float32(np.inf)
    return _draw_from_prefix(probs[order], order, topp, coin)


def _draw_from_prefix(sorted_probs: np.ndarray, order: np.ndarray, topp: np.float32, coin: np.float32) -> int:
    cumulative = np.cumsum(sorted_probs, dtype=np.float32)
    over = np.nonzero(cumulative > topp)[0]
    last = int(over[0]) if over.size else sorted_probs.size - 1
    r = coin * cumulative[last]
    hits = np.nonzero(r < cumulative[: last + 1])[0]
    return int(order[hits[0]]) if hits.size else int(order[last])
