"""Milvus collections, one per embedding-model version: `index.engine: milvus`, the same interface as `matcher.index.Index`.

| what        | how                                                                                          |
|-------------|----------------------------------------------------------------------------------------------|
| collection  | `<prefix>_<version>_<hash>` (the version made safe for Milvus, a hash of its exact name): `id` INT64 |
|             | primary key = the store's sighting id, `camera` VARCHAR, the partition key, and `vec`; the version's |
|             | exact name is the collection's description                                                    |
| metric      | inner product on the unit vectors (cosine similarity); `index.milvus.index_type` per sealed segment |
| cameras     | `search(..., cameras=)` filters on the partition key, so only those cameras' partitions are searched |
| consistency | `index.milvus.consistency`; Session (the default): a search sees every insert this client made, so |
|             | what ingest counted is findable; Strong sees other replicas' too, at one time tick (~200 ms) a search |
|             | Counting a collection (opening it, recovery) is Strong whatever the setting: pymilvus keeps Session's |
|             | write times per process, so a restarted matcher's Session count is an eventual one, which missed the |
|             | killed one's last writes (`tests/test_matcher_durability.py`'s kill test: a size off after recovery) |
| removal     | `delete` by ids, as the store commits deletions                                               |
| TTL         | `collection.ttl.seconds` = `retention.max_age_hours` (rounded up), set when a collection is made and |
|             | brought in line when a matcher (not a read-only reader) opens one, "0" (Milvus: no expiry) once  |
|             | retention has no max age; no retention, no property. A backstop: retention's deletes stay the   |
|             | mechanism (they remove a sighting when it is past its age, from the store too). The TTL counts from |
|             | the insert, so it ends a vector no sooner than its sighting's retention would (a re-embedded or |
|             | recovered one later). Both servers here take the property; the 2.3.5 standalone expires rows at |
|             | compaction of sealed segments (a 2 s TTL left a fresh row counted 4 s on), Milvus Lite 3.2.2 keeps |
|             | the property but never expires                                                                 |
| writes      | `upsert` by id, so a row written twice (a restarting replica's recovery inserting what another's ingest |
|             | just wrote) stays one row; plain `insert` on Milvus 2.3 servers, whose upsert puts a partition-key |
|             | collection's rows in the wrong partition (milvus-io/milvus#30607, measured on 2.3.5: a camera filter |
|             | then finds none). There a row written twice is held twice: searches and queries return it once, |
|             | but `count(*)` counts both, so each recovery finds the count off and compares every id again |
| durability  | Milvus's own (its log, then object storage). The matcher keeps no snapshot: `save()` writes nothing, |
|             | and the deletion log may be pruned up to what was applied                                     |
| recovery    | `recover()`: each version's collection count against the store's; where they differ (a matcher killed |
|             | between the store commit and the Milvus insert, or between a store deletion and Milvus's), the ids |
|             | are compared: what the store holds and Milvus lacks is inserted from the store, what Milvus holds   |
|             | and the store no longer has is deleted. So a kill loses nothing and resurrects nothing           |
| production  | `production(model)`, once a new production version's migration is done: the alias `<prefix>_production` |
|             | is moved to its collection, for readers outside the matcher (the matcher's queries name their version) |
| drop        | `drop(model)`: the version's collection goes                                                  |
| clients     | one pymilvus `MilvusClient` for a server or cluster (`uri`) and for Milvus Lite (`lite_file`)    |
| replicas    | matchers on one store share the collections: a version another replica's ingest created is opened, |
|             | and one the migrating replica dropped is forgotten, within a second (`open_stored`, which never |
|             | makes one); Session consistency sees the others' inserts only once this client's own guarantee |
|             | time passes them, so replicas that must answer alike at once use Strong or Bounded. A         |
|             | collection's `size` (stats, metrics) is Milvus's count when this replica opened it plus its own |
|             | adds and removals, so replicas show different sizes (measured, `tests/test_replicas.py`'s kill |
|             | test: 560 and 530 for one collection of 560); searches are not affected                      |

    index = MilvusIndex(cfg.index, store)                # cfg.index.engine == "milvus"
    index.recover()
    index.add("osnet-3", ids, vecs)                      # once committed: cameras come from the store
    scores, ids = index.search("osnet-3", query_vec, k=80, cameras=["gate"])
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from crossview.kernel.config import IndexConfig, read_secret
from crossview.kernel.wire import MAX_ID_LEN
from crossview.matcher.index import VectorIndex, _key
from crossview.matcher.store import Store

log = logging.getLogger(__name__)

TOPK_MAX = 16384  # Milvus answers at most this many hits a search: a bigger k gets this many
_INSERT_ROWS = 5000  # rows per insert: well below Milvus's message size limit for 4096-d vectors
_ID_PAGE = 10000
_NUM_PARTITIONS = 64  # partition-key buckets the cameras hash into
TTL_KEY = "collection.ttl.seconds"


def upserts_by_key(version: str) -> bool:
    """Whether a server of `version` upserts into a partition-key collection correctly: Milvus Lite, or 2.4 and later
    (the fix, milvus-io/milvus#30772, came after 2.3.5 and before 2.4.0)."""
    if version.startswith("milvus_lite"):
        return True
    major_minor = re.match(r"v?(\d+)\.(\d+)", version)
    return major_minor is not None and (int(major_minor[1]), int(major_minor[2])) >= (2, 4)


def collection_name(prefix: str, model: str) -> str:
    return f"{prefix}_{_key(model, r'[^A-Za-z0-9_]', '_')}"


class Collection:
    """One model version's collection. `size` is counted here: Milvus's count at recovery, then adds and removals."""

    kind = "milvus"

    def __init__(self, model: str, dim: int, name: str, size: int = 0):
        self.model, self.dim, self.name, self.size = model, dim, name, size

    def stats(self) -> dict:
        return {"size": self.size, "kind": self.kind, "dim": self.dim, "rebuilding": False}


class MilvusIndex(VectorIndex):
    def __init__(self, cfg: IndexConfig, store: Store, read_only: bool = False, max_age_s: float | None = None):
        from pymilvus import MilvusClient  # the milvus extra

        super().__init__(cfg, store, read_only)
        self.mcfg = cfg.milvus
        self.ttl_s = math.ceil(max_age_s) if max_age_s else None  # the collections' TTL: retention's max age
        token = read_secret(self.mcfg.token_file, "index.milvus.token_file", "token") if self.mcfg.token_file else ""
        with self._reaching():
            self.client = MilvusClient(uri=self.mcfg.uri or str(self.mcfg.lite_file), token=token, timeout=self.mcfg.timeout_s)
            self._write = self.client.upsert if upserts_by_key(self.client.get_server_version()) else self.client.insert
        self.partitions: dict[str, Collection] = {}
        self._lock = threading.Lock()  # creating a collection, and counting

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """Milvus's errors at start (unreachable, refused, a wrong token) as a ConnectionError naming the section."""
        from pymilvus import MilvusException

        try:
            yield
        except MilvusException as e:
            raise ConnectionError(f"index.milvus: {self.mcfg.shown}: {e.message or type(e).__name__}") from None

    # -- collections -----------------------------------------------------------------------------

    def _open(self, model: str, dim: int) -> Collection:
        """The version's collection, created if missing; one of another dimension is an error."""
        name = collection_name(self.mcfg.collection_prefix, model)
        if not self.client.has_collection(name):
            if self.read_only:
                return Collection(model, dim, name)
            self._create(name, model, dim)
        else:
            described = self.client.describe_collection(name)
            have = next(f["params"]["dim"] for f in described["fields"] if f["name"] == "vec")
            if int(have) != dim:
                raise ValueError(f"Milvus collection {name} holds {have}-d vectors, model version {model!r} has {dim}-d")
            if not self.read_only:
                self._keep_ttl(name, described.get("properties") or {})
            if not self.client.list_indexes(name):  # made by a matcher killed before it could index it
                if self.read_only:
                    return Collection(model, dim, name)
                self.client.create_index(name, self._index_params())
                log.warning("Milvus collection %s had no index (its maker was stopped mid-creation): indexed now", name)
        self.client.load_collection(name)
        return Collection(model, dim, name, self._count(name))

    def _create(self, name: str, model: str, dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=model[:255])
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("camera", DataType.VARCHAR, max_length=4 * MAX_ID_LEN, is_partition_key=True)  # UTF-8 bytes
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
        self.client.create_collection(name, schema=schema, index_params=self._index_params(), num_partitions=_NUM_PARTITIONS,
                                      consistency_level=self.mcfg.consistency,
                                      properties={TTL_KEY: self.ttl_s} if self.ttl_s else None)
        log.info("Milvus collection %s created for model version %s (%d-d, %s%s)", name, model, dim, self.mcfg.index_type,
                 f", TTL {self.ttl_s} s" if self.ttl_s else "")

    def _keep_ttl(self, name: str, properties: dict) -> None:
        """Bring an existing collection's TTL in line with retention's max age (changed since it was made). Without one,
        "0" rather than dropping the property: Milvus 2.3 cannot drop a property, and 0 means no expiry on every server."""
        have, want = properties.get(TTL_KEY), str(self.ttl_s) if self.ttl_s else None
        if have == want or (want is None and have in (None, "0")):
            return
        self.client.alter_collection_properties(name, {TTL_KEY: want or "0"})
        log.info("Milvus collection %s: TTL %s s, was %s (retention.max_age_hours)", name, want or "none", have or "none")

    def _index_params(self):
        params = self.client.prepare_index_params()
        params.add_index(field_name="vec", index_type=self.mcfg.index_type, metric_type="IP", params=self._build_params())
        return params

    def _build_params(self) -> dict:
        if self.mcfg.index_type == "HNSW":
            return {"M": self.cfg.hnsw_m, "efConstruction": max(2 * self.cfg.hnsw_m, 100)}
        return {"nlist": self.mcfg.nlist} if self.mcfg.index_type == "IVF_FLAT" else {}

    def _search_params(self, k: int) -> dict:
        if self.mcfg.index_type == "HNSW":
            return {"metric_type": "IP", "params": {"ef": max(self.cfg.hnsw_ef_search, k)}}
        if self.mcfg.index_type == "IVF_FLAT":
            return {"metric_type": "IP", "params": {"nprobe": min(self.cfg.nprobe, self.mcfg.nlist)}}
        return {"metric_type": "IP"}

    def _count(self, name: str) -> int:
        rows = self.client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def _collection(self, model: str, dim: int) -> Collection:
        with self._lock:
            c = self.partitions.get(model)
            if c is None:
                c = self.partitions[model] = self._open(model, dim)
        return c

    def open_stored(self) -> None:
        """Follow the collections other replicas made or dropped (the service calls this every second with a shared
        store): open those of versions the store holds that this index has not met (made by another's ingest), and
        forget those that are gone (dropped by the migrating replica). A missing one is never made here: the store
        lists a dropped version until its vectors are deleted, and its collection must not come back meanwhile."""
        held = set(self.client.list_collections())
        for model, c in list(self.partitions.items()):
            if c.name not in held:
                with self._lock:
                    self.partitions.pop(model, None)
                log.info("Milvus collection %s of model version %s dropped by another replica", c.name, model)
        for model, dim in self.store.models().items():
            if model not in self.partitions and collection_name(self.mcfg.collection_prefix, model) in held:
                self._collection(model, dim)

    # -- changes ---------------------------------------------------------------------------------

    def add(self, model: str, ids: np.ndarray, vecs: np.ndarray, seq: int | None = None) -> None:
        """Committed sightings of `model`, or (`seq`) older ones it re-embedded: their cameras are read from the store."""
        c = self._collection(model, vecs.shape[1])
        self._insert(c, np.asarray(ids, np.int64), vecs)

    def _insert(self, c: Collection, ids: np.ndarray, vecs: np.ndarray) -> int:
        """Write rows whose sightings the store still holds (a deletion may have come between); returns how many."""
        n = 0
        for at in range(0, len(ids), _INSERT_ROWS):
            chunk = ids[at: at + _INSERT_ROWS].tolist()
            records = self.store.records(chunk)
            rows = [{"id": i, "camera": records[i].camera, "vec": v}
                    for i, v in zip(chunk, vecs[at: at + _INSERT_ROWS].tolist()) if i in records]
            if rows:
                self._write(c.name, rows)
                n += len(rows)
        with self._lock:
            c.size += n
        return n

    def remove(self, by_model: dict[str, list[int]], del_pos: int) -> None:
        """Apply deletions the store committed up to log position `del_pos`."""
        for model, ids in by_model.items():
            if (c := self.partitions.get(model)) is not None and ids:
                self._delete(c, [int(i) for i in ids])
        self.del_pos = max(self.del_pos, del_pos)

    def _delete(self, c: Collection, ids: list[int]) -> None:
        for at in range(0, len(ids), _INSERT_ROWS):
            self.client.delete(c.name, ids=ids[at: at + _INSERT_ROWS])
        with self._lock:
            c.size = max(0, c.size - len(ids))  # the store deleted them, so they were here

    def drop(self, model: str) -> bool:
        """Drop a version's collection; False if it had none. Its vectors in the store are the caller's."""
        with self._lock:
            c = self.partitions.pop(model, None)
        if c is None:
            return False
        self.client.drop_collection(c.name)
        log.info("Milvus collection %s of model version %s dropped", c.name, model)
        return True

    def production(self, model: str) -> None:
        alias = f"{self.mcfg.collection_prefix}_production"
        if (c := self.partitions.get(model)) is None:
            return  # no sighting of it yet: the alias stays where it was
        if alias in self.client.list_aliases(c.name).get("aliases", []):
            return
        from pymilvus import MilvusException

        try:
            self.client.alter_alias(c.name, alias)
        except MilvusException:  # no such alias yet
            self.client.create_alias(c.name, alias)
        log.info("Milvus alias %s -> %s (model version %s)", alias, c.name, model)

    # -- queries ---------------------------------------------------------------------------------

    def search(self, model: str, vec: np.ndarray, k: int, cameras: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) best first, at most min(k, TOPK_MAX); with `cameras`, of those cameras' sightings only."""
        c = self.partition(model)
        vec = self.query_vector(model, vec)
        k = min(k, TOPK_MAX)
        if k <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        where = f"camera in {json.dumps(list(cameras), ensure_ascii=False)}" if cameras else ""
        [hits] = self.client.search(c.name, data=[vec.tolist()], limit=k, filter=where, anns_field="vec",
                                    search_params=self._search_params(k))
        return (np.fromiter((h["distance"] for h in hits), np.float32, len(hits)),
                np.fromiter((h["id"] for h in hits), np.int64, len(hits)))

    # -- what the FAISS index has and Milvus does itself -------------------------------------------

    def rebuilding(self, model: str) -> bool:
        return False  # Milvus builds its segment indexes itself; searches never wait for them

    def wait_rebuilds(self, timeout: float | None = None) -> bool:
        return True

    def save(self) -> int:
        return 0  # Milvus is durable on its own: nothing to snapshot

    def snapshot_deletion_pos(self) -> int:
        return self.del_pos  # applied to Milvus when committed; recovery compares ids, not the log

    def close(self, timeout: float = 30.0) -> None:
        self.client.close()

    # -- recovery --------------------------------------------------------------------------------

    def recover(self) -> None:
        """Open every stored version's collection and make it hold exactly the store's vectors of that version."""
        t0 = time.monotonic()
        with self._reaching():
            for model, dim in self.store.models().items():
                c = self._collection(model, dim)
                stored = self.store.count(model, None, None, None, limit=2**62)
                if stored != c.size and not self.read_only:
                    self._reconcile(c)
        self.del_pos = self.store.last_deletion()
        summary = ", ".join(f"{m} {c.size}" for m, c in sorted(self.partitions.items())) or "empty"
        log.info("Milvus index (%s) recovered in %.1f s: %s", self.mcfg.shown, time.monotonic() - t0, summary)

    def _reconcile(self, c: Collection) -> None:
        held = np.fromiter(self._ids(c.name), np.int64)
        kept, added = [], 0
        for ids, vecs in self.stored_chunks(c.model):
            kept.append(ids)
            missing = ~np.isin(ids, held)
            if missing.any():
                added += self._insert(c, ids[missing], vecs[missing])
        gone = np.setdiff1d(held, np.concatenate(kept) if kept else held[:0]).tolist()
        if gone:
            self._delete(c, gone)
        with self._lock:
            c.size = self._count(c.name)
        log.info("Milvus collection %s: %d inserted from the store, %d deleted ones removed (%d held)",
                 c.name, added, len(gone), c.size)

    def _ids(self, name: str) -> Iterator[int]:
        """Every primary key in the collection, a page at a time."""
        it = self.client.query_iterator(name, batch_size=_ID_PAGE, filter="", output_fields=["id"])
        try:
            while page := it.next():
                yield from (r["id"] for r in page)
        finally:
            it.close()
