"""The coordinator <-> worker wire protocol, and nothing else.

A message is a ZeroMQ multipart message:
  frame 0: message type (ASCII, e.g. b"STEP")
  frame 1: msgpack map (the header); key "arrays" lists [dtype, shape] per array frame
  frame 2..: raw C-contiguous array bytes, read back with np.frombuffer (no copy)
Never pickle. Two layers: the framing (`encode`/`decode`: kind, header map, arrays) and the
typed messages of common/wire/messages.py (`pack`/`unpack`/`send_message`: one class per
type, every field checked). Anything that does not fit raises ProtocolError, so a worker
can log one line and keep serving.
"""

import math
from dataclasses import dataclass, field

import msgpack
import numpy as np

from llmtp.common.errors import ProtocolError

from . import messages
from .messages import PROTOCOL_VERSION, WireMessage  # noqa: F401  (PROTOCOL_VERSION: re-exported)

HELLO, PEERS, STEP, REDUCED = (messages.Hello.KIND, messages.Peers.KIND, messages.Step.KIND, messages.Reduced.KIND)
PING, BYE, SHUTDOWN = messages.Ping.KIND, messages.Bye.KIND, messages.Shutdown.KIND
READY, CONNECTED, PARTIAL = messages.Ready.KIND, messages.Connected.KIND, messages.Partial.KIND
LOGITS, PONG, ERROR = messages.Logits.KIND, messages.Pong.KIND, messages.Error.KIND
MESSAGE_TYPES = frozenset(messages.BY_KIND)
ARRAY_DTYPES = {"float32": np.float32}
MAX_ARRAY_DIMENSIONS = 4
MAX_ARRAY_BYTES = 1 << 34  # no array of ours comes near; the socket's MAXMSGSIZE is the real bound
ZERO_COPY_MIN_BYTES = 65536  # below this, copying is cheaper than pinning the buffer


@dataclass
class Message:
    """A framed message before its fields are typed: kind, header map, arrays."""

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


def pack(message: WireMessage) -> list:
    """A typed message -> frames."""
    return encode(message.KIND, message.header(), message.arrays())


def unpack(frames: list) -> WireMessage:
    """frames -> the typed message, every field checked; ProtocolError on anything else."""
    framed = decode(frames)
    return messages.BY_KIND[framed.kind].from_wire(framed.header, framed.arrays)


def send_message(socket, message: WireMessage, prefix: list | None = None) -> None:
    send(socket, message.KIND, message.header(), message.arrays(), prefix)


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
    # Exact types: isinstance(True, int) holds, and a shape of [True] once crashed numpy's reshape.
    if not (type(descriptor) is list and len(descriptor) == 2 and type(descriptor[0]) is str
            and descriptor[0] in ARRAY_DTYPES and type(descriptor[1]) is list
            and len(descriptor[1]) <= MAX_ARRAY_DIMENSIONS
            and all(type(n) is int and n >= 0 for n in descriptor[1])):
        raise ProtocolError(f"{kind.decode()} has a bad array descriptor {descriptor!r:.60}")
    dtype = np.dtype(ARRAY_DTYPES[descriptor[0]])
    shape = tuple(descriptor[1])
    buffer = _buffer(frame)
    expected = math.prod(shape) * dtype.itemsize
    if expected > MAX_ARRAY_BYTES or len(buffer) != expected:
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
