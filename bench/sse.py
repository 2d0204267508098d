"""The SSE client: time to first event, and a concurrent load for CPU per event.

A small HTTP/1.1 client on raw asyncio streams, so the client's own cost is
small and the clock is read right at the socket: ``ttfb`` is the time from
writing the request to reading the first byte of the body (the upstream
sends the first event at once, so this is the time to the first event).
Each stream must deliver every event (counted after de-chunking: a proxy
may split an event across chunks) or the run is refused.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from bench import arms


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
    """The same streaming chat-completion POST for every arm."""
    body = arms.SSE_BODY.encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _dechunk(body: bytes) -> bytes:
    """The payload of a chunked body (the proxies may split events across chunks)."""
    out = bytearray()
    i = 0
    while True:
        eol = body.index(b"\r\n", i)
        size = int(body[i:eol].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(out)
        out += body[eol + 2:eol + 2 + size]
        i = eol + 2 + size + 2


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
               events: int) -> int:
    """One stream on a kept-alive connection; returns the time to the first body byte in ns."""
    start = time.perf_counter_ns()
    writer.write(request)
    first = 0
    body_at = -1
    buf = bytearray()
    while True:
        data = await reader.read(65536)
        if not data:
            raise SseError("connection closed mid-stream")
        buf += data
        if body_at < 0:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                body_at = head_end + 4
        if not first and body_at >= 0:
            size_end = buf.find(b"\r\n", body_at)
            if size_end >= 0 and len(buf) > size_end + 2:
                first = time.perf_counter_ns()  # the first byte of the first chunk's payload
        if buf.endswith(b"\r\n0\r\n\r\n"):
            break
    head = bytes(buf[:buf.find(b"\r\n")])
    if not head.startswith(b"HTTP/1.1 200"):
        raise SseError(f"stream answered {head[:40]!r}")
    if b"chunked" not in bytes(buf[:body_at]).lower():
        raise SseError("stream is not chunked")
    # counted by content, not by "data:" lines: LiteLLM re-encodes each chunk and adds a final one
    got = _dechunk(bytes(buf[body_at:])).count(b'"token ')
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
