"""A worker: serves one slice of the model to one coordinator session at a time.

States: idle (waiting for HELLO) -> serving (a coordinator's session) -> idle on BYE,
on a HELLO from a new coordinator (the old one is presumed gone), or when a
reduction does not arrive in time. Bad input is logged in one line and dropped.
"""

import os
import sys
import time
from dataclasses import dataclass

import zmq

from llmtp.common.wire import protocol, security
from llmtp.common.errors import FormatError, LlmtpError, ProtocolError
from llmtp.common.wire.protocol import Message, field_of
from llmtp.common.formats.shard_file import Shard
from llmtp.common.model.transformer import SliceModel, StepSequence, no_reduce

from llmtp.common.exchange.peers import PeerExchange

POLL_TICK_MS = 500


class SessionLost(Exception):
    """The current session ended mid-step: its coordinator went quiet, said BYE, or was
    replaced by a new session (replaced=True: keep serving the new one)."""

    def __init__(self, message: str, replaced: bool = False):
        super().__init__(message)
        self.replaced = replaced


@dataclass
class WorkerOptions:
    bind: str
    announce_file: str | None = None  # where to write the bound endpoint (for tcp://host:* binds)
    parent_pid: int | None = None  # exit when this process is gone (local clusters)
    reduce_timeout: float = 60.0  # seconds to wait for a reduction before dropping the session
    max_message_bytes: int = 0  # 0 = derived from the model's size
    peer_port: int | None = None  # peer inbox port (None = any free port)
    keys: security.WorkerKeys | None = None  # CURVE on every socket (see common/security.py)
    verify: bool = True  # check the shard's sha256 against a manifest.json beside it


class Worker:
    def __init__(self, shard: Shard, options: WorkerOptions):
        self.shard = shard
        self.options = options
        self.name = f"worker {shard.spec.index}/{shard.spec.count}"
        self.model: SliceModel | None = None
        self.coordinator: bytes | None = None  # ZeroMQ identity of the coordinator in session
        self.reduce_mode = "star"
        self.step_id = 0
        self.sync = 0
        max_bytes = options.max_message_bytes or self._max_message_bytes()
        self.context = zmq.Context()
        self.authenticator = None
        if options.keys:  # before any bind: a CURVE socket without its ZAP handler admits anyone
            self.authenticator = security.start_worker_authenticator(self.context, options.keys, self.log)
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        if options.keys:
            security.serve_curve(self.socket, options.keys.worker, security.CONTROL_DOMAIN)
        self.socket.bind(options.bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peers = None
        self.shm = None  # ShmExchange of the current session, for reduce "shm"
        if self.endpoint.startswith("tcp://") and shard.spec.count > 1:
            host = self.endpoint[len("tcp://"):].rsplit(":", 1)[0]
            self.peers = PeerExchange(self.context, host, shard.spec.index, shard.spec.count, max_bytes,
                                      port=options.peer_port, keys=options.keys)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        if self.peers:
            self.poller.register(self.peers.inbox, zmq.POLLIN)

    def _max_message_bytes(self) -> int:
        config = self.shard.config
        return 16 * config.seq_len * config.dim * 4 + (1 << 20)

    def announce(self) -> None:
        if self.options.announce_file:
            temporary = self.options.announce_file + ".tmp"
            with open(temporary, "w") as handle:
                handle.write(self.endpoint)
            os.replace(temporary, self.options.announce_file)
        else:
            security_note = "CURVE, coordinator key only" if self.options.keys else "no encryption"
            self.log(f"listening on {self.endpoint} ({security_note})")

    def log(self, text: str) -> None:
        print(f"llmtp {self.name}: {text}", file=sys.stderr, flush=True)

    def serve_forever(self) -> None:
        self.announce()
        try:
            while True:
                message, identity = self.receive(POLL_TICK_MS)
                if message is None:
                    continue
                if not self.dispatch(message, identity):
                    return
        finally:
            if self.peers:
                self.peers.close()
            if self.shm:
                self.shm.close()
            self.socket.close(linger=0)
            if self.authenticator:
                self.authenticator.stop()
            self.context.term()

    def receive(self, timeout_ms: int) -> tuple[Message | None, bytes | None]:
        """One decoded control message, or (None, None) on timeout or junk. Exits if the parent is gone."""
        if not self.socket.poll(timeout_ms):
            self.check_parent()
            return None, None
        return self.read_control()

    def read_control(self) -> tuple[Message | None, bytes | None]:
        frames = self.socket.recv_multipart(copy=False)
        identity = frames[0].bytes
        try:
            return protocol.decode(frames[1:]), identity
        except ProtocolError as error:
            self.log(f"dropped a malformed message: {error}")
            return None, None

    def check_parent(self) -> None:
        if self.options.parent_pid and os.getppid() != self.options.parent_pid:
            self.log("coordinator process is gone; exiting")
            sys.exit(0)

    def dispatch(self, message: Message, identity: bytes) -> bool:
        """Handle one message outside a step; False means exit."""
        try:
            if message.kind == protocol.HELLO:
                self.on_hello(message, identity)
            elif message.kind == protocol.PING:
                self.reply(identity, protocol.PONG, self.stats())
            elif identity != self.coordinator:
                self.refuse(identity, f"{message.kind.decode()} from a peer that has no session")
            elif message.kind == protocol.PEERS:
                self.on_peers(message)
            elif message.kind == protocol.STEP:
                self.on_step(message)
            elif message.kind == protocol.BYE:
                self.coordinator = None
            elif message.kind == protocol.SHUTDOWN:
                return False
            else:
                self.refuse(identity, f"unexpected {message.kind.decode()} while idle")
        except ProtocolError as error:
            self.refuse(identity, str(error))
        except SessionLost as error:
            self.log(f"session dropped: {error}")
            if not error.replaced:
                self.coordinator = None
        return True

    def on_hello(self, message: Message, identity: bytes) -> None:
        expected = {"protocol_version": protocol.PROTOCOL_VERSION, "model_sha256": self.shard.model_sha256,
                    "shard_index": self.shard.spec.index, "n_shards": self.shard.spec.count}
        for name, value in expected.items():
            if message.header.get(name) != value:
                raise ProtocolError(f"handshake refused: {name} is {message.header.get(name)!r}, "
                                    f"this worker has {value!r}")
        n_slots = field_of(message, "n_slots", int)
        if not 1 <= n_slots <= 1024:
            raise ProtocolError(f"handshake refused: n_slots {n_slots} outside 1..1024")
        reduce_mode = message.header.get("reduce", "star")
        if reduce_mode not in protocol.REDUCE_MODES or (reduce_mode in ("peers", "shm") and self.peers is None):
            raise ProtocolError(f"handshake refused: reduce {reduce_mode!r} is not available here")
        if reduce_mode == "shm":
            self.attach_shared_memory(message)
        if self.model is None or self.model.cache.n_slots != n_slots:
            self.model = SliceModel(self.shard.config, self.shard.spec, self.shard.weights, n_slots)
        if self.coordinator is not None and self.coordinator != identity:
            self.log("a new coordinator connected; the previous session is dropped")
        self.coordinator = identity
        self.reduce_mode = reduce_mode
        self.reply(identity, protocol.READY, {
            "shard_index": self.shard.spec.index, "n_shards": self.shard.spec.count,
            "spec": self.shard.spec.to_dict(), "pid": os.getpid(),
            "peer_port": self.peers.port if self.peers else None, **self.stats()})

    def attach_shared_memory(self, message: Message) -> None:
        from llmtp.common.exchange.shm import ShmExchange
        name, rows = field_of(message, "shm_name", str), field_of(message, "shm_rows", int)
        if self.shm:
            self.shm.close()
            self.shm = None
        try:
            self.shm = ShmExchange(name, self.shard.spec.index, self.shard.spec.count, rows, self.shard.config.dim)
        except (OSError, ValueError) as error:
            raise ProtocolError(f"handshake refused: cannot use shared memory {name!r}: {error}") from None

    def on_peers(self, message: Message) -> None:
        endpoints = field_of(message, "endpoints", list)
        session = field_of(message, "session", str)
        if self.peers is None or len(endpoints) != self.shard.spec.count or \
                not all(isinstance(e, str) and e.startswith("tcp://") for e in endpoints):
            raise ProtocolError(f"PEERS needs {self.shard.spec.count} tcp:// endpoints")
        self.peers.connect(session, endpoints)
        self.reply(self.coordinator, protocol.CONNECTED)

    def on_step(self, message: Message) -> None:
        self.step_id = field_of(message, "step_id", int)
        raw_sequences = field_of(message, "sequences", list)
        if len(message.arrays) != 1 or message.arrays[0].ndim != 2 or \
                message.arrays[0].shape[1] != self.shard.config.dim:
            raise ProtocolError(f"STEP needs one (tokens, {self.shard.config.dim}) array")
        try:
            sequences = [StepSequence(*(int(v) for v in seq)) for seq in raw_sequences]
        except (TypeError, ValueError):
            raise ProtocolError("STEP sequences must be [slot, start_position, n_tokens] lists") from None
        self.sync = 0
        if self.shard.spec.count == 1:
            reduce = None
        elif self.reduce_mode == "shm":
            reduce = self.allreduce_in_shared_memory
        elif self.reduce_mode == "peers":
            reduce = self.allreduce_with_peers
        else:
            reduce = self.allreduce_via_coordinator
        reduce_seconds = 0.0

        def timed_reduce(partial):
            nonlocal reduce_seconds
            started = time.perf_counter()
            total = reduce(partial)
            reduce_seconds += time.perf_counter() - started
            return total

        started = time.perf_counter()
        logits = self.model.forward(message.arrays[0], sequences, allreduce=timed_reduce if reduce else no_reduce,
                                    all_logits=bool(message.header.get("all_logits", False)))
        # How the step's time went, for `llmtp bench`: math versus waiting on the others.
        timing = {"forward_s": time.perf_counter() - started, "reduce_s": reduce_seconds}
        self.reply(self.coordinator, protocol.LOGITS, {"step_id": self.step_id, **timing}, [logits])

    def allreduce_via_coordinator(self, partial):
        """Send this worker's partial sum, wait for the coordinator's total."""
        self.reply(self.coordinator, protocol.PARTIAL, {"step_id": self.step_id, "sync": self.sync}, [partial])
        deadline = time.monotonic() + self.options.reduce_timeout
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise SessionLost(f"no REDUCED for step {self.step_id} sync {self.sync} "
                                  f"within {self.options.reduce_timeout:g} s")
            message, identity = self.receive(min(remaining_ms, POLL_TICK_MS))
            if message is None:
                continue
            if message.kind == protocol.REDUCED and identity == self.coordinator:
                if message.header.get("step_id") != self.step_id or message.header.get("sync") != self.sync \
                        or len(message.arrays) != 1 or message.arrays[0].shape != partial.shape:
                    raise ProtocolError(f"REDUCED does not match step {self.step_id} sync {self.sync}")
                self.sync += 1
                return message.arrays[0]
            self.handle_mid_step(message, identity)

    def allreduce_with_peers(self, partial):
        deadline = time.monotonic() + self.options.reduce_timeout
        try:
            total = self.peers.allreduce(partial, self.step_id, self.sync, deadline, self.wait_for_peers)
        except TimeoutError as error:
            raise SessionLost(str(error)) from None
        self.sync += 1
        return total

    def allreduce_in_shared_memory(self, partial):
        if not self.shm.fits(partial.shape[0]):  # a long prefill: the ZeroMQ peer exchange
            return self.allreduce_with_peers(partial)
        deadline = time.monotonic() + self.options.reduce_timeout
        try:
            total = self.shm.allreduce(partial, deadline, self.look_at_control_socket)
        except TimeoutError as error:
            raise SessionLost(str(error)) from None
        self.sync += 1
        return total

    def look_at_control_socket(self) -> None:
        """While spinning: answer or act on control messages, and notice a dead parent."""
        self.check_parent()
        while self.socket.poll(0):
            message, identity = self.read_control()
            if message is not None:
                self.handle_mid_step(message, identity)

    def wait_for_peers(self, timeout_ms: int) -> bool:
        """Poll the peer inbox and the control socket; True when the inbox is readable.
        Control messages that arrive meanwhile are handled (or end the step)."""
        ready = dict(self.poller.poll(min(timeout_ms, POLL_TICK_MS)))
        if not ready:
            self.check_parent()
        if self.socket in ready:
            message, identity = self.read_control()
            if message is not None:
                self.handle_mid_step(message, identity)
        return self.peers.inbox in ready

    def handle_mid_step(self, message: Message, identity: bytes) -> None:
        """A control message during a step: answer PING; a new HELLO or a BYE ends the step."""
        if message.kind == protocol.PING:
            self.reply(identity, protocol.PONG, self.stats())
        elif message.kind == protocol.HELLO:
            self.on_hello(message, identity)
            raise SessionLost("a new session began mid-step", replaced=True)
        elif identity != self.coordinator:
            self.refuse(identity, f"{message.kind.decode()} from a peer that has no session")
        elif message.kind == protocol.BYE:
            raise SessionLost("BYE arrived mid-step")
        else:
            raise ProtocolError(f"unexpected {message.kind.decode()} in step {self.step_id}")

    def reply(self, identity: bytes, kind: bytes, header: dict | None = None, arrays: list | None = None):
        protocol.send(self.socket, kind, header, arrays, prefix=[identity])

    def refuse(self, identity: bytes, text: str) -> None:
        self.log(text)
        self.reply(identity, protocol.ERROR, {"message": f"{self.name}: {text}"})

    def stats(self) -> dict:
        return {"rss_bytes": resident_bytes("VmRSS"), "peak_rss_bytes": resident_bytes("VmHWM"),
                "shard_bytes": self.shard.n_bytes,
                "kv_cache_bytes": self.model.cache.n_bytes if self.model else 0}


def resident_bytes(field_name: str) -> int:
    """VmRSS / VmHWM of this process from /proc (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
    try:
        worker = Worker(shard, options)
    except zmq.ZMQError as error:
        peer = f" (peer inbox port {options.peer_port})" if options.peer_port else ""
        raise LlmtpError(f"cannot bind {options.bind}{peer}: {error}") from None
    worker.serve_forever()
    return 0
