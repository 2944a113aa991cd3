"""The coordinator <-> worker wire protocol, and nothing else.

A message is a ZeroMQ multipart message:
  frame 0: message type (ASCII, e.g. b"STEP")
  frame 1: msgpack map (the header); key "arrays" lists [dtype, shape] per array frame
  frame 2..: raw C-contiguous array bytes, read back with np.frombuffer (no copy)
Never pickle. Anything that does not fit raises ProtocolError, so a worker can log
one line and keep serving.
"""

import math
from dataclasses import dataclass, field

import msgpack
import numpy as np

from llmtp.common.errors import ProtocolError

PROTOCOL_VERSION = 1

# coordinator -> worker
HELLO = b"HELLO"  # {protocol_version, model_sha256, shard_index, n_shards, n_slots, session, reduce
#                    [, shm_name, shm_rows]}
PEERS = b"PEERS"  # {endpoints}: every worker's peer inbox, for reduce "peers"; answered CONNECTED
STEP = b"STEP"  # {step_id, sequences: [[slot, start_position, n_tokens]...], all_logits}; x (T, dim)
REDUCED = b"REDUCED"  # {step_id, sync}; the sum of every worker's partial (T, dim)
PING = b"PING"  # {}; answered with PONG {rss_bytes, shard_bytes, kv_cache_bytes, pid}
BYE = b"BYE"  # {}: the session ends; the worker forgets it and waits for the next HELLO
SHUTDOWN = b"SHUTDOWN"  # {}: the worker exits
# worker -> coordinator
READY = b"READY"  # {shard_index, n_shards, spec, pid, peer_port, shard_bytes, kv_cache_bytes}
CONNECTED = b"CONNECTED"  # {}: peer sockets connected
PARTIAL = b"PARTIAL"  # {step_id, sync[, session, index]}; a partial sum (T, dim), to the coordinator or a peer
LOGITS = b"LOGITS"  # {step_id}; this worker's logits slice (rows, vocab_local)
PONG = b"PONG"
ERROR = b"ERROR"  # {message}

MESSAGE_TYPES = frozenset({HELLO, PEERS, STEP, REDUCED, PING, BYE, SHUTDOWN,
                           READY, CONNECTED, PARTIAL, LOGITS, PONG, ERROR})
# peers: workers exchange partials directly over ZeroMQ; star: via the coordinator;
# shm: through a shared-memory segment the coordinator creates (local clusters only)
REDUCE_MODES = ("peers", "star", "shm")
ARRAY_DTYPES = {"float32": np.float32}
ZERO_COPY_MIN_BYTES = 65536  # below this, copying is cheaper than pinning the buffer


@dataclass
class Message:
    kind: bytes
    header: dict
    arrays: list = field(default_factory=list)


def encode(kind: bytes, header: dict | None = None, arrays: list | None = None) -> list:
    """-> frames for socket.send_multipart. Arrays must be float32; they are sent as views."""
    arrays = arrays or []
    header = dict(header or {})
    header["arrays"] = [[str(array.dtype), list(array.shape)] for array in arrays]
    frames = [kind, msgpack.packb(header, use_bin_type=True)]
    for array in arrays:
        assert array.dtype == np.float32, array.dtype
        frames.append(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return frames


def send(socket, kind: bytes, header: dict | None = None, arrays: list | None = None, prefix: list | None = None):
    frames = (prefix or []) + encode(kind, header, arrays)
    large = sum(len(frame) for frame in frames[2:]) >= ZERO_COPY_MIN_BYTES
    socket.send_multipart(frames, copy=not large)


def decode(frames: list) -> Message:
    """frames (bytes or zmq.Frame) -> Message; ProtocolError on anything malformed."""
    if len(frames) < 2:
        raise ProtocolError(f"message has {len(frames)} frame(s), expected at least 2")
    kind = bytes(_buffer(frames[0]))
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {kind[:32]!r}")
    try:
        header = msgpack.unpackb(_buffer(frames[1]), raw=False, strict_map_key=True,
                                 max_bin_len=0, max_str_len=1 << 16, max_array_len=1 << 16, max_map_len=256)
    except Exception as error:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"{kind.decode()} header is not valid msgpack ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{kind.decode()} header is a {type(header).__name__}, expected a map")
    descriptors = header.pop("arrays", [])
    if not isinstance(descriptors, list) or len(descriptors) != len(frames) - 2:
        raise ProtocolError(f"{kind.decode()} declares {descriptors!r:.60} arrays but carries {len(frames) - 2}")
    arrays = [_array(kind, descriptor, frame) for descriptor, frame in zip(descriptors, frames[2:])]
    return Message(kind, header, arrays)


def _array(kind: bytes, descriptor, frame) -> np.ndarray:
    if not (isinstance(descriptor, list) and len(descriptor) == 2 and descriptor[0] in ARRAY_DTYPES
            and isinstance(descriptor[1], list) and all(isinstance(n, int) and n >= 0 for n in descriptor[1])):
        raise ProtocolError(f"{kind.decode()} has a bad array descriptor {descriptor!r:.60}")
    dtype = np.dtype(ARRAY_DTYPES[descriptor[0]])
    shape = tuple(descriptor[1])
    buffer = _buffer(frame)
    expected = math.prod(shape) * dtype.itemsize
    if len(buffer) != expected:
        raise ProtocolError(f"{kind.decode()} array {shape} needs {expected} bytes, frame has {len(buffer)}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _buffer(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def field_of(message: Message, name: str, kind: type | tuple):
    """A header field of the expected type, or ProtocolError naming it."""
    value = message.header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolError(f"{message.kind.decode()} field {name!r} is {value!r:.40}, "
                            f"expected {getattr(kind, '__name__', kind)}")
    return value
