"""The README's main job: `crossview demo` runs edge node + matcher on the shipped clips and finds
the query person on the other camera."""

import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A hit's line: camera, node:camera:track, P, verdict, first and last seen
ROW = re.compile(r"^(\S+) +\S+ +([\d.]+) +(?:likely same person|possible|unlikely) +(\S+ \S+) +(\S+ \S+) ", re.M)


@pytest.mark.timeout(400)
def test_demo_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "crossview.cli", "demo", "--out", str(tmp_path / "demo")],
                       cwd=REPO, capture_output=True, text=True, timeout=380)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for camera in ("campus-a", "campus-b", "tud-campus", "tud-stadtmitte"):
        assert f"\n{camera} " in out and "finished" in out
    table = out[out.index("Where else was campus-a track"):]
    assert "\ncampus-b " in table  # campus-b shows the same people ten seconds later
    assert "score = cosine similarity" in table or "P = P(same person)" in table  # the scale is said
    for camera in ("tud-campus", "tud-stadtmitte"):  # a camera searched either matched or says it did not
        assert f"\n{camera} " in table or f"\n{camera}: no match" in table
    report = (tmp_path / "demo" / "report.html").read_text()
    assert report.count("data:image/jpeg;base64,") >= 2 and "class=legend" in report
    # campus-b shows several people walking at once; at most one of them is campus-a's person, so their P cannot add
    # up past 1 (a map fitted on crops once called five of them "likely same person", 0.96 each).
    rows = [(cam, float(p), first, last) for cam, p, first, last in ROW.findall(table)]
    at_once = [(a, b) for a, b in combinations(rows, 2) if a[0] == b[0] and a[2] <= b[3] and b[2] <= a[3]]
    if "P = P(same person)" in table:
        assert at_once and all(a[1] + b[1] < 1 for a, b in at_once), at_once
        assert "share one person's odds" in report  # the legend says why

