"""Small random Llama-2 models for tests: configs, weights, and checkpoint files."""

from pathlib import Path

from llmtp.common.formats.checkpoint import write_checkpoint
from llmtp.common.model.config import ModelConfig
from llmtp.common.model.random_weights import random_weights  # noqa: F401 (tests import it from here)


def make_config(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=67, seq_len=32,
                shared_classifier=False) -> ModelConfig:
    """Defaults: grouped-query attention (3 query heads per kv head), head_dim 8, odd vocab."""
    config = ModelConfig(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, vocab_size=vocab_size, seq_len=seq_len,
                         shared_classifier=shared_classifier)
    config.validate("make_config")
    return config


def write_random_checkpoint(path, config: ModelConfig, seed: int, version: int = 1,
                            group_size: int | None = None) -> Path:
    """random_weights(config, seed) written as a llama2.c checkpoint of `version`."""
    return write_checkpoint(Path(path), config, random_weights(config, seed), version, group_size)
