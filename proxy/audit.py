"""The audit line: one per request, its fields typed, its timestamp cheap.

Every request ends in exactly one line, whatever path it took (refused,
forwarded, cut by either side), so the record is created when the request
arrives and filled in as it goes. The path is redacted (query values
replaced) because agents put keys and personal data in queries.
"""

from __future__ import annotations

import time
from typing import TypedDict


class AuditRecord(TypedDict, total=False):
    request_id: str
    pod: str
    namespace: str
    service_account: str | None
    upstream: str | None
    method: str
    path: str
    decision: str  # allowed, denied, error
    reason: str  # ok, or the refusal's word (not_allowed, upstream_timeout, client_disconnected, ...)
    status: int
    bytes_in: int
    bytes_out: int
    duration_ms: float
    time: str
    streamed: bool
    model: str  # LLM upstreams (api set): the model the request named
    tokens: dict[str, int | bool]  # LLM upstreams: input, output, cached, estimated


def redacted(raw: str) -> str:
    """The request target for the audit line: query values are replaced."""
    path, sep, query = raw.partition("?")
    if not sep:
        return path[:2048]
    names = "&".join(f"{p.split('=', 1)[0]}=REDACTED" for p in query.split("&") if p)
    return f"{path}?{names}"[:2048]


class Stamp:
    """RFC 3339 UTC with milliseconds; ``strftime`` runs once a second, not per request."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._text}.{int((now - second) * 1000):03d}Z"
