"""The model arguments `llmtp serve` and `llmtp chat` share, and the engine they open: in this
process, or on N local workers (with recovery, as generate has), with as many KV slots as asked."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llmtp.common.errors import ConfigError
from llmtp.common.formats.chat_template import ChatTemplate, resolve_chat_template
from llmtp.common.model.config import ModelConfig

KV_MEMORY_SHARE = 0.25  # the default --slots may use this share of available memory for KV caches
MAX_DEFAULT_SLOTS = 8


@dataclass
class OpenedModel:
    engine: object  # an Engine
    tokenizer: object
    template: ChatTemplate
    name: str


def add_model_arguments(parser) -> None:
    parser.add_argument("checkpoint", nargs="?", metavar="MODEL",
                        help="llama2.c checkpoint (default: the bundled Shakespeare model)")
    parser.add_argument("-z", "--tokenizer", help="tokenizer.bin or .model (default: beside the checkpoint)")
    parser.add_argument("-w", "--workers", type=int, default=0, help="run on N local worker processes "
                        "(0 = in this process)")
    parser.add_argument("--chat-template", metavar="NAME|FILE", help="llama2, chatml, a Jinja file or a "
                        "tokenizer_config.json (default: the model folder's tokenizer_config.json, else llama2)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for any worker reply")
    parser.add_argument("--recover-wait", type=float, default=30.0,
                        help="seconds to wait for a lost worker to come back")


def kv_bytes_per_slot(config: ModelConfig) -> int:
    return 2 * config.n_layers * config.seq_len * config.kv_dim * 4  # keys and values, float32


def default_slots(config: ModelConfig) -> int:
    """As many as fit in a share of MemAvailable, at most MAX_DEFAULT_SLOTS, at least 1."""
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 1
    return max(1, min(MAX_DEFAULT_SLOTS, int(available * KV_MEMORY_SHARE) // kv_bytes_per_slot(config)))


def open_model(args, n_slots: int | None) -> OpenedModel:
    """n_slots None: default_slots. Raises ConfigError for bad arguments."""
    from llmtp.common.formats.checkpoint import load_checkpoint
    from llmtp.common.formats.tokenizer import load_tokenizer
    from llmtp.coordinator.cli import resolve_model_paths

    if args.workers < 0:
        raise ConfigError(f"-w/--workers must be >= 0, got {args.workers}")
    checkpoint_path, tokenizer_path = resolve_model_paths(args.checkpoint, args.tokenizer)
    template = resolve_chat_template(args.chat_template, checkpoint_path.parent)
    checkpoint = load_checkpoint(checkpoint_path)
    config = checkpoint.config
    tokenizer = load_tokenizer(tokenizer_path, config.vocab_size)
    if n_slots is None:
        n_slots = default_slots(config)
    if n_slots < 1:
        raise ConfigError(f"--slots must be >= 1, got {n_slots}")
    if args.workers:
        from llmtp.coordinator import local_cluster
        from llmtp.coordinator.recovery import RecoveringEngine
        del checkpoint  # the workers read their shards; the coordinator maps only the embedding
        shard_folder = local_cluster.ensure_shards(checkpoint_path, args.workers)
        engine = RecoveringEngine(local_cluster.open_local_engine(shard_folder, args.workers, n_slots=n_slots,
                                                                  timeout=args.timeout),
                                  wait_seconds=args.recover_wait)
    else:
        from llmtp.coordinator.local_engine import LocalEngine
        engine = LocalEngine.from_checkpoint(checkpoint, n_slots)
    return OpenedModel(engine, tokenizer, template, model_name(checkpoint_path))


def model_name(checkpoint_path: Path) -> str:
    """What /v1/models lists: the file's stem, or its folder's name for a generic one (model.bin)."""
    stem = checkpoint_path.stem
    return checkpoint_path.resolve().parent.name if stem in ("model", "checkpoint") else stem


def log(message: str) -> None:
    print(f"llmtp: {message}", file=sys.stderr, flush=True)


def is_interactive() -> bool:
    return os.isatty(0)
