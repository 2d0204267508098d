"""The SSE client: time to first event, and a concurrent load for CPU per event.

A small HTTP/1.1 client on raw asyncio streams, so the client's own cost is
small and the clock is read right at the socket: ``ttfb`` is the time from
writing the request to reading the first ``data:`` byte. Each stream must
deliver every event (counted) or the run is refused.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass


class SseError(RuntimeError):
    pass


@dataclass(frozen=True)
class SseResult:
    streams: int
    events: int
    seconds: float
    ttfb_p50_us: float
    ttfb_p90_us: float


def _request(path: str, host: str, token: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
               events: int) -> int:
    """One stream on a kept-alive connection; returns the time to first event in ns."""
    start = time.perf_counter_ns()
    writer.write(request)
    first = 0
    buf = bytearray()
    while True:
        data = await reader.read(65536)
        if not data:
            raise SseError("connection closed mid-stream")
        if not first and b"data:" in data:
            first = time.perf_counter_ns()
        buf += data
        if buf.endswith(b"\r\n0\r\n\r\n"):
            break
    head = bytes(buf[:buf.find(b"\r\n")])
    if not head.startswith(b"HTTP/1.1 200"):
        raise SseError(f"stream answered {head[:40]!r}")
    got = buf.count(b"data: {")
    if got != events:
        raise SseError(f"stream delivered {got} of {events} events")
    return first - start


async def _client(port: int, path: str, token: str | None, streams: int, events: int,
                  ttfbs: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = _request(path, f"127.0.0.1:{port}", token)
    try:
        for _ in range(streams):
            ttfbs.append(await _one(reader, writer, request, events))
    finally:
        writer.close()


async def _run(port: int, path: str, token: str | None, clients: int, streams: int,
               events: int) -> SseResult:
    ttfbs: list[int] = []
    started = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(_client(port, path, token, streams, events, ttfbs) for _ in range(clients))),
        timeout=120)
    seconds = time.perf_counter() - started
    q = statistics.quantiles(ttfbs, n=10) if len(ttfbs) > 1 else [ttfbs[0]] * 9
    return SseResult(streams=len(ttfbs), events=len(ttfbs) * events, seconds=seconds,
                     ttfb_p50_us=statistics.median(ttfbs) / 1000, ttfb_p90_us=q[8] / 1000)


def run(port: int, path: str, token: str | None, *, clients: int, streams: int,
        events: int = 100) -> SseResult:
    """``clients`` connections, each reading ``streams`` streams one after another."""
    return asyncio.run(_run(port, path, token, clients, streams, events))
