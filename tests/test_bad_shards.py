"""A worker refuses a damaged or unlisted shard at start, and the coordinator a damaged
embedding table: one line naming the file, exit 2."""

import shutil
import subprocess
import time

import pytest

from charvocab import write_char_model
from cli_runner import llmtp_command, run_llmtp
from llmtp.common.errors import FormatError
from llmtp.common.formats.manifest import load_manifest
from llmtp.common.formats.shard_file import load_shard
from llmtp.common.formats.verification import stamp_path, verify_mapped
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


def test_shard_without_a_manifest_is_refused(shard_folder, tmp_path):
    lone = tmp_path / "shard-1-of-2.bin"
    shutil.copy(shard_folder / lone.name, lone)
    result = run_llmtp("worker", "--shard", lone, "--bind", "tcp://127.0.0.1:*", timeout=30)
    assert_one_line_error(result, "shard-1-of-2.bin", "manifest.json", "--no-verify")


def test_no_verify_serves_a_shard_without_a_manifest(shard_folder, tmp_path):
    lone = tmp_path / "shard-1-of-2.bin"
    shutil.copy(shard_folder / lone.name, lone)
    announce = tmp_path / "endpoint"
    worker = subprocess.Popen(llmtp_command() + ["worker", "--shard", str(lone), "--bind", "tcp://127.0.0.1:*",
                                                 "--announce", str(announce), "--no-verify"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not announce.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert announce.exists(), worker.stderr.read() if worker.poll() is not None else "no endpoint in 60 s"
    finally:
        worker.terminate()
        worker.wait(10)


def test_verified_shard_leaves_a_stamp_that_a_change_voids(shard_folder, tmp_path):
    """The second start trusts the stamp; a byte changed after it is still caught."""
    copy = tmp_path / "copy"
    shutil.copytree(shard_folder, copy)
    manifest = load_manifest(copy)
    shard = load_shard(copy / "shard-0-of-2.bin")
    entry = manifest.shards[0]
    assert verify_mapped(shard.path, shard.mapping, entry.n_bytes, entry.sha256)  # hashed
    assert stamp_path(shard.path).exists()
    assert not verify_mapped(shard.path, shard.mapping, entry.n_bytes, entry.sha256)  # the stamp stood
    with open(shard.path, "r+b") as file:
        file.seek(entry.n_bytes - 100)
        byte = file.read(1)
        file.seek(entry.n_bytes - 100)
        file.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(FormatError, match="sha256"):
        verify_mapped(shard.path, shard.mapping, entry.n_bytes, entry.sha256)


def test_flipped_bit_in_the_embedding_is_refused_by_the_coordinator(tmp_path):
    """The coordinator checks embedding.bin as workers check their shards: one line, exit 2."""
    checkpoint, _ = write_char_model(tmp_path / "model")
    cache = {"LLMTP_CACHE_DIR": str(tmp_path / "cache")}
    first = run_llmtp("generate", checkpoint, "-n", 4, "-t", 0, "--workers", 1, env_extra=cache)
    assert first.returncode == 0, first.stderr
    (embedding,) = (tmp_path / "cache").glob("shards/*/embedding.bin")
    with open(embedding, "r+b") as file:
        file.seek(-10, 2)
        byte = file.read(1)
        file.seek(-10, 2)
        file.write(bytes([byte[0] ^ 0x01]))
    result = run_llmtp("generate", checkpoint, "-n", 4, "-t", 0, "--workers", 1, env_extra=cache)
    assert_one_line_error(result, "embedding.bin", "sha256")


def test_verifying_a_large_file_shows_progress(shard_folder, tmp_path, monkeypatch, capsys):
    from llmtp.common.formats import verification
    monkeypatch.setattr(verification, "SHOW_PROGRESS_FROM", 1)
    monkeypatch.setattr(verification, "HASH_SLICE", 4096)
    copy = tmp_path / "copy"
    shutil.copytree(shard_folder, copy)
    entry = load_manifest(copy).shards[1]
    shard = load_shard(copy / entry.file)
    assert verify_mapped(shard.path, shard.mapping, entry.n_bytes, entry.sha256)
    err = capsys.readouterr().err
    assert f"verifying {entry.file}" in err and "100%" in err
