"""The v2 files the runq.c fixtures of tests/fixtures/runq_random_v2.json were recorded on:
random weights (common/model/random_weights.py, a fixed seed) written by llmtp's own writer with
group sizes 32 and 64, whose products take the kernels' SIMD path (stories260K's group of 4
takes the scalar one). tools/record_runq_fixtures.py runs runq.c on them; the fixture keeps each
file's sha256 so a test knows it rebuilt the same bytes."""

from pathlib import Path

from llmtp.common.model.config import ModelConfig

from model_factory import write_random_checkpoint

SEED = 15
PROMPT = "Once upon a time"
STEPS = 64


def random_v2_config(group_size: int) -> ModelConfig:
    # head_dim 32: group 32 cuts for 1..4 workers, group 64 only for 1, 2 (a head pair per group);
    # the 512-token vocabulary is stories260K's tok512.bin
    return ModelConfig(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, seq_len=64,
                       shared_classifier=True)


def write_random_v2(folder: Path, group_size: int) -> Path:
    return write_random_checkpoint(Path(folder) / f"random_v2_g{group_size}.bin", random_v2_config(group_size),
                                   SEED, version=2, group_size=group_size)
