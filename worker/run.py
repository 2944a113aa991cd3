"""Starting a worker: load and check its shard, bind, serve until told to stop."""

import dataclasses
import os
import sys

import zmq

from llmtp.common.errors import FormatError, LlmtpError
from llmtp.common.formats.shard_file import Shard

from .server import Worker, WorkerOptions


def die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the launching process dies (even by kill -9)."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the parent check in the poll loop still catches it within a tick


def verify_against_manifest(shard: Shard) -> None:
    """A shard must match the size and sha256 that the manifest.json beside it records (a
    corrupted or truncated copy fails here, with one line, instead of computing nonsense);
    a shard without one is refused (--no-verify runs it unchecked). Hashing goes through the
    shard's map, so it is also the read that faults it in (common/formats/verification.py)."""
    from llmtp.common.formats.manifest import MANIFEST_NAME, load_manifest
    from llmtp.common.formats.verification import verify_mapped
    manifest_path = shard.path.parent / MANIFEST_NAME
    if not manifest_path.exists():
        raise FormatError(f"{shard.path}: no {MANIFEST_NAME} beside it to check the shard against "
                          f"(copy it from the folder `llmtp shard` wrote, or give --no-verify to run it unchecked)")
    manifest = load_manifest(manifest_path)
    if manifest.n_workers != shard.spec.count or manifest.shards[shard.spec.index].file != shard.path.name:
        raise FormatError(f"{shard.path}: {manifest_path} does not list it as shard {shard.spec.index} "
                          f"of {shard.spec.count}")
    entry = manifest.shards[shard.spec.index]
    verify_mapped(shard.path, shard.mapping, entry.n_bytes, entry.sha256)


def run_worker(shard_path: str, options: WorkerOptions) -> int:
    from llmtp.common.formats.mapping import settle_on_huge_pages
    from llmtp.common.formats.shard_file import load_shard
    if options.parent_pid:
        die_with_parent()
        if os.getppid() != options.parent_pid:
            return 0
    shard = load_shard(shard_path)
    if options.verify:
        verify_against_manifest(shard)
    # After hashing (which faulted the map in), this reads nothing more unless the file sat on
    # small pages; a stamped file is faulted in here.
    note = settle_on_huge_pages(shard.mapping, shard.path)
    if note:
        print(f"llmtp worker {shard.spec.index}/{shard.spec.count}: {note}", file=sys.stderr, flush=True)
    if options.context is not None:  # the KV cache, RoPE table and message bounds follow seq_len
        from llmtp.common.model.memory import with_context
        shard = dataclasses.replace(shard, config=with_context(shard.config, options.context, str(shard.path)))
    try:
        worker = Worker(shard, options)
    except zmq.ZMQError as error:
        peer = f" (peer inbox port {options.peer_port})" if options.peer_port else ""
        raise LlmtpError(f"cannot bind {options.bind}{peer}: {error}") from None
    worker.serve_forever()
    return 0
