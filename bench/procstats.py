"""CPU time and resident memory of the processes under test, read from /proc.

CPU is utime + stime of a process and its threads (``/proc/<pid>/stat``
fields 14 and 15, in clock ticks); the benchmark divides a delta by the
number of requests served in between. nginx runs as a master plus a worker,
so a measured arm is a set of pids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        raw = Path(f"/proc/{pid}/stat").read_text()
        # the command name may hold spaces and parentheses: split after the last ')'
        fields = raw[raw.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICKS


def rss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
    return total


def children(pid: int) -> list[int]:
    """Direct children of a process (nginx's worker under its master)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        path = task / "children"
        if path.exists():
            found += [int(p) for p in path.read_text().split()]
    return found


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin_prefix(core: int | None) -> list[str]:
    """``taskset -c N`` when pinning is possible, else nothing."""
    return [] if core is None else ["taskset", "-c", str(core)]


#: How far the benchmark raises its own priority (and its children's) when it may.
NICE = -10


def raise_priority() -> int | None:
    """Renice this process (children inherit it) so other work on a shared machine disturbs less.

    Every arm gets the same priority, so the comparison stays fair; only root
    may lower a nice value. Returns the new nice value, or None if unchanged.
    """
    if os.geteuid() != 0:
        return None
    return os.nice(NICE - os.nice(0))
