"""Publishes sightings to the matcher over ZeroMQ; the only edge module that talks ZeroMQ.

| behaviour            | how                                                                   |
|----------------------|-----------------------------------------------------------------------|
| matcher slow or down | PUSH socket buffers up to the high-water mark (sent once the matcher is back); beyond it, messages are dropped and counted, never blocking video |
| wire format          | `crossview.wire.encode` (MessagePack, schema-versioned)              |

    >>> pub = Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:5555"))
    >>> pub.send(sighting)  # True if queued, False if dropped
"""

from __future__ import annotations

import logging

import zmq

from crossview.config import PublisherConfig
from crossview.wire import Sighting, encode

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, cfg: PublisherConfig, context: zmq.Context | None = None):
        self.cfg = cfg
        self.sock = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, cfg.hwm)
        self.sock.setsockopt(zmq.LINGER, 1000)  # on close, give queued messages a second, then let go
        self.sock.connect(cfg.endpoint)
        self.sent = 0
        self.dropped = 0
        log.info("publishing to %s (high-water mark %d)", cfg.endpoint, cfg.hwm)

    def send(self, sighting: Sighting) -> bool:
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
        self.sock.close()
