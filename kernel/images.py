"""What an image costs to decode, read from its header before anything decodes it: pure Python, no pixels.

| what        | how                                                                                      |
|-------------|------------------------------------------------------------------------------------------|
| dimensions  | `image_size(data)`: (kind, width, height) from a PNG's IHDR or a JPEG's frame header (SOF); |
|             | `jpeg_size(data)`: a JPEG's, or None when it has no frame header (then nothing decodes it) |
| JPEG scans  | `check_scans(data)`: each scan is a pass over the whole image, so thousands of them take  |
|             | minutes of CPU from a few KB; more than `MAX_JPEG_SCANS` is a `ValueError`               |

Shared by the wire's thumbnails (`kernel.wire`) and the matcher's uploads (`matcher.limits`).

    >>> image_size(b"\\x89PNG\\r\\n\\x1a\\n\\x00\\x00\\x00\\rIHDR\\x00\\x00\\x02\\x80\\x00\\x00\\x01\\xe0")
    ('PNG', 640, 480)
"""

from __future__ import annotations

import re
import struct

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
MAX_JPEG_SCANS = 100  # a progressive JPEG has about 10
# JPEG start-of-frame markers (baseline, progressive, lossless, ...): C0-CF but DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: markers without a length field
_SOS = 0xDA
_SOS_MARKER = re.compile(b"\xff\xda")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as a JPEG's frame header declares them; None when it has none before its first scan.
    Markers are found as libjpeg finds them (bytes between segments and stuffed FF 00 skipped), so the frame
    header read here is the one it would decode."""
    pos = 2
    while (pos := data.find(b"\xff", pos)) >= 0 and pos + 4 <= len(data):
        marker = data[pos + 1]
        if marker in (0xFF, 0x00):  # a fill byte; FF 00 is no marker
            pos += 1 if marker else 2
        elif marker in _NO_LENGTH:
            pos += 2
        elif marker in _SOF:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        elif marker == _SOS:  # a scan before any frame header
            return None
        else:
            pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def image_size(data: bytes) -> tuple[str, int, int]:
    """(kind, width, height) as the image's header declares them; `ValueError` for anything but PNG and JPEG,
    its message completing "upload 'x' is ..."."""
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ValueError("a corrupt PNG: it has no header (IHDR)")
        return ("PNG", *struct.unpack(">II", data[16:24]))
    if data.startswith(JPEG_SOI):
        size = jpeg_size(data)
        if size is None:
            raise ValueError("a corrupt JPEG: it has no frame header (SOF)")
        return ("JPEG", *size)
    raise ValueError(f"not a JPEG or PNG image (it starts with {data[:8]!r})")


def check_scans(jpeg: bytes) -> None:
    """`ValueError` for a JPEG of more than MAX_JPEG_SCANS scans, its message completing "upload 'x' is ...".
    Entropy-coded data stuffs each FF byte with 00, so FF DA is a start-of-scan marker wherever it is (or inside
    another segment, which only makes the count stricter)."""
    scans = sum(1 for _ in _SOS_MARKER.finditer(jpeg))  # the wire checks every thumbnail: 2.5x faster than bytes.count
    if scans > MAX_JPEG_SCANS:
        raise ValueError(f"a JPEG of {scans:,} scans; the limit is {MAX_JPEG_SCANS} (each is a pass over the whole image)")
