"""One frozen class per wire message, with its fields; the protocol module encodes and decodes them.

Decoding validates every field by exact type (a bool is not an int, a float is not an int) and
range, and every array against its message's shape rules, before anything else sees it: a
message off the network is either one of these, complete and in range, or a ProtocolError.
Checks that need the worker's model (dim, slot count, context length) are the worker's.
"""

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from llmtp.common.errors import ProtocolError
from llmtp.common.exchange.modes import ReduceMode

PROTOCOL_VERSION = 1  # of these messages; separate from the package's version
MAX_COUNT = 1 << 31  # ids, positions, counts, ports, pids and byte sizes stay below this...
MAX_BYTES = 1 << 62  # ...except byte sizes, which may be large
MAX_TEXT = 4096  # characters of any string field
MAX_SLOTS = 1024  # KV-cache slots a HELLO may ask for (the worker bounds it further by memory)
MAX_SEQUENCES = 4096  # sequences in one STEP
MAX_WORKERS = 256  # shards in one cluster
MAX_SECONDS = 1e9  # timings a worker reports


class _Fields:
    """Reads a decoded header field by field; anything missing, extra or out of range is a ProtocolError."""

    def __init__(self, kind: str, header: dict):
        self.kind = kind
        self.header = dict(header)

    def fail(self, name: str, value, expected: str):
        raise ProtocolError(f"{self.kind} field {name!r} is {value!r:.60}, expected {expected}")

    def take(self, name: str, optional: bool):
        if name not in self.header:
            if optional:
                return None
            raise ProtocolError(f"{self.kind} has no field {name!r}")
        value = self.header.pop(name)
        return value

    def int(self, name: str, low: int = 0, high: int = MAX_COUNT, optional: bool = False) -> int | None:
        value = self.take(name, optional)
        if value is None and optional:
            return None
        return checked_int(value, low, high, lambda v: self.fail(name, v, f"an integer in {low}..{high - 1}"))

    def text(self, name: str, optional: bool = False, max_length: int = MAX_TEXT) -> str | None:
        value = self.take(name, optional)
        if value is None and optional:
            return None
        if type(value) is not str or len(value) > max_length:
            self.fail(name, value, f"a string of at most {max_length} characters")
        return value

    def flag(self, name: str) -> bool:
        value = self.take(name, optional=True)
        if value is None:
            return False
        if type(value) is not bool:
            self.fail(name, value, "true or false")
        return value

    def seconds(self, name: str) -> float:
        value = self.take(name, optional=True)
        if value is None:
            return 0.0
        if type(value) not in (float, int) or not math.isfinite(value) or not 0 <= value < MAX_SECONDS:
            self.fail(name, value, f"a finite number of seconds in 0..{MAX_SECONDS:g}")
        return float(value)

    def done(self) -> None:
        if self.header:
            raise ProtocolError(f"{self.kind} has unknown field(s) {sorted(map(str, self.header))!r:.80}")


def checked_int(value, low: int, high: int, fail) -> int:
    if type(value) is not int or not low <= value < high:
        fail(value)
    return value


def one_array(kind: str, arrays: list, ndim: int) -> np.ndarray:
    if len(arrays) != 1 or arrays[0].ndim != ndim:
        shapes = [a.shape for a in arrays]
        raise ProtocolError(f"{kind} carries arrays {shapes!r:.60}, expected one array of {ndim} dimension(s)")
    return arrays[0]


def no_arrays(kind: str, arrays: list) -> None:
    if arrays:
        raise ProtocolError(f"{kind} carries {len(arrays)} array(s), expected none")


@dataclass(frozen=True)
class WireMessage:
    """Base of every message: KIND names it on the wire; ARRAY, if any, names its one array field."""

    KIND: ClassVar[bytes] = b""
    ARRAY: ClassVar[str | None] = None

    def header(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != self.ARRAY and getattr(self, f.name) is not None}

    def arrays(self) -> list:
        return [getattr(self, self.ARRAY)] if self.ARRAY else []

    @classmethod
    def from_wire(cls, header: dict, arrays: list) -> "WireMessage":
        reader = _Fields(cls.KIND.decode(), header)
        no_arrays(reader.kind, arrays)
        reader.done()
        return cls()


# --- coordinator -> worker ------------------------------------------------------------------

@dataclass(frozen=True)
class Hello(WireMessage):
    """Opens a session. shm_name/shm_rows: the segment of reduce "shm". secret: the cluster's
    shared secret when the worker was started with one (unkeyed local clusters)."""

    KIND: ClassVar[bytes] = b"HELLO"
    protocol_version: int
    model_sha256: str
    shard_index: int
    n_shards: int
    n_slots: int
    session: str
    reduce: str = ReduceMode.STAR.value
    shm_name: str | None = None
    shm_rows: int | None = None
    secret: str | None = None

    @classmethod
    def from_wire(cls, header, arrays):
        reader = _Fields("HELLO", header)
        no_arrays("HELLO", arrays)
        version = reader.int("protocol_version")  # first: another version's HELLO may differ in the rest
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"handshake refused: protocol_version is {version}, this worker speaks "
                                f"{PROTOCOL_VERSION}")
        message = cls(version, reader.text("model_sha256", max_length=128), reader.int("shard_index", 0, MAX_WORKERS),
                      reader.int("n_shards", 1, MAX_WORKERS + 1), reader.int("n_slots", 1, MAX_SLOTS + 1),
                      reader.text("session", max_length=128), reader.text("reduce", optional=True) or "star",
                      reader.text("shm_name", optional=True, max_length=255), reader.int("shm_rows", 1, optional=True),
                      reader.text("secret", optional=True, max_length=256))
        if message.reduce not in {mode.value for mode in ReduceMode}:
            reader.fail("reduce", message.reduce, " or ".join(mode.value for mode in ReduceMode))
        if (message.shm_name is None) != (message.shm_rows is None) or \
                (message.reduce == ReduceMode.SHM.value) != (message.shm_name is not None):
            raise ProtocolError("HELLO has shm_name and shm_rows exactly when reduce is shm")
        reader.done()
        return message


@dataclass(frozen=True)
class Peers(WireMessage):
    """Every worker's peer inbox, in shard order (reduce "peers" and "shm"); answered CONNECTED."""

    KIND: ClassVar[bytes] = b"PEERS"
    session: str
    endpoints: tuple[str, ...]

    @classmethod
    def from_wire(cls, header, arrays):
        reader = _Fields("PEERS", header)
        no_arrays("PEERS", arrays)
        session = reader.text("session", max_length=128)
        endpoints = reader.take("endpoints", optional=False)
        if type(endpoints) is not list or not 1 <= len(endpoints) <= MAX_WORKERS or \
                not all(type(e) is str and e.startswith("tcp://") and len(e) <= 300 for e in endpoints):
            reader.fail("endpoints", endpoints, f"a list of 1..{MAX_WORKERS} tcp:// endpoints")
        reader.done()
        return cls(session, tuple(endpoints))


@dataclass(frozen=True)
class Step(WireMessage):
    """One forward step: x (rows, dim) split among sequences of (slot, start_position, n_tokens)."""

    KIND: ClassVar[bytes] = b"STEP"
    ARRAY: ClassVar[str] = "x"
    step_id: int
    sequences: tuple[tuple[int, int, int], ...]
    x: np.ndarray
    all_logits: bool = False

    def header(self) -> dict:
        return {"step_id": self.step_id, "all_logits": self.all_logits,
                "sequences": [list(sequence) for sequence in self.sequences]}

    @classmethod
    def from_wire(cls, header, arrays):
        reader = _Fields("STEP", header)
        step_id = reader.int("step_id")
        raw = reader.take("sequences", optional=False)
        if type(raw) is not list or not 1 <= len(raw) <= MAX_SEQUENCES:
            reader.fail("sequences", raw, f"a list of 1..{MAX_SEQUENCES} [slot, start_position, n_tokens] lists")
        sequences = tuple(_sequence(index, entry) for index, entry in enumerate(raw))
        all_logits = reader.flag("all_logits")
        reader.done()
        x = one_array("STEP", arrays, 2)
        if not np.isfinite(x).all():  # inf or nan in the residual stream would poison every later step
            raise ProtocolError("STEP input holds a non-finite number")
        return cls(step_id, sequences, x, all_logits)


def _sequence(index: int, entry) -> tuple[int, int, int]:
    def fail(value):
        raise ProtocolError(f"STEP sequences[{index}] is {entry!r:.60}, expected [slot, start_position, "
                            f"n_tokens] integers")
    if type(entry) is not list or len(entry) != 3:
        fail(entry)
    slot, start, n_tokens = (checked_int(value, -MAX_COUNT, MAX_COUNT, fail) for value in entry)
    if start < 0 or n_tokens < 1:
        raise ProtocolError(f"STEP sequences[{index}]: positions {start}..{start + n_tokens - 1} "
                            f"outside the context")
    return slot, start, n_tokens


@dataclass(frozen=True)
class Reduced(WireMessage):
    """Reduce "star": the coordinator's sum of every worker's partial for (step_id, sync)."""

    KIND: ClassVar[bytes] = b"REDUCED"
    ARRAY: ClassVar[str] = "total"
    step_id: int
    sync: int
    total: np.ndarray

    @classmethod
    def from_wire(cls, header, arrays):
        reader = _Fields("REDUCED", header)
        message = cls(reader.int("step_id"), reader.int("sync"), one_array("REDUCED", arrays, 2))
        reader.done()
        return message


@dataclass(frozen=True)
class Ping(WireMessage):
    """Answered with PONG at once (between steps)."""
    KIND: ClassVar[bytes] = b"PING"


@dataclass(frozen=True)
class Bye(WireMessage):
    """The session ends; the worker forgets it and waits for the next HELLO."""
    KIND: ClassVar[bytes] = b"BYE"


@dataclass(frozen=True)
class Shutdown(WireMessage):
    """The worker exits."""
    KIND: ClassVar[bytes] = b"SHUTDOWN"


# --- worker -> coordinator (and worker -> worker) ------------------------------------------------

@dataclass(frozen=True)
class Ready(WireMessage):
    """The handshake's answer. spec: the worker's slice (SliceSpec.to_dict). syncs_per_step: the
    all-reduces its forward makes per step (0: unsaid, two per layer)."""

    KIND: ClassVar[bytes] = b"READY"
    shard_index: int
    n_shards: int
    spec: dict
    pid: int
    peer_port: int | None
    shard_bytes: int
    kv_cache_bytes: int
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    syncs_per_step: int = 0

    @classmethod
    def from_wire(cls, header, arrays):
        reader = _Fields("READY", header)
        no_arrays("READY", arrays)
        shard_index, n_shards = reader.int("shard_index", 0, MAX_WORKERS), reader.int("n_shards", 1, MAX_WORKERS + 1)
        spec = reader.take("spec", optional=False)
        if type(spec) is not dict or not all(type(key) is str for key in spec):
            reader.fail("spec", spec, "a map")
        message = cls(shard_index, n_shards, spec, reader.int("pid"), reader.int("peer_port", 1, 65536, optional=True),
                      reader.int("shard_bytes", 0, MAX_BYTES), reader.int("kv_cache_bytes", 0, MAX_BYTES),
                      reader.int("rss_bytes", 0, MAX_BYTES, optional=True) or 0,
                      reader.int("peak_rss_bytes", 0, MAX_BYTES, optional=True) or 0,
                      reader.int("syncs_per_step", 0, MAX_COUNT, optional=True) or 0)
        reader.done()
        return message


@dataclass(frozen=True)
class Connected(WireMessage):
    """Peer sockets connected."""
    KIND: ClassVar[bytes] = b"CONNECTED"


@dataclass(frozen=True)
class Partial(WireMessage):
    """A worker's partial sum (rows, dim) for (step_id, sync): to the coordinator (star; no session
    or index), or to every peer (session and index say whose)."""

    KIND: ClassVar[bytes] = b"PARTIAL"
    ARRAY: ClassVar[str] = "partial"
    step_id: int
    sync: int
    partial: np.ndarray
    session: str | None = None
    index: int | None = None

    @classmethod
    def from_wire(cls, header, arrays):
        reader = _Fields("PARTIAL", header)
        message = cls(reader.int("step_id"), reader.int("sync"), one_array("PARTIAL", arrays, 2),
                      reader.text("session", optional=True, max_length=128),
                      reader.int("index", 0, MAX_WORKERS, optional=True))
        reader.done()
        return message


@dataclass(frozen=True)
class Logits(WireMessage):
    """This worker's logits slice (rows, vocab_local), and how the step's time went (for bench)."""

    KIND: ClassVar[bytes] = b"LOGITS"
    ARRAY: ClassVar[str] = "logits"
    step_id: int
    logits: np.ndarray
    forward_s: float = 0.0
    reduce_s: float = 0.0

    @classmethod
    def from_wire(cls, header, arrays):
        reader = _Fields("LOGITS", header)
        message = cls(reader.int("step_id"), one_array("LOGITS", arrays, 2), reader.seconds("forward_s"),
                      reader.seconds("reduce_s"))
        reader.done()
        return message


@dataclass(frozen=True)
class Pong(WireMessage):
    """A worker's memory (PING's answer)."""

    KIND: ClassVar[bytes] = b"PONG"
    pid: int
    rss_bytes: int
    peak_rss_bytes: int
    shard_bytes: int
    kv_cache_bytes: int

    @classmethod
    def from_wire(cls, header, arrays):
        reader = _Fields("PONG", header)
        no_arrays("PONG", arrays)
        message = cls(reader.int("pid"), *(reader.int(name, 0, MAX_BYTES) for name in
                                           ("rss_bytes", "peak_rss_bytes", "shard_bytes", "kv_cache_bytes")))
        reader.done()
        return message


@dataclass(frozen=True)
class Error(WireMessage):
    """A refusal, in one line."""

    KIND: ClassVar[bytes] = b"ERROR"
    message: str

    @classmethod
    def from_wire(cls, header, arrays):
        reader = _Fields("ERROR", header)
        no_arrays("ERROR", arrays)
        message = cls(reader.text("message"))
        reader.done()
        return message


MESSAGE_CLASSES = (Hello, Peers, Step, Reduced, Ping, Bye, Shutdown, Ready, Connected, Partial, Logits, Pong, Error)
BY_KIND = {cls.KIND: cls for cls in MESSAGE_CLASSES}
