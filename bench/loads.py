"""wrk runs: saturation at a fixed connection count, and a paced fixed rate.

wrk runs with one thread, pinned to the load core. The Lua scripts in
``bench/wrk`` set the caller's token from the environment and write the
summary as JSON; a run with any socket error or non-2xx answer is refused
rather than reported, so a misconfigured arm cannot look fast.
"""

from __future__ import annotations

import json
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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WrkResult:
        seconds = data["duration_us"] / 1e6
        lat = data["latency_us"]
        return cls(requests=data["requests"], seconds=seconds, rps=data["requests"] / seconds,
                   p50_us=lat["p50"], p90_us=lat["p90"], p99_us=lat["p99"], p999_us=lat["p999"],
                   mean_us=lat["mean"], errors=data["errors"])


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
