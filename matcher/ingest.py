"""ZeroMQ ingest: receives edge sightings, validates them against the wire schema, counts the rest.

| outcome    | what happens                                                             |
|------------|--------------------------------------------------------------------------|
| valid      | handed to the consumer as a `crossview.kernel.wire.Sighting`                    |
| malformed  | counted per reason, logged (rate-limited) with the sender, dropped; the receiver keeps going |

    >>> rx = Receiver("tcp://127.0.0.1:5555", security=cfg.ingest.security)  # CURVE + allow-list
    >>> for s in rx.iter(timeout=1.0): ...
    >>> rx.receive_batch(0.1, 1000)   # what is queued (≤ 1000), decoded as one batch: the matcher's way
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator

import zmq

from crossview.kernel.config import CurveConfig
from crossview.kernel.transport import secure_server
from crossview.kernel.wire import MAX_MESSAGE_BYTES, Sighting, WireError, decode_many

log = logging.getLogger(__name__)
PLAIN = CurveConfig(mode="plain")


class Receiver:
    def __init__(self, endpoint: str, security: CurveConfig = PLAIN, rcvhwm: int = 10000):
        # A context of its own: ZeroMQ allows one CURVE authenticator per context.
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.PULL)
        self.guard = secure_server(self.sock, security)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # oversized frames are cut off by ZeroMQ itself
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.accepted = 0
        self.rejected: Counter[str] = Counter()

    def receive(self, timeout: float) -> Sighting | None:
        """The next valid sighting, or None when nothing valid arrived within `timeout` seconds."""
        batch = self.receive_batch(timeout, 1)
        return batch[0] if batch else None

    def receive_batch(self, timeout: float, max_n: int) -> list[Sighting]:
        """Valid sightings, at most `max_n`: once one message is in, whatever else is already queued is taken
        without waiting and decoded as one batch. [] when nothing valid arrived within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            frames = [self.sock.recv(copy=False)]
            while len(frames) < max_n:
                try:
                    frames.append(self.sock.recv(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
            valid = []
            for frame, s in zip(frames, decode_many([f.buffer for f in frames])):
                if isinstance(s, WireError):
                    self._reject(frame, s)
                else:
                    valid.append(s)
            if valid:
                self.accepted += len(valid)
                return valid
        return []

    def iter(self, timeout: float) -> Iterator[Sighting]:
        """Sightings until none arrives for `timeout` seconds."""
        while (s := self.receive(timeout)) is not None:
            yield s

    def _reject(self, frame: zmq.Frame, err: WireError) -> None:
        reason = str(err).split(":")[0][:60]
        self.rejected[reason] += 1
        total = sum(self.rejected.values())
        if total <= 10 or total % 1000 == 0:
            sender = _peer(frame)
            log.warning("dropped malformed message from %s (%d bytes): %s [%d rejected so far]", sender, len(frame.buffer), err,
                        total)

    @property
    def denied(self) -> int:
        """Connections refused because the edge's key is not on the allow-list."""
        return self.guard.denied if self.guard else 0

    def close(self) -> None:
        self.sock.close()
        if self.guard:
            self.guard.stop()
        self._ctx.term()


def _peer(frame: zmq.Frame) -> str:
    try:  # ZeroMQ knows the sender's address for TCP peers only
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return "unknown peer"
