"""A worker: serves one slice of the model to one coordinator session at a time.

Its states are worker/session.py's WorkerState. Control messages (HELLO, PING, BYE, ...) are
handled between steps only: one that arrives mid-step waits, or, when it ends the session
(BYE, the coordinator's new HELLO), abandons the step with one StepAbandoned. Whatever goes
wrong with one message is logged in one line, and the worker keeps serving.
"""

import collections
import hmac
import os
import sys
import time
from dataclasses import dataclass

import zmq

from llmtp.common.wire import protocol, security
from llmtp.common.errors import LlmtpError, ProtocolError
from llmtp.common.wire.messages import (Bye, Connected, Error, Hello, Logits, Partial, Peers, Ping, Pong, Ready,
                                        Reduced, Shutdown, Step, WireMessage)
from llmtp.common.exchange.base import NoExchange, StepAbandoned
from llmtp.common.exchange.modes import ReduceMode
from llmtp.common.exchange.peers import PeerExchange
from llmtp.common.exchange.relay import RelayExchange
from llmtp.common.formats.shard_file import Shard
from llmtp.common.model.transformer import SliceModel, StepSequence

from .limits import check_cache_fits, max_message_bytes
from .session import WAITING_FOR, Session, WorkerState

POLL_TICK_MS = 500
MAX_DEFERRED = 64  # control messages kept for after the step; more are dropped (with a line)


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
    secret: str | None = None  # without keys: every HELLO must carry it (local clusters)
    context: int | None = None  # positions to hold (None: the model's seq_len)


class Worker:
    def __init__(self, shard: Shard, options: WorkerOptions):
        self.shard = shard
        self.options = options
        self.name = f"worker {shard.spec.index}/{shard.spec.count}"
        self.model: SliceModel | None = None
        self.state = WorkerState.IDLE
        self.session: Session | None = None
        self.deferred: collections.deque = collections.deque()  # (identity, message) read mid-step
        self.reduced: collections.deque = collections.deque()  # REDUCED read mid-step, for the relay
        max_bytes = options.max_message_bytes or max_message_bytes(shard.config)
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
                                      port=options.peer_port, keys=options.keys, wait=self.wait_for_peers,
                                      timeout=options.reduce_timeout)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        if self.peers:
            self.poller.register(self.peers.inbox, zmq.POLLIN)

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
            while self.serve_one(POLL_TICK_MS):
                pass
        finally:
            self.close()

    def close(self) -> None:
        self.end_session()
        if self.peers:
            self.peers.close()
        self.socket.close(linger=0)
        if self.authenticator:
            self.authenticator.stop()
        self.context.term()

    # --- between steps ----------------------------------------------------------------------

    def serve_one(self, timeout_ms: int) -> bool:
        """Handle the next control message (a deferred one first), if any; False means exit."""
        if self.deferred:
            identity, message = self.deferred.popleft()
            return self.handle(identity, message)
        ready = dict(self.poller.poll(timeout_ms))
        if self.peers and self.peers.inbox in ready:
            self.peers.drain()  # junk cannot pile up; a faster peer's first partial is kept
        if self.socket not in ready:
            self.check_parent()
            return True
        frames = self.socket.recv_multipart(copy=False)
        return self.handle_frames(frames[0].bytes, frames[1:])

    def handle_frames(self, identity: bytes, frames: list) -> bool:
        try:
            message = protocol.unpack(frames)
        except ProtocolError as error:
            self.refuse(identity, f"dropped a malformed message: {error}")
            return True
        return self.handle(identity, message)

    def handle(self, identity: bytes, message: WireMessage) -> bool:
        """One message between steps; False means exit. Nothing raised here ends the worker."""
        try:
            return self.dispatch(identity, message)
        except LlmtpError as error:
            self.refuse(identity, str(error))
        except StepAbandoned as error:
            self.log(f"step abandoned: {error}")
            if error.session_over:
                self.end_session()
        except Exception as error:  # a bug must not let one message stop the service
            self.refuse(identity, f"could not handle {message.KIND.decode()}: {type(error).__name__}: {error}")
        if self.state is WorkerState.STEPPING:
            self.state = WorkerState.CONNECTED
        return True

    def dispatch(self, identity: bytes, message: WireMessage) -> bool:
        kind = message.KIND
        if type(message) is Ping:
            self.reply(identity, self.pong())
            return True
        if type(message) is Hello:
            self.on_hello(message, identity)
            return True
        if self.session is None or identity != self.session.coordinator:
            raise ProtocolError(f"{kind.decode()} from a peer that has no session")
        if not self.state.accepts(kind):
            raise ProtocolError(f"{kind.decode()} refused: this worker is {self.state.value}, "
                                f"waiting for {WAITING_FOR[self.state]}")
        if type(message) is Peers:
            self.on_peers(message)
        elif type(message) is Step:
            self.on_step(message)
        elif type(message) is Bye:
            self.end_session()
        elif type(message) is Shutdown:
            return False
        return True

    def check_parent(self) -> None:
        if self.options.parent_pid and os.getppid() != self.options.parent_pid:
            self.log("coordinator process is gone; exiting")
            sys.exit(0)

    def credentials_hold(self, hello: Hello) -> bool:
        """Keys: CURVE admitted only the coordinator. A secret: the HELLO must carry it."""
        if self.options.keys or self.options.secret is None:
            return True
        return hello.secret is not None and hmac.compare_digest(hello.secret.encode(), self.options.secret.encode())

    def on_hello(self, hello: Hello, identity: bytes) -> None:
        if not self.credentials_hold(hello):
            raise ProtocolError("handshake refused")  # says nothing a stranger could use
        if not hmac.compare_digest(hello.model_sha256.encode(), self.shard.model_sha256.encode()):
            raise ProtocolError("handshake refused: model_sha256 is not this worker's model")
        if (hello.shard_index, hello.n_shards) != (self.shard.spec.index, self.shard.spec.count):
            raise ProtocolError(f"handshake refused: shard_index {hello.shard_index} of n_shards "
                                f"{hello.n_shards} is not this worker's shard")
        reduce = ReduceMode(hello.reduce)
        if reduce in (ReduceMode.PEERS, ReduceMode.SHM) and self.peers is None and self.shard.spec.count > 1:
            raise ProtocolError(f"handshake refused: reduce {reduce.value!r} is not available here")
        if self.model is None or self.model.cache.n_slots != hello.n_slots:
            held = self.model.cache.n_bytes if self.model else 0
            check_cache_fits(self.shard.config, self.shard.spec, hello.n_slots, held)
        if self.session is not None and self.session.coordinator != identity:
            self.log("a new coordinator connected; the previous session is dropped")
        self.end_session()
        session = Session(identity, hello.session, reduce)
        if reduce is ReduceMode.SHM and self.shard.spec.count > 1:
            self.attach_shared_memory(hello)
        if self.model is None or self.model.cache.n_slots != hello.n_slots:
            self.model = None  # the old cache goes before the new one is allocated
            self.model = SliceModel(self.shard.config, self.shard.spec, self.shard.weights, hello.n_slots)
        self.session = session
        if self.shard.spec.count == 1:
            session.exchange = NoExchange()
        elif reduce is ReduceMode.STAR:
            session.exchange = RelayExchange(self.send_to_coordinator, self.receive_reduced, self.options.reduce_timeout)
        self.state = WorkerState.CONNECTED if session.exchange else WorkerState.IN_SESSION
        stats = self.pong()
        self.reply(identity, Ready(self.shard.spec.index, self.shard.spec.count, self.shard.spec.to_dict(),
                                   os.getpid(), self.peers.port if self.peers else None, stats.shard_bytes,
                                   stats.kv_cache_bytes, stats.rss_bytes, stats.peak_rss_bytes,
                                   self.model.syncs_per_step))

    def attach_shared_memory(self, hello: Hello) -> None:
        from llmtp.common.exchange.shm import ShmExchange
        try:
            self.shm = ShmExchange(hello.shm_name, self.shard.spec.index, self.shard.spec.count, hello.shm_rows,
                                   self.shard.config.dim, long_steps=self.peers, between_spins=self.look_mid_step,
                                   timeout=self.options.reduce_timeout)
        except (OSError, ValueError) as error:
            raise ProtocolError(f"handshake refused: cannot use shared memory {hello.shm_name!r}: {error}") from None

    def end_session(self) -> None:
        if self.shm:
            self.shm.close()
            self.shm = None
        if self.peers:
            self.peers.close_outboxes()
        self.session = None
        self.reduced.clear()
        self.state = WorkerState.IDLE

    def on_peers(self, peers: Peers) -> None:
        if self.peers is None or len(peers.endpoints) != self.shard.spec.count:
            raise ProtocolError(f"PEERS needs {self.shard.spec.count} tcp:// endpoints")
        self.peers.connect(peers.session, list(peers.endpoints))
        self.session.exchange = self.shm or self.peers
        self.state = WorkerState.CONNECTED
        self.reply(self.session.coordinator, Connected())

    def on_step(self, step: Step) -> None:
        if step.x.shape[1] != self.shard.config.dim:
            raise ProtocolError(f"STEP needs one (tokens, {self.shard.config.dim}) array, got {step.x.shape}")
        sequences = [StepSequence(*sequence) for sequence in step.sequences]
        self.model.check_sequences(sequences, step.x.shape[0])  # before any state changes
        exchange = self.session.exchange
        exchange.start_step(step.step_id)
        reduce_seconds = 0.0

        def timed_reduce(partial):
            nonlocal reduce_seconds
            started = time.perf_counter()
            total = exchange.allreduce(partial)
            reduce_seconds += time.perf_counter() - started
            return total

        self.state = WorkerState.STEPPING
        started = time.perf_counter()
        logits = self.model.forward(step.x, sequences, allreduce=timed_reduce, all_logits=step.all_logits)
        self.state = WorkerState.CONNECTED
        # How the step's time went, for `llmtp bench`: math versus waiting on the others.
        self.reply(self.session.coordinator,
                   Logits(step.step_id, logits, time.perf_counter() - started, reduce_seconds))

    # --- mid-step: only the step's data is handled; control waits or ends the step -------------

    def poll_mid_step(self, timeout_ms: int, inbox: zmq.Socket | None = None) -> bool:
        """Wait up to timeout_ms for the control socket (or `inbox`); True when `inbox` is readable.
        A REDUCED from the coordinator is kept for the relay; anything else waits in `deferred`,
        and ends the step at once when it ends the session."""
        ready = dict(self.poller.poll(timeout_ms)) if inbox is not None else \
            ({self.socket: zmq.POLLIN} if self.socket.poll(timeout_ms) else {})
        if not ready:
            self.check_parent()
        if self.socket in ready:
            self.read_mid_step()
        return inbox is not None and inbox in ready

    def read_mid_step(self) -> None:
        frames = self.socket.recv_multipart(copy=False)
        identity = frames[0].bytes
        try:
            message = protocol.unpack(frames[1:])
        except ProtocolError as error:
            self.log(f"dropped a malformed message mid-step: {error}")
            return
        if identity == self.session.coordinator and type(message) is Reduced:
            self.reduced.append(message)
            return
        if len(self.deferred) >= MAX_DEFERRED:
            self.log(f"dropped a {message.KIND.decode()} that arrived mid-step (too many waiting)")
            return
        self.deferred.append((identity, message))
        if identity == self.session.coordinator:
            raise StepAbandoned(f"{message.KIND.decode()} arrived mid-step")
        if type(message) is Hello and self.credentials_hold(message):
            raise StepAbandoned("a new coordinator said HELLO mid-step")

    def wait_for_peers(self, timeout_ms: int) -> bool:
        return self.poll_mid_step(min(timeout_ms, POLL_TICK_MS), self.peers.inbox)

    def look_mid_step(self) -> None:
        """While spinning on shared memory: a glance at the control socket and the parent."""
        self.check_parent()
        while self.socket.poll(0):
            self.read_mid_step()

    def send_to_coordinator(self, partial: Partial) -> None:
        self.reply(self.session.coordinator, partial)

    def receive_reduced(self, deadline: float) -> Reduced | None:
        while not self.reduced:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return None
            self.poll_mid_step(min(remaining_ms, POLL_TICK_MS))
        return self.reduced.popleft()

    # --- replies ---------------------------------------------------------------------------

    def reply(self, identity: bytes, message: WireMessage) -> None:
        protocol.send_message(self.socket, message, prefix=[identity])

    def refuse(self, identity: bytes, text: str) -> None:
        self.log(text)
        self.reply(identity, Error(f"{self.name}: {text}"[:4000]))

    def pong(self) -> Pong:
        return Pong(os.getpid(), resident_bytes("VmRSS"), resident_bytes("VmHWM"), self.shard.n_bytes,
                    self.model.cache.n_bytes if self.model else 0)


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
