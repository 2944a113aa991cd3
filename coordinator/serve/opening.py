"""The model arguments `llmtp serve` and `llmtp chat` share, and the engine they open: the same
engines as generate (in this process, N local workers, `cluster up`'s workers or a cluster YAML,
with recovery), with as many KV slots as asked or as fit."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llmtp.common.errors import ConfigError
from llmtp.common.formats.chat_template import ChatTemplate, jinja_template, resolve_chat_template
from llmtp.common.model.config import ModelConfig
from llmtp.common.model.memory import available_memory_bytes, kv_cache_bytes

from ..commands.arguments import non_negative_int, positive_int, positive_seconds

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
                        help="llama2.c checkpoint, GGUF file or Hugging Face folder "
                             "(default: the bundled Shakespeare model)")
    parser.add_argument("-z", "--tokenizer", help="tokenizer.bin or .model (default: the model's own, or "
                        "tokenizer.model / tokenizer.bin beside the checkpoint)")
    parser.add_argument("-w", "--workers", type=non_negative_int, default=0,
                        help="run on N local worker processes (0 = in this process)")
    parser.add_argument("--cluster", nargs="?", const="", default=None, metavar="STATE",
                        help="use the workers of `llmtp cluster up` (optional: its state file)")
    parser.add_argument("--config", help="cluster YAML: run on the workers it lists")
    parser.add_argument("--context", type=positive_int, metavar="N",
                        help="positions of context to run (default: the model's seq_len; fewer need less memory)")
    parser.add_argument("--chat-template", metavar="NAME|FILE", help="llama2, chatml, a Jinja file or a "
                        "tokenizer_config.json (default: the model's own template, else llama2)")
    parser.add_argument("--timeout", type=positive_seconds, help="seconds to wait for any worker reply "
                        "(default 30, or the config's timeouts.reply)")
    parser.add_argument("--recover-wait", type=positive_seconds,
                        help="seconds to wait for a lost worker to come back (default 30, or the config's)")


def default_slots(config: ModelConfig) -> int:
    """As many as fit in a share of MemAvailable, at most MAX_DEFAULT_SLOTS, at least 1."""
    one_slot = kv_cache_bytes(config, 1)
    return max(1, min(MAX_DEFAULT_SLOTS, int(available_memory_bytes() * KV_MEMORY_SHARE) // one_slot))


def open_model(args, n_slots: int | None) -> OpenedModel:
    """n_slots None: default_slots. Raises ConfigError for bad arguments."""
    from ..commands.engines import EngineOptions, plan_engine

    if n_slots is not None and n_slots < 1:
        raise ConfigError(f"--slots must be >= 1, got {n_slots}")
    plan = plan_engine(EngineOptions(checkpoint=args.checkpoint, tokenizer=args.tokenizer, workers=args.workers,
                                     cluster=args.cluster, config=args.config, timeout=args.timeout,
                                     recover_wait=args.recover_wait, context=args.context))
    plan.launch()  # --workers: they start (and import numpy) while this process reads the tokenizer
    try:
        from llmtp.common.formats.load import open_tokenizer
        tokenizer = open_tokenizer(plan.tokenizer_path, plan.config.vocab_size)
        template = model_template(args.chat_template, tokenizer, plan.checkpoint_path)
        engine = plan.open(n_slots if n_slots is not None else default_slots(plan.config))
    except BaseException:
        plan.discard()
        raise
    return OpenedModel(engine, tokenizer, template, model_name(plan.checkpoint_path or plan.tokenizer_path))


def model_template(spec: str | None, tokenizer, checkpoint_path: Path | None) -> ChatTemplate:
    """--chat-template wins; else the template the tokenizer carries (GGUF metadata or
    tokenizer_config.json); else a tokenizer_config.json beside a llama2.c file; else llama2."""
    carried = getattr(tokenizer, "chat_template", None)
    if spec is None and isinstance(carried, str):
        return jinja_template(carried, name=f"{tokenizer.source}:chat_template")
    folder = None
    if checkpoint_path is not None:
        folder = checkpoint_path if checkpoint_path.is_dir() else checkpoint_path.parent
    return resolve_chat_template(spec, folder)


def model_name(model_path: Path) -> str:
    """What /v1/models lists: the file's stem, or its folder's name for a generic one (model.bin)
    or a Hugging Face folder."""
    if model_path.is_dir():
        return model_path.resolve().name
    stem = model_path.stem
    return model_path.resolve().parent.name if stem in ("model", "checkpoint") else stem


def log(message: str) -> None:
    print(f"llmtp: {message}", file=sys.stderr, flush=True)


def is_interactive() -> bool:
    return os.isatty(0)
