"""`llmtp cache`: list, size and clean the shard cache; stale and unfinished shards go, current
ones only with --all, and shards a running `cluster up` serves never."""

import json
import os
import time

import pytest

from cli_runner import run_llmtp
from model_factory import make_config, write_random_checkpoint


def bytes_under(path) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache holding: current shards (2 workers), stale ones (their checkpoint rewritten, 1 worker),
    shards of a vanished checkpoint that `cluster up` serves, an old and a young folder without a
    manifest, and a bench preset."""
    from llmtp.coordinator.local_cluster import ensure_shards
    root = tmp_path / "cache"
    monkeypatch.setenv("LLMTP_CACHE_DIR", str(root))
    config = make_config()
    kept = write_random_checkpoint(tmp_path / "kept.bin", config, seed=1)
    changed = write_random_checkpoint(tmp_path / "changed.bin", config, seed=2)
    served = write_random_checkpoint(tmp_path / "served.bin", config, seed=3)
    folders = {"current": ensure_shards(kept, 2), "stale": ensure_shards(changed, 1),
               "in use": ensure_shards(served, 2)}
    write_random_checkpoint(changed, config, seed=4)
    os.utime(changed, ns=(time.time_ns(), os.stat(changed).st_mtime_ns + 10**9))
    served.unlink()
    from llmtp.coordinator.cluster_state import ClusterState, WorkerRecord, write_state
    write_state(root / "cluster.json", ClusterState(
        checkpoint=served, tokenizer=tmp_path / "t.bin", shards=folders["in use"], run_folder=root / "cluster-run",
        workers=(WorkerRecord(pid=1, start_time=1, endpoint="tcp://127.0.0.1:1"),)))
    for name, age in (("unfinished", 2 * 3600), ("being written", 0)):
        folder = root / "shards" / f"x-0000000000000000-2w.{name.replace(' ', '_')}"
        folder.mkdir()
        (folder / "shard-0-of-2.bin.partial").write_bytes(bytes(1000))
        os.utime(folder, (time.time() - age, time.time() - age))
        folders[name] = folder
    preset = root / "bench" / "random-15M.bin"
    preset.parent.mkdir()
    preset.write_bytes(bytes(5000))
    folders["bench preset"] = preset
    return root, folders


def listed_states(stdout: str) -> dict[str, str]:
    """folder name -> state, from `cache list`'s rows."""
    states = {}
    for line in stdout.splitlines()[:-1]:
        name, _, _, rest = line.split(None, 3)
        states[name] = next(state for state in ("current", "stale", "unfinished", "being written", "in use",
                                                "bench preset") if rest.startswith(state))
    return states


def test_list_and_size(cache):
    root, folders = cache
    listed = run_llmtp("cache", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed_states(listed.stdout) == {path.name: state for state, path in folders.items()}
    assert run_llmtp("cache").stdout == listed.stdout  # list is the default
    size = run_llmtp("cache", "size")
    expected = bytes_under(root) - os.path.getsize(root / "cluster.json")
    assert size.stdout.split()[0] == str(expected)


def test_clean_removes_stale_and_unfinished_only(cache):
    root, folders = cache
    before = {path: path.exists() for path in folders.values()}
    dry = run_llmtp("cache", "clean", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert {path: path.exists() for path in folders.values()} == before
    cleaned = run_llmtp("cache", "clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert {state for state, path in folders.items() if path.exists()} == {"current", "in use", "being written",
                                                                         "bench preset"}
    everything = run_llmtp("cache", "clean", "--all")
    assert everything.returncode == 0, everything.stderr
    assert {state for state, path in folders.items() if path.exists()} == {"in use", "being written"}


def test_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTP_CACHE_DIR", str(tmp_path / "none"))
    result = run_llmtp("cache")
    assert result.returncode == 0 and "empty" in result.stdout
    assert run_llmtp("cache", "clean").returncode == 0
