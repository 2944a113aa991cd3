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
    """A shard beside a manifest.json must match its recorded size and sha256 (a corrupted or
    truncated copy fails here, with one line, instead of computing nonsense)."""
    from llmtp.common.formats.manifest import MANIFEST_NAME, load_manifest, verify_shard
    manifest_path = shard.path.parent / MANIFEST_NAME
    if not manifest_path.exists():
        return
    manifest = load_manifest(manifest_path)
    if manifest.shards[shard.spec.index].file != shard.path.name:
        raise FormatError(f"{shard.path}: {manifest_path} lists shard {shard.spec.index} as "
                          f"{manifest.shards[shard.spec.index].file}")
    verify_shard(manifest, shard.spec.index)


def run_worker(shard_path: str, options: WorkerOptions) -> int:
    from llmtp.common.formats.mapping import settle_on_huge_pages
    from llmtp.common.formats.shard_file import load_shard
    if options.parent_pid:
        die_with_parent()
        if os.getppid() != options.parent_pid:
            return 0
    shard = load_shard(shard_path)
    note = settle_on_huge_pages(shard.mapping, shard.path)  # before verifying, so one disk read serves both
    if note:
        print(f"llmtp worker {shard.spec.index}/{shard.spec.count}: {note}", file=sys.stderr, flush=True)
    if options.verify:
        verify_against_manifest(shard)
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
