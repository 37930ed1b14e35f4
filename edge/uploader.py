"""Harvested crops to the matcher's harvest store (`matcher.harvest`), deleted here only once it has them.

| what              | how                                                                                     |
|-------------------|-----------------------------------------------------------------------------------------|
| when              | a thread: every `harvest.upload.interval_s`, the folder's crops, oldest first (file time), |
|                   | in batches of `batch` crops (and at most 4 MB)                                          |
| request           | `POST /api/v1/harvest` with the edge token: multipart `crops` (JPEGs) and `sidecars`     |
|                   | (their JSON) pairwise (`kernel.multipart`); the matcher answers for each crop            |
| acknowledged      | `stored`, `duplicate` (it had it already), `expired` (past its retention): the crop, then |
|                   | its sidecar, is deleted here                                                            |
| matcher away      | unreachable, a timeout, 5xx, a refused token: nothing is deleted, the wait doubles up to |
|                   | 32 x `interval_s`, and the same crops go first at the next pass                         |
| refused for good  | a crop the matcher refuses (bad sidecar, not a JPEG, too large), or whose sidecar is unreadable |
|                   | here: moved to `<dir>/.refused/<camera>/`, counted and logged, never sent again. A batch |
|                   | refused whole (413: over the matcher's body limit) is sent again one crop at a time     |
| quota             | each deletion is handed to `freed(bytes)` (the harvester's), so harvesting goes on once |
|                   | the matcher has the crops                                                               |
| stop              | the pass under way ends after its batch; then, if the matcher was answering, one more for |
|                   | up to `drain_s`                                                                         |

    uploader = Uploader(cfg.harvest, freed=harvester.release)
    uploader.start(); ...; uploader.stop()
    uploader.upload_pending()   # one pass now: True unless the matcher could not be reached
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from crossview.kernel.config import HarvestConfig, read_secret
from crossview.kernel.harvest import CROP_SUFFIX, SIDECAR_SUFFIX, HarvestError, read_sidecar, sidecar_path
from crossview.kernel.multipart import encode_multipart

log = logging.getLogger(__name__)
REFUSED_DIR = ".refused"
MAX_BATCH_BYTES = 4 << 20  # half the matcher's default http.max_upload_bytes: a batch is never refused whole for size
MAX_ANSWER_BYTES = 1 << 20
ORPHAN_AGE_S = 60.0  # a sidecar this old without its crop was left by a crash: the crop is never coming
ACKNOWLEDGED = ("stored", "duplicate", "expired")


class MatcherAway(RuntimeError):
    """The matcher did not take the batch (unreachable, timeout, 5xx, token refused): keep the crops, try later."""


class _Refused(RuntimeError):
    """The matcher refused a whole request for good (4xx)."""


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


class Uploader:
    def __init__(self, cfg: HarvestConfig, freed: Callable[[int], None] = lambda n: None):
        self.cfg, self.up, self.freed = cfg, cfg.upload, freed
        self.token = read_secret(self.up.token_file, "harvest.upload.token_file", "token")
        self.url = self.up.url.rstrip("/") + "/api/v1/harvest"
        self.uploaded = self.refused = self.pending = 0
        self.away_since: float | None = None  # when the matcher stopped taking crops; None while it does
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-harvest-upload", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("harvest upload: crops in %s go to %s every %g s", self.cfg.dir, self.url, self.up.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.up.drain_s + 2 * self.up.timeout_s)

    def status(self) -> str:
        where = "matcher taking them" if self.away_since is None else \
            f"matcher away since {_clock(self.away_since)} ({self.last_error})"
        refused = f", {self.refused:,} refused (in {self.cfg.dir / REFUSED_DIR})" if self.refused else ""
        return f"{self.uploaded:,} crops uploaded, {self.pending:,} pending{refused}, {where}"

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            failures = 0 if self.upload_pending() else failures + 1
            self._stop.wait(self.up.interval_s * 2 ** min(max(failures - 1, 0), 5))  # backing off up to 32x
        if self.away_since is None and self.up.drain_s:
            self.upload_pending(deadline=time.monotonic() + self.up.drain_s)

    # -- one pass ------------------------------------------------------------------------------

    def upload_pending(self, deadline: float | None = None) -> bool:
        """Send every crop in the folder now, oldest first; False when the matcher stopped taking them. Without a
        `deadline` the pass ends early on stop(); with one, when it passes."""
        crops = self._scan()
        self.pending = len(crops)
        for batch in self._batches(crops):
            if (self._stop.is_set() and deadline is None) or (deadline is not None and time.monotonic() > deadline):
                return True
            try:
                self._send(batch)
            except MatcherAway as e:
                if self.away_since is None:
                    self.away_since = time.time()
                    log.warning("harvest upload: the matcher did not take crops (%s); they stay here and go later", e)
                self.last_error = str(e)[:200]
                return False
        if self.away_since is not None:
            log.info("harvest upload: the matcher takes crops again (away since %s)", _clock(self.away_since))
            self.away_since = None
        return True

    def _scan(self) -> list[Path]:
        """The crops in the folder, oldest first; crop-less sidecars old enough to be a crash's are deleted."""
        found = []
        for camera in self.cfg.dir.iterdir() if self.cfg.dir.is_dir() else []:
            if not camera.is_dir() or camera.name.startswith("."):
                continue  # .refused, and anything else that is no camera's
            for path in camera.iterdir():
                try:
                    if path.suffix == CROP_SUFFIX:
                        found.append((path.stat().st_mtime, path))
                    elif path.suffix == SIDECAR_SUFFIX and not path.with_suffix(CROP_SUFFIX).exists() \
                            and time.time() - path.stat().st_mtime > ORPHAN_AGE_S:
                        self._delete(path)
                except FileNotFoundError:  # deleted meanwhile
                    continue
        return [p for _, p in sorted(found)]

    def _batches(self, crops: list[Path]):
        batch, size = [], 0
        for path in crops:
            try:
                n = path.stat().st_size
            except FileNotFoundError:
                continue
            if batch and (len(batch) == self.up.batch or size + n > MAX_BATCH_BYTES):
                yield batch
                batch, size = [], 0
            batch.append(path)
            size += n
        if batch:
            yield batch

    def _send(self, paths: list[Path]) -> None:
        """Upload one batch and settle each crop by its answer; `MatcherAway` leaves all of them in place."""
        items = []
        for path in paths:
            try:
                read_sidecar(path)  # the matcher would refuse it: spare the round trip
                items.append((path, sidecar_path(path).read_bytes(), path.read_bytes()))
            except HarvestError as e:
                self._refuse(path, f"here: {e}")
            except FileNotFoundError:
                continue
        if not items:
            return
        try:
            answers = self._post(items)
        except _Refused as e:
            if len(items) > 1:  # one of them may be the cause: each on its own
                for path, *_ in items:
                    self._send([path])
                return
            self._refuse(items[0][0], str(e))
            return
        for (path, *_), answer in zip(items, answers):
            if answer.get("status") in ACKNOWLEDGED:
                self._settled(path)
                self.uploaded += 1
            else:
                self._refuse(path, f"by the matcher: {answer.get('reason')}")

    def _post(self, items: list[tuple[Path, bytes, bytes]]) -> list[dict]:
        body, content_type = encode_multipart({}, {
            "crops": [(p.name, jpeg, "image/jpeg") for p, _, jpeg in items],
            "sidecars": [(sidecar_path(p).name, sidecar, "application/json") for p, sidecar, _ in items]})
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=self.up.timeout_s) as res:
                answer = json.loads(res.read(MAX_ANSWER_BYTES))
        except urllib.error.HTTPError as e:
            detail = _detail(e)
            if e.code in (401, 403, 404, 408, 429) or e.code >= 500:  # not the crops' fault
                raise MatcherAway(f"HTTP {e.code}: {detail}") from None
            raise _Refused(f"HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:  # refused connection, timeout, reset
            raise MatcherAway(str(getattr(e, "reason", e))) from None
        except ValueError as e:
            raise MatcherAway(f"its answer is not JSON: {e}") from None
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != len(items) or not all(isinstance(r, dict) for r in results):
            raise MatcherAway(f"its answer does not say what became of the {len(items)} crop(s)")
        return results

    # -- settling a crop -----------------------------------------------------------------------

    def _delete(self, path: Path) -> None:
        try:
            n = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self.freed(n)

    def _settled(self, crop: Path) -> None:
        """The matcher has it: the crop goes first, so a crash in between leaves a sidecar (cleaned up later), never
        a crop without one (which would be refused)."""
        self._delete(crop)
        self._delete(sidecar_path(crop))
        self.pending = max(self.pending - 1, 0)

    def _refuse(self, crop: Path, reason: str) -> None:
        aside = self.cfg.dir / REFUSED_DIR / crop.parent.name
        aside.mkdir(parents=True, exist_ok=True)
        for path in (sidecar_path(crop), crop):
            if path.exists():
                os.replace(path, aside / path.name)  # still counted in the harvest quota: the operator clears them
        self.refused += 1
        self.pending = max(self.pending - 1, 0)
        log.error("harvest upload: crop %s refused %s; moved to %s (%d refused so far)", crop.name, reason, aside,
                  self.refused)


def _detail(err: urllib.error.HTTPError) -> str:
    """The matcher's own error message, else the HTTP reason."""
    try:
        detail = json.loads(err.read(MAX_ANSWER_BYTES)).get("detail")
    except (ValueError, AttributeError, OSError):
        detail = None
    return str(detail)[:300] if detail else str(err.reason)
