"""Matcher metrics for Prometheus, read from the matcher's own counters at scrape time (one source of truth).

| series                                    | labels                                   |
|-------------------------------------------|------------------------------------------|
| `crossview_matcher_accepted_total`        | camera                                   |
| `crossview_matcher_rejected_total`        | reason (one of the fixed `wire.REASONS`) |
| `crossview_matcher_partition_size`        | model, kind                              |
| `crossview_matcher_edges`                 | state (online, offline: `matcher.edges`)  |
| `crossview_matcher_cameras`               | state (online, stalled, offline)         |
| `crossview_matcher_ingest_batch_seconds`  | (histogram: one batch, from its commit's start until searchable) |
| `crossview_matcher_harvest_crops` / `_harvest_bytes` | crops in the harvest store now, and their JPEGs' size |
| `crossview_matcher_harvest_uploads_total` | status (stored, duplicate, expired, refused): uploaded crops since start |
| `crossview_matcher_harvest_dropped_total` | crops deleted to stay within `harvest.quota_mb` since start |
| `crossview_matcher_migration_sightings`   | model, state (migrated, remaining, without_thumbnail): the gallery's re-embedding by the production version |
| `crossview_matcher_migration_running`     | model: 1 while it re-embeds, 0 once done                    |
| `crossview_matcher_migration_rate`        | model: thumbnails re-embedded per second (this run)        |

    m = MatcherMetrics(matcher.stats); m.serve(9200)   # http://127.0.0.1:9200/metrics
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_BATCH_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class _FromStats:
    """A custom collector: turns `stats()` into metric families when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        accepted = CounterMetricFamily("crossview_matcher_accepted", "Sightings committed to the store", labels=["camera"])
        for camera, n in sorted(s["cameras"].items()):
            accepted.add_metric([camera], n)
        rejected = CounterMetricFamily("crossview_matcher_rejected", "Messages dropped, by reason", labels=["reason"])
        for reason, n in sorted(s["rejected"].items()):
            rejected.add_metric([reason], n)
        size = GaugeMetricFamily("crossview_matcher_partition_size", "Vectors searchable per model version",
                                 labels=["model", "kind"])
        for model, p in s["partitions"].items():
            size.add_metric([model, p["kind"]], p["size"])
        status = [GaugeMetricFamily(f"crossview_matcher_{what}", f"{what.capitalize()} by state, from their heartbeats",
                                    labels=["state"]) for what in s["status"]]
        for family, counts in zip(status, s["status"].values()):
            for state, n in counts.items():
                family.add_metric([state], n)
        yield from (accepted, rejected, size, *status, *_harvest(s["harvest"]), *_migration(s["migration"]))


def _migration(m: dict | None) -> list[Metric]:
    if m is None:  # no production version yet
        return []
    counts = GaugeMetricFamily("crossview_matcher_migration_sightings", "Earlier sightings and the production version's "
                               "re-embedding of them", labels=["model", "state"])
    for state, n in (("migrated", m["migrated"]), ("remaining", max(0, m["total"] - m["migrated"])),
                     ("without_thumbnail", m["without_thumbnail"])):
        counts.add_metric([m["model"], state], n)
    running = GaugeMetricFamily("crossview_matcher_migration_running", "1 while the gallery is re-embedded, 0 once done",
                                labels=["model"])
    running.add_metric([m["model"]], float(m["state"] == "migrating"))
    rate = GaugeMetricFamily("crossview_matcher_migration_rate", "Thumbnails re-embedded per second", labels=["model"])
    rate.add_metric([m["model"]], m["per_second"])
    return [counts, running, rate]


def _harvest(h: dict) -> list[Metric]:
    uploads = CounterMetricFamily("crossview_matcher_harvest_uploads", "Harvested crops uploaded, by answer",
                                  labels=["status"])
    for status in ("stored", "duplicate", "expired", "refused"):
        uploads.add_metric([status], h[status])
    return [GaugeMetricFamily("crossview_matcher_harvest_crops", "Crops in the harvest store", value=h["crops"]),
            GaugeMetricFamily("crossview_matcher_harvest_bytes", "Their JPEGs' size", value=h["bytes"]), uploads,
            CounterMetricFamily("crossview_matcher_harvest_dropped", "Crops deleted to stay within harvest.quota_mb",
                                value=h["dropped"])]


class MatcherMetrics:
    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(_FromStats(stats))
        self.batch_seconds = Histogram("crossview_matcher_ingest_batch_seconds",
                                       "One ingest batch from its commit's start until searchable",
                                       buckets=_BATCH_BUCKETS, registry=self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0
