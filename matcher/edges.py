"""The edges as the matcher last heard them: every node's newest heartbeat (`kernel.wire.Heartbeat`), and what it
says of each edge and camera, with since when.

| state     | an edge                                          | a camera                                      |
|-----------|--------------------------------------------------|-----------------------------------------------|
| `online`  | a heartbeat within `MISSED` of its intervals     | streaming (`behind` says if below 0.8 of its target fps) |
| `stalled` |                                                  | connecting, or reconnecting to its source     |
| `offline` | no heartbeat for `MISSED` of its intervals       | failed, finished, stopped, or its edge offline |

Times are the matcher's clock (an edge's may be off). The last heartbeats are saved to `edges.msgpack` in the
data directory every status interval and at stop, so after a restart an edge that is gone is still listed, offline
since its last heartbeat; the file holds wire-format heartbeats, validated again when read.

With `store.kind: postgres` they are saved to that database's `edges` table instead (`matcher.sqldb`), one row per
node, the newest heartbeat of every matcher on it winning; each save then takes the rows newer than its own, so
every replica lists (and the canary and the gallery migration count) the edges its peers hear, one status interval
late at most. The `MAX_EDGES` most recently heard are kept.

    edges = Edges(data_dir / "edges.msgpack", cfg.store)    # loads what was saved
    edges.heard(heartbeat)                       # the receiving thread, per heartbeat
    edges.report()                               # {"now": ..., "edges": [...], "summary": {...}}: the API's answer
    edges.save()
    print(report_text(edges.report()))           # what `crossview status --url` prints
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from crossview.kernel.config import StoreConfig
from crossview.kernel.wire import CameraStatus, Heartbeat, decode, encode_heartbeat
from crossview.matcher.sqldb import open_db

log = logging.getLogger(__name__)
MISSED = 3  # heartbeats missed before an edge is offline
MAX_EDGES = 1024  # nodes remembered (each up to wire.MAX_CAMERAS cameras); beyond, the longest quiet is forgotten
EDGE_STATES = ("online", "offline")
CAMERA_STATES = ("online", "stalled", "offline")
_FILE_VERSION = 1
MIGRATIONS = ["""
CREATE TABLE IF NOT EXISTS edges (
    node TEXT PRIMARY KEY,
    seen REAL NOT NULL,      -- its last heartbeat, by the clock of the matcher that heard it
    edge BLOB NOT NULL       -- msgpack: one row of the file's `edges`
);
CREATE INDEX IF NOT EXISTS edges_seen ON edges (seen);
"""]  # never edit a step: add one


def camera_state(c: CameraStatus) -> str:
    if c.state == "streaming":
        return "online"
    return "stalled" if c.state in ("connecting", "reconnecting") else "offline"


@dataclass
class _Edge:
    heartbeat: Heartbeat
    last_seen: float
    online_since: float
    cameras: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (state, since)

    def online(self, now: float) -> bool:
        return now - self.last_seen <= MISSED * self.heartbeat.every_s

    def update(self, hb: Heartbeat, now: float) -> None:
        if not self.online(now):
            self.online_since = now
        self.heartbeat, self.last_seen = hb, now
        cameras = {}
        for c in hb.cameras:
            state = camera_state(c)
            old = self.cameras.get(c.id)
            cameras[c.id] = old if old and old[0] == state else (state, now)
        self.cameras = cameras  # a camera the edge no longer runs is gone from the list

    def report(self, now: float) -> dict:
        online = self.online(now)
        hb = self.heartbeat
        return {
            "node": hb.node, "state": "online" if online else "offline",
            "since": self.online_since if online else self.last_seen, "last_seen": self.last_seen,
            "heartbeat_s": hb.every_s, "model": hb.model,
            "spool": {"sightings": hb.spooled, "oldest_s": hb.spool_age_s, "dropped": hb.dropped},
            "cameras": [self._camera(c, online) for c in hb.cameras],
        }

    def _camera(self, c: CameraStatus, edge_online: bool) -> dict:
        state, since = self.cameras[c.id]
        if not edge_online and state != "offline":
            state, since = "offline", self.last_seen
        return {"id": c.id, "state": state, "since": since, "source_state": c.state, "fps": c.fps,
                "target_fps": c.target_fps, "behind": c.behind and edge_online, "frames": c.frames,
                "position": list(c.position) if c.position else None, "eta_s": c.eta_s, "error": c.error}


class Edges:
    """See the module docstring. Thread-safe: heartbeats arrive on the receiving thread, reports go to HTTP's."""

    def __init__(self, path: Path | None = None, store: StoreConfig | None = None):
        self.path = path
        self._edges: dict[str, _Edge] = {}  # the most recently heard last
        self._lock = threading.Lock()
        self._db = open_db("edges", path, store, MIGRATIONS) if store is not None and store.kind == "postgres" else None
        if self._db is not None:
            self._adopt()
        elif path is not None and path.exists():
            self._load(path)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def heard(self, hb: Heartbeat, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            edge = self._edges.pop(hb.node, None)
            if edge is None:
                if len(self._edges) >= MAX_EDGES:
                    del self._edges[next(iter(self._edges))]
                edge = _Edge(hb, now, now)
            edge.update(hb, now)
            self._edges[hb.node] = edge

    def report(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        with self._lock:
            edges = sorted((e.report(now) for e in self._edges.values()), key=lambda e: e["node"])
        summary = {"edges": dict.fromkeys(EDGE_STATES, 0), "cameras": dict.fromkeys(CAMERA_STATES, 0)}
        for e in edges:
            summary["edges"][e["state"]] += 1
            for c in e["cameras"]:
                summary["cameras"][c["state"]] += 1
        return {"now": now, "edges": edges, "summary": summary}

    # -- the file ------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the last heartbeats atomically (a crash leaves the previous file); PostgreSQL: share them."""
        if self.path is None and self._db is None:
            return
        with self._lock:
            rows = {node: {"hb": encode_heartbeat(e.heartbeat), "seen": e.last_seen, "since": e.online_since,
                           "cams": {cid: list(v) for cid, v in e.cameras.items()}} for node, e in self._edges.items()}
        if self._db is not None:
            self._share(rows)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(msgpack.packb({"v": _FILE_VERSION, "edges": list(rows.values())}, use_bin_type=True))
        os.replace(tmp, self.path)

    def _load(self, path: Path) -> None:
        try:
            m = msgpack.unpackb(path.read_bytes(), raw=False, max_array_len=MAX_EDGES)
            for row in m["edges"]:
                edge = _edge(row)
                self._edges[edge.heartbeat.node] = edge
        except Exception as e:  # a damaged file costs the list until the edges' next heartbeats, nothing more
            log.warning("%s unreadable (%s: %s): the edges' status starts empty", path, type(e).__name__, e)
            self._edges.clear()

    # -- the shared table (PostgreSQL) ---------------------------------------------------------

    def _share(self, rows: dict[str, dict]) -> None:
        """Ours where newer than the table's, the `MAX_EDGES` newest kept; then the table's where newer than ours."""
        self._db.many("INSERT INTO edges (node, seen, edge) VALUES (?, ?, ?) ON CONFLICT (node) DO UPDATE SET "
                      "seen = excluded.seen, edge = excluded.edge WHERE edges.seen < excluded.seen",
                      [(node, r["seen"], msgpack.packb(r, use_bin_type=True)) for node, r in rows.items()])
        self._db.run("DELETE FROM edges WHERE seen < (SELECT MIN(seen) FROM (SELECT seen FROM edges ORDER BY seen DESC "
                     "LIMIT ?) AS newest)", (MAX_EDGES,))
        self._adopt()

    def _adopt(self) -> None:
        for (data,) in reversed(self._db.all("SELECT edge FROM edges ORDER BY seen DESC LIMIT ?", (MAX_EDGES,))):
            try:
                edge = _edge(msgpack.unpackb(bytes(data), raw=False))
            except Exception as e:  # another matcher's row we cannot read: its next save replaces it
                log.warning("edges: a row in %s unreadable (%s: %s): skipped", self._db.shown, type(e).__name__, e)
                continue
            with self._lock:
                mine = self._edges.get(edge.heartbeat.node)
                if mine is None or mine.last_seen < edge.last_seen:
                    self._edges.pop(edge.heartbeat.node, None)
                    if len(self._edges) >= MAX_EDGES:
                        del self._edges[next(iter(self._edges))]
                    self._edges[edge.heartbeat.node] = edge


def _edge(row: dict) -> _Edge:
    """An edge from a saved row, validated: `ValueError` (or a wire error) for one that does not hold together."""
    hb = decode(row["hb"])
    if not isinstance(hb, Heartbeat):
        raise ValueError("a sighting where a heartbeat belongs")
    cams = {cid: (state, float(since)) for cid, (state, since) in row["cams"].items()}
    if set(cams) != {c.id for c in hb.cameras} or not all(s in CAMERA_STATES for s, _ in cams.values()):
        raise ValueError("camera states do not match the heartbeat")
    return _Edge(hb, float(row["seen"]), float(row["since"]), cams)


# -- the terminal's view -------------------------------------------------------------------------

def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s < 172800 else f"{s // 86400}d{s // 3600 % 24:02d}h"


def _since(ts: float, now: float) -> str:
    clock = time.strftime("%H:%M:%S" if now - ts < 86400 else "%Y-%m-%d %H:%M", time.localtime(ts))
    return f"since {clock} ({_ago(now - ts)})"


def _camera_line(c: dict, now: float) -> str:
    if c["state"] == "online":
        rate = f"{c['fps']:.1f} of {c['target_fps']:g} fps" if c["target_fps"] else f"{c['fps']:.1f} fps"
        detail = f"falling behind: {rate}" if c["behind"] else rate
        if c["position"]:
            done, total = c["position"]
            detail += f", frame {done} of {total} ({100 * done / max(total, 1):.0f}%)"
            if c["eta_s"] is not None:
                detail += f", ETA {_ago(c['eta_s'])}"
    else:
        detail = c["source_state"] + (f": {c['error']}" if c["error"] else "")
    return f"  {c['id']:<16} {c['state']:<8} {_since(c['since'], now):<24} {detail}"


def report_text(report: dict) -> str:
    """`report()` as lines for a terminal: a summary, then each edge and its cameras."""
    now, s = report["now"], report["summary"]
    counts = "; ".join(f"{sum(n.values())} {what}: " + ", ".join(f"{k} {state}" for state, k in n.items() if k)
                       for what, n in s.items())
    lines = [counts if report["edges"] else "no edge has sent a heartbeat yet"]
    for e in report["edges"]:
        sp = e["spool"]
        lines.append(f"{e['node']}  {e['state']} {_since(e['since'], now)}, last heartbeat {_ago(now - e['last_seen'])} ago, "
                     f"model {e['model']}, spool {sp['sightings']:,} (oldest {_ago(sp['oldest_s'])}), {sp['dropped']:,} dropped")
        lines += [_camera_line(c, now) for c in e["cameras"]]
    return "\n".join(lines)
