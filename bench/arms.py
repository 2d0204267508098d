"""The arms of the benchmark and the processes behind them.

Every arm answers the same two requests: a small JSON call and an SSE stream
of 100 events. ``direct`` calls the upstreams themselves; ``nginx`` is the C
baseline doing the same job (attach a static key, keep-alive, no
buffering); ``aiohttp-floor`` is a bare aiohttp passthrough (bench/passthrough.py),
the least any aiohttp-based proxy pays; ``sidekey`` is the sidecar on its full path (token validated,
cached, policy checked, key attached, response scrubbed, audit line
written); ``sidekey-nocache`` is the same sidecar validating the token
signature and claims on every request (``SIDEKEY_TOKEN_CACHE=0``, a benchmark knob);
``sidekey-llm`` is the sidecar with ``api: openai``, a model allow-list and
a token budget (reading ``model`` and metering every SSE event); ``litellm``
is LiteLLM's proxy, the Python peer (bench/litellm_peer.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import procstats

JSON_PATH = "/v1/chat/completions"
#: The SSE stream is a chat completion too (the upstream streams 100 events, 1 ms apart, to any POST),
#: so the LLM arm meters it and LiteLLM routes it; its model names the SSE upstream for LiteLLM.
SSE_PATH = "/v1/chat/completions"
_MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": "Say ok."}]
JSON_BODY = json.dumps({"model": "bench", "max_tokens": 16, "messages": _MESSAGES}, separators=(",", ":"))
SSE_BODY = json.dumps({"model": "bench-sse", "max_tokens": 256, "stream": True, "messages": _MESSAGES},
                      separators=(",", ":"))


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
