"""Endpoint policy and CurveZMQ keys.

By default every socket binds only ``ipc://`` or a loopback address. Binding anything else
needs a key directory made by ``pdserve keys DIR``:

    DIR/router.key, DIR/router.key_secret   the router's key pair (both sockets)
    DIR/client.key, DIR/client.key_secret   a key pair for clients
    DIR/worker.key, DIR/worker.key_secret   a key pair for workers
    DIR/clients/*.key                       public keys allowed on the client socket
    DIR/workers/*.key                       public keys allowed on the worker socket

Add a public key to ``clients/`` or ``workers/`` to let another key pair in. The router checks
peers with a ZAP authenticator; an unknown key never completes the handshake.
"""
from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

KEY_NAMES = ("router", "client", "worker")
# ZAP domains: which directory of public keys each router socket trusts.
DOMAINS = {"frontend": "clients", "backend": "workers"}


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (127.0.0.0/8, ::1, localhost)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or a wildcard: not local


def check_endpoint(endpoint: str, what: str) -> None:
    """Raise ValueError unless ``endpoint`` looks like a zmq endpoint we can use."""
    if not isinstance(endpoint, str) or not endpoint.startswith(("ipc://", "tcp://", "inproc://")):
        raise ValueError(f"{what} {endpoint!r} is not a zmq endpoint; use ipc:///path/to/socket "
                         "or tcp://HOST:PORT")
    if endpoint.startswith("tcp://") and ":" not in endpoint[len("tcp://"):]:
        raise ValueError(f"{what} {endpoint!r} has no port; use tcp://HOST:PORT")
    port = endpoint.rpartition(":")[2] if endpoint.startswith("tcp://") else "*"
    if port != "*" and not (port.isdigit() and int(port) <= 65535):
        raise ValueError(f"{what} {endpoint!r} has no valid port; use tcp://HOST:PORT with a port "
                         "in 0-65535 (or * for any free one)")


def check_bind(endpoint: str, curve_dir: str | None, what: str) -> None:
    """Refuse to bind a non-local endpoint without CurveZMQ keys (ValueError says what to do)."""
    check_endpoint(endpoint, what)
    if curve_dir is None and not is_local_endpoint(endpoint):
        raise ValueError(f"{what} {endpoint} is reachable from other hosts; bind ipc:// or 127.0.0.1, "
                         "or make keys with `pdserve keys DIR` and pass --curve-dir DIR")


def create_keys(key_dir: str | Path) -> list[Path]:
    """Write the key pairs and the trusted-key directories. Refuses to overwrite keys."""
    key_dir = Path(key_dir)
    existing = [key_dir / f"{name}.key_secret" for name in KEY_NAMES
                if (key_dir / f"{name}.key_secret").exists()]
    if existing:
        raise ValueError(f"{key_dir} already holds keys ({existing[0].name}); "
                         "remove them or choose another directory")
    key_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in KEY_NAMES:
        public, secret = zmq.auth.create_certificates(key_dir, name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    for name, sub in (("client", "clients"), ("worker", "workers")):
        (key_dir / sub).mkdir(exist_ok=True)
        shutil.copy(key_dir / f"{name}.key", key_dir / sub / f"{name}.key")
        written.append(key_dir / sub / f"{name}.key")
    return written


def _load_pair(key_dir: Path, name: str) -> tuple[bytes, bytes]:
    path = key_dir / f"{name}.key_secret"
    if not path.is_file():
        raise ValueError(f"{path} is missing; make keys with `pdserve keys {key_dir}`")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except Exception as exc:  # pyzmq raises ValueError or OSError on a bad file
        raise ValueError(f"cannot read {path}: {exc}") from None
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


@dataclass(frozen=True)
class CurveKeys:
    """One side's key pair, plus the router's public key (peers) or the trusted dir (router)."""
    public: bytes
    secret: bytes
    server_public: bytes | None = None
    key_dir: Path | None = None

    @classmethod
    def for_router(cls, key_dir: str | Path) -> "CurveKeys":
        key_dir = Path(key_dir)
        public, secret = _load_pair(key_dir, "router")
        return cls(public, secret, key_dir=key_dir)

    @classmethod
    def for_peer(cls, key_dir: str | Path, name: str) -> "CurveKeys":
        """``name`` is ``client`` or ``worker``."""
        key_dir = Path(key_dir)
        public, secret = _load_pair(key_dir, name)
        router_public = key_dir / "router.key"
        if not router_public.is_file():
            raise ValueError(f"{router_public} is missing; copy the router's public key there")
        server_public, _ = zmq.auth.load_certificate(router_public)
        return cls(public, secret, server_public=server_public)

    def apply_client(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public

    def apply_server(self, sock: zmq.Socket, domain: str) -> None:
        sock.zap_domain = domain.encode()
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """A ZAP handler that admits only the public keys in ``clients/`` or ``workers/``."""
        if self.key_dir is None:
            raise ValueError("only the router's keys can start an authenticator")
        auth = ThreadAuthenticator(ctx)
        auth.start()
        for domain, sub in DOMAINS.items():
            trusted = self.key_dir / sub
            if not trusted.is_dir():
                raise ValueError(f"{trusted} is missing; make keys with `pdserve keys {self.key_dir}`")
            auth.configure_curve(domain=domain, location=str(trusted))
        return auth
