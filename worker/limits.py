"""What a worker may be asked to hold, bounded before anything is allocated."""

from llmtp.common.errors import ProtocolError
from llmtp.common.model.config import ModelConfig
from llmtp.common.model.split import SliceSpec

MAX_STEP_SEQUENCES = 16  # a STEP's rows: at most this many full contexts (a batched prefill)
HEADER_ALLOWANCE = 1 << 20


def max_message_bytes(config: ModelConfig) -> int:
    """The largest message a worker accepts: a STEP of MAX_STEP_SEQUENCES full contexts."""
    return MAX_STEP_SEQUENCES * config.seq_len * config.dim * 4 + HEADER_ALLOWANCE


def kv_cache_bytes(config: ModelConfig, spec: SliceSpec, n_slots: int) -> int:
    """Keys and values of this worker's kv heads for n_slots full contexts (KVCache's shape)."""
    return 2 * config.n_layers * n_slots * spec.n_kv_heads_local * config.seq_len * config.head_dim * 4


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_cache_fits(config: ModelConfig, spec: SliceSpec, n_slots: int, held_bytes: int = 0) -> None:
    """Refuse a KV cache that cannot fit this machine's memory (held_bytes: the cache it replaces)."""
    needed = kv_cache_bytes(config, spec, n_slots)
    available = available_memory_bytes()
    if available is not None and needed > available + held_bytes:
        raise ProtocolError(f"handshake refused: n_slots {n_slots} needs a {needed / 2**30:.2f} GiB KV cache, "
                            f"this machine has {(available + held_bytes) / 2**30:.2f} GiB available")
