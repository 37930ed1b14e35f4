"""multipart/form-data request bodies, the one way files go to the matcher's HTTP API: image queries and watchlist
crops (`matcher.client`), harvested crops and their sidecars (`edge.uploader`). Stdlib only.

    body, content_type = encode_multipart({"model": "m-1", "cameras": ["gate", "hall"]},
                                          {"image": ("crop.jpg", jpeg, "image/jpeg")})
    # a list of files under one name is sent as repeated parts, in order:
    encode_multipart({}, {"crops": [("a.jpg", a, "image/jpeg"), ("b.jpg", b, "image/jpeg")]})
"""

from __future__ import annotations

import secrets

File = tuple[str, bytes, str]  # (file name, bytes, content type)


def encode_multipart(fields: dict[str, object], files: dict[str, File | list[File]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request; list values become repeated fields or files."""
    boundary = f"crossview-{secrets.token_hex(12)}"
    parts = []
    for name, value in fields.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{v}\r\n'.encode())
    for name, value in files.items():
        for filename, data, content_type in value if isinstance(value, list) else [value]:
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    f"Content-Type: {content_type}\r\n\r\n")
            parts.append(head.encode() + bytes(data) + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
