"""wrk runs: saturation at a fixed connection count, and a paced fixed rate.

wrk runs with one thread, pinned to the load core. The Lua scripts in
``bench/wrk`` set the caller's token from the environment and write the
summary as JSON; a run with any socket error or non-2xx answer is refused
rather than reported, so a misconfigured arm cannot look fast.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import arms, procstats

LUA_DIR = Path(__file__).resolve().parent / "wrk"


class LoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    mean_us: float
    errors: dict[str, int]
    max_us: int = 0
    #: the latency distribution: (microseconds, count) per distinct value, ascending
    hist: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WrkResult:
        seconds = data["duration_us"] / 1e6
        lat = data["latency_us"]
        return cls(requests=data["requests"], seconds=seconds, rps=data["requests"] / seconds,
                   p50_us=lat["p50"], p90_us=lat["p90"], p99_us=lat["p99"], p999_us=lat["p999"],
                   mean_us=lat["mean"], errors=data["errors"], max_us=lat["max"],
                   hist=tuple((int(v), int(c)) for v, c in data.get("hist", ())))


def percentile(hist: list[tuple[int, int]], p: float) -> int:
    """The smallest latency with at least ``p`` percent of the samples at or below it."""
    total = sum(c for _, c in hist)
    rank = max(1, math.ceil(total * p / 100))
    seen = 0
    for value, count in hist:
        seen += count
        if seen >= rank:
            return value
    raise ValueError("an empty latency distribution")


def merged(results: list[WrkResult]) -> WrkResult:
    """Several runs of one arm as one: their requests and seconds added, their latency
    distributions merged, and the percentiles read from the merged distribution.

    The paced phase runs each arm in short slices that take turns, so that every
    arm meets the same machine (a few seconds of hypervisor steal lands in every
    arm's distribution, not in one arm's whole run); this puts the slices back together.
    """
    counts: dict[int, int] = {}
    for r in results:
        if not r.hist:
            raise ValueError("a wrk result without its latency distribution cannot be merged")
        for value, count in r.hist:
            counts[value] = counts.get(value, 0) + count
    hist = sorted(counts.items())
    requests = sum(r.requests for r in results)
    seconds = sum(r.seconds for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for kind, n in r.errors.items():
            errors[kind] = errors.get(kind, 0) + n
    total = sum(c for _, c in hist)
    return WrkResult(requests=requests, seconds=seconds, rps=requests / seconds,
                     p50_us=percentile(hist, 50), p90_us=percentile(hist, 90),
                     p99_us=percentile(hist, 99), p999_us=percentile(hist, 99.9),
                     mean_us=sum(v * c for v, c in hist) / total, errors=errors,
                     max_us=hist[-1][0], hist=tuple(hist))


def wrk(url: str, *, connections: int, seconds: float, token: str | None = None,
        rate: int | None = None, core: int | None = None, timeout_s: float = 5.0) -> WrkResult:
    """One wrk run; ``rate`` paces it (requests per second), else it saturates."""
    script = LUA_DIR / ("paced.lua" if rate else "report.lua")
    with tempfile.NamedTemporaryFile(prefix="wrk-", suffix=".json", delete=False) as f:
        out = Path(f.name)
    env = {**os.environ, "BENCH_OUT": str(out), "BENCH_LUA_DIR": str(LUA_DIR),
           "BENCH_TOKEN": token or "", "BENCH_BODY": arms.JSON_BODY, "BENCH_RATE": str(rate or 0)}
    duration = max(1, round(seconds))
    cmd = [*procstats.pin_prefix(core), "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
           f"--timeout={timeout_s:g}s", "-s", str(script), url]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=duration + 30, check=False)
        if proc.returncode != 0 or not out.stat().st_size:
            raise LoadError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        result = WrkResult.from_json(json.loads(out.read_text()))
    finally:
        out.unlink(missing_ok=True)
    if any(result.errors.values()):
        raise LoadError(f"wrk saw errors against {url}: {result.errors} "
                        f"({result.requests} requests); is the arm answering 2xx?")
    if result.requests == 0:
        raise LoadError(f"wrk completed no request against {url}")
    return result
