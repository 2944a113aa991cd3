"""A worker refuses a damaged shard at start: one line naming the file, exit 2."""

import shutil

import pytest

from cli_runner import run_llmtp
from llmtp.common.formats.shard_file import write_shards
from model_factory import make_config, write_random_checkpoint
from llmtp.common.formats.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    config = make_config(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=67, seq_len=32)
    checkpoint = load_checkpoint(write_random_checkpoint(folder / "model.bin", config, seed=4))
    write_shards(checkpoint, 2, folder / "shards", progress=False)
    return folder / "shards"


def damaged_copy(shard_folder, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(shard_folder, copy)
    shard = copy / "shard-1-of-2.bin"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(damage(data))
    return shard


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def flip_a_weight_byte(data):
    data[len(data) - 100] ^= 0x40
    return bytes(data)


def test_corrupted_shard_is_refused_by_its_sha256(shard_folder, tmp_path):
    shard = damaged_copy(shard_folder, tmp_path, flip_a_weight_byte)
    result = run_llmtp("worker", "--shard", shard, "--bind", "tcp://127.0.0.1:*", timeout=30)
    assert_one_line_error(result, "shard-1-of-2.bin", "sha256")


def test_truncated_shard_is_refused(shard_folder, tmp_path):
    shard = damaged_copy(shard_folder, tmp_path, lambda data: bytes(data[:-64]))
    result = run_llmtp("worker", "--shard", shard, "--bind", "tcp://127.0.0.1:*", timeout=30)
    assert_one_line_error(result, "shard-1-of-2.bin")


def test_not_a_shard_is_refused(tmp_path):
    bogus = tmp_path / "shard-0-of-1.bin"
    bogus.write_bytes(b"GGUF" + bytes(100))
    result = run_llmtp("worker", "--shard", bogus, "--bind", "tcp://127.0.0.1:*", timeout=30)
    assert_one_line_error(result, "shard-0-of-1.bin")
