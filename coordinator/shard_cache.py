"""What the cache folder ($LLMTP_CACHE_DIR, default ~/.cache/llmtp) holds, and what of it
can go: shard folders of checkpoints that changed or vanished, folders left unfinished by
an interrupted sharding, and (when asked) everything that would be remade on demand.

Shards that a running `cluster up` (the default state file) serves are never removed."""

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llmtp.common.errors import LlmtpError

from .local_cluster import cache_dir, shard_cache_folder
from .standing_cluster import state_path

UNFINISHED_AGE = 3600.0  # seconds: a younger folder without a manifest may still be being written

CURRENT, STALE, UNFINISHED, WRITING, IN_USE, PRESET = ("current", "stale", "unfinished", "being written",
                                                       "in use", "bench preset")
REMOVED_BY_CLEAN = {STALE, UNFINISHED}  # `cache clean`; --all adds CURRENT and PRESET


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    state: str  # one of the names above
    n_bytes: int
    note: str  # why it is in that state, or what it was made from

    def removable(self, everything: bool) -> bool:
        return self.state in REMOVED_BY_CLEAN or (everything and self.state in (CURRENT, PRESET))


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under `path`, not following symlinks."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def shards_in_use() -> set[Path]:
    """The shard folder of the default `cluster up` state file, if a cluster is up."""
    from .cluster_state import read_state
    try:
        return {read_state(state_path(None)).shards.resolve()}
    except LlmtpError:  # no cluster up, or a state file that names nothing it could protect
        return set()


def shard_folder_state(folder: Path, in_use: set[Path], now: float) -> tuple[str, str]:
    from llmtp.common.formats.manifest import load_manifest
    if folder.resolve() in in_use:
        return IN_USE, "served by `llmtp cluster up`"
    if not (folder / "manifest.json").exists():
        if now - folder.stat().st_mtime < UNFINISHED_AGE:
            return WRITING, "no manifest yet (sharding may be under way)"
        return UNFINISHED, "no manifest (an interrupted sharding)"
    try:
        manifest = load_manifest(folder)
    except LlmtpError as error:
        return STALE, f"unreadable ({error})"
    source = Path(manifest.source_path)
    if not source.is_file():
        return STALE, f"{source} is gone"
    if shard_cache_folder(source, manifest.n_workers).name != folder.name:
        return STALE, f"{source} changed since"
    return CURRENT, f"{source}, {manifest.n_workers} workers"


def inventory(cache: Path | None = None) -> list[CacheEntry]:
    cache = cache or cache_dir()
    in_use, now = shards_in_use(), time.time()
    entries = []
    shards = cache / "shards"
    if shards.is_dir():
        for folder in sorted(shards.iterdir()):
            if folder.is_dir() and not folder.is_symlink():
                state, note = shard_folder_state(folder, in_use, now)
                entries.append(CacheEntry(folder, state, folder_bytes(folder), note))
    bench = cache / "bench"
    if bench.is_dir():
        for file in sorted(bench.glob("*.bin")):
            if file.is_file() and not file.is_symlink():
                entries.append(CacheEntry(file, PRESET, file.stat().st_size, "remade by `llmtp bench --preset`"))
    return entries


def remove(entry: CacheEntry) -> None:
    if entry.path.is_dir():
        shutil.rmtree(entry.path)
    else:
        entry.path.unlink()
