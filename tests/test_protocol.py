"""Wire protocol: round trips, and every malformed message becomes a ProtocolError."""

import msgpack
import numpy as np
import pytest

from llmtp.common.wire import protocol
from llmtp.common.errors import ProtocolError


def frames_to_bytes(frames):
    return [bytes(frame) for frame in frames]


def test_round_trip_with_arrays():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    empty = np.zeros((0, 4), dtype=np.float32)
    frames = protocol.encode(protocol.STEP, {"step_id": 7, "sequences": [[0, 5, 3]]}, [x, empty])
    message = protocol.decode(frames_to_bytes(frames))
    assert message.kind == protocol.STEP
    assert message.header == {"step_id": 7, "sequences": [[0, 5, 3]]}
    np.testing.assert_array_equal(message.arrays[0], x)
    assert message.arrays[1].shape == (0, 4)


def test_arrays_travel_as_raw_float32_frames():
    x = np.array([[1.5, -2.0]], dtype=np.float32)
    frames = frames_to_bytes(protocol.encode(protocol.PARTIAL, {"step_id": 1, "sync": 0}, [x]))
    assert frames[0] == b"PARTIAL"
    assert frames[2] == x.tobytes()
    assert msgpack.unpackb(frames[1])["arrays"] == [["float32", [1, 2]]]


def test_non_contiguous_array_is_sent_in_order():
    x = np.arange(16, dtype=np.float32).reshape(4, 4)[:, ::2]
    message = protocol.decode(frames_to_bytes(protocol.encode(protocol.REDUCED, {}, [x])))
    np.testing.assert_array_equal(message.arrays[0], x)


def header(**fields):
    return msgpack.packb(fields)


@pytest.mark.parametrize("frames, complaint", [
    ([b"STEP"], "at least 2"),
    ([b"NOPE", header()], "unknown message type"),
    ([b"STEP", b"\xc1\xff\x00"], "not valid msgpack"),
    ([b"STEP", msgpack.packb([1, 2])], "expected a map"),
    ([b"STEP", header(arrays=[["float32", [2]]])], "carries 0"),
    ([b"STEP", header(arrays=[["float64", [1]]]), b"\x00" * 8], "bad array descriptor"),
    ([b"STEP", header(arrays=[["float32", [-1]]]), b""], "bad array descriptor"),
    ([b"STEP", header(arrays=[["float32", [3]]]), b"\x00" * 8], "needs 12 bytes"),
    ([b"STEP", header(arrays=[["float32", [2**40, 2**40]]]), b"\x00" * 8], "bytes"),
    ([b"STEP", header(arrays="x")], "declares"),
    ([b"STEP", msgpack.packb({1: 2})], "msgpack"),
])
def test_malformed_messages_raise_protocol_error(frames, complaint):
    with pytest.raises(ProtocolError, match=complaint):
        protocol.decode(frames)


def test_random_junk_never_raises_anything_but_protocol_error():
    rng = np.random.default_rng(3)
    kinds = sorted(protocol.MESSAGE_TYPES)
    for _ in range(2000):
        n_frames = int(rng.integers(0, 5))
        frames = [rng.bytes(int(rng.integers(0, 40))) for _ in range(n_frames)]
        if frames and rng.random() < 0.5:
            frames[0] = kinds[int(rng.integers(len(kinds)))]
        try:
            protocol.decode(frames)
        except ProtocolError:
            pass


def test_field_of_checks_types():
    message = protocol.Message(protocol.STEP, {"step_id": "7", "flag": True})
    with pytest.raises(ProtocolError, match="step_id"):
        protocol.field_of(message, "step_id", int)
    with pytest.raises(ProtocolError, match="flag"):
        protocol.field_of(message, "flag", int)
