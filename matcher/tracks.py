"""Matcher track ids: which earlier sighting's track a new one continues, decided before its batch is stored.

| what      | how                                                                                       |
|-----------|-------------------------------------------------------------------------------------------|
| track id  | the id of the track's first sighting; tracks are edge tracks (node, camera, track, model)  |
| gaps      | an edge track id seen again after `gap_s` starts a new track (edge ids restart with the node) |
| memory    | every track within `gap_s` of its node's newest sighting (nodes' clocks may differ), loaded |
|           | from the store at start: all a new sighting can continue, so assigning costs no query     |
| rollback  | `assign()` returns what it decided; `remember()` that only once the batch is committed, so a |
|           | rolled-back batch's track ids are never continued                                         |
| replicas  | `assign(..., ends)`: what the store holds of the batch's edge tracks (`PgStore.insert_new`, in the |
|           | batch's transaction) comes before the memory, which misses what other replicas stored     |

    tracks = Tracks(store, cfg.query.track_gap_s)
    track_ids, seen = tracks.assign(sightings, ids)    # ids: the ones the store is about to give them
    store.insert(ids, sightings, track_ids, vecs)
    tracks.remember(seen)
"""

from __future__ import annotations

from collections.abc import Sequence

from crossview.kernel.wire import Sighting
from crossview.matcher.store import Store

_CACHE = 100_000  # edge tracks remembered before the ones past gap_s are dropped

Key = tuple[str, str, int, str]  # node, camera, edge track id, model version
Seen = dict[Key, tuple[int, float]]  # edge track -> (track id, last ts)


class Tracks:
    def __init__(self, store: Store, gap_s: float):
        self.gap_s = gap_s
        self._newest = store.newest_by_node()  # node -> newest sighting time
        self._tracks: Seen = {}
        if self._newest:
            rows = store.track_ends(min(self._newest.values()) - gap_s)
            self._tracks = {(n, c, t, m): (tid, ts) for n, c, t, m, tid, ts in rows if ts >= self._newest[n] - gap_s}
        self._prune_at = _CACHE

    def assign(self, sightings: Sequence[Sighting], ids: Sequence[int], ends: Seen | None = None) -> tuple[list[int], Seen]:
        """(track id of each sighting, what to `remember()` once they are stored under `ids`); `ends`: the store's
        newest (track id, ts) of edge tracks, newer than the memory where another replica stored since."""
        out, seen, ends = [], {}, ends or {}
        for i, s in zip(ids, sightings):
            key = (s.node, s.camera, s.track, s.model)
            known = seen.get(key) or ends.get(key) or self._tracks.get(key)
            if known and abs(s.ts - known[1]) <= self.gap_s:
                seen[key] = (known[0], max(s.ts, known[1]))
            else:
                seen[key] = (i, s.ts)
            out.append(seen[key][0])
        return out, seen

    def remember(self, seen: Seen) -> None:
        self._tracks.update(seen)
        for (node, *_), (_, ts) in seen.items():
            self._newest[node] = max(ts, self._newest.get(node, ts))
        if len(self._tracks) > self._prune_at:  # drop tracks any new sighting would start afresh anyway
            self._tracks = {k: v for k, v in self._tracks.items() if v[1] >= self._newest[k[0]] - self.gap_s}
            self._prune_at = max(_CACHE, 2 * len(self._tracks))
