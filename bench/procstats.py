"""CPU time and resident memory of the processes under test, read from /proc.

CPU is utime + stime of a process and its threads (``/proc/<pid>/stat``
fields 14 and 15, in clock ticks); the benchmark divides a delta by the
number of requests served in between. nginx runs as a master plus a worker,
so a measured arm is a set of pids.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pids: Iterable[int]) -> tuple[int, int]:
    """User and system time of the pids, in clock ticks (utime, stime: fields 14, 15)."""
    user = system = 0
    for pid in pids:
        raw = Path(f"/proc/{pid}/stat").read_text()
        # the command name may hold spaces and parentheses: split after the last ')'
        fields = raw[raw.rindex(")") + 2:].split()
        user, system = user + int(fields[11]), system + int(fields[12])
    return user, system


def cpu_seconds(pids: Iterable[int]) -> float:
    return sum(cpu_ticks(pids)) / TICKS


def rss_kib(pids: Iterable[int], field: str = "VmRSS") -> int:
    """Resident memory; ``RssAnon`` is the part no other process can share.

    The rest of VmRSS is file-backed (the interpreter, OpenSSL, extension
    modules): on a node, every sidecar maps the same image files, so the
    page cache holds those pages once for all of them.
    """
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
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


def core_ticks(core: int | None) -> tuple[int, int]:
    """(steal, total) clock ticks of one core (all cores for None), from /proc/stat.

    Steal is time the hypervisor ran something else while this guest's vCPU
    had work: a task's wall time grows by it, its CPU time does not. So
    steal on the proxy's core during a paced run is latency no proxy can
    remove; the benchmark reports it beside the tail.
    """
    name = "cpu" if core is None else f"cpu{core}"
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == name:
            ticks = [int(v) for v in fields[1:9]]  # user .. steal; guest time is inside user
            return ticks[7], sum(ticks)
    raise LookupError(f"no {name} line in /proc/stat")


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of a core's time stolen between two ``core_ticks`` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


#: ``settle`` gives up after this long (and the harness says so in the run's notes).
SETTLE_LIMIT_S = 5.0


def schedstat(pids: Iterable[int]) -> tuple[int, int]:
    """Nanoseconds the pids' threads have run, and have waited runnable on a run queue
    (``/proc/<pid>/task/*/schedstat``, fields 1 and 2)."""
    ran = waited = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fields = (task / "schedstat").read_text().split()
                ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran, waited


def on_cpu_ns(pids: Iterable[int]) -> int:
    """Nanoseconds the pids' threads have run: finer than ``cpu_seconds`` (clock ticks of
    10 ms), so a short quiet window can be told."""
    return schedstat(pids)[0]


def settle(pids: list[int], *, quiet_ms: float = 1.0, window_s: float = 0.1,
           limit_s: float = SETTLE_LIMIT_S) -> bool:
    """Wait until the pids use less than ``quiet_ms`` of CPU in a ``window_s`` window.

    LiteLLM, at its limit in the paced run, is still serving the run's last
    requests after wrk has stopped: up to 8 in flight at some 16 ms of CPU
    each, which fell into the next arm's run on the same core, and into that
    arm's tail.
    False if the pids were still busy after ``limit_s``.
    """
    deadline = time.monotonic() + limit_s
    last = on_cpu_ns(pids)
    while time.monotonic() < deadline:
        time.sleep(window_s)
        now = on_cpu_ns(pids)
        if now - last < quiet_ms * 1e6:
            return True
        last = now
    return False


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin_prefix(core: int | None) -> list[str]:
    """``taskset -c N`` when pinning is possible, else nothing."""
    return [] if core is None else ["taskset", "-c", str(core)]


#: How far the benchmark raises its own priority (and its children's) when it may.
NICE = -10
AUTOGROUP = Path("/proc/self/autogroup")


def _autogroup_nice() -> int | None:
    try:
        return int(AUTOGROUP.read_text().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return None


def raise_priority() -> tuple[str | None, Callable[[], None]]:
    """Raise this process's priority (children inherit it); return what was done and how to undo it.

    Linux with autogroup shares the CPU between sessions first and applies
    nice values only inside one, so the session's autogroup is reniced too
    (and restored when the run ends). Every arm runs at the same priority,
    so the comparison stays fair; other work on a shared machine disturbs
    the measurement less. Only root may do either.
    """
    if os.geteuid() != 0:
        return None, lambda: None
    os.nice(NICE - os.nice(0))
    before = _autogroup_nice()
    if before is None:
        return f"nice {NICE}", lambda: None
    try:
        AUTOGROUP.write_text(str(NICE))
    except OSError:
        return f"nice {NICE}", lambda: None

    def restore() -> None:
        with contextlib.suppress(OSError):
            AUTOGROUP.write_text(str(before))
    return f"nice {NICE} and autogroup nice {NICE}", restore
