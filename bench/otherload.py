"""How much CPU other processes took while a benchmark block ran: the machine is shared, so every
measurement records it next to its figures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil


class OtherLoad:
    """Other processes' CPU use while the block runs, in cores: all busy time minus this process tree's."""

    def __enter__(self) -> "OtherLoad":
        self.start = (time.monotonic(), _busy_seconds(), _own_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own = (b - a for a, b in zip(self.start, (time.monotonic(), _busy_seconds(), _own_seconds())))
        self.cores = max(0.0, (busy - own) / wall)


def _busy_seconds() -> float:
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system  # children_*: senders already finished
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total
