"""Central matcher: ingests the edge nodes' sightings and answers where else a person was seen.

`ingest` receives and validates the wire messages; indexing, storage and queries build on it.
"""
