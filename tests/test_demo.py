"""The README's main job: `crossview demo` runs edge node + matcher on the shipped clips and finds
the query person on the other camera."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
