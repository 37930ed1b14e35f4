"""Watchlists: people an operator wants to hear about, checked against every ingested sighting, and the alerts
they raise. The file `watchlist.db` in the data directory is this module's; with `store.kind: postgres` its tables
are in that database (`matcher.sqldb`), shared by every matcher on it.

| part      | what                                                                                         |
|-----------|----------------------------------------------------------------------------------------------|
| entry     | a person as one model version's unit vector (from a sighting, a track or an uploaded crop), a |
|           | threshold and optionally the cameras to watch                                                |
| threshold | on P(same person) when the model version has a calibration (`kernel.calibration`), else on raw |
|           | cosine similarity, and labelled so; kept as the cosine it stands for, so a check is a compare |
| check     | per ingest batch and model version: one exact FAISS inner-product search of the batch's newest |
|           | sighting of each track against that version's entries (`check`, on the ingest's index thread, |
|           | once the batch is searchable). Replicas on PostgreSQL: `check_stored`, the store's rows above a |
|           | shared cursor, moved with the alerts in one transaction, by the replica holding the lease     |
| alert     | one per entry and matcher track (its first sighting checked over the threshold), stored, then |
|           | listed by the API and offered to the webhooks (`matcher.webhooks`)                            |
| replicas  | an entry added or removed through another matcher on the database: each check first compares |
|           | (count, highest id) of the entries with its indexes' and rebuilds them if it changed (ids are |
|           | never reused); the UNIQUE (entry, track) keeps one alert even when two matchers check a track |

    wl = Watchlist(data_dir / "watchlist.db", cfg.watchlist, calibration_of, cfg.store)
    entry = wl.add("visitor 7", queries.sighting_subject(123), min_probability=0.9, cameras=["gate"])
    wl.check(model, ids, sightings, vecs, records_of)    # -> the new alerts
    wl.check_stored(store)                               # replicas: what the store holds above the cursor
    wl.alerts(after=0)                                   # oldest first
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from crossview.kernel.calibration import Calibration
from crossview.kernel.config import StoreConfig, WatchlistConfig
from crossview.kernel.wire import Sighting
from crossview.matcher.query import Subject
from crossview.matcher.results import SightingRecord
from crossview.matcher.sqldb import WAL_FULL, open_db
from crossview.matcher.storecommon import SqlStore

log = logging.getLogger(__name__)
_HITS_PER_SIGHTING = 8  # entries over the threshold reported per sighting at most
_CHECK_IDS = 50_000  # sighting ids `check_stored` covers in one transaction at most: a backlog goes in steps
MAX_NAME_LEN = 128

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    model TEXT NOT NULL,
    vec BLOB NOT NULL,
    min_probability REAL,          -- NULL: the model has no calibration, the threshold is min_similarity itself
    min_similarity REAL NOT NULL,  -- the cosine the threshold stands for: what the check compares
    cameras TEXT,                  -- JSON list, NULL: every camera
    origin TEXT NOT NULL,          -- JSON: how the person was given (sighting, track, image)
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    entry INTEGER NOT NULL,
    name TEXT NOT NULL,
    sighting INTEGER NOT NULL,
    node TEXT NOT NULL, camera TEXT NOT NULL, track INTEGER NOT NULL, track_id INTEGER NOT NULL,
    ts REAL NOT NULL,
    similarity REAL NOT NULL,
    probability REAL,
    created REAL NOT NULL,
    UNIQUE (entry, track_id)       -- one alert per person and track, not one per frame
);
CREATE INDEX IF NOT EXISTS alerts_created ON alerts (created);
"""
# the store's highest sighting id checked (`check_stored`, replicas on PostgreSQL); NULL: not yet started
CHECKED = """
CREATE TABLE IF NOT EXISTS checked (one INTEGER PRIMARY KEY CHECK (one = 1), upto INTEGER);
INSERT INTO checked (one, upto) VALUES (1, NULL) ON CONFLICT DO NOTHING;
"""
MIGRATIONS = [SCHEMA, CHECKED]  # never edit a step: add one


@dataclass(frozen=True)
class Entry:
    id: int
    name: str
    model: str
    min_probability: float | None  # None: uncalibrated model, the threshold is raw similarity
    min_similarity: float
    cameras: list[str] | None
    origin: dict
    created: float

    def to_dict(self) -> dict:
        return {**asdict(self), "calibrated": self.min_probability is not None}


@dataclass(frozen=True)
class Alert:
    id: int
    entry: int
    name: str
    sighting: int
    node: str
    camera: str
    track: int
    track_id: int
    ts: float
    similarity: float
    probability: float | None
    created: float

    def to_dict(self) -> dict:
        return asdict(self)


class _Partition:
    """One model version's entries as an exact inner-product index: row n is `entries[n]`."""

    def __init__(self, entries: list[Entry], vecs: np.ndarray):
        self.entries = entries
        self.index = faiss.IndexFlatIP(vecs.shape[1])
        self.index.add(vecs)
        self.min_similarity = np.array([e.min_similarity for e in entries], np.float32)


class Watchlist:
    def __init__(self, path: Path, cfg: WatchlistConfig, calibration_of: Callable[[str], Calibration | None],
                 store: StoreConfig | None = None):
        self.cfg, self.calibration_of = cfg, calibration_of
        self._db = open_db("watchlist", path, store, MIGRATIONS, pragmas=WAL_FULL)
        self._seen: tuple | None = None  # (count, highest id) of the entries the indexes hold
        self._lock = threading.Lock()  # the index thread checks, HTTP threads add and list, webhooks read
        self._parts: dict[str, _Partition] = {}
        self._listeners: list[Callable[[list[Alert]], None]] = []
        self.alerted = 0  # alerts raised since start
        self._rebuild()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def on_alerts(self, listener: Callable[[list[Alert]], None]) -> None:
        """Call `listener` with each batch of new alerts, once stored (the webhooks)."""
        self._listeners.append(listener)

    # -- entries -------------------------------------------------------------------------------

    def add(self, name: str, subject: Subject, min_probability: float | None = None, min_similarity: float | None = None,
            cameras: Sequence[str] | None = None) -> Entry:
        """A person on the watchlist. The threshold: `min_probability` for a calibrated model (default
        `watchlist.default_probability`), `min_similarity` (cosine) for one without (default `default_similarity`);
        `ValueError` for a probability asked of an uncalibrated model, a bad name or a full watchlist."""
        name = name.strip()
        if not name or len(name) > MAX_NAME_LEN or not name.isprintable():
            raise ValueError(f"name must be 1..{MAX_NAME_LEN} printable characters")
        p, cos = self._threshold(subject.model, min_probability, min_similarity)
        vec = np.ascontiguousarray(subject.vec, np.float32).reshape(-1)
        vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        cams = sorted(set(cameras)) if cameras else None
        with self._lock:
            with self._db.transaction() as db:  # counted and added with no other matcher adding meanwhile
                (n,) = db.one("SELECT COUNT(*) FROM entries")
                if n >= self.cfg.max_entries:
                    raise ValueError(f"the watchlist is full ({n} entries, watchlist.max_entries): remove one first")
                (entry_id,) = db.one(
                    "INSERT INTO entries (name, model, vec, min_probability, min_similarity, cameras, origin, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (name, subject.model, vec.tobytes(), p, cos, json.dumps(cams) if cams else None,
                     json.dumps(subject.query), time.time()))
            self._rebuild_locked()
        log.info("watchlist: %r added (entry %d, model %s, %s, cameras %s)", name, entry_id, subject.model,
                 f"P >= {p:g}" if p is not None else f"similarity >= {cos:g} (uncalibrated)", ", ".join(cams or ["all"]))
        return self.entry(entry_id)

    def _threshold(self, model: str, p: float | None, cos: float | None) -> tuple[float | None, float]:
        cal = self.calibration_of(model)
        if cal is None:
            if p is not None:
                raise ValueError(f"model version {model!r} has no calibration: give min_similarity (cosine) instead of "
                                 "min_probability, or calibrate the model (crossview calibrate)")
            return None, self.cfg.default_similarity if cos is None else cos
        if cos is not None and p is None:
            return float(cal.probability(cos)), cos
        p = self.cfg.default_probability if p is None else p
        cos = cal.cosine_at(p)
        if cos is None:
            raise ValueError(f"model version {model!r}: its calibration never reaches P {p:g}; ask for a lower probability")
        return p, cos

    def remove(self, entry_id: int) -> bool:
        with self._lock:
            gone = self._db.run("DELETE FROM entries WHERE id = ?", (entry_id,)) > 0
            self._rebuild_locked()
        if gone:
            log.info("watchlist: entry %d removed", entry_id)
        return gone

    def entry(self, entry_id: int) -> Entry | None:
        rows = self._entries("WHERE id = ?", (entry_id,))
        return rows[0] if rows else None

    @property
    def size(self) -> int:
        """Entries on the watchlist, from the indexes in memory (no query: stats and /metrics read it)."""
        return sum(len(part.entries) for part in self._parts.values())

    def entries(self) -> list[Entry]:
        return self._entries("ORDER BY id", ())

    def _entries(self, where: str, args: tuple) -> list[Entry]:
        with self._lock:
            rows = self._db.all(f"SELECT {_ENTRY_COLUMNS} FROM entries {where}", args)
        return [_entry(r) for r in rows]

    def _rebuild(self) -> None:
        with self._lock:
            self._rebuild_locked()

    def _refresh(self) -> None:
        """Rebuild the indexes if another matcher on the database added or removed an entry."""
        with self._lock:
            if self._db.one(_SEEN) != self._seen:
                self._rebuild_locked()

    def _rebuild_locked(self) -> None:
        """The per-model indexes from the table: entries change rarely, so a rebuild (milliseconds) is simplest."""
        by_model: dict[str, list[tuple[Entry, bytes]]] = {}
        self._seen = self._db.one(_SEEN)
        for r in self._db.all(f"SELECT {_ENTRY_COLUMNS}, vec FROM entries ORDER BY id"):
            e = _entry(r)
            by_model.setdefault(e.model, []).append((e, r[8]))
        self._parts = {model: _Partition([e for e, _ in rows], np.frombuffer(b"".join(v for _, v in rows), np.float32)
                                         .reshape(len(rows), -1))
                       for model, rows in by_model.items()}

    # -- checks and alerts ---------------------------------------------------------------------

    def check(self, model: str, ids: np.ndarray, sightings: Sequence[Sighting], vecs: np.ndarray,
              records_of: Callable[[list[int]], dict[int, SightingRecord]]) -> list[Alert]:
        """Alerts for the sightings of one model version's batch (committed, so `records_of` finds them): one
        search of the batch against the version's entries; a track alerts an entry once."""
        self._refresh()
        hits = self._hits(model, [(s.node, s.camera, s.track) for s in sightings], vecs)
        if not hits:
            return []
        records = records_of([int(ids[i]) for i, _, _ in hits])
        with self._lock:
            new = self._store_alerts(model, ids, hits, records)
        self._announce(new)
        return new

    def check_stored(self, store: SqlStore) -> list[Alert]:
        """Alerts for the store's sightings above the shared cursor (`checked`), which moves in the transaction that
        stores them: replicas on one PostgreSQL check each sighting once site-wide, whoever ingested it and whichever
        replica holds the lease now (the module's lock keeps two checks from overlapping). The cursor starts at
        `start_checks`: history is not checked."""
        self._refresh()
        with self._lock, self._db.transaction():
            (upto,) = self._db.one("SELECT upto FROM checked")
            top = min(store.next_id() - 1, upto + _CHECK_IDS)
            new = []
            for model in list(self._parts):
                for ids, vecs in store.vectors(model, after_id=upto, upto_id=top):
                    records = store.records(ids)  # a row deleted meanwhile (retention) raises nothing
                    keys = [(r.node, r.camera, r.track) if (r := records.get(int(i))) else (None, None, i) for i in ids]
                    new += self._store_alerts(model, ids, self._hits(model, keys, vecs), records)
            if top != upto:
                self._db.run("UPDATE checked SET upto = ?", (top,))
        self._announce(new)
        return new

    def start_checks(self, store: SqlStore) -> None:
        """The shared cursor at the store's top unless it has one: from now on `check_stored` sees every sighting."""
        self._db.run("UPDATE checked SET upto = ? WHERE upto IS NULL", (store.next_id() - 1,))

    def _hits(self, model: str, keys: list[tuple], vecs: np.ndarray) -> list[tuple[int, Entry, float]]:
        """(row, entry, similarity) over an entry's threshold, rows keyed (node, camera, edge track) like `keys`."""
        part = self._parts.get(model)
        if part is None or not len(keys) or part.index.d != vecs.shape[1]:
            return []
        # A track's sightings in one batch: only its newest is searched (edges send the track's running mean
        # embedding, so the newest is its best estimate): a tenth of the work for tracks seen at 10 fps.
        newest = list({key: i for i, key in enumerate(keys)}.values())
        k = min(_HITS_PER_SIGHTING, part.index.ntotal)
        scores, rows = part.index.search(np.ascontiguousarray(vecs[newest], np.float32), k)
        hits = []
        for n, j in zip(*np.nonzero(scores >= part.min_similarity[rows])):
            entry, i = part.entries[rows[n, j]], newest[n]
            if entry.cameras is None or keys[i][1] in entry.cameras:
                hits.append((i, entry, float(scores[n, j])))
        return hits

    def _store_alerts(self, model: str, ids: np.ndarray, hits: list[tuple[int, Entry, float]],
                      records: dict[int, SightingRecord]) -> list[Alert]:
        """The hits as alerts, under `_lock`: one per entry and track (the table's UNIQUE), so a repeat is no alert."""
        cal, new = self.calibration_of(model), []
        for i, entry, score in hits:
            rec = records.get(int(ids[i]))
            if rec is None:  # deleted meanwhile (retention)
                continue
            p = float(cal.probability(score)) if cal is not None and entry.min_probability is not None else None
            row = self._db.one(
                "INSERT INTO alerts (entry, name, sighting, node, camera, track, track_id, ts, similarity, probability, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                (entry.id, entry.name, rec.id, rec.node, rec.camera, rec.track, rec.track_id, rec.ts, score, p, time.time()))
            if row is not None:
                new.append(self._alert(row[0]))
        return new

    def _announce(self, new: list[Alert]) -> None:
        """Log new alerts and hand them to the listeners (the webhooks), once committed."""
        if not new:
            return
        self.alerted += len(new)
        for a in new:
            log.warning("ALERT %d: %r seen on %s (node %s, track %d) at %s, %s", a.id, a.name, a.camera, a.node, a.track,
                        time.strftime("%H:%M:%S", time.localtime(a.ts)),
                        f"P {a.probability:.2f}" if a.probability is not None else f"similarity {a.similarity:.2f}")
        for listener in self._listeners:
            listener(new)

    def _alert(self, alert_id: int) -> Alert:
        return Alert(*self._db.one(f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id = ?", (alert_id,)))

    def alerts(self, after: int = 0, limit: int = 100) -> list[Alert]:
        """Alerts with an id above `after`, oldest first: a client polls with the last id it has."""
        with self._lock:
            rows = self._db.all(f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
        return [Alert(*r) for r in rows]

    def expire(self, before: float) -> int:
        """Delete alerts of sightings older than `before` (retention: an alert says who was where)."""
        with self._lock:
            n = self._db.run("DELETE FROM alerts WHERE ts < ?", (before,))
            if n:
                self._db.purge("alerts")
            return n


_SEEN = "SELECT COUNT(*), MAX(id) FROM entries"
_ENTRY_COLUMNS = "id, name, model, min_probability, min_similarity, cameras, origin, created"


def _entry(r: Sequence) -> Entry:
    """An `Entry` from a row that starts with `_ENTRY_COLUMNS`."""
    return Entry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else None, json.loads(r[6]), r[7])


_ALERT_COLUMNS = "id, entry, name, sighting, node, camera, track, track_id, ts, similarity, probability, created"
