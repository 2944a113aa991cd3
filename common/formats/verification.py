"""Checking a mapped shard or embedding file against its manifest entry, reading it once.

The sha256 is computed through the file's own read-only map (`map_readonly` advised it onto
2 MiB pages), so the one pass that hashes the file is also the one that faults it in: the
later `settle_on_huge_pages` finds it resident and reads nothing again, and the page cache
gets the file in large folios, as a first fault through such a map leaves it (a read()
would leave small ones, and the next start would reload).

A file that matched is remembered in a stamp beside it, `.NAME.verified`: its sha256 with
the file's size, inode, device, mtime and ctime. A later start whose stat matches every one
of them trusts the stamp and skips the hash (0.4 s per 500 MB on this machine's cores). Any
write to the file changes its mtime and ctime, and ctime cannot be set back by a user
(`touch -d` and utime() set it to now), so a changed file is hashed again. A folder that is
not writable gets no stamp; the file is then hashed at every start.
"""

import hashlib
import json
import os
from pathlib import Path

from llmtp.common.errors import FormatError

from .progress import Progress

HASH_SLICE = 32 << 20  # bytes hashed between progress updates
SHOW_PROGRESS_FROM = 256 << 20  # bytes: smaller files verify too quickly to be worth a line


def stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def file_identity(path: Path, sha256: str) -> dict:
    """What must be unchanged since a verification for its stamp to stand."""
    stat = os.stat(path)
    return {"sha256": sha256, "n_bytes": stat.st_size, "inode": stat.st_ino, "device": stat.st_dev,
            "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def stamp_holds(path: Path, identity: dict) -> bool:
    try:
        return json.loads(stamp_path(path).read_text()) == identity
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def write_stamp(path: Path, identity: dict) -> None:
    stamp = stamp_path(path)
    partial = stamp.with_name(stamp.name + ".partial")
    try:
        partial.write_text(json.dumps(identity))
        os.replace(partial, stamp)
    except OSError:  # a read-only folder: verify again next time
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass


def sha256_mapped(mapping, label: str) -> str:
    """sha256 of a whole map, a slice at a time (hashlib releases the GIL for each)."""
    digest = hashlib.sha256()
    view = memoryview(mapping)
    bar = Progress(len(view), enabled=len(view) >= SHOW_PROGRESS_FROM, min_bytes=SHOW_PROGRESS_FROM,
                   log_line="{label}: {percent}%")
    bar.label = f"verifying {label}"
    try:
        for start in range(0, len(view), HASH_SLICE):
            piece = view[start:start + HASH_SLICE]
            digest.update(piece)
            bar.advance(len(piece))
            piece.release()
    finally:
        view.release()
        bar.finish()
    return digest.hexdigest()


def verify_mapped(path: Path, mapping, n_bytes: int, sha256: str) -> bool:
    """Check a file mapped whole as `mapping` against a manifest's size and sha256; one line
    naming the file when it differs. Returns True if it hashed, False if a stamp stood."""
    path = Path(path)
    if len(mapping) != n_bytes:
        raise FormatError(f"{path}: size is {len(mapping)} bytes, manifest says {n_bytes}")
    try:
        identity = file_identity(path, sha256)  # taken before hashing: a write during it voids the stamp
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error.strerror}") from None
    if stamp_holds(path, identity):
        return False
    actual = sha256_mapped(mapping, path.name)
    if actual != sha256:
        raise FormatError(f"{path}: sha256 is {actual}, manifest says {sha256} (a damaged or changed copy)")
    write_stamp(path, identity)
    return True
