"""Central matcher: ingests the edge nodes' sightings and answers where else a person was seen.

| module     | job                                                                           |
|------------|-------------------------------------------------------------------------------|
| `ingest`   | ZeroMQ receiver: validates wire messages, counts and drops the rest           |
| `store`    | SQLite (WAL): sightings, embeddings, thumbnails, deletion log                  |
| `index`    | FAISS partitions per model version: exact → IVF/HNSW, snapshots, recovery     |
| `query`    | filters, over-fetch, grouping into tracks, result types                        |
| `service`  | the `Matcher` facade and its threads (ingest, snapshots, retention)           |
| `metrics`  | Prometheus series from the matcher's counters                                  |

    >>> m = Matcher(load_matcher_config("configs/matcher.yaml")); m.start()
    $ crossview matcher --config configs/matcher.yaml
    $ crossview query --data-dir var/matcher --track edge-1:gate:17 --json
"""
