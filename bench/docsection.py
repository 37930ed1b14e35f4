"""Each benchmark owns one section of a markdown file (docs/benchmarks.md, docs/results.md) and rewrites
only that section, so running one benchmark never touches another's figures."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(out: Path, heading: str, text: str) -> None:
    """Replace the part of `out` from `heading` up to the next heading of its level or above, or append `text`."""
    old = out.read_text() if out.is_file() else "# Benchmarks\n"
    level = len(heading) - len(heading.lstrip("#"))
    pattern = re.compile(rf"^{re.escape(heading)}.*?\n.*?(?=^#{{1,{level}}} |\Z)", re.S | re.M)
    body = text.rstrip("\n") + "\n\n"
    new = pattern.sub(lambda _: body, old, 1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(new.rstrip("\n") + "\n")
