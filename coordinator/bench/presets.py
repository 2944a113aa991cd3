"""The shapes `llmtp bench --preset` measures, as random-weight checkpoints made once into the cache."""

import sys
from pathlib import Path

from llmtp.common.model.config import ModelConfig
from llmtp.common.model.random_weights import random_weights

PRESETS = {
    "15M": ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000,
                       seq_len=256, shared_classifier=True),
    "110M": ModelConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                        seq_len=1024, shared_classifier=True),
    # One Llama-2-7B layer plus its (separate) classifier: the per-layer and logits costs of the real thing.
    "7B-layer": ModelConfig(dim=4096, hidden_dim=11008, n_layers=1, n_heads=32, n_kv_heads=32, vocab_size=32000,
                            seq_len=2048, shared_classifier=False),
}


def synthetic_checkpoint(preset: str) -> Path:
    """A random-weight v1 checkpoint of a preset's shape (the tests' random_weights, seed 0),
    made once into the cache."""
    from llmtp.common.formats.checkpoint import write_checkpoint

    from ..local_cluster import cache_dir
    config = PRESETS[preset]
    path = cache_dir() / "bench" / f"random-{preset}.bin"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"bench: writing a random {preset} checkpoint to {path}", file=sys.stderr)
    write_checkpoint(path, config, random_weights(config, seed=0), version=1)
    return path
