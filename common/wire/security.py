"""CURVE keys for a cluster: make them, load them, and put them on sockets.

Two key pairs secure a cluster (`llmtp keygen`):

  coordinator  the coordinator's own pair. Every worker's control socket (ROUTER)
               accepts a connection only from this public key.
  worker       one pair shared by all workers. It is the server key of every worker
               socket (control and peer inbox), so the coordinator and the workers know
               whom they reach; and the client key a worker presents to another
               worker's peer inbox (PULL), which accepts no other key. The coordinator's
               key cannot feed partial sums into a peer inbox, nor can a stranger's.

Every link is CURVE (Curve25519 + XSalsa20-Poly1305): encrypted and authenticated.
A ZAP handler (zmq.auth.ThreadAuthenticator) in each worker checks client keys; a
client without CURVE, or with another key, never completes the handshake and gets
nothing. Key files are ZeroMQ certificates (zmq.auth): NAME.key holds the public key,
NAME.key_secret both keys, mode 0600.
"""

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth

from llmtp.common.errors import ConfigError

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

KEY_NAMES = ("coordinator", "worker")
CONTROL_DOMAIN = "llmtp-control"  # ZAP domain of a worker's control socket
PEERS_DOMAIN = "llmtp-peers"  # ZAP domain of a worker's peer inbox
REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about refused clients
Z85_KEY_LENGTH = 40


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes


@dataclass(frozen=True)
class WorkerKeys:
    worker: KeyPair  # shared by every worker
    coordinator_public: bytes  # the only client key the control socket accepts


@dataclass(frozen=True)
class CoordinatorKeys:
    coordinator: KeyPair
    worker_public: bytes  # the server key every worker presents


# --- files --------------------------------------------------------------------------------

def key_files(folder: Path, name: str) -> tuple[Path, Path]:
    """(public, secret) certificate paths, as zmq.auth.create_certificates names them."""
    return folder / f"{name}.key", folder / f"{name}.key_secret"


def generate_keys(folder: str | Path) -> dict[str, tuple[Path, Path]]:
    """Write a coordinator and a worker key pair into `folder`; secret files 0600, never overwritten."""
    folder = Path(folder)
    for name in KEY_NAMES:
        for path in key_files(folder, name):
            if path.exists():
                raise ConfigError(f"{path} exists; remove the old keys first (every host then needs the new ones)")
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        for name in KEY_NAMES:
            public, secret = zmq.auth.create_certificates(folder, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            written[name] = (Path(public), Path(secret))
    finally:
        os.umask(old_umask)
    return written


def keys_yaml(folder_text: str) -> str:
    """The `keys:` section for files written by generate_keys into `folder_text`."""
    folder = folder_text.rstrip("/") or "/"
    lines = ["keys:  # paths are relative to the YAML file's folder"]
    for name in KEY_NAMES:
        lines.append(f"  {name}_public: {folder}/{name}.key")
        lines.append(f"  {name}_secret: {folder}/{name}.key_secret")
    return "\n".join(lines)


def load_public_key(path: Path, where: str) -> bytes:
    """A public key file; refuses a file that also holds a secret (it would be copied around)."""
    public, secret = _read_certificate(path, where)
    if secret is not None:
        raise ConfigError(f"{where}: {path} holds a secret key too; point it at the public .key file")
    return public


def load_key_pair(path: Path, where: str) -> KeyPair:
    """A secret key file (mode 0600 or stricter)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as error:
        raise ConfigError(f"{where}: cannot read {path}: {error.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"{where}: {path} is readable by others (mode {mode:04o}); expected 0600 "
                          f"(chmod 600 {path})")
    public, secret = _read_certificate(path, where)
    if secret is None:
        raise ConfigError(f"{where}: {path} holds no secret key; expected a .key_secret file from `llmtp keygen`")
    return KeyPair(public, secret)


def _read_certificate(path: Path, where: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError:
        raise ConfigError(f"{where}: cannot read key file {path}") from None
    except ValueError:
        raise ConfigError(f"{where}: {path} is not a ZeroMQ certificate (no public-key line)") from None
    for key in (public, secret):
        if key is not None and len(key) != Z85_KEY_LENGTH:
            raise ConfigError(f"{where}: {path} holds a key of {len(key)} characters, expected {Z85_KEY_LENGTH} (Z85)")
    return public, secret


# --- sockets ------------------------------------------------------------------------------

def serve_curve(socket: zmq.Socket, own: KeyPair, domain: str) -> None:
    """Make `socket` a CURVE server whose clients the authenticator checks under `domain`. Before bind."""
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, own.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, own.secret)
    socket.setsockopt_string(zmq.ZAP_DOMAIN, domain)


def connect_curve(socket: zmq.Socket, own: KeyPair, server_public: bytes) -> None:
    """Make `socket` a CURVE client that only talks to the holder of `server_public`. Before connect."""
    socket.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, own.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, own.secret)


class KeyGate:
    """ZAP credentials provider: one allowed client key per domain. Refusals are logged, at
    most one line per domain per REFUSAL_LOG_INTERVAL (a refused client keeps reconnecting)."""

    def __init__(self, allowed: dict[str, bytes], log):
        self.allowed = allowed
        self.log = log
        self.refused = {domain: 0 for domain in allowed}
        self.last_logged = {domain: float("-inf") for domain in allowed}

    def callback(self, domain: str, key: bytes) -> bool:
        if domain not in self.allowed:
            return False
        if key == self.allowed[domain]:
            return True
        self.refused[domain] += 1
        now = time.monotonic()
        if now - self.last_logged[domain] >= REFUSAL_LOG_INTERVAL:
            self.last_logged[domain] = now
            self.log(f"refused a CURVE client on {domain}: its key is not allowed there "
                     f"({self.refused[domain]} refused so far)")
        return False


def start_worker_authenticator(context: zmq.Context, keys: WorkerKeys, log) -> "ThreadAuthenticator":
    """The ZAP handler of a worker: the control socket admits the coordinator's key, the
    peer inbox the workers' key, nothing else. Start it before binding."""
    # Here, not at the top: it imports asyncio (~30 ms of every worker's start, keys or none).
    from zmq.auth.thread import ThreadAuthenticator
    gate = KeyGate({CONTROL_DOMAIN: keys.coordinator_public, PEERS_DOMAIN: keys.worker.public}, log)
    authenticator = ThreadAuthenticator(context)
    for domain in (CONTROL_DOMAIN, PEERS_DOMAIN):  # plain attributes: set before the thread starts
        authenticator.configure_curve_callback(domain, credentials_provider=gate)
    authenticator.start()
    return authenticator
