"""Typed wire messages: every class round-trips, every decoder refuses anything else with a
ProtocolError only (property-based: random headers, values and frames)."""

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llmtp.common.errors import ProtocolError
from llmtp.common.wire import protocol
from llmtp.common.wire.messages import (Bye, Connected, Error, Hello, Logits, Partial, Peers, Ping, Pong, Ready,
                                        Reduced, Shutdown, Step)
from wire_strategies import hostile_frames

FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frames_to_bytes(frames):
    return [bytes(frame) for frame in frames]


def round_trip(message):
    return protocol.unpack(frames_to_bytes(protocol.pack(message)))


ROWS = np.arange(8, dtype=np.float32).reshape(2, 4)
EXAMPLES = [
    Hello(protocol.PROTOCOL_VERSION, "ab" * 32, 1, 2, 3, "s1", "shm", "psm_x", 16, "secret"),
    Hello(protocol.PROTOCOL_VERSION, "ab" * 32, 0, 1, 1, "s2"),
    Peers("s1", ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")),
    Reduced(4, 1, ROWS), Ping(), Bye(), Shutdown(), Connected(),
    Ready(0, 2, {"index": 0, "heads": [0, 3]}, 99, 5555, 10, 20, 30, 40),
    Ready(0, 3, {"index": 0, "heads": [0, 3]}, 99, 5555, 10, 20, 30, 40, 72),
    Ready(0, 1, {}, 99, None, 10, 20),
    Partial(3, 0, ROWS), Partial(3, 1, ROWS, session="s", index=1),
    Logits(9, ROWS, 0.25, 0.125), Pong(1, 2, 3, 4, 5), Error("no"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    back = round_trip(message)
    assert type(back) is type(message)
    assert back.header() == message.header()
    for mine, theirs in zip(message.arrays(), back.arrays()):
        np.testing.assert_array_equal(mine, theirs)


def test_step_round_trips_its_sequences():
    step = round_trip(Step(7, ((0, 5, 1), (1, 0, 1)), ROWS, all_logits=True))
    assert step.sequences == ((0, 5, 1), (1, 0, 1)) and step.all_logits is True and step.step_id == 7


def test_ping_listing_an_array_of_shape_true_is_a_protocol_error():
    """Issue 12's probe: isinstance(True, int) let [True] through, and numpy's reshape then raised TypeError."""
    frames = [b"PING", msgpack.packb({"arrays": [["float32", [True]]]}), b"\x00" * 4]
    with pytest.raises(ProtocolError, match="bad array descriptor"):
        protocol.decode(frames)
    with pytest.raises(ProtocolError):
        protocol.unpack(frames)


def header(**fields):
    return msgpack.packb(fields)


GOOD_STEP = {"step_id": 1, "sequences": [[0, 0, 1]], "arrays": [["float32", [1, 4]]]}


@pytest.mark.parametrize("change, complaint", [
    ({"step_id": True}, "step_id"),
    ({"step_id": 1.0}, "step_id"),
    ({"step_id": -1}, "step_id"),
    ({"sequences": [[0, float("inf"), 1]]}, "sequences"),
    ({"sequences": [[0, True, 1]]}, "sequences"),
    ({"sequences": []}, "sequences"),
    ({"all_logits": 1}, "all_logits"),
    ({"surprise": 1}, "unknown field"),
])
def test_step_fields_are_checked_by_exact_type_and_range(change, complaint):
    frames = [b"STEP", header(**{**GOOD_STEP, **change}), b"\x00" * 16]
    with pytest.raises(ProtocolError, match=complaint):
        protocol.unpack(frames)


def test_non_finite_step_input_is_refused():
    x = np.array([[0, np.inf, 0, 0]], dtype=np.float32)
    with pytest.raises(ProtocolError, match="non-finite"):
        protocol.unpack(frames_to_bytes(protocol.encode(protocol.STEP, {"step_id": 1, "sequences": [[0, 0, 1]]}, [x])))


@pytest.mark.parametrize("change, complaint", [
    ({"n_slots": 1025}, "n_slots"), ({"n_slots": 0}, "n_slots"), ({"n_slots": True}, "n_slots"),
    ({"reduce": "carrier pigeon"}, "reduce"), ({"reduce": "shm"}, "shm_name"),
    ({"protocol_version": True}, "protocol_version"), ({"model_sha256": 5}, "model_sha256"),
])
def test_hello_fields_are_checked(change, complaint):
    hello = {"protocol_version": protocol.PROTOCOL_VERSION, "model_sha256": "ab", "shard_index": 0,
             "n_shards": 1, "n_slots": 1, "session": "s"}
    with pytest.raises(ProtocolError, match=complaint):
        protocol.unpack([b"HELLO", header(**{**hello, **change})])


@FUZZ
@given(hostile_frames())
def test_every_decoder_raises_only_protocol_errors(frames):
    try:
        message = protocol.unpack(frames)
    except ProtocolError:
        return
    assert message.KIND == frames[0]  # what decodes is a complete, typed message of that type
    assert type(message) is protocol.messages.BY_KIND[message.KIND]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(protocol.MESSAGE_TYPES)), st.binary(max_size=200), st.lists(st.binary(max_size=40),
                                                                                          max_size=3))
def test_random_bytes_as_any_message_type(kind, header_bytes, arrays):
    try:
        protocol.unpack([kind, header_bytes] + arrays)
    except ProtocolError:
        pass
