"""The control plane's small HTTP/1.1 client against raw loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sidekey.core import certificates, httpclient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler, context: ssl.SSLContext | None = None) -> Server:
        state = Server()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=context)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for s in servers:
        s.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            head += await reader.readexactly(int(line.split(b":")[1]))
    return head


def answering(*answers: bytes, keep_open: bool = True) -> tuple[Handler, list[bytes]]:
    """Answer each request on a connection with the next of ``answers``."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            seen.append(await read_request(reader))
            writer.write(answer)
            await writer.drain()
        if keep_open:
            await reader.read()

    return handler, seen


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": true}"


async def test_a_second_request_reuses_the_kept_alive_connection(serve: Callable[..., Awaitable[Server]]) -> None:
    handler, seen = answering(OK, OK)
    server = await serve(handler)
    client = httpclient.Client()
    try:
        for _ in range(2):
            resp = await client.request("GET", f"http://127.0.0.1:{server.port}/x?y=1", headers=[("A", "b")])
            assert resp.status == 200 and resp.body == b'{"a": true}'
            assert resp.headers["content-type"] == "application/json"
    finally:
        await client.close()
    assert server.connections == 1
    assert seen[0].startswith(b"GET /x?y=1 HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in seen[0] and b"\r\nA: b\r\n" in seen[0]
    assert b"\r\nAccept-Encoding: identity\r\n" in seen[0]


async def test_a_body_is_sent_with_its_length(serve: Callable[..., Awaitable[Server]]) -> None:
    handler, seen = answering(OK)
    server = await serve(handler)
    client = httpclient.Client()
    try:
        await client.request("POST", f"http://127.0.0.1:{server.port}/t", body=b"k=v")
    finally:
        await client.close()
    assert b"\r\nContent-Length: 3\r\n\r\nk=v" in seen[0]


async def test_a_kept_connection_the_server_drops_before_answering_is_replaced_once(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)  # keep-alive promised...
        await writer.drain()
        await read_request(reader)  # ...but the next request is dropped unanswered (an idle-timeout race)

    server = await serve(one_answer_then_close)
    client = httpclient.Client()
    try:
        assert (await client.request("GET", f"http://127.0.0.1:{server.port}/")).status == 200
        await asyncio.sleep(0.05)
        assert (await client.request("GET", f"http://127.0.0.1:{server.port}/")).status == 200
    finally:
        await client.close()
    assert server.connections == 2


async def test_silence_longer_than_the_read_timeout_fails_but_a_slow_stream_that_talks_does_not(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if b"/silent" in request:
            await asyncio.sleep(5)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(6):  # 0.6 s in all, never 0.3 s of silence
            writer.write(b"2\r\n%02d\r\n" % i)
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    server = await serve(trickle)
    client = httpclient.Client(read_timeout=0.3)  # the client's own, for calls that give none
    try:
        with pytest.raises(httpclient.HttpTimeout, match=r"no answer within 0\.3 s"):
            await client.request("GET", f"http://127.0.0.1:{server.port}/silent")
        chunks = []
        async with client.stream("GET", f"http://127.0.0.1:{server.port}/slow", read_timeout=0.25) as s:
            assert s.status == 200
            async for chunk in s:
                chunks.append(chunk)
        assert b"".join(chunks) == b"000102030405" and len(chunks) >= 3  # handed over as they came
    finally:
        await client.close()


async def test_a_name_that_does_not_resolve_in_time_is_a_connect_timeout() -> None:
    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["127.0.0.1"]

    client = httpclient.Client(resolve=slow, connect_timeout=0.2)
    with pytest.raises(httpclient.HttpTimeout, match="no connection"):
        await client.request("GET", "http://idp.example:80/")
    await client.close()


async def test_a_refusing_resolver_stops_the_call_before_any_connection(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    handler, _ = answering(OK)
    server = await serve(handler)
    asked: list[tuple[str, int]] = []

    async def refuse(host: str, port: int) -> list[str]:
        asked.append((host, port))
        raise OSError(f"{host} resolves to this pod")

    client = httpclient.Client(resolve=refuse)
    with pytest.raises(httpclient.HttpError, match="resolves to this pod"):
        await client.request("GET", f"http://idp.example:{server.port}/")
    # an IP literal is trusted as written: no lookup
    assert (await client.request("GET", f"http://127.0.0.1:{server.port}/")).status == 200
    await client.close()
    assert asked == [("idp.example", server.port)] and server.connections == 1


async def test_a_body_over_the_limit_is_refused_and_not_read_to_the_end(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    sent: list[int] = []

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * 65536))
        for _ in range(64):
            writer.write(b"x" * 65536)
            await writer.drain()
            sent.append(1)

    server = await serve(huge)
    client = httpclient.Client()
    with pytest.raises(httpclient.BodyTooLarge):
        await client.request("GET", f"http://127.0.0.1:{server.port}/", limit=1024)
    await client.close()
    await asyncio.sleep(0.1)
    assert len(sent) < 64


@pytest.mark.parametrize("answer,match", [
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n", "'gzip'-encoded"),
    (b"NOT HTTP AT ALL\r\n\r\n", "unparsable"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "middle of its answer"),
])
async def test_an_answer_that_cannot_be_used_is_an_http_error(
    serve: Callable[..., Awaitable[Server]], answer: bytes, match: str
) -> None:
    handler, _ = answering(answer, keep_open=False)
    server = await serve(handler)
    client = httpclient.Client()
    with pytest.raises(httpclient.HttpError, match=match):
        await client.request("GET", f"http://127.0.0.1:{server.port}/")
    await client.close()


async def test_an_early_hint_is_skipped_and_a_body_until_close_is_read(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    handler, _ = answering(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", keep_open=False)
    server = await serve(handler)
    client = httpclient.Client()
    resp = await client.request("GET", f"http://127.0.0.1:{server.port}/")
    await client.close()
    assert resp.status == 200 and resp.body == b"until the end" and "link" not in resp.headers


async def test_a_header_with_a_line_break_is_never_sent() -> None:
    client = httpclient.Client()
    with pytest.raises(ValueError, match="line break") as info:
        await client.request("GET", "http://127.0.0.1:1/", headers=[("Authorization", "Bearer a\r\nX-Evil: 1")])
    assert "Bearer" not in str(info.value)
    await client.close()


def server_tls(tmp_path: Path) -> tuple[certificates.KeyPair, ssl.SSLContext]:
    """A private CA and a server context with a certificate it issued for 127.0.0.1."""
    ca = certificates.make_ca("test CA")
    leaf = certificates.issue(ca, "server", ip_addresses=["127.0.0.1"])
    (tmp_path / "server.pem").write_bytes(leaf.cert_pem + leaf.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem")
    return ca, context


async def test_tls_is_verified_against_the_callers_context(
    serve: Callable[..., Awaitable[Server]], tmp_path: Path
) -> None:
    ca, context = server_tls(tmp_path)
    handler, _ = answering(OK, OK)
    server = await serve(handler, context)
    url = f"https://127.0.0.1:{server.port}/"
    client = httpclient.Client(tls=ssl.create_default_context(cadata=ca.cert_pem.decode()))
    try:
        assert (await client.request("GET", url)).status == 200
        stranger = ssl.create_default_context(cadata=certificates.make_ca("another CA").cert_pem.decode())
        with pytest.raises(httpclient.HttpError, match="TLS"):
            await client.request("GET", url, tls=stranger)
    finally:
        await client.close()


async def test_a_kept_connection_is_reused_only_under_the_context_that_verified_it(
    serve: Callable[..., Awaitable[Server]], tmp_path: Path
) -> None:
    ca, context = server_tls(tmp_path)

    async def answer_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
    server = await serve(answer_all, context)
    url = f"https://127.0.0.1:{server.port}/"
    first = ssl.create_default_context(cadata=ca.cert_pem.decode())
    second = ssl.create_default_context(cadata=ca.cert_pem.decode())  # the same trust, another context
    client = httpclient.Client()
    try:
        assert (await client.request("GET", url, tls=first)).status == 200
        assert (await client.request("GET", url, tls=first)).status == 200
        assert server.connections == 1  # reused under the same context
        assert (await client.request("GET", url, tls=second)).status == 200
        assert server.connections == 2  # never handed to another context
    finally:
        await client.close()
