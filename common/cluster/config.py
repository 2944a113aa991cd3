"""The cluster config: one YAML file that describes a multi-host cluster, read once.

    model: models/llama2-7b.bin          # llama2.c checkpoint (read by `llmtp shard --config`)
    tokenizer: models/tokenizer.bin
    shards: shards                       # <shards>/<host>/ holds each host's files
    coordinator: {host: 10.0.0.1}
    workers:                             # one per shard
      - {host: 10.0.0.2, port: 5555, shard: 0, threads: 8}
    timeouts: {reply: 30, reduce: 60, liveness: 5, recover: 60}    # optional
    reduce: peers                        # optional: peers | star
    keys: {coordinator_public: ..., coordinator_secret: ..., worker_public: ..., worker_secret: ...}

yaml.safe_load at the edge, then frozen dataclasses. Unknown keys are errors, and every
error is a ConfigError of one line: the file, the field path (`workers[1].port`), what it
holds and what is allowed. Relative paths are resolved against the YAML file's folder.
Without `keys` every address must be loopback (the links would be plaintext).

Imports no numpy: a worker reads its thread count from here before numpy loads.
"""

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmtp.common.errors import ConfigError
from llmtp.common.exchange.modes import CONFIG_REDUCE_MODES, ReduceMode

from .addresses import is_loopback

HOST_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
HOST_ALLOWED = "an IPv4 address or a host name (letters, digits, '.', '-')"
PORT_ALLOWED = "an integer 1..65535"
KEY_FIELDS = ("coordinator_public", "coordinator_secret", "worker_public", "worker_secret")
_REQUIRED = object()


@dataclass(frozen=True)
class Timeouts:
    reply: float = 30.0  # coordinator: seconds to wait for any worker reply (handshake, step)
    reduce: float = 60.0  # worker: seconds to wait for the other workers' partials mid-step
    liveness: float = 5.0  # coordinator: a silent connection (no heartbeat) counts as lost after this
    recover: float = 60.0  # coordinator: seconds to wait for a lost worker to come back (systemd)


TIMEOUT_FIELDS = tuple(field.name for field in dataclasses.fields(Timeouts))


@dataclass(frozen=True)
class Keys:
    """CURVE key files (ZeroMQ certificates, from `llmtp keygen`). A host needs only its own
    secret: the coordinator's host coordinator_secret, the worker hosts worker_secret."""

    coordinator_public: Path
    coordinator_secret: Path
    worker_public: Path
    worker_secret: Path


@dataclass(frozen=True)
class CoordinatorEntry:
    host: str  # the coordinator's address; names its shard folder (embedding.bin, manifest.json)


@dataclass(frozen=True)
class WorkerEntry:
    host: str  # the address the coordinator and the other workers reach this worker at
    port: int  # control socket (coordinator -> worker)
    shard: int  # which shard this worker serves, 0..n_workers-1
    threads: int  # BLAS threads, 0 = all cores
    peer_port: int  # peer inbox (worker -> worker partial sums); default port + 1
    bind: str  # interface to listen on; default host ("*" = all)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def bind_endpoint(self) -> str:
        return f"tcp://{self.bind}:{self.port}"


@dataclass(frozen=True)
class ClusterConfig:
    path: Path  # the YAML file
    model: Path
    tokenizer: Path
    shards: Path
    coordinator: CoordinatorEntry
    workers: tuple[WorkerEntry, ...]  # in the file's order; --index counts in this order
    timeouts: Timeouts
    reduce: str
    keys: Keys | None

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    def host_folder(self, host: str) -> Path:
        """The folder `llmtp shard --config` fills for one host (copy it to that host)."""
        return self.shards / host

    @property
    def coordinator_folder(self) -> Path:
        return self.host_folder(self.coordinator.host)

    def by_shard(self) -> list[WorkerEntry]:
        """The workers in shard order, as the coordinator addresses them."""
        return sorted(self.workers, key=lambda worker: worker.shard)

    def worker(self, index: int) -> WorkerEntry:
        if not 0 <= index < self.n_workers:
            raise ConfigError(f"{self.path}: --index {index} is outside 0..{self.n_workers - 1} "
                              f"(the config lists {self.n_workers} workers)")
        return self.workers[index]

    def plaintext_notice(self) -> str | None:
        """One line to print when the links are not encrypted (allowed only on loopback)."""
        if self.keys is not None:
            return None
        return (f"llmtp: notice: {self.path} has no keys: links are not encrypted "
                f"(allowed because every address is loopback)")


# A cluster config is a few kilobytes, a few levels deep, and has no use for anchors: anything
# beyond these is refused before it is built (a 701-byte alias bomb grows past 900 MB otherwise).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Read and check a cluster YAML file; ConfigError (one line) on anything wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read cluster config: {error.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: cluster config is larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cluster config is not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # yaml.SafeLoader, plus duplicate keys refused
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML{_yaml_position(error)}") from None
    return _Reader(path).cluster(data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, except a key given twice in one mapping is an error, not a silent override,
    and aliases and nesting deeper than MAX_CONFIG_DEPTH are refused while composing, before any
    object is built."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a cluster config",
                                              self.peek_event().start_mark)
        if self.depth >= MAX_CONFIG_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels",
                                              self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # SafeLoader itself refuses unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"field {key!r} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_position(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {problem}"


def _describe(value) -> str:
    if value is None:
        return "empty"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Reader:
    """Checks one file's data field by field; every failure names the file and field path."""

    def __init__(self, path: Path):
        self.path = path
        self.folder = path.resolve().parent

    def fail(self, where: str, text: str):
        raise ConfigError(f"{self.path}: {where}: {text}")

    def cluster(self, data) -> ClusterConfig:
        top = _Section(self, "", data, "a mapping with model, tokenizer, shards, coordinator, workers")
        model = top.take("model", self.file_path, "a path (llama2.c or GGUF file, Hugging Face folder)")
        tokenizer = top.take("tokenizer", self.file_path, "a file path")
        shards = top.take("shards", self.file_path, "a folder path")
        coordinator = top.take("coordinator", self.coordinator, "a mapping with host")
        workers = top.take("workers", self.workers, "a list of worker mappings")
        timeouts = top.take("timeouts", self.timeouts, "a mapping with " + ", ".join(TIMEOUT_FIELDS),
                            default=Timeouts())
        reduce = top.take("reduce", _choice(CONFIG_REDUCE_MODES), " or ".join(CONFIG_REDUCE_MODES),
                          default=ReduceMode.PEERS.value)
        keys = top.take("keys", self.keys, "a mapping with " + ", ".join(KEY_FIELDS), default=None)
        top.done()
        config = ClusterConfig(path=self.path, model=model, tokenizer=tokenizer, shards=shards,
                               coordinator=coordinator, workers=workers, timeouts=timeouts, reduce=reduce,
                               keys=keys)
        if keys is None:
            self.check_loopback_only(config)
        return config

    def file_path(self, value, where: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"{_describe(value)} is not allowed; expected a path (relative to this file's folder)")
        path = Path(os.path.expanduser(value))
        return Path(os.path.normpath(path if path.is_absolute() else self.folder / path))

    def host(self, value, where: str) -> str:
        if not isinstance(value, str) or not HOST_PATTERN.match(value):
            self.fail(where, f"{_describe(value)} is not allowed; expected {HOST_ALLOWED}")
        return value

    def bind(self, value, where: str) -> bool:
        return value == "*" or isinstance(value, str) and bool(HOST_PATTERN.match(value))

    def coordinator(self, value, where: str) -> CoordinatorEntry:
        section = _Section(self, where, value, "a mapping with host")
        entry = CoordinatorEntry(host=section.take("host", self.host, HOST_ALLOWED))
        section.done()
        return entry

    def workers(self, value, where: str) -> tuple[WorkerEntry, ...]:
        if not isinstance(value, list) or not value:
            self.fail(where, f"{_describe(value)} is not allowed; expected a non-empty list of workers")
        workers = tuple(self.worker(item, f"{where}[{index}]") for index, item in enumerate(value))
        self.check_shards(workers, where)
        self.check_ports(workers, where)
        return workers

    def worker(self, value, where: str) -> WorkerEntry:
        section = _Section(self, where, value, "a mapping with host, port, shard")
        host = section.take("host", self.host, HOST_ALLOWED)
        port = section.take("port", _int_in(1, 65535), PORT_ALLOWED)
        shard = section.take("shard", _int_in(0, 1 << 16), "an integer 0..n_workers-1")
        threads = section.take("threads", _int_in(0, 4096), "an integer >= 0 (0 = all cores)", default=0)
        peer_port = section.take("peer_port", _int_in(1, 65535), PORT_ALLOWED, default=None)
        bind = section.take("bind", self.bind, HOST_ALLOWED + ", or * for all interfaces", default=host)
        section.done()
        if peer_port is None:
            if port == 65535:
                self.fail(f"{where}.port", "65535 leaves no room for the default peer_port (port + 1); "
                                           "set peer_port")
            peer_port = port + 1
        return WorkerEntry(host=host, port=port, shard=shard, threads=threads, peer_port=peer_port, bind=bind)

    def check_shards(self, workers: tuple[WorkerEntry, ...], where: str) -> None:
        """Each shard 0..N-1 exactly once."""
        owner: dict[int, int] = {}
        for index, worker in enumerate(workers):
            field = f"{where}[{index}].shard"
            if worker.shard >= len(workers):
                self.fail(field, f"{worker.shard} is not allowed; expected 0..{len(workers) - 1} "
                                 f"(one shard per worker)")
            if worker.shard in owner:
                self.fail(field, f"{worker.shard} is already {where}[{owner[worker.shard]}]'s; "
                                 f"each shard 0..{len(workers) - 1} appears once")
            owner[worker.shard] = index

    def check_ports(self, workers: tuple[WorkerEntry, ...], where: str) -> None:
        """No two sockets of one host on the same port (port and peer_port of every worker there)."""
        used: dict[tuple[str, int], str] = {}
        for index, worker in enumerate(workers):
            for name in ("port", "peer_port"):
                field = f"{where}[{index}].{name}"
                key = ("127.0.0.1" if worker.host == "localhost" else worker.host, getattr(worker, name))
                if key in used:
                    self.fail(field, f"{key[1]} on {key[0]} is already {used[key]}; "
                                     f"each port of one host is used once")
                used[key] = field

    def timeouts(self, value, where: str) -> Timeouts:
        section = _Section(self, where, value, "a mapping with " + ", ".join(TIMEOUT_FIELDS))
        seconds, allowed = _positive_number, "a number of seconds > 0"
        timeouts = Timeouts(**{name: section.take(name, seconds, allowed, default=getattr(Timeouts, name))
                               for name in TIMEOUT_FIELDS})
        section.done()
        return timeouts

    def keys(self, value, where: str) -> Keys:
        section = _Section(self, where, value, "a mapping with " + ", ".join(KEY_FIELDS))
        keys = Keys(**{name: section.take(name, self.file_path, "a key file path (from `llmtp keygen`)")
                       for name in KEY_FIELDS})
        section.done()
        return keys

    def check_loopback_only(self, config: ClusterConfig) -> None:
        addresses = [("coordinator.host", config.coordinator.host)]
        for index, worker in enumerate(config.workers):
            addresses += [(f"workers[{index}].host", worker.host), (f"workers[{index}].bind", worker.bind)]
        for field, host in addresses:
            if not is_loopback(host):
                self.fail(field, f"{host} is not a loopback address, and there are no keys; keys are required "
                                 f"off loopback (make them with `llmtp keygen -o DIR` and paste its keys: section)")


class _Section:
    """One YAML mapping: take() checks a field, done() rejects any field not taken."""

    def __init__(self, reader: _Reader, where: str, data, allowed: str):
        if not isinstance(data, dict):
            reader.fail(where or "top level", f"{_describe(data)} is not allowed; expected {allowed}")
        self.reader, self.where, self.data = reader, where, data
        self.names: list[str] = []
        self.missing: list[str] = []  # reported by done(), after unknown fields (a typo shows as itself)

    def field(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def take(self, name: str, check, allowed: str, default=_REQUIRED):
        """check(value, field path): True/False for a predicate (False fails with `allowed`),
        else the value to keep (such a check fails on its own)."""
        self.names.append(name)
        field = self.field(name)
        if name not in self.data:
            if default is _REQUIRED:
                self.missing.append(f"{field}: missing; expected {allowed}")
            return None if default is _REQUIRED else default
        value = self.data[name]
        result = check(value, field)
        if result is False:
            self.reader.fail(field, f"{_describe(value)} is not allowed; expected {allowed}")
        return value if result is True else result

    def done(self) -> None:
        for name in self.data:
            if name not in self.names:
                self.reader.fail(self.field(str(name)), f"unknown field; allowed: {', '.join(self.names)}")
        if self.missing:
            raise ConfigError(f"{self.reader.path}: {self.missing[0]}")


def _int_in(low: int, high: int):
    def check(value, field) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    return check


def _positive_number(value, field) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def _choice(options: tuple[str, ...]):
    def check(value, field) -> bool:
        return isinstance(value, str) and value in options
    return check
