"""Central matcher: ingests the edge nodes' sightings and answers where else a person was seen.

| module     | job                                                                           |
|------------|-------------------------------------------------------------------------------|
| `ingest`   | the ingest pipeline: ZeroMQ receive → checks → SQLite commit → index, counts  |
| `tracks`   | which track a new sighting continues (matcher track ids)                      |
| `store`    | SQLite (WAL): sightings, embeddings, thumbnails, deletion log                  |
| `pgstore`  | `store.kind: postgres`: the same store on PostgreSQL                           |
| `sqldb`    | the other databases (registry, watchlist, webhooks, users, audit, harvest, edges) on either engine |
| `index`    | FAISS partitions per model version: exact → IVF/HNSW, snapshots, recovery     |
| `milvus_index` | `index.engine: milvus`: a Milvus collection per model version, the same interface |
| `query`    | the query engine: filters, over-fetch, grouping into tracks                    |
| `results`  | what queries answer with (`SightingRecord`, `TrackHit`, `QueryResult`); stdlib only |
| `service`  | `Matcher`: starts ingest and maintenance (snapshots, retention), holds the queries |
| `harvest`  | the person crops edges upload, for the adapt job: SQLite index + JPEGs, quota, retention |
| `metrics`  | Prometheus series from the matcher's counters                                  |
| `api`, `schemas`, `client` | the HTTP API and web page, its bodies, a client for it            |

    m = Matcher(load_matcher_config("configs/matcher.yaml")); m.start()
    m.queries.search_sighting(123)
    $ crossview matcher --config configs/matcher.yaml
    $ crossview query --data-dir var/matcher --track edge-1:gate:17 --json
"""
