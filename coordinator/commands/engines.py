"""From the command line's engine flags to an engine: a frozen EngineOptions built from
argparse (never mutating its namespace), and plan_engine, which checks the flags and the
model and returns what generate needs before it opens anything.

Every opener passes n_slots, and returns a complete engine: one with workers comes wrapped
in RecoveringEngine (survive losing a worker), so callers never probe what they hold."""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import llmtp.common as common_package
from llmtp.common.errors import ConfigError
from llmtp.common.model.config import ModelConfig
from llmtp.common.model.memory import check_context, with_context

if TYPE_CHECKING:  # engine.py loads numpy, which --workers starts its workers before loading
    from ..engine import Engine

DEFAULT_MODEL_DIR = Path(common_package.__file__).resolve().parent / "default_model"  # package data
DEFAULT_REPLY_TIMEOUT = 30.0  # seconds to wait for any worker reply (a config's timeouts.reply wins)
DEFAULT_RECOVER_WAIT = 30.0  # seconds to wait for a lost worker to come back (a config's timeouts.recover)


@dataclass(frozen=True)
class EngineOptions:
    """Which engine generate runs on. At most one of workers > 0, cluster, config applies."""

    checkpoint: str | None = None
    tokenizer: str | None = None
    workers: int = 0  # 0: in this process
    cluster: str | None = None  # a `cluster up` state file; "" for the default one
    config: str | None = None  # a cluster YAML
    timeout: float | None = None  # None: DEFAULT_REPLY_TIMEOUT or the config's
    recover_wait: float | None = None  # None: DEFAULT_RECOVER_WAIT or the config's
    n_slots: int = 1
    context: int | None = None  # positions to run (None: the model's seq_len); in-process and --workers only

    @classmethod
    def from_args(cls, args) -> "EngineOptions":
        return cls(checkpoint=args.checkpoint, tokenizer=args.tokenizer, workers=args.workers,
                   cluster=args.cluster, config=args.config, timeout=args.timeout,
                   recover_wait=args.recover_wait, context=args.context)


@dataclass(frozen=True)
class EnginePlan:
    """What the flags resolved to, before anything is opened. open(n_slots) opens the engine
    (n_slots defaults to the options'), so a caller can size its slots from `config` first."""

    config: ModelConfig
    tokenizer_path: Path
    open: Callable[..., "Engine"]
    checkpoint_path: Path | None = None  # None for --cluster and --config (the workers hold the model)
    # --workers: start the worker processes now, for open() to connect to later (their start-up
    # then overlaps the caller's own, e.g. reading the tokenizer); a caller that launched them
    # and then does not open must discard() them.
    launch: Callable[[], None] = lambda: None
    discard: Callable[[], None] = lambda: None


def resolve_model_paths(checkpoint: str | None, tokenizer: str | None) -> tuple[Path, Path]:
    """The checkpoint (checked first, so that a mistyped model path is reported as the model)
    and the tokenizer given or found beside it."""
    if checkpoint is None:
        checkpoint_path = DEFAULT_MODEL_DIR / "model.bin"
        if not checkpoint_path.exists():
            raise ConfigError(f"no checkpoint given and the bundled model {checkpoint_path} is missing")
    else:
        checkpoint_path = Path(checkpoint)
        if not checkpoint_path.exists():
            raise ConfigError(f"{checkpoint_path}: no such checkpoint file or model folder")
        if checkpoint_path.is_dir() and not (checkpoint_path / "config.json").is_file():
            raise ConfigError(f"{checkpoint_path}: a folder without config.json, so not a Hugging Face model folder")
    from llmtp.common.formats.detect import carries_tokenizer
    if tokenizer is None and carries_tokenizer(checkpoint_path):
        tokenizer_path = checkpoint_path  # a GGUF file or Hugging Face folder holds its own
    elif tokenizer is None:
        # A .model says how it normalizes whitespace; a tokenizer.bin cannot, so prefer the former.
        candidates = [checkpoint_path.parent / name for name in ("tokenizer.model", "tokenizer.bin")]
        tokenizer_path = next((path for path in candidates if path.exists()), None)
        if tokenizer_path is None:
            raise ConfigError(f"no tokenizer given (-z) and neither {candidates[0]} nor {candidates[1].name} "
                              f"exists")
    else:
        tokenizer_path = Path(tokenizer)
    return checkpoint_path, tokenizer_path


def plan_engine(options: EngineOptions) -> EnginePlan:
    """With workers, the coordinator maps only the shard folder's embedding table; the
    checkpoint itself is read once, to shard it into the cache."""
    if options.config is not None or options.cluster is not None:
        if options.context is not None:
            raise ConfigError("--context applies to a model run in this process or on --workers N; running "
                              "workers (--cluster, --config) keep the context they were started with "
                              "(`llmtp worker --context N`)")
        return plan_config_engine(options) if options.config is not None else plan_cluster_engine(options)
    checkpoint_path, tokenizer_path = resolve_model_paths(options.checkpoint, options.tokenizer)
    where = str(checkpoint_path)
    if options.workers:
        from llmtp.common.formats.manifest import load_manifest
        from llmtp.coordinator import local_cluster
        warn_if_oversubscribed(options.workers, len(local_cluster.usable_cpus()))
        shard_folder = local_cluster.ensure_shards(checkpoint_path, options.workers)
        config = with_context(load_manifest(shard_folder).config, options.context, where)
        check_context(config, options.n_slots, where, n_processes=options.workers)

        early = local_cluster.EarlyWorkers(shard_folder, options.workers, options.context)

        def open_workers(n_slots: int = options.n_slots) -> "Engine":
            try:
                check_context(config, n_slots, where, n_processes=options.workers)  # before any worker starts
            except BaseException:
                early.discard()
                raise
            return recovering(local_cluster.open_local_engine(shard_folder, options.workers, n_slots=n_slots,
                                                              timeout=reply_timeout(options),
                                                              context=options.context, early=early), options)
        return EnginePlan(config, tokenizer_path, open_workers, checkpoint_path, launch=early.launch,
                          discard=early.discard)

    from llmtp.common.formats.load import load_model
    from ..local_engine import LocalEngine
    checkpoint = load_model(checkpoint_path)
    config = with_context(checkpoint.config, options.context, where)
    check_context(config, options.n_slots, where)

    def open_here(n_slots: int = options.n_slots) -> "Engine":
        check_context(config, n_slots, where)
        return LocalEngine.from_checkpoint(checkpoint, n_slots=n_slots, config=config)
    return EnginePlan(config, tokenizer_path, open_here, checkpoint_path)


def warn_if_oversubscribed(n_workers: int, n_cores: int) -> None:
    """More workers than cores: every sync waits for a worker the scheduler has not run yet."""
    if n_workers > n_cores:
        print(f"llmtp: notice: --workers {n_workers} is more than the {n_cores} usable core"
              f"{'s' if n_cores > 1 else ''}; the workers share cores and decode much slower "
              f"(use at most {n_cores})", file=sys.stderr)


def plan_cluster_engine(options: EngineOptions) -> EnginePlan:
    """--cluster: the workers, shards and tokenizer of `llmtp cluster up` (-z may replace the last)."""
    from llmtp.common.formats.manifest import load_manifest
    from llmtp.coordinator import standing_cluster
    from llmtp.coordinator.cluster_state import read_state
    if options.workers:
        raise ConfigError("--cluster runs on the workers `llmtp cluster up` started; --workers does not apply "
                          "(give one or the other)")
    if options.checkpoint:
        raise ConfigError("--cluster runs the model `llmtp cluster up` was given; CHECKPOINT does not apply")
    state_file = standing_cluster.state_path(options.cluster or None)
    check_state_file(state_file)
    state = read_state(state_file)
    config = load_manifest(state.shards).config
    tokenizer = Path(options.tokenizer) if options.tokenizer else state.tokenizer
    return EnginePlan(config, tokenizer, lambda n_slots=options.n_slots: recovering(
        standing_cluster.StandingClusterEngine(state_file, n_slots=n_slots, timeout=reply_timeout(options)),
        options))


def check_state_file(state_file: Path) -> None:
    """`generate --cluster MODEL.bin` puts the model where the state file goes: say so."""
    from llmtp.common.formats.checkpoint import MAGIC
    try:
        with state_file.open("rb") as file:
            head = file.read(4)
    except OSError:
        return  # read_cluster_state names a missing or unreadable file
    if head == MAGIC.to_bytes(4, "little") or state_file.suffix == ".bin":
        raise ConfigError(f"--cluster {state_file}: a checkpoint, not a cluster state file (--cluster runs the model "
                          f"`llmtp cluster up` was given; its optional value is the state file `cluster up` wrote)")
    if not head.lstrip()[:1] in (b"{", b""):
        raise ConfigError(f"--cluster {state_file}: not a cluster state file (the JSON `llmtp cluster up` writes)")


def plan_config_engine(options: EngineOptions) -> EnginePlan:
    """--config: the YAML's tokenizer (unless -z), shards, workers and timeouts."""
    from llmtp.common.cluster.config import load_cluster_config
    from ..config_cluster import coordinator_manifest, open_config_engine
    if options.checkpoint or options.workers or options.cluster is not None:
        raise ConfigError("--config replaces CHECKPOINT, --workers and --cluster")
    cluster = load_cluster_config(options.config)
    manifest = coordinator_manifest(cluster)
    tokenizer = Path(options.tokenizer) if options.tokenizer else cluster.tokenizer
    recover_wait = options.recover_wait if options.recover_wait is not None else cluster.timeouts.recover
    return EnginePlan(manifest.config, tokenizer, lambda n_slots=options.n_slots: recovering(
        open_config_engine(cluster, manifest, n_slots=n_slots, timeout=options.timeout),
        options, recover_wait))


def reply_timeout(options: EngineOptions) -> float:
    return options.timeout if options.timeout is not None else DEFAULT_REPLY_TIMEOUT


def recovering(engine, options: EngineOptions, recover_wait: float | None = None) -> "Engine":
    """A worker engine that survives losing one (restart or wait, rebuild, go on)."""
    from ..recovery import RecoveringEngine
    if recover_wait is None:
        recover_wait = options.recover_wait if options.recover_wait is not None else DEFAULT_RECOVER_WAIT
    return RecoveringEngine(engine, wait_seconds=recover_wait)
