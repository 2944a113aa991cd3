"""Hypothesis strategies for wire messages: valid ones of every class, and anything at all."""

import msgpack
import numpy as np
from hypothesis import strategies as st

from llmtp.common.wire import protocol
from llmtp.common.wire.messages import MESSAGE_CLASSES

FIELD_NAMES = sorted({"arrays", "protocol_version", "model_sha256", "shard_index", "n_shards", "n_slots", "session",
                      "reduce", "shm_name", "shm_rows", "secret", "endpoints", "step_id", "sequences", "all_logits",
                      "sync", "index", "spec", "pid", "peer_port", "shard_bytes", "kv_cache_bytes", "rss_bytes",
                      "peak_rss_bytes", "forward_s", "reduce_s", "message"})
KINDS = sorted(cls.KIND for cls in MESSAGE_CLASSES)

# Scalars a hostile header may hold: bools where ints go, huge and negative ints, inf and nan.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["star", "peers", "shm", "tcp://127.0.0.1:1", "float32"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=12)
descriptors = st.lists(st.one_of(values, st.tuples(st.sampled_from(["float32", "float64", "int8"]),
                                                   st.lists(st.one_of(st.integers(-2, 6), st.booleans()),
                                                            max_size=3)).map(list)), max_size=3)


@st.composite
def hostile_frames(draw):
    """A type frame (real or not), a header of known and unknown fields with any values, and
    array frames that may or may not match what the header declares."""
    kind = draw(st.one_of(st.sampled_from(KINDS), st.binary(max_size=10)))
    header = draw(st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6)), values, max_size=8))
    if draw(st.booleans()):
        header["arrays"] = draw(descriptors)
    n_arrays = len(header["arrays"]) if isinstance(header.get("arrays"), list) else draw(st.integers(0, 2))
    arrays = [draw(st.binary(max_size=64)) for _ in range(n_arrays)]
    if draw(st.booleans()):  # a frame the size its descriptor asks for, so decoding reaches the fields
        arrays = [np.zeros(draw(st.integers(0, 8)), dtype=np.float32).tobytes() for _ in arrays]
    header_frame = msgpack.packb(header, use_bin_type=True) if draw(st.integers(0, 9)) else draw(st.binary(max_size=20))
    return [kind, header_frame] + arrays


def hostile_message_frames():
    """Mostly near-valid: a real type and its real fields, some values wrong."""
    return hostile_frames()


def valid_step(dim: int, seq_len: int, n_slots: int = 1):
    """A STEP a worker in session must serve or refuse with ERROR (positions may overrun)."""
    return st.builds(lambda step_id, start, n_tokens, slot, all_logits: protocol.Message(
        protocol.STEP, {"step_id": step_id, "sequences": [[slot, start, n_tokens]], "all_logits": all_logits},
        [np.zeros((n_tokens, dim), dtype=np.float32)]),
        st.integers(0, 100), st.integers(0, seq_len + 2), st.integers(1, 4), st.integers(0, n_slots), st.booleans())
