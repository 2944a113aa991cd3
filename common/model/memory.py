"""What a context costs in memory, checked before anything is allocated.

The KV cache is allocated lazily (an anonymous map: pages on first touch), so a header that
claims a context of 2^30 positions does not fail at allocation but later, at a random
step, or in the RoPE table (eagerly built, seq_len x head_dim/2). Every engine asks
`check_context` first and refuses, in one line, a context that cannot fit."""

import os
from dataclasses import replace

from llmtp.common.errors import ConfigError

from .config import ModelConfig

FLOAT32_BYTES = 4
COMPLEX64_BYTES = 8


def kv_cache_bytes(config: ModelConfig, n_slots: int, n_kv_heads_local: int | None = None) -> int:
    """Keys and values of every layer, slot and position (float32) for n_kv_heads_local heads."""
    heads = config.n_kv_heads if n_kv_heads_local is None else n_kv_heads_local
    return 2 * config.n_layers * n_slots * heads * config.seq_len * config.head_dim * FLOAT32_BYTES


def rope_table_bytes(config: ModelConfig) -> int:
    return config.seq_len * (config.head_dim // 2) * COMPLEX64_BYTES


def context_bytes(config: ModelConfig, n_slots: int, n_kv_heads_local: int | None = None,
                  n_processes: int = 1) -> int:
    """Memory for the contexts beyond the weights: the KV cache, and one RoPE table in each of
    n_processes processes (the workers of one machine each build their own)."""
    return kv_cache_bytes(config, n_slots, n_kv_heads_local) + n_processes * rope_table_bytes(config)


def available_memory_bytes() -> int:
    """MemAvailable (what can be allocated without swapping), else physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2 ** 30:.1f} GiB"


def largest_context(config: ModelConfig, n_slots: int, budget_bytes: int, n_kv_heads_local: int | None = None,
                    n_processes: int = 1) -> int:
    """The most positions whose contexts fit `budget_bytes` (0 if not even one)."""
    one = context_bytes(replace(config, seq_len=1), n_slots, n_kv_heads_local, n_processes)
    return max(0, min(config.seq_len, budget_bytes // one))


def check_context(config: ModelConfig, n_slots: int, where: str, n_kv_heads_local: int | None = None,
                  budget_bytes: int | None = None, n_processes: int = 1) -> None:
    """Refuse, in one line naming `where`, contexts that cannot fit in memory (n_processes: the
    local workers that share this machine's memory, each with its RoPE table)."""
    budget = available_memory_bytes() if budget_bytes is None else budget_bytes
    needed = context_bytes(config, n_slots, n_kv_heads_local, n_processes)
    if needed <= budget:
        return
    fits = largest_context(config, n_slots, budget, n_kv_heads_local, n_processes)
    hint = f"--context {fits} fits" if fits else "not even one position fits"
    raise ConfigError(f"{where}: a context of {config.seq_len} positions x {n_slots} slot(s) needs "
                      f"{gib(needed)} of KV cache and RoPE table, {gib(budget)} is available ({hint})")


def with_context(config: ModelConfig, n_positions: int | None, where: str) -> ModelConfig:
    """The model run with a shorter context than it was trained for (llama.cpp's -c)."""
    if n_positions is None or n_positions == config.seq_len:
        return config
    if not 1 <= n_positions <= config.seq_len:
        raise ConfigError(f"{where}: --context {n_positions} is outside 1..{config.seq_len} (the model's context)")
    return replace(config, seq_len=n_positions)
