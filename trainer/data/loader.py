"""Images in, batches out: reading, up-front verification, PK batches and the DataLoaders.

| what              | how                                                                          |
|-------------------|------------------------------------------------------------------------------|
| read one image    | `read_image(path)` → RGB PIL image, or `ImageReadError` naming the file        |
| verify up front   | `filter_readable(samples)` → (readable, skipped count); warns with an example  |
| dataset           | `ImageDataset(samples, transform)[i]` → (image tensor, pid, camid, i)           |
| PK batches        | `PKSampler(labels, p, k, seed)`: P identities x K images, label -1 never drawn  |
| loaders           | `make_train_loader(samples, transform, p, k)`, `make_eval_loader(samples, transform)` |

Verification decodes every image once (JPEGs at 1/8 scale, which is fast yet still reads all the
compressed data), so a truncated crop is dropped before training instead of crashing an epoch.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from crossview.trainer.data.samples import UNLABELLED, Sample

log = logging.getLogger(__name__)


class ImageReadError(OSError):
    """An image file is missing, not an image, or truncated."""


# With ultralytics imported in the process (the edge node's), Image.open is wrapped: for a file PIL cannot
# identify it tries an optional HEIF plugin and raises that ImportError instead of UnidentifiedImageError.
_UNREADABLE = (OSError, SyntaxError, ValueError, ImportError, Image.DecompressionBombError)


def _reason(e: Exception) -> str:
    return "not an image format PIL can identify" if isinstance(e, ImportError) else str(e) or type(e).__name__


def read_image(path: str | Path) -> Image.Image:
    """The image as RGB; any decoding problem becomes an `ImageReadError` that names the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() loads the pixels, so truncation surfaces here
    except _UNREADABLE as e:
        raise ImageReadError(f"{path}: cannot read image ({_reason(e)})") from e


def image_problem(path: str | Path) -> str | None:
    """Why `path` cannot be used as an image, or None when it decodes."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # JPEG: DCT-domain downscale
            img.load()
    except _UNREADABLE as e:
        return _reason(e)
    return None


def filter_readable(samples: Sequence[Sample], workers: int = 2) -> tuple[list[Sample], int]:
    """(the samples whose image decodes, how many were skipped); order is kept. Logs one warning."""
    workers = max(1, min(workers, _cpus()))
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        problems = list(pool.map(lambda s: image_problem(s.path), samples, chunksize=64))
    good = [s for s, p in zip(samples, problems) if p is None]
    bad = [(s, p) for s, p in zip(samples, problems) if p is not None]
    if bad:
        log.warning("skipped %d unreadable image(s) of %d, e.g. %s (%s)", len(bad), len(samples), bad[0][0].path, bad[0][1])
    return good, len(bad)


class ImageDataset(Dataset):
    """Samples → (transformed image, pid, camid, index); the index lets a trainer map features back."""

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        s = self.samples[index]
        img = read_image(s.path)
        return (self.transform(img) if self.transform is not None else img), s.pid, s.camid, index


class PKSampler(Sampler[list[int]]):
    """Batches of `p` distinct identities x `k` images each, as triplet-style losses need.

    Each epoch shuffles every identity's images into chunks of `k` (an identity with fewer than `k`
    images is drawn with replacement), then repeatedly picks `p` identities that still have chunks;
    so an epoch sees each image about once. Label -1 (unlabelled / outlier) is never drawn.
    Deterministic given `seed`; successive epochs differ (`set_epoch` to resume at a given epoch).
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, seed: int = 0):
        if p < 1 or k < 1:
            raise ValueError(f"PKSampler needs p >= 1 and k >= 1, got p={p}, k={k}")
        by_label: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            if int(label) != UNLABELLED:
                by_label[int(label)].append(i)
        if len(by_label) < p:
            raise ValueError(f"PKSampler needs at least p={p} identities with images, the labels have {len(by_label)}")
        self.pools = [np.asarray(idx) for _, idx in sorted(by_label.items())]
        self.p, self.k, self.seed = p, k, seed
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # A generator: the epoch advances only once batches are drawn. DataLoader's worker iterator
        # calls iter() twice and drops the first, which must not skip an epoch.
        batches = self._batches(self.epoch)
        self.epoch += 1
        yield from batches

    def __len__(self) -> int:
        return len(self._batches(self.epoch))

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        chunks: list[list[np.ndarray]] = []
        for pool in self.pools:
            order = rng.permutation(pool) if len(pool) >= self.k else rng.choice(pool, self.k, replace=True)
            chunks.append([order[i : i + self.k] for i in range(0, len(order) - self.k + 1, self.k)])
        batches = []
        live = [i for i, c in enumerate(chunks) if c]
        while len(live) >= self.p:
            picked = rng.choice(live, self.p, replace=False)
            batches.append([int(j) for ident in picked for j in chunks[ident].pop()])
            live = [i for i in live if chunks[i]]
        self._cache = (epoch, batches)
        return batches


def make_train_loader(samples: Sequence[Sample], transform: Callable, p: int = 16, k: int = 4, seed: int = 0,
                      num_workers: int = 2, persistent_workers: bool = True) -> DataLoader:
    """PK batches of augmented images; worker augmentation is seeded from `seed` too."""
    workers = _workers(num_workers)
    return DataLoader(
        ImageDataset(samples, transform),
        batch_sampler=PKSampler([s.pid for s in samples], p, k, seed),
        num_workers=workers,
        persistent_workers=persistent_workers and workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


def make_eval_loader(samples: Sequence[Sample], transform: Callable, batch_size: int = 64, num_workers: int = 2) -> DataLoader:
    """Every sample once, in order, for feature extraction (query, gallery, clustering)."""
    workers = _workers(num_workers)
    return DataLoader(ImageDataset(samples, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _workers(requested: int) -> int:
    return max(0, min(requested, _cpus()))
