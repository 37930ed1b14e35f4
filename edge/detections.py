"""`Detections`: the one type every detector returns and the tracker, embedder and publisher read.

Parallel NumPy arrays, as in supervision's `sv.Detections`; boolean masks and index arrays select.

    >>> d = Detections(xyxy=np.array([[0, 0, 10, 20.]]), confidence=np.array([0.9]))
    >>> d[d.confidence > 0.5].xyxy.shape
    (1, 4)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _empty_ids() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class Detections:
    xyxy: np.ndarray  # (N, 4) float32 pixel corners
    confidence: np.ndarray  # (N,) float32
    tracker_id: np.ndarray = field(default_factory=_empty_ids)  # (N,) int64 once tracked, else empty
    embedding: np.ndarray | None = None  # (N, D) re-ID vectors once embedded

    def __post_init__(self) -> None:
        self.xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        self.confidence = np.asarray(self.confidence, dtype=np.float32).reshape(-1)
        self.tracker_id = np.asarray(self.tracker_id, dtype=np.int64).reshape(-1)
        if len(self.confidence) != len(self.xyxy):
            raise ValueError(f"{len(self.xyxy)} boxes but {len(self.confidence)} confidences")
        if len(self.tracker_id) not in (0, len(self.xyxy)):
            raise ValueError(f"{len(self.xyxy)} boxes but {len(self.tracker_id)} tracker ids")
        if self.embedding is not None and len(self.embedding) != len(self.xyxy):
            raise ValueError(f"{len(self.xyxy)} boxes but {len(self.embedding)} embeddings")

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index) -> "Detections":
        ids = self.tracker_id[index] if len(self.tracker_id) else self.tracker_id
        emb = None if self.embedding is None else self.embedding[index]
        return Detections(self.xyxy[index], self.confidence[index], ids, emb)

    @property
    def height(self) -> np.ndarray:
        return self.xyxy[:, 3] - self.xyxy[:, 1]

    def clip(self, width: int, height: int) -> "Detections":
        """Boxes clipped to the image; boxes left with no area are dropped."""
        xyxy = self.xyxy.copy()
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
        d = Detections(xyxy, self.confidence, self.tracker_id, self.embedding)
        return d[(xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)]
