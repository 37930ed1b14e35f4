"""The tracker's appearance association (`tracker.appearance`): ultralytics' BoT-SORT fed our own re-ID vectors."""

import numpy as np
import pytest

from crossview.edge.detections import Detections
from crossview.edge.tracking import Tracker
from crossview.kernel.config import ConfigError, TrackerConfig
from tests.helpers import edge_config, shared_data

FRAME = np.zeros((240, 320, 3), np.uint8)
# Two people side by side, their boxes overlapping (IoU 0.67): close enough for appearance to decide.
BOXES = np.array([[100, 50, 150, 150], [110, 50, 160, 150]], np.float32)


def _unit(dim: int, i: int) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i] = 1.0
    return v


def _people(dim: int, swapped: bool = False) -> Detections:
    """Person 0 and person 1 at BOXES; `swapped`: they traded places."""
    emb = np.stack([_unit(dim, 1), _unit(dim, 0)] if swapped else [_unit(dim, 0), _unit(dim, 1)])
    return Detections(BOXES, np.array([0.9, 0.9]), embedding=emb)


def _ids_after_the_swap(appearance: bool) -> tuple[dict, dict]:
    """Track id per person before and after the two traded places."""
    tracker = Tracker(TrackerConfig(kind="botsort", appearance=appearance))
    for _ in range(3):
        before = tracker.update(_people(8), FRAME)
    after = tracker.update(_people(8, swapped=True), FRAME)
    person = lambda d: {int(np.argmax(e)): int(t) for e, t in zip(d.embedding, d.tracker_id)}  # noqa: E731
    return person(before), person(after)


def test_appearance_keeps_each_person_on_their_track_where_boxes_alone_swap_them():
    before, after = _ids_after_the_swap(appearance=True)
    assert len(set(before.values())) == 2 and after == before
    before, after = _ids_after_the_swap(appearance=False)  # the same BoT-SORT by boxes: the ids follow the places
    assert after == {0: before[1], 1: before[0]}


def test_tracked_boxes_carry_the_embeddings_of_their_detections():
    tracker = Tracker(TrackerConfig(kind="botsort", appearance=True))
    for _ in range(2):
        out = tracker.update(_people(8), FRAME)
    order = np.argsort(out.xyxy[:, 0])
    assert np.array_equal(out.embedding[order], _people(8).embedding)


def test_a_new_model_of_another_length_does_not_break_the_tracks():
    """After a model swap the old vectors are forgotten; the tracks go on by their boxes and learn the new ones."""
    tracker = Tracker(TrackerConfig(kind="botsort", appearance=True))
    for _ in range(3):
        before = tracker.update(_people(8), FRAME)
    tracker.forget_appearance()
    for _ in range(2):
        after = tracker.update(_people(16), FRAME)
    assert sorted(after.tracker_id) == sorted(before.tracker_id)


def test_appearance_needs_botsort_and_says_so(tmp_path):
    with pytest.raises(ConfigError, match="tracker.*appearance: true needs kind: botsort"):
        edge_config(tmp_path / "m.onnx", [{"id": "a", "source": "a.mp4"}], tracker={"appearance": True})


def test_the_node_tracks_real_footage_by_appearance(default_model):
    from crossview.edge.node import EdgeNode

    cams = [{"id": "campus", "source": str(shared_data("TUD-Campus/TUD-Campus.mp4")), "fps": 5}]
    node = EdgeNode(edge_config(default_model, cams, tracker={"kind": "botsort", "appearance": True}))
    seen = []
    update = node.cameras["campus"].tracker.update
    node.cameras["campus"].tracker.update = lambda dets, image: seen.append(dets) or update(dets, image)
    stats = node.run(max_seconds=100)["campus"]
    assert stats.frames == 15 and stats.sightings > 0 and stats.tracks
    # Every box reached the tracker with its embedding, one unit vector each.
    boxes = [d for d in seen if len(d)]
    assert boxes and all(np.allclose(np.linalg.norm(d.embedding, axis=1), 1, atol=1e-4) for d in boxes)


def test_frames_with_nobody_in_them_pass_through_the_appearance_tracker(tmp_path, default_model):
    """Empty frames (nothing detected, nothing tracked) before real people: the node runs on and sends them."""
    import cv2

    from crossview.edge.node import EdgeNode

    clip = tmp_path / "dark-then-campus.mp4"
    cap = cv2.VideoCapture(str(shared_data("TUD-Campus/TUD-Campus.mp4")))
    real = [cap.read()[1] for _ in range(6)]
    cap.release()
    out = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 25, (real[0].shape[1], real[0].shape[0]))
    for img in [np.zeros_like(real[0])] * 4 + real:
        out.write(img)
    out.release()
    cams = [{"id": "campus", "source": str(clip), "fps": 25}]
    node = EdgeNode(edge_config(default_model, cams, tracker={"kind": "botsort", "appearance": True}))
    stats = node.run(max_seconds=100)["campus"]
    assert stats.frames == 10 and stats.sightings > 0
