"""Files that must arrive whole: SHA-256 of a file, and a bounded download checked against the size and digest
announced for it (model rollout on the edges, the adapt job fetching the production model).

    >>> import io, tempfile
    >>> data = b"model bytes"
    >>> digest = hashlib.sha256(data).hexdigest()
    >>> out = Path(tempfile.mkdtemp()) / "m.onnx"
    >>> copy_verified(io.BytesIO(data), out, len(data), digest, "m.onnx"); sha256_of(out) == digest
    True
    >>> try:
    ...     copy_verified(io.BytesIO(b"other bytes"), out, len(data), digest, "m.onnx")
    ... except ValueError as e:
    ...     print(str(e)[-8:], out.exists())
    not kept False
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

BLOCK = 1 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def copy_verified(stream: BinaryIO, out: Path, size: int, sha256: str, what: str) -> None:
    """Write `stream` to `out`, reading at most `size` + 1 bytes; `ValueError` (and `out` removed) unless it is
    exactly `size` bytes with digest `sha256`."""
    h, got = hashlib.sha256(), 0
    try:
        with open(out, "wb") as f:
            while block := stream.read(BLOCK):
                got += len(block)
                if got > size:
                    raise ValueError(f"{what}: more than the {size} bytes announced")
                h.update(block)
                f.write(block)
        if got != size or h.hexdigest() != sha256:
            raise ValueError(f"{what}: {got} bytes with sha256 {h.hexdigest()[:12]}..., announced {size} bytes, "
                             f"sha256 {sha256[:12]}...: not kept")
    except BaseException:
        Path(out).unlink(missing_ok=True)
        raise
