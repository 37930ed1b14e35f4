"""End to end: a real edge node (HOG, tracker, ONNX embedder) on real footage → ZeroMQ → the matcher → a query.

The same TUD-Campus clip plays as two cameras, so every person walks past both: a track on one
camera must find its twin on the other as the best hit (different clips would show different people).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import cv2
import pytest
from helpers import edge_config, matcher_config, shared_data, wait_until

from crossview.edge.node import EdgeNode
from crossview.matcher.query import Filters
from crossview.matcher.service import Matcher


@pytest.mark.timeout(120)
def test_a_track_on_one_camera_finds_the_same_person_on_the_other(default_model, tmp_path):
    clip = shared_data("TUD-Campus/TUD-Campus.mp4")
    m = Matcher(matcher_config(tmp_path / "matcher", models=[str(default_model)]))
    m.start()
    try:
        cams = [{"id": cam, "source": str(clip), "fps": 5} for cam in ("campus-a", "campus-b")]
        stats = EdgeNode(edge_config(default_model, cams, m.ingest.endpoint)).run(max_seconds=60)
        made = sum(s.sightings for s in stats.values())
        assert stats["campus-a"].frames == stats["campus-b"].frames == 15 and made > 0
        wait_until(lambda: m.ingest.accepted == made, 20, f"all {made} sightings accepted")

        on_a = m.store.recent("campus-a", limit=1000)
        track, n = Counter(r.track for r in on_a).most_common(1)[0]
        assert n >= 5, "the longest track on camera A should span several frames"
        result = m.queries.search_track("test-edge", "campus-a", track, None, Filters(top_k=3))
        top = result.ranked()[0]
        assert result.model == "mobilenetv2-imagenet-1"
        assert top.camera == "campus-b" and top.score > 0.99, f"best hit {top.camera}:{top.track} at {top.score:.3f}"
        # Its twin: the same frames, the same boxes.
        query_boxes = {(r.frame, tuple(round(v) for v in r.box)) for r in on_a if r.track == track}
        assert {(s.frame, tuple(round(v) for v in s.box)) for s in top.sightings} <= query_boxes
        assert m.store.thumbnail(top.best.id)[:2] == b"\xff\xd8"

        # A crop of that person, embedded by the matcher's own copy of the model, finds both tracks.
        crop = _crop(clip, top.best)
        by_image = m.queries.search_image(crop, "mobilenetv2-imagenet-1", Filters(top_k=2))
        assert {h.camera for h in by_image.ranked()} == {"campus-a", "campus-b"}
    finally:
        m.stop()
    # The same from the command line, on the data directory the matcher left.
    cv2.imwrite(str(tmp_path / "crop.png"), crop)
    out = subprocess.run([sys.executable, "-m", "crossview.cli", "query", "--data-dir", str(tmp_path / "matcher"),
                          "--image", str(tmp_path / "crop.png"), "--model", "mobilenetv2-imagenet-1",
                          "--embedder", str(default_model), "--top-k", "2", "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert set(json.loads(out)["cameras"]) == {"campus-a", "campus-b"}


def _crop(clip, sighting):
    cap = cv2.VideoCapture(str(clip))
    cap.set(cv2.CAP_PROP_POS_FRAMES, sighting.frame)
    ok, frame = cap.read()
    cap.release()
    assert ok, f"{clip}: frame {sighting.frame} unreadable"
    x1, y1, x2, y2 = (int(round(v)) for v in sighting.box)
    return frame[max(y1, 0):y2, max(x1, 0):x2]
