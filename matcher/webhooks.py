"""Watchlist alerts POSTed to the configured webhooks: at least once, signed, retried, resumed after a restart.
The file `webhooks.db` in the data directory (the deliveries not yet done) is this module's; with `store.kind:
postgres` the queue is in that database (`matcher.sqldb`), shared by every matcher on it. A pass takes the
deliveries due in one transaction and moves them `timeout_s` + 1 s later before trying them, so two matchers never
try one at once, and one that dies mid-try leaves it due again soon after.

Each alert goes to each webhook as one JSON POST, `{"alert": {...}}` (`watchlist.Alert.to_dict()`), with headers

| header                   | value                                                                        |
|--------------------------|------------------------------------------------------------------------------|
| `X-Crossview-Alert`      | the alert's id: a receiver that sees one twice (a retry after a lost answer) drops it |
| `X-Crossview-Timestamp`  | Unix seconds when this try was signed                                        |
| `X-Crossview-Signature`  | `sha256=` + hex HMAC-SHA256 of `timestamp + "." + body` under the webhook's secret |

A receiver recomputes the signature (`sign()`) and refuses stale timestamps, so a replayed request is
useless. A 2xx answer delivers the alert; anything else, or no answer within `timeout_s`, is tried again
after 1, 2, 4, ... s (at most `watchlist.retry_max_s`), `watchlist.max_attempts` times in all, then given up,
logged and counted. One thread per webhook, so a dead receiver delays no other.

    hooks = Webhooks(data_dir / "webhooks.db", cfg.watchlist, cfg.store)
    watchlist.on_alerts(hooks.enqueue)
    hooks.start(); ...; hooks.stop(); hooks.close()
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from crossview.kernel.config import StoreConfig, WatchlistConfig, WebhookConfig, read_secret
from crossview.matcher.sqldb import WAL_FULL, open_db
from crossview.matcher.watchlist import Alert

log = logging.getLogger(__name__)
_BATCH = 32  # deliveries taken per pass

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    hook TEXT NOT NULL,             -- the webhook's URL
    alert INTEGER NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,
    PRIMARY KEY (hook, alert)
);
"""
MIGRATIONS = [SCHEMA]  # never edit a step: add one


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The `X-Crossview-Signature` value of `body` signed at `timestamp`."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _shown(url: str) -> str:
    """A webhook URL for the log: many carry their credential in the path or query, so only where it goes."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/..."


def _secret(hook: WebhookConfig, n: int) -> bytes:
    if hook.secret is not None:
        return hook.secret.encode()
    return read_secret(hook.secret_file, f"watchlist.webhooks.{n}.secret_file").encode()


class Webhooks:
    def __init__(self, path: Path, cfg: WatchlistConfig, store: StoreConfig | None = None):
        self.cfg = cfg
        self._hooks = [(h, _secret(h, n)) for n, h in enumerate(cfg.webhooks)]
        self._db = open_db("webhooks", path, store, MIGRATIONS, pragmas=WAL_FULL)
        urls = {h.url for h, _ in self._hooks}
        # Deliveries to a webhook no longer configured have nowhere to go.
        dropped = sum(self._db.run("DELETE FROM deliveries WHERE hook = ?", (hook,))
                      for (hook,) in self._db.all("SELECT DISTINCT hook FROM deliveries") if hook not in urls)
        if dropped:
            log.warning("webhooks: %d undelivered alerts dropped: their webhook is no longer configured", dropped)
        self._lock = threading.Lock()
        self._wake = [threading.Event() for _ in self._hooks]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.delivered = self.given_up = self.failures = 0

    def enqueue(self, alerts: list[Alert]) -> None:
        """Queue each alert for every webhook (on disk, so a restart still delivers it)."""
        if not self._hooks:
            return
        now = time.time()
        rows = [(h.url, a.id, json.dumps({"alert": a.to_dict()}).encode(), now) for h, _ in self._hooks for a in alerts]
        with self._lock:
            self._db.many("INSERT INTO deliveries (hook, alert, body, due) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
        for wake in self._wake:
            wake.set()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._db.one("SELECT COUNT(*) FROM deliveries")[0]

    def start(self) -> None:
        for n, (hook, secret) in enumerate(self._hooks):
            t = threading.Thread(target=self._run, args=(hook, secret, self._wake[n]), name=f"webhook-{n}", daemon=True)
            t.start()
            self._threads.append(t)
            log.info("webhook %d: alerts go to %s", n, _shown(hook.url))

    def stop(self) -> None:
        self._stop.set()
        for wake in self._wake:
            wake.set()
        for t in self._threads:
            t.join()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- one thread per webhook ----------------------------------------------------------------

    def _run(self, hook: WebhookConfig, secret: bytes, wake: threading.Event) -> None:
        while not self._stop.is_set():
            try:
                wait = self._pass(hook, secret)
            except self._db.Error as e:  # the database away: what is due stays due, tried again in a second
                log.error("webhook %s: deliveries not read, retried in 1 s: %s", hook.url, e)
                wait = 1.0
            wake.wait(wait)
            wake.clear()

    def _pass(self, hook: WebhookConfig, secret: bytes) -> float:
        """Try what is due; the seconds until the next is due (at most 1)."""
        with self._lock:
            rows = self._take(hook)
        for alert, body, attempts in rows:
            if self._stop.is_set():
                break
            error = self._post(hook, secret, alert, body)
            self._done(hook, alert, attempts + 1, error)
        with self._lock:
            (due,) = self._db.one("SELECT MIN(due) FROM deliveries WHERE hook = ?", (hook.url,))
        return 1.0 if due is None else min(1.0, max(0.0, due - time.time()))

    def _take(self, hook: WebhookConfig) -> list[tuple]:
        """(alert, body, attempts) of the deliveries due, theirs to try until `timeout_s` + 1 s from now."""
        now = time.time()
        with self._db.transaction() as db:
            rows = db.all("SELECT alert, body, attempts FROM deliveries WHERE hook = ? AND due <= ? ORDER BY due LIMIT ?",
                          (hook.url, now, _BATCH))
            db.many("UPDATE deliveries SET due = ? WHERE hook = ? AND alert = ?",
                    [(now + hook.timeout_s + 1, hook.url, alert) for alert, _, _ in rows])
        return [(alert, bytes(body), attempts) for alert, body, attempts in rows]

    def _post(self, hook: WebhookConfig, secret: bytes, alert: int, body: bytes) -> str | None:
        """None once delivered, else what went wrong."""
        ts = str(int(time.time()))
        req = urllib.request.Request(hook.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "X-Crossview-Alert": str(alert), "X-Crossview-Timestamp": ts,
            "X-Crossview-Signature": sign(secret, ts, body)})
        try:
            with urllib.request.urlopen(req, timeout=hook.timeout_s) as res:
                res.read(1 << 16)
                return None
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError) as e:
            return str(getattr(e, "reason", e))

    def _done(self, hook: WebhookConfig, alert: int, attempts: int, error: str | None) -> None:
        with self._lock:
            if error is None or attempts >= self.cfg.max_attempts:
                self._db.run("DELETE FROM deliveries WHERE hook = ? AND alert = ?", (hook.url, alert))
            else:
                due = time.time() + min(2.0 ** (attempts - 1), self.cfg.retry_max_s)
                self._db.run("UPDATE deliveries SET attempts = ?, due = ? WHERE hook = ? AND alert = ?",
                             (attempts, due, hook.url, alert))
        if error is None:
            self.delivered += 1
        elif attempts >= self.cfg.max_attempts:
            self.given_up += 1
            log.error("webhook %s: alert %d given up after %d tries: %s", _shown(hook.url), alert, attempts, error)
        else:
            self.failures += 1
            log.warning("webhook %s: alert %d not delivered (try %d of %d): %s", _shown(hook.url), alert, attempts,
                        self.cfg.max_attempts, error)
