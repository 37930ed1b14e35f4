"""ZeroMQ transport security between edges and matcher: CURVE keys, encryption and the allow-list.

| what                    | how                                                                  |
|-------------------------|----------------------------------------------------------------------|
| key pairs               | `generate_keys(dir, name)` → `name.key` (public) + `name.key_secret`; `crossview keys` |
| edge (client) socket    | `secure_client(sock, cfg)`: encrypts, authenticates to the matcher's public key |
| matcher (server) socket | `secure_server(sock, cfg)`: encrypts; only edge public keys found in `allowed_clients` get through (re-read when the folder changes, so an edge is added without a restart); files that are no key are skipped and logged |
| removing an edge        | `guard.allows(frame)`: false once the key its connection logged in with left the folder (checked at most 1 s late) |
| a key is one node       | `guard.binding(frame, node)`: why a message naming `node` may not come over this connection: its key's file is not `<node>.key` (`bind_nodes`) |
| plain TCP               | only with `mode: plain` in the config                                 |

    $ crossview keys --out keys --name matcher      # on the matcher
    $ crossview keys --out keys --name edge-1       # on each edge; copy edge-1.key to the matcher's allow-list
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from crossview.kernel.config import CurveConfig, bad_id

log = logging.getLogger(__name__)


class KeyFileError(ValueError):
    """A key file is missing or is not a CURVE certificate; the message names it."""


def generate_keys(out: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """`<out>/<name>.key` and `.key_secret`; an existing pair is kept unless `force`: every peer trusts it."""
    if problem := bad_id(name):  # the name is a file name in `out`, and the node id the allow-list binds it to
        raise ValueError(f"key name: {problem}")
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


_REREAD_S = 1.0  # the allow-list folder is looked at this often at most: a removed key is cut off within it
_KEY_LEN = 40  # a CURVE public key, Z85-encoded


def _public_key(path: Path) -> bytes | None:
    """The Z85 public key in a certificate file; None, logged, for anything else (an empty or junk file)."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        log.warning("CURVE allow-list: %s skipped: not a public key file (%s)", path, e)
        return None
    if len(public) != _KEY_LEN:
        log.warning("CURVE allow-list: %s skipped: its public key is not %d Z85 characters", path, _KEY_LEN)
        return None
    return public


class _AllowList:
    """ZAP credentials provider, and the check of every message: a client key is allowed while a public key file in
    `folder` holds it. Files are parsed again only when they change, so a bad one is logged once per change."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.denied = 0  # connections refused
        self.cut_off = 0  # messages dropped: their connection's key was removed from the folder since
        self._files: dict[str, tuple[tuple[int, int], bytes | None]] = {}  # name -> ((mtime, size), key or None)
        self._keys: frozenset[bytes] = frozenset()
        self._names: dict[bytes, frozenset[str]] = {}  # key -> the names of the files holding it (`<node>.key`)
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def keys(self, max_age: float = _REREAD_S) -> frozenset[bytes]:
        """The allowed keys, the folder re-read if it was last read over `max_age` seconds ago."""
        with self._lock:
            if time.monotonic() - self._read_at >= max_age:
                self._reread()
            return self._keys

    def _reread(self) -> None:
        files = {}
        for path in sorted(self.folder.glob("*.key")):
            try:
                st = path.stat()
            except OSError:  # removed since the listing
                continue
            stamp, old = (st.st_mtime_ns, st.st_size), self._files.get(path.name)
            files[path.name] = old if old and old[0] == stamp else (stamp, _public_key(path))
        names: dict[bytes, set[str]] = {}
        for name, (_, key) in files.items():
            if key:
                names.setdefault(key, set()).add(name.removesuffix(".key"))
        keys = frozenset(names)
        if keys != self._keys or not self._files:
            log.info("CURVE allow-list: %d edge key(s) in %s", len(keys), self.folder)
        self._files, self._keys, self._read_at = files, keys, time.monotonic()
        self._names = {key: frozenset(n) for key, n in names.items()}

    def names(self, user_id: str) -> frozenset[str]:
        """The node ids a connection that authenticated as `user_id` (its Z85 key) may write as."""
        self.keys()  # re-read if due
        with self._lock:
            return self._names.get(user_id.encode(), frozenset())

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator thread at each connection attempt. It must never raise: an exception
        ends that thread, and with it every later CURVE login and the socket's shutdown."""
        try:
            allowed = key in self.keys(max_age=0)  # a key just added is let in at once
        except Exception:
            log.exception("CURVE allow-list: %s could not be read; connection refused", self.folder)
            allowed = False
        if not allowed:
            self.denied += 1
            log.warning("refused a connection with an edge key not on the allow-list: %s", key.decode())
        return allowed

    def allows(self, user_id: str) -> bool:
        """Whether a message whose connection authenticated as `user_id` (its Z85 key) may still be taken."""
        if user_id.encode() in self.keys():
            return True
        self.cut_off += 1
        if self.cut_off <= 10 or self.cut_off % 1000 == 0:
            log.warning("dropped a message from edge key %s: removed from the allow-list since it connected "
                        "[%d dropped so far]", user_id, self.cut_off)
        return False


class ServerGuard:
    """The ZAP authenticator thread and allow-list of one server socket; `denied` counts refused connections,
    `cut_off` the messages dropped because their connection's key was removed."""

    def __init__(self, auth: ThreadAuthenticator, allow: _AllowList, bind_nodes: bool):
        self._auth, self._allow, self._bind_nodes = auth, allow, bind_nodes

    @property
    def denied(self) -> int:
        return self._allow.denied

    @property
    def cut_off(self) -> int:
        return self._allow.cut_off

    def allows(self, frame: zmq.Frame) -> bool:
        """Whether the key this message's connection logged in with is still on the allow-list (ZeroMQ gives it
        as the frame's User-Id, which the authenticator set to the Z85 key). Removing a key cuts off an open
        connection this way within `_REREAD_S`: ZeroMQ cannot close one connection of a bound socket."""
        return self._allow.allows(frame.get("User-Id"))

    def binding(self, frame: zmq.Frame, node: str) -> str | None:
        """None when this message's connection may write as `node`; otherwise why not (safe to log: the node id
        is escaped by the wire decoder, the key file names are the operator's)."""
        if not self._bind_nodes:
            return None
        names = self._allow.names(frame.get("User-Id"))
        if node in names:
            return None
        return (f"node {node} over a connection made with the key of {', '.join(sorted(f'{n}.key' for n in names))}: "
                f"an edge's public key file must be named <node id>.key (or set security.bind_nodes: false)")

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
    allow.keys()
    auth = ThreadAuthenticator(sock.context)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allow)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return ServerGuard(auth, allow, cfg.bind_nodes)
