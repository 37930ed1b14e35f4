"""ZeroMQ transport security between edges and matcher: CURVE keys, encryption and the allow-list.

| what                    | how                                                                  |
|-------------------------|----------------------------------------------------------------------|
| key pairs               | `generate_keys(dir, name)` → `name.key` (public) + `name.key_secret`; `crossview keys` |
| edge (client) socket    | `secure_client(sock, cfg)`: encrypts, authenticates to the matcher's public key |
| matcher (server) socket | `secure_server(sock, cfg)`: encrypts; only edge public keys found in `allowed_clients` get through (re-read when the folder changes, so an edge is added without a restart) |
| plain TCP               | only with `mode: plain` in the config                                 |

    $ crossview keys --out keys --name matcher      # on the matcher
    $ crossview keys --out keys --name edge-1       # on each edge; copy edge-1.key to the matcher's allow-list
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from crossview.kernel.config import CurveConfig

log = logging.getLogger(__name__)


class KeyFileError(ValueError):
    """A key file is missing or is not a CURVE certificate; the message names it."""


def generate_keys(out: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """`<out>/<name>.key` and `.key_secret`; an existing pair is kept unless `force`: every peer trusts it."""
    existing = [p for p in (out / f"{name}.key", out / f"{name}.key_secret") if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]}: a key pair named {name!r} exists already; replacing it cuts off "
                              "every peer that trusts it (pass --force to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    public, secret = (Path(p) for p in zmq.auth.create_certificates(out, name))
    os.chmod(secret, 0o600)
    return public, secret


def _load(path: Path | None, what: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    if path is None:
        raise KeyFileError(f"security.{what}: required with mode: curve")
    if not Path(path).exists():
        raise KeyFileError(f"security.{what}: {path}: not found; make the site's keys with `crossview init` "
                           "or one pair with `crossview keys`")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"security.{what}: {path}: not a readable CURVE key file ({e})") from None
    if need_secret and secret is None:
        raise KeyFileError(f"security.{what}: {path} holds no secret key (use the .key_secret file)")
    return public, secret


def secure_client(sock: zmq.Socket, cfg: CurveConfig) -> None:
    if cfg.mode == "plain":
        return
    public, secret = _load(cfg.secret_key, "secret_key", need_secret=True)
    server_public, _ = _load(cfg.server_key, "server_key", need_secret=False)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public


class _AllowList:
    """ZAP credentials provider: a client key is allowed if a public key file in `folder` holds it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.denied = 0
        self._stamp: tuple | None = None
        self._keys: set[bytes] = set()
        self._lock = threading.Lock()

    def _current(self) -> set[bytes]:
        files = sorted(self.folder.glob("*.key"))
        stamp = tuple((f.name, f.stat().st_mtime_ns) for f in files)
        if stamp != self._stamp:
            self._keys = {zmq.auth.load_certificate(f)[0] for f in files}
            self._stamp = stamp
            log.info("CURVE allow-list: %d edge key(s) in %s", len(self._keys), self.folder)
        return self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            if key in self._current():
                return True
            self.denied += 1
        log.warning("refused a connection with an edge key not on the allow-list: %s", key.decode())
        return False


class ServerGuard:
    """The ZAP authenticator thread and allow-list of one server socket; `denied` counts refused edges."""

    def __init__(self, auth: ThreadAuthenticator, allow: _AllowList):
        self._auth, self._allow = auth, allow

    @property
    def denied(self) -> int:
        return self._allow.denied

    def stop(self) -> None:
        self._auth.stop()


def secure_server(sock: zmq.Socket, cfg: CurveConfig) -> ServerGuard | None:
    """Make `sock` a CURVE server before it binds. ZeroMQ allows one authenticator per context, so
    give the socket a context of its own."""
    if cfg.mode == "plain":
        log.warning("ZeroMQ ingest in plain TCP: traffic is neither encrypted nor authenticated")
        return None
    public, secret = _load(cfg.secret_key, "secret_key", need_secret=True)
    if cfg.allowed_clients is None or not Path(cfg.allowed_clients).is_dir():
        raise KeyFileError(f"security.allowed_clients: {cfg.allowed_clients}: not a folder of edge public keys")
    allow = _AllowList(Path(cfg.allowed_clients))
    allow._current()
    auth = ThreadAuthenticator(sock.context)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allow)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return ServerGuard(auth, allow)
