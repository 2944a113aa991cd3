"""Unkeyed workers (issue 12.2, 12.3): a local cluster's workers open sessions only for a HELLO
carrying the launcher's secret, and a bare `llmtp worker --bind` off loopback is refused."""

import stat

import numpy as np
import pytest
import zmq

from cli_runner import run_llmtp
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.formats.shard_file import write_shards
from llmtp.common.model.transformer import StepSequence
from llmtp.common.wire import protocol
from llmtp.common.wire.messages import Error, Hello
from llmtp.coordinator.local_cluster import SECRET_NAME, open_local_engine
from llmtp.coordinator.local_engine import LocalEngine
from model_factory import make_config, write_random_checkpoint


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555"])
def test_worker_bind_off_loopback_without_keys_is_refused(tmp_path, bind):
    result = run_llmtp("worker", "--shard", tmp_path / "absent.bin", "--bind", bind, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "not a loopback address" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_stranger_without_the_secret_cannot_open_a_session(tmp_path):
    checkpoint = load_checkpoint(write_random_checkpoint(tmp_path / "m.bin", make_config(), seed=9))
    write_shards(checkpoint, 2, tmp_path / "shards", progress=False)
    local = LocalEngine(checkpoint.config, checkpoint.weights)
    engine = open_local_engine(tmp_path / "shards", 2, reduce="peers")
    try:
        secret_file = engine.run_folder / SECRET_NAME
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(engine.run_folder.stat().st_mode) == 0o700
        tokens = np.array([1, 7, 3])
        np.testing.assert_allclose(engine.step(tokens, [StepSequence(0, 0, 3)]),
                                   local.step(tokens, [StepSequence(0, 0, 3)]), atol=1e-5, rtol=1e-6)
        with zmq.Context() as context:
            stranger = context.socket(zmq.DEALER)
            stranger.setsockopt(zmq.LINGER, 0)
            stranger.connect(engine.links[0].endpoint)
            protocol.send_message(stranger, Hello(protocol.PROTOCOL_VERSION, engine.model_sha256, 0, 2, 1,
                                                  "intruder", "star"))
            assert stranger.poll(10000)
            reply = protocol.unpack(stranger.recv_multipart())
            assert type(reply) is Error and reply.message.endswith("handshake refused")
            stranger.close()
        np.testing.assert_allclose(engine.step(np.array([4]), [StepSequence(0, 3, 1)]),
                                   local.step(np.array([4]), [StepSequence(0, 3, 1)]), atol=1e-5, rtol=1e-6)
    finally:
        engine.close()
