"""The matcher's web page in a real headless browser: Debian's chromium driven by Playwright.

Against the same live matchers as the API tests (`served_matcher`: SQLite + FAISS, then PostgreSQL + Milvus): enter the
token, pick a camera and a sighting, and see one timeline row per camera with every thumbnail loaded;
search by an uploaded crop; narrow by the camera filter. The browser may reach nothing but the matcher, and the token never
appears in a URL. Skipped only when chromium is not installed (`make browser` installs it).
"""

from __future__ import annotations

import shutil
import time
import urllib.parse

import cv2
import pytest
from live_matcher import TOKEN, person_crop

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason="Debian chromium is not installed: `make browser` (apt-get install chromium)")

ALL_THUMBS_LOADED = """sel => {
    const imgs = [...document.querySelectorAll(sel)];
    return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Visit:
    """One browser tab on the matcher's page, recording every request and every script error."""

    def __init__(self, browser, live):
        self.ctx = browser.new_context(viewport={"width": 1440, "height": 1000})
        self.page = self.ctx.new_page()
        self.urls: list[str] = []
        self.errors: list[str] = []  # script errors and failed requests
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("response", lambda r: r.status >= 400 and self.errors.append(f"{r.status} {r.url}"))
        self.page.set_default_timeout(15000)
        self.origin = live.url
        self.page.goto(live.url + "/")

    def login(self, token: str = TOKEN) -> None:
        self.page.fill("#token", token)
        self.page.click("#login-form button")

    def wait_thumbs(self, selector: str) -> None:
        self.page.wait_for_function(ALL_THUMBS_LOADED, arg=selector)

    def foreign(self) -> list[str]:
        """Requests that went anywhere but the matcher (blob: URLs are local to the page)."""
        return [u for u in self.urls if not (u.startswith(self.origin) or u.startswith("blob:"))]


@pytest.fixture
def visit(browser, served_matcher):
    v = Visit(browser, served_matcher)
    yield v
    v.ctx.close()


def test_pick_a_sighting_and_see_the_timeline_per_camera(visit, served_matcher, tmp_path):
    page = visit.page
    visit.login("wrong-token-0123456789")
    page.wait_for_selector("#login-error:has-text('not accepted')")
    page.wait_for_load_state("networkidle")  # the page's other requests with that token may answer after the first
    assert visit.errors and all(e.startswith("401 ") for e in visit.errors)
    visit.errors.clear()

    visit.login()
    page.wait_for_selector(".camera[data-camera='hall']")
    assert page.locator(".camera").all_inner_texts()[1].startswith("gate")
    page.click(".camera[data-camera='hall']")
    page.wait_for_selector("#picker-title:has-text('Recent sightings on hall')")
    visit.wait_thumbs("#grid img.thumb")

    # Person 3 seen in hall: the timeline should show gate (earlier) above hall.
    subject = next(r for r in served_matcher.matcher.store.recent("hall", 100) if r.track == 3)
    page.click(f".pick[data-id='{subject.id}']")
    page.wait_for_selector("#results .row")
    visit.wait_thumbs("#timeline img.thumb")
    assert page.locator("#query h2").inner_text() == f"Sighting #{subject.id} on hall"
    rows = page.locator("#timeline .row")
    assert [rows.nth(i).get_attribute("data-camera") for i in range(rows.count())] == ["gate", "hall"]
    gate_hits = page.locator(".row[data-camera='gate'] .hit")
    assert gate_hits.count() >= 3
    assert "3" in page.locator(".row[data-camera='gate'] .hit").evaluate_all("hits => hits.map(h => h.dataset.track)")
    # A hit shows its score and its best box; each frame its time (and box on hover).
    first = page.locator(".row[data-camera='gate'] .hit").first
    assert first.locator(".score").inner_text().startswith("sim 0.")  # the test model has no calibration: raw, labelled
    assert "no calibration" in page.locator("#query .legend").inner_text()
    assert "best box " in first.locator("footer").inner_text()
    assert ":" in first.locator(".frame .caption").first.inner_text()
    assert "box " in first.locator(".frame").first.get_attribute("title")

    shot = tmp_path / "timeline.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

    # Clicking a result follows the person: it becomes the next query.
    follow = page.locator(".row[data-camera='gate'] .frame").first
    follow_id = follow.get_attribute("data-id")
    follow.click()
    page.wait_for_selector(f"#query h2:has-text('Sighting #{follow_id} on gate')")

    assert not visit.errors
    assert not visit.foreign()
    assert not [u for u in visit.urls if TOKEN in urllib.parse.unquote(u)]
    assert page.locator("#timeline img.thumb").first.get_attribute("src").startswith("blob:")


def test_search_by_uploaded_crop_and_filter_cameras(visit, served_matcher, tud_frames, tmp_path):
    page = visit.page
    visit.login()
    page.wait_for_selector(".camera[data-camera='gate']")

    crop = tmp_path / "person.jpg"
    cv2.imwrite(str(crop), person_crop(tud_frames, 33, 3))
    page.set_input_files("#crop", str(crop))
    page.wait_for_function("document.querySelector('#model').value !== ''")  # the model list loads after the cameras
    assert page.locator("#model").input_value() == served_matcher.model
    page.click("#upload-form button")
    page.wait_for_selector("#results .row", timeout=60_000)  # Milvus answers an image query slowly on a loaded machine
    visit.wait_thumbs("#timeline img.thumb")
    assert page.locator("#query h2").inner_text() == "Uploaded crop person.jpg"
    assert sorted(page.locator("#timeline .row").evaluate_all("rows => rows.map(r => r.dataset.camera)")) == ["gate", "hall"]

    # Untick gate, ask for the best 2 tracks: only hall is left.
    page.uncheck("#filter-cameras input[value='gate']")
    page.fill("#top-k", "2")
    page.click("#filters button")
    page.wait_for_function("() => document.querySelectorAll('#timeline .row').length === 1")
    assert page.locator("#timeline .row").get_attribute("data-camera") == "hall"
    assert page.locator("#timeline .hit").count() == 2

    # An impossible score threshold is an empty answer, not an error.
    page.fill("#min-score", "0.9999")
    page.click("#filters button")
    page.wait_for_selector("#timeline:has-text('No matches with these filters.')")
    assert page.locator("#timeline .nomatch").all_inner_texts() == ["hall: no match"]  # each camera searched says so

    # The token lives in this tab's sessionStorage: a reload stays connected; "Forget token" logs out.
    page.reload()
    page.wait_for_selector(".camera[data-camera='gate']")
    page.wait_for_selector("#grid img.thumb")
    visit.wait_thumbs("#grid img.thumb")  # logging out mid-load would fail the thumbnails still in flight
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    assert page.evaluate("() => sessionStorage.length") == 0

    assert not visit.errors
    assert not visit.foreign()


def test_the_status_panel_shows_edges_and_cameras_and_updates_live(visit, served_matcher):
    """Heartbeats of a panel-only edge (the API tests do not read edges): its cameras' states and a change of one
    of them, shown without a reload."""
    from helpers import Pusher

    from crossview.kernel.wire import CameraStatus, Heartbeat, encode_heartbeat

    def beat(lobby: str) -> bytes:
        cams = (CameraStatus("gate", "streaming", 1.2, 5.0, 200), CameraStatus("lobby", lobby, 0.0, 5.0, 40, error="no frame for 10 s"))
        return encode_heartbeat(Heartbeat("edge-panel", time.time(), 1.0, served_matcher.model, 3, 1.0, 0, cams))

    page = visit.page
    with Pusher(served_matcher.matcher.ingest.endpoint) as pusher:
        pusher.send_raw(beat("reconnecting"))
        visit.login()
        page.wait_for_selector(".edge[data-node='edge-panel']")
        edge = page.locator(".edge[data-node='edge-panel']")
        assert edge.get_attribute("data-state") == "online"
        assert edge.locator("[data-camera='lobby']").get_attribute("data-state") == "stalled"
        assert "reconnecting: no frame for 10 s" in edge.locator("[data-camera='lobby']").inner_text()
        assert "falling behind: 1.2 of 5 fps" in edge.locator("[data-camera='gate']").inner_text()
        assert "spool 3" in edge.inner_text()
        lobby_online = ".edge[data-node='edge-panel'] [data-camera='lobby'][data-state='online']"
        deadline = time.monotonic() + 15
        while not page.locator(lobby_online).count():  # beating, as an edge does, until the next poll shows it
            assert time.monotonic() < deadline, page.locator("#edges").inner_text()
            pusher.send_raw(beat("streaming"))
            page.wait_for_timeout(500)
    # no heartbeat for 3 x 1 s: the panel turns it offline at its next poll
    page.wait_for_selector(".edge[data-node='edge-panel'][data-state='offline']", timeout=15000)
    assert "Edges: " in page.locator("#status-summary").inner_text()
    assert not visit.errors


def test_watch_for_a_person_from_the_page_and_see_the_alert_arrive_live(browser, default_model, tud_frames, tmp_path):
    """A matcher of its own (the shared one is read-only): watch person 3 from their newest gate sighting, then that
    appearance is seen again on hall as a new track, and the alert shows without a reload."""
    import dataclasses

    from helpers import Pusher
    from live_matcher import LiveMatcher

    with LiveMatcher(tmp_path / "matcher", default_model, tud_frames) as live:
        visit = Visit(browser, live)
        page = visit.page
        visit.login()
        page.wait_for_selector("#alerts li.muted")
        subject = next(r for r in live.matcher.store.recent("gate", 100) if r.track == 3)
        page.click(".camera[data-camera='gate']")
        page.click(f".pick[data-id='{subject.id}']")
        page.wait_for_selector("#watch-form:not([hidden])")
        page.fill("#watch-name", "person three")
        page.fill("#watch-threshold", "0.8")
        page.click("#watch-form button")
        page.wait_for_selector("#watchlist li:has-text('person three')")
        assert "uncalibrated" in page.locator("#watchlist li").first.inner_text()

        # the person's gate appearance, seen again on hall a quarter of an hour later
        again = [dataclasses.replace(s, node="edge-2", camera="hall", track=103, ts=s.ts + 900)
                 for s in live.sightings if s.camera == "gate" and s.track == 3]
        with Pusher(live.matcher.ingest.endpoint) as pusher:
            pusher.send(again)
        page.wait_for_selector("#alerts li[data-alert]", timeout=15000)
        alert = page.locator("#alerts li[data-alert]")
        assert alert.count() == 1  # one per track, however many frames
        assert "person three on hall" in alert.inner_text() and "track 103" in alert.inner_text()
        alert.locator("button").click()  # follow the alert: where else was this person seen
        page.wait_for_selector("#query h2:has-text('on hall')")
        assert not visit.errors
        visit.ctx.close()


def test_a_late_answer_never_replaces_what_was_asked_after_it(visit):
    """The first page of all cameras' sightings is held back 3 s; a camera clicked meanwhile keeps its own view."""
    page = visit.page
    held = []

    def hold_first_recent(route):
        if "camera=" not in route.request.url and not held:
            held.append(route.request.url)
            page.wait_for_timeout(3000)
        route.continue_()

    page.route("**/api/v1/sightings?*", hold_first_recent)
    visit.login()
    page.wait_for_selector(".camera[data-camera='hall']")
    page.click(".camera[data-camera='hall']")
    page.wait_for_selector("#picker-title:has-text('Recent sightings on hall')")
    page.wait_for_timeout(4000)  # the held answer has come back by now
    assert held and page.locator("#picker-title").inner_text() == "Recent sightings on hall"
    assert not visit.errors
