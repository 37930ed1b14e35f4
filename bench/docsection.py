"""What every benchmark writes beside its figures.

| function        | what                                                                                  |
|-----------------|---------------------------------------------------------------------------------------|
| `write_section` | each benchmark owns one section of a markdown file and rewrites only that section     |
| `read_section`  | that section as it stands, for a benchmark that keeps part of it                      |
| `machine`       | the machine line: CPUs, RAM, Python and the library versions the figures depend on    |
| `table_head`    | a section's first lines: heading, the command that made it, when and where, the table's head |
| `publish`       | print a section, and write it into a markdown file when one is given                  |
"""

from __future__ import annotations

import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path


def _section(heading: str) -> re.Pattern:
    """From `heading` up to the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    return re.compile(rf"^{re.escape(heading)}.*?\n.*?(?=^#{{1,{level}}} |\Z)", re.S | re.M)


def read_section(out: Path, heading: str) -> str | None:
    found = _section(heading).search(out.read_text()) if out.is_file() else None
    return found[0] if found else None


def write_section(out: Path, heading: str, text: str) -> None:
    """Replace the part of `out` from `heading` up to the next heading of its level or above, or append `text`."""
    old = out.read_text() if out.is_file() else "# Benchmarks\n"
    pattern = _section(heading)
    body = text.rstrip("\n") + "\n\n"
    new = pattern.sub(lambda _: body, old, 1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(new.rstrip("\n") + "\n")


def machine(*versions: str) -> str:
    """"2 CPUs (model), 23.4 GiB RAM; Python 3.11.2, <versions>": CPUs this process may use, not the host's."""
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    mem = int(re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)[1]) / 2**20
    return ", ".join((f"{len(os.sched_getaffinity(0))} CPUs ({cpu[1] if cpu else platform.processor()}), {mem:.1f} GiB RAM; "
                      f"Python {platform.python_version()}", *versions))


def table_head(heading: str, columns: list[str], note: str = "") -> list[str]:
    """The heading, the command line that ran (this script and its arguments), when and on what, then the head of
    a table with `columns`."""
    run = f"`python bench/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`".replace(" `", "`")
    return [heading, "", f"{run}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}.{note and ' ' + note}",
            "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def publish(out: Path | None, heading: str, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    if out:
        write_section(out, heading, text)
    print(text)
