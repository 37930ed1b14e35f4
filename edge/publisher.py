"""Publishes sightings to the matcher over ZeroMQ; the only edge module that talks ZeroMQ.

| behaviour            | how                                                                   |
|----------------------|-----------------------------------------------------------------------|
| matcher slow or down | PUSH socket buffers up to the high-water mark (sent once the matcher is back); beyond it, messages are dropped and counted, never blocking video |
| wire format          | `crossview.kernel.wire.encode` (MessagePack, schema-versioned)              |

    pub = Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:5555"))
    pub.send(sighting)  # True if queued, False if dropped
"""

from __future__ import annotations

import logging
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from crossview.kernel.config import PublisherConfig
from crossview.kernel.transport import secure_client
from crossview.kernel.wire import Sighting, encode

log = logging.getLogger(__name__)


_AUTH_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_RETRY_MIN_S, _RETRY_MAX_S = 2.0, 60.0


class Publisher:
    def __init__(self, cfg: PublisherConfig, context: zmq.Context | None = None):
        self.cfg = cfg
        self.sock = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, cfg.hwm)
        self.sock.setsockopt(zmq.LINGER, 1000)  # on close, give queued messages a second, then let go
        secure_client(self.sock, cfg.security)
        # ZeroMQ gives up on a peer that refused our key; watch for that and connect again later,
        # so an edge added to the matcher's allow-list afterwards gets through without a restart.
        self._monitor = self.sock.get_monitor_socket(_AUTH_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._retry_at: float | None = None
        self._retry_s = _RETRY_MIN_S
        self.sock.connect(cfg.endpoint)
        self.sent = 0
        self.dropped = 0
        self.refused = 0
        log.info("publishing to %s (%s, high-water mark %d)", cfg.endpoint, cfg.security.mode, cfg.hwm)

    def _watch_handshakes(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event & _AUTH_FAILED:
                self.refused += 1
                self._retry_at = time.monotonic() + self._retry_s
                log.error("matcher at %s refused this edge's key (is its public key on the allow-list?); retrying in %.0f s",
                          self.cfg.endpoint, self._retry_s)
                self._retry_s = min(self._retry_s * 2, _RETRY_MAX_S)
            else:
                self._retry_s = _RETRY_MIN_S
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._retry_at = None
            self.sock.disconnect(self.cfg.endpoint)
            self.sock.connect(self.cfg.endpoint)

    def send(self, sighting: Sighting) -> bool:
        self._watch_handshakes()
        try:
            self.sock.send(encode(sighting), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("matcher at %s not keeping up: %d sightings dropped so far", self.cfg.endpoint, self.dropped)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self.sock.disable_monitor()
        self._monitor.close()
        self.sock.close()
