"""A burst's idle connections are closed a batch per loop turn, not all at once.

Upstream: a burst's connections come back to the pool together, so they fall
due together: 256 closed in one loop turn held the sidecar's loop for 4 ms, and
every request in flight waited that long. In batches of ``CLOSES_PER_TURN`` the
longest turn was 1 ms and the typical one 0.25 ms. The agent side: the
listener's idle sweep closes keep-alive connections the agent left open, which
a burst leaves idle together too. Real loopback sockets, on the sidecar's loop
(uvloop) and asyncio's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from sidekey.proxy import listener, routes, upstream

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop,
}
WIDTH = 40  # two and a half batches


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _until(check: Callable[[], bool], seconds: float = 3.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.01)


async def _closings_per_turn(closing: Callable[[], int]) -> list[int]:
    """How many of the WIDTH connections began closing in each loop turn, until all have."""
    per_turn: list[int] = []
    seen = 0
    async with asyncio.timeout(5):
        while seen < WIDTH:  # one reading per loop turn
            await asyncio.sleep(0)
            now = closing()
            if now > seen:
                per_turn.append(now - seen)
                seen = now
    return per_turn


@contextlib.asynccontextmanager
async def _burst() -> AsyncIterator[tuple[upstream.Pool, upstream.Origin, list[upstream.UpstreamConnection]]]:
    """A pool that served WIDTH requests at once and has every connection back, idle."""
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    pool = upstream.Pool(routes.GuardedResolver(frozenset()))
    origin: upstream.Origin = ("http", "127.0.0.1", port, None)
    loop = asyncio.get_running_loop()
    conns = []
    try:
        for _ in range(WIDTH):
            _, conn = await loop.create_connection(lambda: upstream.UpstreamConnection(pool, origin),
                                                   "127.0.0.1", port)
            conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", head_method=False, timeout=3)
            await asyncio.wait_for(conn.head(), 3)
            await asyncio.wait_for(conn.relay(lambda data: None), 3)
            conns.append(conn)
        for conn in conns:  # the burst is over: every connection back in the pool at once
            conn.release()
        assert len(pool._idle[origin]) == WIDTH
        yield pool, origin, conns
    finally:
        pool.close()
        server.close()


def _run(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_burst_is_reaped_one_batch_per_loop_turn(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.2)

    async def main() -> None:
        async with _burst() as (pool, origin, conns):
            closing_per_turn = await _closings_per_turn(
                lambda: sum(1 for c in conns if c.closed or c.transport_closing))
            assert max(closing_per_turn) <= upstream.CLOSES_PER_TURN, closing_per_turn
            assert len(closing_per_turn) >= -(-WIDTH // upstream.CLOSES_PER_TURN)
            assert origin not in pool._idle  # the pool is empty and holds no list for the origin
            await asyncio.sleep(0.05)
            assert all(c.closed for c in conns)

    _run(loop, main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_connection_not_yet_due_waits_for_its_own_time(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batches take only the due connections; a younger one is reaped at its own time."""
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.3)

    async def main() -> None:
        async with _burst() as (pool, origin, conns):
            young = pool._idle[origin][-1]
            young.idle_since += 0.4  # returned later than the rest
            await _until(lambda: sum(c.closed for c in conns) == WIDTH - 1)
            assert not young.closed and pool._idle[origin] == [young]
            await _until(lambda: young.closed)
            assert origin not in pool._idle

    _run(loop, main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_the_listener_closes_a_bursts_idle_agent_connections_one_batch_per_loop_turn(
        loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener, "IDLE_SECONDS", 0.2)

    async def handler(request: listener.Request, conn: listener.AgentConnection) -> None:
        listener.Reply(conn, request).whole(200, b"", b"ok")

    async def main() -> None:
        server = listener.Listener(handler)
        await server.start("127.0.0.1", 0)
        clients = []
        try:
            for _ in range(WIDTH):  # a burst of agents that keep their connections open
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await asyncio.wait_for(reader.readuntil(b"ok"), 3)
                clients.append((reader, writer))
            conns = list(server.connections)
            assert len(conns) == WIDTH
            now = server.clock()
            for conn in conns:  # idle since the same moment: all due in the same sweep
                conn.last_data = now
            closing_per_turn = await _closings_per_turn(
                lambda: sum(1 for c in conns if c.transport is None or c.transport.is_closing()))
            assert max(closing_per_turn) <= listener.CLOSES_PER_TURN, closing_per_turn
            assert len(closing_per_turn) >= -(-WIDTH // listener.CLOSES_PER_TURN)
            for reader, _ in clients:  # every agent sees its connection end cleanly
                assert await asyncio.wait_for(reader.read(), 2) == b""
            await _until(lambda: not server.connections)
            await asyncio.sleep(0.1)
            assert server._sweep is None  # nothing connected, nothing scheduled
        finally:
            for _, writer in clients:
                writer.close()
            await server.drain(0.1)

    _run(loop, main)
