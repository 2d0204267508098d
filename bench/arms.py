"""The arms of the benchmark and the processes behind them.

Every arm answers the same two requests: a small JSON call and an SSE stream
of 100 events. ``direct`` calls the upstreams themselves; ``nginx`` is the C
baseline doing the same job (attach a static key, keep-alive, no
buffering); ``aiohttp-floor`` is a bare aiohttp passthrough (bench/passthrough.py),
the least any aiohttp-based proxy pays; ``sidekey`` is the sidecar on its full path (token validated,
cached, policy checked, key attached, response scrubbed, audit line
written); ``sidekey-nocache`` is the same sidecar validating the token
signature and claims on every request (``SIDEKEY_TOKEN_CACHE=0``, a benchmark knob).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench import procstats

JSON_PATH = "/v1/chat/completions"
SSE_PATH = "/stream?events=100&gap_ms=1"


@dataclass
class Arm:
    name: str
    port: int
    prefix: str  # "" for direct; "/bench" and "/sse" routes otherwise
    sse_port: int
    sse_prefix: str
    token: str | None = None
    #: The pids whose CPU and memory are the arm's cost (none for direct).
    pids: Callable[[], list[int]] = field(default=lambda: [])
    label: str = ""

    @property
    def json_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}{JSON_PATH}"

    @property
    def sse_path(self) -> str:
        return f"{self.sse_prefix}{SSE_PATH}"

    @property
    def measured(self) -> bool:
        return bool(self.pids())

    def cpu(self) -> float:
        return procstats.cpu_seconds(self.pids())

    def rss_kib(self, field: str = "VmRSS") -> int:
        return procstats.rss_kib(self.pids(), field)
