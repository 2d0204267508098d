"""A closed connection is freed when it closes, not when the collector next runs.

httptools' parsers hold bound methods of their protocol, a reference cycle
with the connection. Connections that served through a burst are promoted to
the collector's oldest generation, so the cycle kept a whole burst's
connections (and the allocator's arenas under them) until a full pass ran:
after a second 256-connection burst the sidecar held 2.3 MB more than after
the first (docs/performance.md, "The memory after a burst"). Each test runs
with the collector off, on the sidecar's loop (uvloop) and on asyncio's, over
real loopback sockets, and counts the connection objects that are still alive.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from sidekey.proxy import listener, routes, upstream

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop,
}
CONNECTIONS = 20


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


def _run(loop: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main())


async def _until(check: Callable[[], bool], seconds: float = 3.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_closed_agent_connection_is_freed_without_the_collector(loop: str, no_collector: None) -> None:
    async def handler(request: listener.Request, conn: listener.AgentConnection) -> None:
        listener.Reply(conn, request).whole(200, b"", b"ok")

    async def main() -> int:
        server = listener.Listener(handler)
        await server.start("127.0.0.1", 0)
        before = _alive(listener.AgentConnection)
        for _ in range(CONNECTIONS):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"ok"), 3)).startswith(b"HTTP/1.1 200")
            writer.close()
            await writer.wait_closed()
        await _until(lambda: not server.connections)
        await asyncio.sleep(0.05)  # the transports' last callbacks
        left = _alive(listener.AgentConnection) - before
        await server.drain(0.1)
        return left

    assert _run(loop, main) == 0


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_closed_upstream_connection_is_freed_without_the_collector(loop: str, no_collector: None) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # kept alive until the sidecar's side closes
        writer.close()

    async def main() -> int:
        upstream_server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = int(upstream_server.sockets[0].getsockname()[1])
        pool = upstream.Pool(routes.GuardedResolver(frozenset()))
        origin: upstream.Origin = ("http", "127.0.0.1", port, None)

        async def exchange() -> None:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: upstream.UpstreamConnection(pool, origin), "127.0.0.1", port)
            conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", head_method=False, timeout=3)
            got: list[bytes] = []
            await asyncio.wait_for(conn.head(), 3)
            await asyncio.wait_for(conn.relay(got.append), 3)
            assert (conn.status, b"".join(got)) == (200, b"ok")
            conn.abandon()
            await _until(lambda: conn.closed)

        before = _alive(upstream.UpstreamConnection)
        for _ in range(CONNECTIONS):
            await exchange()
        await asyncio.sleep(0.05)
        left = _alive(upstream.UpstreamConnection) - before
        upstream_server.close()
        return left

    assert _run(loop, main) == 0
