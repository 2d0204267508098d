"""The transport catalogue: upstream answers shaped to carry the key past the scrubber, or to desync.

Each case is an upstream that answers with exactly the bytes written here
(a raw socket, so malformed framing arrives as written) to a request the
policy allows. The agent's whole answer (status line, headers, body) must
hold no form of the key, and the sidecar must answer the next request on a
fresh exchange correctly: a response nobody asked for, a body after a HEAD
answer, or a trailer must never reach the next caller.

- ``refused``: a 502 from the sidecar (the body cannot be checked, or it is not HTTP);
- ``scrubbed``: relayed, with every form of the key replaced;
- ``cut``: the status line went out, then the connection is cut (a truncated body
  must not look complete).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.proxy.conftest import make_proxy
from tests.proxy.fakes import SECRET, SECRETS, ProxyFactory, bearer_upstream, mint, policy

__all__ = ["make_proxy"]  # the fixture, imported for this module

KEY = SECRET.encode()
B64 = base64.b64encode(KEY)
FORMS = (KEY, B64.rstrip(b"="), SECRET.replace("-", "%2D").encode())


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


GZ = gzip.compress(b"echo: " + KEY)


@dataclass(frozen=True)
class Case:
    answer: bytes
    expect: str  # refused, scrubbed, cut
    body: bytes | None = None  # the exact body the agent must get, where it is known


CATALOGUE: dict[str, Case] = {
    # --- transfer codings the scrubber cannot read through (issue 14)
    "te-gzip-chunked": Case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + _chunked(GZ), "refused"),
    "te-gzip-until-close": Case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n" + GZ,
                                "refused"),
    "te-deflate-chunked": Case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: deflate, chunked\r\n\r\n" + _chunked(GZ),
                               "refused"),
    "te-chunked-twice": Case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + _chunked(KEY), "refused"),
    "te-identity-chunked": Case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity, chunked\r\n\r\n" + _chunked(KEY),
                                "refused"),
    "content-encoding-br": Case(b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nabc", "refused"),
    # --- header names (issue 14): an echo as a name, raw and base64
    "key-as-a-header-name": Case(b"HTTP/1.1 401 No\r\n" + KEY + b": 1\r\nContent-Length: 2\r\n\r\nno", "scrubbed"),
    "base64-key-in-a-header-name": Case(b"HTTP/1.1 401 No\r\nX-" + B64.rstrip(b"=").replace(b"+", b"-")
                                        .replace(b"/", b"_") + b": 1\r\nContent-Length: 2\r\n\r\nno", "scrubbed"),
    "key-in-a-header-value": Case(b"HTTP/1.1 401 No\r\nWWW-Authenticate: Bearer " + KEY
                                  + b"\r\nContent-Length: 2\r\n\r\nno", "scrubbed"),
    "key-in-the-reason-phrase": Case(b"HTTP/1.1 401 Invalid key " + KEY + b"\r\nContent-Length: 2\r\n\r\nno",
                                     "scrubbed"),
    # --- bodies
    "key-split-over-chunks": Case(b"HTTP/1.1 401 No\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  + _chunked(*(KEY[i:i + 3] for i in range(0, len(KEY), 3))), "scrubbed"),
    "key-in-a-trailer": Case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Leak\r\n\r\n"
                             b"2\r\nok\r\n0\r\nX-Leak: " + KEY + b"\r\n\r\n", "scrubbed"),
    "key-after-a-100-continue": Case(b"HTTP/1.1 100 Continue\r\nX-Leak: " + KEY + b"\r\n\r\n"
                                     b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(KEY) + KEY, "scrubbed"),
    "gzip-content-encoding-echo": Case(b"HTTP/1.1 500 Err\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                                       % len(GZ) + GZ, "scrubbed"),
    "body-until-close": Case(b"HTTP/1.1 401 No\r\nConnection: close\r\n\r\necho " + KEY, "scrubbed"),
    # --- framing the agent must see as broken, not as complete
    "shorter-than-content-length": Case(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\npartial", "cut"),
    # (in one packet nothing was sent yet: a clean 502; split, it is a cut stream)
    "bad-chunk-size": Case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n", "refused"),
    # --- not HTTP/1.1, or a tunnel
    "switching-protocols": Case(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                b"Connection: Upgrade\r\n\r\n" + KEY, "refused"),
    "not-http": Case(b"SSH-2.0-OpenSSH_9.6 " + KEY + b"\r\n", "refused"),
    "content-length-and-chunked": Case(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                                       + _chunked(KEY), "refused"),
    # --- desync: extra responses must never answer the next request
    "a-second-response-in-one-packet": Case(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                                            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(KEY) + KEY,
                                            "scrubbed", body=b"ok"),
}


class ScriptedUpstream:
    """Answers every request with the case's bytes, then (for the follow-up) a plain 200 'fresh'."""

    def __init__(self) -> None:
        self.answer = b""
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                if head.startswith(b"GET /base/fresh"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
                else:
                    writer.write(self.answer)
                    if b"Connection: close" in self.answer or b"Content-Length" not in self.answer:
                        await writer.drain()
                        writer.close()
                        return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    up.server = await asyncio.start_server(up._client, "127.0.0.1", 0)
    up.port = up.server.sockets[0].getsockname()[1]
    yield up
    up.server.close()


async def _exchange(port: int, target: str, method: str = "GET") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mint()}\r\n"
                 "Connection: close\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def test_the_catalogue_has_at_least_20_shapes() -> None:
    assert len(CATALOGUE) >= 20


@pytest.mark.parametrize("case", list(CATALOGUE))
async def test_an_upstream_answer_cannot_carry_the_key_or_desync(
    make_proxy: ProxyFactory, scripted: ScriptedUpstream, case: str
) -> None:
    shape = CATALOGUE[case]
    scripted.answer = shape.answer
    p = await make_proxy(policy(bearer_upstream(f"http://127.0.0.1:{scripted.port}")), secrets=SECRETS)
    port = int(p.url.rsplit(":", 1)[1])
    answer = await _exchange(port, "/openai/x")
    assert scripted.requests, "the upstream was never asked: the case proves nothing"
    assert KEY in scripted.requests[0], "the key did not go up: the case proves nothing"
    for form in FORMS:
        assert form not in answer, f"{case}: a form of the key came back: {answer[:300]!r}"
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    if shape.expect == "refused":
        assert status == 502, (case, answer[:300])
    elif shape.expect == "scrubbed":
        assert status not in (0, 502), (case, answer[:300])
        if b"Transfer-Encoding: chunked" in answer.split(b"\r\n\r\n", 1)[0]:
            assert answer.endswith(b"0\r\n\r\n"), (case, answer[-100:])
    else:
        assert status == 200, (case, answer[:300])
        body = answer.split(b"\r\n\r\n", 1)[1]
        assert not body.endswith(b"0\r\n\r\n") and len(body) < 100000, (case, answer[-100:])
    if shape.body is not None:
        assert answer.split(b"\r\n\r\n", 1)[1] == shape.body, (case, answer[-200:])
    # the next request is answered by its own response, never a leftover of this one
    follow = await _exchange(port, "/openai/fresh")
    assert follow.startswith(b"HTTP/1.1 200") and follow.endswith(b"fresh"), (case, follow[:300])
    line = p.audit_lines()[0]
    assert line["upstream"] == "openai" and line["status"] == status


async def test_a_head_answer_leaves_the_pooled_connection_in_step(
    make_proxy: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    # llhttp cannot be told an answer is to HEAD: without care it would wait for 50 body bytes
    # and read the next response as that body
    scripted.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"
    p = await make_proxy(policy(bearer_upstream(f"http://127.0.0.1:{scripted.port}")), secrets=SECRETS)
    port = int(p.url.rsplit(":", 1)[1])
    head = await _exchange(port, "/openai/x", "HEAD")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 50" in head
    for _ in range(3):
        follow = await _exchange(port, "/openai/fresh")
        assert follow.startswith(b"HTTP/1.1 200") and follow.endswith(b"fresh"), follow
