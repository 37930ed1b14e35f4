"""Delivers sightings to the matcher, at least once; the only edge module that talks ZeroMQ.

| behaviour             | how                                                                    |
|-----------------------|------------------------------------------------------------------------|
| nothing lost silently | every sighting goes to the spool on disk (`edge.spool`) first and leaves it only when the |
|                       | matcher acknowledges it, committed; a full spool drops its oldest, counted and logged |
| matcher slow or down  | at most `hwm` sightings in flight (sent, unacknowledged); the rest wait in the spool, never |
|                       | blocking video. A lost connection, or no acknowledgement in `ACK_TIMEOUT_S`, resends |
| resend                | oldest first, after the live sightings of each round, at most `_RESEND_ROUND` per round |
| socket                | DEALER (the matcher is a ROUTER, see `kernel.wire`), `IMMEDIATE`: nothing queues in ZeroMQ |
|                       | for a matcher not connected, so the spool alone holds what is undelivered |
| replicas              | `endpoint` a list: connected to each, ZeroMQ deals the sightings round-robin to the ones |
|                       | connected; reachable while one is. One lost resends all in flight (which peer held what |
|                       | is not known), so a killed replica's batches go to another; a repeat is acknowledged, not stored |
| handshakes            | a refused edge key (allow-list) and a wrong matcher key (`server_key`) are told apart and |
|                       | logged; a refused key is retried with backoff, so a later allow-list entry gets through |
| heartbeats            | `beat()`: the node's state, sent while the matcher is reachable, never spooled: only the |
|                       | newest one waits, and a lost one is replaced by the next                            |
| wire format           | `crossview.kernel.wire` (MessagePack, v2: `seq` from the spool, acknowledgements) |

    pub = Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:5555", spool_dir=Path("var/spool")))
    pub.send(sighting)   # spooled (and sent when the matcher is there); its seq
    pub.status()         # "matcher unreachable since 12:03:10, 1,234 sightings spooled (12 of 500 MB), ..."
    pub.close()          # waits up to drain_s for acknowledgements; the rest stays spooled for the next start
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sqlite3
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from crossview.edge.spool import Spool
from crossview.kernel.config import PublisherConfig
from crossview.kernel.transport import secure_client
from crossview.kernel.wire import Heartbeat, Sighting, WireError, decode_ack, encode, encode_heartbeat

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10.0  # a sighting in flight this long unacknowledged is sent again
_RESEND_ROUND = 256  # spooled sightings resent per round of the I/O loop, after the live ones
_POLL_MS = 10  # the I/O loop's longest sleep: how long a live sighting may wait to be sent
_RETRY_MIN_S, _RETRY_MAX_S = 2.0, 60.0
_REPEAT_S = 60.0  # a handshake problem is logged again after this long
_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


class Publisher:
    def __init__(self, cfg: PublisherConfig, context: zmq.Context | None = None):
        self.cfg = cfg
        try:
            self.spool = Spool(cfg.spool_dir, int(cfg.spool_mb * 1e6))
        except OSError as e:
            raise OSError(f"publisher.spool_dir: {e}") from None
        self.acknowledged = 0
        self.refused_sightings = 0  # acknowledged as never to be stored: malformed, or refused by the matcher's checks
        self.unspooled = 0  # sightings the spool could not take (disk full or failing)
        self.refused = 0  # handshakes the matcher refused: this edge's key is not on its allow-list
        self.key_failures = 0  # handshakes that failed otherwise: most likely a wrong matcher key
        self.reachable = False
        self.unreachable_since: float | None = time.time()
        self._live: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=cfg.hwm)
        self._beat: collections.deque[bytes] = collections.deque(maxlen=1)  # the newest heartbeat, not yet sent
        self._in_flight: dict[int, float] = {}  # seq -> when sent, oldest first
        self._cursor = 0  # the resend pass has offered every spooled sighting up to here
        self._logged: dict[str, float] = {}
        self._stop = threading.Event()
        self._drain_until = 0.0
        self._sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._sock.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.LINGER, 0)  # what is unacknowledged is in the spool anyway
        secure_client(self._sock, cfg.security)
        self._monitor = self._sock.get_monitor_socket(_EVENTS)
        self._retry_at: dict[str, float] = {}  # endpoint -> when to connect again after a refused key
        self._retry_s = _RETRY_MIN_S
        self._up: set[str] = set()  # endpoints whose handshake succeeded, not disconnected since
        for endpoint in cfg.endpoints:
            self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, name="edge-publisher", daemon=True)
        self._thread.start()
        log.info("publishing to %s (%s, %d in flight at most), spool %s (%g MB)", ", ".join(cfg.endpoints), cfg.security.mode, cfg.hwm,
                 self.spool.path, cfg.spool_mb)

    # -- the caller's side ---------------------------------------------------------------------

    def send(self, sighting: Sighting) -> int | None:
        """Spool the sighting and queue it for sending; its sequence number, or None when the spool could not take it
        (a full or failing disk: counted in `dropped`, logged, and the node goes on)."""
        seq = self.spool.next_seq()
        msg = encode(dataclasses.replace(sighting, seq=seq))
        try:
            self.spool.add(seq, time.time(), msg)
        except sqlite3.Error as e:
            self.unspooled += 1
            self._log_once("spool", logging.ERROR, "SPOOL WRITE FAILED (%s): %s; %d sightings dropped so far", self.spool.path, e,
                           self.dropped)
            return None
        self._live.append((seq, msg))  # the I/O thread sends it; if it falls off, the resend pass does
        return seq

    def beat(self, heartbeat: Heartbeat) -> None:
        """Queue the node's heartbeat; it replaces one not yet sent."""
        self._beat.append(encode_heartbeat(heartbeat))

    @property
    def dropped(self) -> int:
        """Sightings dropped unacknowledged: the spool was full, or could not be written."""
        return self.spool.dropped + self.unspooled

    @property
    def connected(self) -> list[str]:
        """The matcher endpoints connected now (a handshake done, no disconnection since)."""
        return sorted(self._up.copy())  # a copy: the I/O thread changes the set

    @property
    def spooled(self) -> int:
        """Sightings not yet acknowledged."""
        return self.spool.count

    def oldest_age_s(self) -> float:
        oldest = self.spool.oldest_ts()
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def status(self) -> str:
        spool = f"{self.spooled:,} sightings spooled ({self.spool.bytes / 1e6:.1f} of {self.cfg.spool_mb:g} MB)"
        where = "matcher reachable" if self.reachable else f"matcher unreachable since {_clock(self.unreachable_since)}"
        refused = f", {self.refused_sightings:,} refused by the matcher" if self.refused_sightings else ""
        return (f"{where}, {spool}, oldest unacknowledged {self.oldest_age_s():.0f} s, {self.acknowledged:,} acknowledged, "
                f"{self.dropped:,} dropped{refused}")

    def close(self, drain_s: float | None = None) -> None:
        """While the matcher is reachable, wait up to `drain_s` (default: the config's) for the spool to be
        acknowledged; then stop. What is left is sent after the next start."""
        self._drain_until = time.monotonic() + (self.cfg.drain_s if drain_s is None else drain_s)
        self._stop.set()
        self._thread.join()
        self._sock.disable_monitor()
        self._monitor.close()
        self._sock.close()
        log.info("publisher stopped: %s", self.status())
        self.spool.close()

    # -- the I/O thread ------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set() or (self.spool.count and self.reachable and time.monotonic() < self._drain_until):
            poller.poll(_POLL_MS)
            try:
                self._round()
            except Exception:  # a bug, or a spool that cannot be read, must not end delivery: what is spooled stays
                self._log_once("round", logging.ERROR, "publisher: delivery round failed, retried", exc_info=True)
                time.sleep(1)
        self._send_beat()  # the node's last word: its cameras stopped

    def _round(self) -> None:
        self._read_acks()
        self._watch_handshakes()
        if self.reachable:
            self._send_beat()
            self._expire()
            self._send_live()
            self._resend()

    def _read_acks(self) -> None:
        while True:
            try:
                buf = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                ack = decode_ack(buf)
            except WireError as e:
                self._log_once("ack", logging.WARNING, "unreadable acknowledgement from the matcher: %s", e)
                continue
            seqs = ack.seqs
            for s in seqs:
                self._in_flight.pop(s, None)
            done = self.spool.ack(seqs)
            if ack.refused:
                self.refused_sightings += done
                self._log_once("refused", logging.ERROR, "the matcher refused %d sightings for good (its log says why); "
                               "%d refused so far, dropped from the spool", done, self.refused_sightings)
            else:
                self.acknowledged += done

    def _put(self, seq: int, msg: bytes) -> bool:
        """Send one sighting unless already in flight; False when ZeroMQ takes no more now."""
        if seq in self._in_flight:
            return True
        try:
            self._sock.send(msg, zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._in_flight[seq] = time.monotonic()
        return True

    def _send_beat(self) -> None:
        if self._beat:
            try:
                self._sock.send(self._beat.popleft(), zmq.NOBLOCK)
            except zmq.Again:  # not connected or full: the next heartbeat says the same, newer
                pass

    def _send_live(self) -> None:
        while self._live and len(self._in_flight) < self.cfg.hwm:
            seq, msg = self._live.popleft()
            if seq <= self._cursor:  # the resend pass sent it already (and it may be acknowledged and gone since)
                continue
            if not self._put(seq, msg):
                self._live.appendleft((seq, msg))
                return

    def _resend(self) -> None:
        room = min(self.cfg.hwm - len(self._in_flight), _RESEND_ROUND)
        if room <= 0:
            return
        for seq, msg in self.spool.after(self._cursor, room):
            if not self._put(seq, msg):
                return
            self._cursor = seq

    def _expire(self) -> None:
        """In flight too long without an acknowledgement: offer the whole spool again (what is in flight is skipped)."""
        if self._in_flight and next(iter(self._in_flight.values())) < time.monotonic() - ACK_TIMEOUT_S:
            deadline = time.monotonic() - ACK_TIMEOUT_S
            self._in_flight = {s: t for s, t in self._in_flight.items() if t >= deadline}
            self._cursor = 0

    def _lost_connection(self, endpoint: str) -> None:
        """Whatever was in flight may be lost with the connection (and which peer held what is not known): resend it
        all, oldest first, to the peers still connected."""
        if endpoint in self._up:
            self._up.discard(endpoint)
            if not self._up:
                self.reachable, self.unreachable_since = False, time.time()
            log.warning("matcher at %s unreachable; %s", endpoint, self.status())
        self._in_flight.clear()
        self._live.clear()
        self._cursor = 0

    def _watch_handshakes(self) -> None:
        while self._monitor.poll(0):
            msg = recv_monitor_message(self._monitor)
            event, endpoint = msg["event"], msg["endpoint"].decode()
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._retry_s = _RETRY_MIN_S
                self._up.add(endpoint)
                self.reachable = True
                log.info("matcher at %s reachable; resending %d spooled sightings", endpoint, self.spool.count)
            elif event == zmq.EVENT_DISCONNECTED:
                self._lost_connection(endpoint)
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refused(endpoint)
            else:  # the matcher could not decrypt our hello, or speaks another protocol
                self.key_failures += 1
                self._log_once("key", logging.ERROR, "CURVE handshake failing: check publisher.security.server_key "
                               "and mode (the matcher at %s does not answer to %s)", endpoint,
                               self.cfg.security.server_key or "plain TCP")
        for endpoint, at in list(self._retry_at.items()):
            if time.monotonic() >= at:
                del self._retry_at[endpoint]
                self._sock.disconnect(endpoint)
                self._sock.connect(endpoint)

    def _refused(self, endpoint: str) -> None:
        """ZeroMQ gives up on a peer that refused our key; connect again later, so an edge added to the matcher's
        allow-list afterwards gets through without a restart."""
        self.refused += 1
        self._retry_at[endpoint] = time.monotonic() + self._retry_s
        log.error("matcher at %s refused this edge's key (is its public key on the allow-list?); retrying in %.0f s",
                  endpoint, self._retry_s)
        self._retry_s = min(self._retry_s * 2, _RETRY_MAX_S)

    def _log_once(self, what: str, level: int, msg: str, *args, exc_info: bool = False) -> None:
        """Log a recurring problem once per `_REPEAT_S`."""
        now = time.monotonic()
        if now - self._logged.get(what, -_REPEAT_S) >= _REPEAT_S:
            self._logged[what] = now
            log.log(level, msg, *args, exc_info=exc_info)
