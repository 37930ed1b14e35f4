"""`crossview eval`: how well a deployed ONNX embedder re-identifies people on a labelled dataset.

| step       | how                                                                                  |
|------------|--------------------------------------------------------------------------------------|
| data       | the dataset's query and gallery (`build_dataset`; MOT sequences are split in time)  |
| embeddings | `crossview.kernel.embedder.Embedder`: the very preprocessing and ONNX session the edge node runs |
| scores     | cosine distance (optionally k-reciprocal re-ranked) → `evaluate_features`           |
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from crossview.kernel.embedder import Embedder
from crossview.trainer.data.build import labelled_split
from crossview.trainer.evaluation import evaluate_features


def embed_samples(embedder: Embedder, samples, batch: int = 64) -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(samples), batch), desc="embedding", leave=False):
        crops = [cv2.imread(str(s.path)) for s in samples[i : i + batch]]
        bad = [str(s.path) for s, c in zip(samples[i : i + batch], crops) if c is None]
        if bad:  # build_dataset verified every file, so this is a file changed since
            raise ValueError(f"cannot read {bad[0]}")
        out.append(embedder.embed(crops))
    return np.concatenate(out)


def evaluate_onnx(model: str | Path, kind: str, root: str | Path, cache_dir: str | Path = "runs/cache",
                  rerank: bool = False) -> dict:
    """Rank-1/5/10 and mAP (fractions) of `model` on the dataset's query/gallery, plus their sizes."""
    split = labelled_split(kind, root, cache_dir)
    if not split.query or not split.gallery:
        raise ValueError(f"{kind}:{root} has no query/gallery split to evaluate on")
    embedder = Embedder(model)
    qf, gf = embed_samples(embedder, split.query), embed_samples(embedder, split.gallery)
    result = evaluate_features(qf, gf, split.query, split.gallery, rerank=rerank)
    return {"model": embedder.version, "gallery": len(split.gallery), **result}
