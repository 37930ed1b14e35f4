"""The store's tail into a FAISS index: with several matcher replicas on one PostgreSQL, each replica's own index
holds every replica's sightings, so any replica gives the same answer.

| what          | how                                                                                    |
|---------------|----------------------------------------------------------------------------------------|
| the feed      | the only writer of new sightings to the index (the ingest pipeline calls `poll()` after |
|               | each commit instead of adding its batch; a thread calls it every `interval_s` for the   |
|               | other replicas'): the store's rows above `upto` in id order, by model version           |
| why in order  | `PgStore.insert_new` commits the replicas' batches one after another in id order, so a  |
|               | row seen means every lower id is committed: reading by id misses nothing, and a         |
|               | partition's `max_id` keeps meaning "everything up to here is in" (snapshots, rebuilds   |
|               | and recovery rely on it, as with one writer)                                            |
| start         | `upto` is the store's top before `Index.recover()` read it; a row above it that recovery |
|               | already added is at or below its partition's `max_id`, and skipped                      |
| re-embedded   | what the migration (one replica, `matcher.lease`) stored for a version above the        |
|               | partition's `mseq` (a new production version's partition starts so), under the          |
|               | migration's lock, which its own adds take too                                            |
| deletions     | the store's deletion log after the index's position: a replica's retention or removal   |
|               | leaves every replica's index; read after the new rows, so a row read just before its   |
|               | deletion is removed again in the same poll                                              |
| drops         | a `log_drop` entry (the migrating replica dropped a replaced version's partition, with   |
|               | the sightings up to an id): the partition goes here too, and what the store holds of that |
|               | version above that id (sent after the drop) is indexed again; a partition whose version |
|               | the store has forgotten goes as well (a replica restarted while another was dropping it) |
| the log kept  | `report()`: the position applied goes to the store, which prunes no further than every  |
|               | live replica's (`PgStore.prune_deletions`)                                              |
| latency       | another replica's sighting is searchable here within `interval_s` (1 s by default) of  |
|               | its commit; one's own, when its batch is counted accepted, as without replicas         |

    tail = StoreTail(store, index, migration.lock, name="host-1:/var/matcher", on_dropped=pipeline.forget_model)
    tail.poll()            # what the store holds beyond the index, added; deletions applied
    tail.report()          # the deletion-log position applied, so the log is kept for this replica until then
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable

import numpy as np

from crossview.matcher.index import Index
from crossview.matcher.store import Store
from crossview.matcher.storecommon import by_model

log = logging.getLogger(__name__)


class StoreTail:
    def __init__(self, store: Store, index: Index, migrating: threading.Lock, name: str,
                 on_dropped: Callable[[str], None] = lambda model: None):
        self.store, self.index, self._migrating = store, index, migrating
        self.on_dropped = on_dropped  # a version's partition went here and nothing of it is left: ingest counts it no more
        self.name = name  # this replica in the store's `replica_positions`: the same across its restarts
        self.upto = index.recovered_upto  # every sighting up to this id is in the index
        self.added = 0  # sightings added since start (own and the other replicas')
        self._lock = threading.Lock()  # one poll at a time: the pipeline's and the timer's

    def poll(self) -> int:
        """Add what the store holds beyond the index, apply deletions logged since; how many sightings were added."""
        with self._lock:
            top = self.store.next_id() - 1  # first: every id up to it is committed (see the module docstring)
            added = sum(self._sightings(model, top) for model in self.store.models()) if top > self.upto else 0
            self.upto = max(self.upto, top)
            with self._migrating:  # the migration adds no partition meanwhile: one the store no longer lists is gone
                stored = self.store.models()
                for model in stored:
                    self._reembedded(model)
                for model in set(self.index.partitions) - set(stored):
                    self._dropped(model, self.upto)
            self._deletions()
            self.added += added
            return added

    def report(self) -> None:
        """Tell the store the deletion-log position this index has applied: it prunes the log no further."""
        self.store.report_position(self.name, self.index.del_pos)

    def _sightings(self, model: str, top: int) -> int:
        held = self.index.partitions.get(model)
        return self._add_stored(model, max(self.upto, held.max_id if held else 0), top)

    def _add_stored(self, model: str, after_id: int, upto_id: int) -> int:
        """Index the store's sightings of `model` with after_id < id <= upto_id; how many."""
        n = 0
        for ids, vecs in self.store.vectors(model, after_id=after_id, upto_id=upto_id):
            self.index.add(model, ids, vecs)
            n += len(ids)
        return n

    def _reembedded(self, model: str) -> None:
        """A version's vectors the migration stored beyond the partition's; a new version's only vectors at first."""
        p = self.index.partitions.get(model)
        for ids, vecs, seq in self.store.reembedded_vectors(model, after_seq=p.mseq if p else 0):
            self.index.add(model, ids, vecs, seq)

    def _dropped(self, model: str, upto: int) -> None:
        """Drop a version's partition, then index again what the store holds of it above sighting id `upto`."""
        if not self.index.drop(model):
            return
        again = self._add_stored(model, upto, self.upto) if upto < self.upto else 0
        if not again:
            self.on_dropped(model)
        log.info("partition %s dropped, its version dropped from the store (%d sightings of it sent since kept)", model, again)

    def _deletions(self) -> None:
        rows = self.store.deletions_after(self.index.del_pos)
        for dropping, run in itertools.groupby(rows, key=lambda row: row[1] < 0):  # in log order: drops and deletions
            run = list(run)
            if dropping:
                for _, upto, model in run:
                    self._dropped(model, -upto)
                self.index.remove({}, run[-1][0])
            else:
                self._remove(run)

    def _remove(self, rows: list[tuple[int, int, str]]) -> None:
        held = {}
        for model, ids in by_model([(i, model) for _, i, model in rows]).items():
            if (p := self.index.partitions.get(model)) is not None:
                ids = np.asarray(ids, np.int64)
                held[model] = ids[p.holds(ids)].tolist()
        self.index.remove(held, rows[-1][0])
