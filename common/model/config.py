"""Model hyper-parameters, as stored in a llama2.c checkpoint header."""

from dataclasses import dataclass

from llmtp.common.errors import FormatError

# What llama2.c's run.c hard-codes; every llama2.c file gets these. GGUF and Hugging Face
# models carry their own.
LLAMA2C_NORM_EPS = 1e-5
LLAMA2C_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True
    rope_theta: float = LLAMA2C_ROPE_THETA
    norm_eps: float = LLAMA2C_NORM_EPS

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def kv_mul(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def validate(self, source: str) -> None:
        """Raise FormatError naming `source` and the first field that is wrong."""
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if value <= 0:
                raise FormatError(f"{source}: {name} must be positive, got {value}")
        if self.dim % self.n_heads:
            raise FormatError(f"{source}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise FormatError(
                f"{source}: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, float) and 0.0 < value < float("inf")):
                raise FormatError(f"{source}: {name} must be a positive finite number, got {value!r}")
        if self.head_dim % 2:
            raise FormatError(f"{source}: head_dim {self.head_dim} must be even for RoPE")

    def n_params(self) -> int:
        """Parameter count (tied classifier counted once)."""
        per_layer = (2 * self.dim + self.dim * self.dim + 2 * self.dim * self.kv_dim
                     + self.dim * self.dim + 3 * self.dim * self.hidden_dim)
        total = self.vocab_size * self.dim + self.n_layers * per_layer + self.dim
        if not self.shared_classifier:
            total += self.vocab_size * self.dim
        return total
