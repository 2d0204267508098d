"""The agent-facing listener: HTTP/1.1 on an ``asyncio.Protocol``, parsed by llhttp.

llhttp (through ``httptools``, the parser Node.js uses) is strict where a
proxy must be: it refuses a request carrying both ``Content-Length`` and
``Transfer-Encoding``, duplicate lengths, obs-fold, bare CR or LF, invalid
header characters and lowercase methods, so no request can be read one way
here and another way upstream (smuggling). On top of it this module refuses
what llhttp allows but a proxy in front of a credential must not: a second
``Host``, a transfer coding other than ``chunked``, HTTP versions other than
1.0 and 1.1, oversized targets and header blocks. Every malformed request is
answered ``400`` (or ``414``/``431``) and the connection closed; nothing
raises out of the protocol.

A connection serves its requests one after another (pipelining), so a
response is never interleaved with another. Requests are dispatched at the
end of each read: first to the ``fast`` handler, which may take a request
whose body is complete and serve it from callbacks alone (no task; it calls
``finished()`` at the end), else to the handler, run in a task per request.
A request body is buffered up to a bound and then reading from the agent
pauses until the handler takes it (back-pressure); the handler's writes
pause the upstream read when the agent reads slowly (``pause_writing``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from sidekey.core import errors

if TYPE_CHECKING:  # the proxy's to set; the listener only holds it
    from sidekey.core import tokens

log = logging.getLogger("sidekey.proxy")

#: The longest request target accepted (aiohttp's and nginx's line limit is of this order).
MAX_TARGET: Final = 8190
#: The largest header block accepted, names and values together.
MAX_HEADERS_BYTES: Final = 64 * 1024
MAX_HEADERS: Final = 128
#: Buffered request body above which reading from the agent pauses.
BODY_HIGH_WATER: Final = 256 * 1024
#: A keep-alive connection with no request for this long is closed (aiohttp's default too).
#: Not Final: compiled, a Final is inlined where it is read, and the tests shorten this one.
IDLE_SECONDS = 75.0
#: The idle sweep closes at most this many connections in one loop turn (as the pool's reaper).
CLOSES_PER_TURN: Final = 16

_REASONS: Final = {
    100: b"Continue", 200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 413: b"Payload Too Large", 414: b"URI Too Long", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 499: b"Client Closed Request", 500: b"Internal Server Error",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}
#: Statuses whose responses never have a body (RFC 9112 §6.3).
NO_BODY: Final = frozenset({204, 304})


#: The request headers the listener reads, by lowercased name (one dict lookup per header).
_AUTHORIZATION, _TOKEN_HEADER, _CONTENT_LENGTH, _HOST, _TRANSFER_ENCODING, _EXPECT, _CONNECTION = range(7)
_SPECIAL: Final = {
    b"authorization": _AUTHORIZATION, b"x-api-key": _TOKEN_HEADER, b"api-key": _TOKEN_HEADER,
    b"content-length": _CONTENT_LENGTH, b"host": _HOST, b"transfer-encoding": _TRANSFER_ENCODING,
    b"expect": _EXPECT, b"connection": _CONNECTION,
}
#: A header the listener only keeps.
_PLAIN: Final = -1


def _spellings(names: dict[bytes, int]) -> dict[bytes, tuple[int, str]]:
    """``names`` (lowercase) with each also as SDKs and tools write it ("Content-Type", "CONTENT-TYPE").

    Looked up before the lowercased name: a common header then costs one dict
    lookup, no ``lower()`` and no decoding; its name is one shared string (its
    hash computed once), which the forwarding's per-name memo finds at once.
    """
    out: dict[bytes, tuple[int, str]] = {}
    for name, kind in names.items():
        for spelled in (name, name.title(), name.upper()):
            out[spelled] = (kind, spelled.decode("latin-1"))
    return out


#: ``_SPECIAL`` and the common headers nothing is read from, in their usual spellings.
_KINDS: Final = _spellings({
    **_SPECIAL, **dict.fromkeys((
        b"content-type", b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"cookie",
        b"x-request-id", b"traceparent", b"anthropic-version", b"openai-organization", b"x-stainless-lang",
    ), _PLAIN),
})


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


class Malformed(errors.InvalidInput):
    """A request this listener will not read further; ``status`` is what the agent is told."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__("", message)
        self.status = status


class Body:
    """A request body arriving from the agent: buffered up to a bound, then read by the handler."""

    __slots__ = ("_chunks", "_conn", "_paused", "_size", "_waiter", "broken", "eof", "received")

    def __init__(self, conn: AgentConnection) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.eof = False
        self.broken = False  # ended by a framing error or the agent leaving, not by its last byte
        self.received = 0

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        self.received += len(chunk)
        if self._size > BODY_HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def end(self) -> None:
        self.eof = True
        self._wake()

    @property
    def paused(self) -> bool:
        """Reading from the agent is paused because this body's buffer is full."""
        return self._paused

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self) -> bytes:
        """The next piece of the body; ``b""`` at its end. Raises ConnectionError if the agent left."""
        while not self._chunks:
            if self.eof:
                if self.broken:
                    raise ConnectionResetError("the request body ended before its framing said")
                return b""
            if self._conn.closed:
                raise ConnectionResetError("the agent closed the connection mid-body")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._paused and self._size <= BODY_HIGH_WATER // 2:
            self._paused = False
            self._conn.resume_reading()
        return chunk

    def take(self) -> bytes:
        """The whole body of a request that has fully arrived (``eof`` and not ``broken``)."""
        assert self.eof and not self.broken
        data = b"".join(self._chunks)
        self.discard()
        return data

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def discard(self) -> None:
        """The handler will not read the body: drop what came and what comes."""
        self._chunks.clear()
        self._size = 0
        if self._paused:
            self._paused = False
            self._conn.resume_reading()


class Request:
    """One parsed request head; headers as the agent wrote them (latin-1 text)."""

    __slots__ = (
        "authorization", "body", "chunked", "connection", "content_length", "expect", "headers",
        "keep_alive", "method", "target", "token_header", "version",
    )

    def __init__(self, conn: AgentConnection) -> None:
        self.method = ""
        self.target = ""
        self.version = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.expect: str | None = None
        self.connection: str | None = None
        self.authorization: str | None = None
        self.token_header: str | None = None  # x-api-key or api-key, the first given
        self.keep_alive = True
        self.body = Body(conn)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


Handler = Callable[[Request, "AgentConnection"], Coroutine[Any, Any, None]]


class Exchange:
    """A request served from callbacks (the fast path); told when the agent leaves mid-way.

    A base class, not a Protocol: the listener tells an exchange from a handler's
    coroutine by ``isinstance``, and a coroutine compiled by mypyc (setup.py) is not a
    ``types.CoroutineType``."""

    __slots__ = ()

    def lost(self) -> None:
        """The agent left before the answer was sent: stop relaying it."""


#: Takes a request whose body has fully arrived and returns the Exchange serving it from
#: callbacks (it calls ``conn.finished(request)`` at its end, perhaps at once), a coroutine
#: to run as the handler would be, or None to leave the request to the handler.
FastHandler = Callable[[Request, "AgentConnection"], "Exchange | Coroutine[Any, Any, None] | None"]


#: What a closed connection holds instead of its own parser. httptools' parser keeps bound
#: methods of its protocol, a reference cycle that only the collector frees: a burst's
#: connections, promoted to the oldest generation while they served, stayed in memory
#: after they closed until a full pass ran. Its protocol has no callbacks, and it is never fed.
DETACHED_PARSER: Final = httptools.HttpRequestParser(object())


class AgentConnection(asyncio.Protocol):
    """One agent connection: parses requests and serves them one after another."""

    # no instance dict: a burst of connections leaves less of the heap behind
    __slots__ = (
        "_current", "_dispatching", "_drain", "_ended", "_error", "_exchange", "_fast", "_handler",
        "_header_bytes", "_hosts", "_parser", "_queue", "_reading_paused", "_server", "_stop_reading",
        "_task", "_url", "busy", "closed", "last_data", "last_token", "on_pause", "on_resume", "transport",
        "write_paused",
    )

    def __init__(self, handler: Handler, server: Listener, fast: FastHandler | None = None) -> None:
        self._handler = handler
        self._fast = fast
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._queue: collections.deque[Request | Malformed] = collections.deque()
        self._ended = False  # closed or aborted by this side: nothing more is served
        self._task: asyncio.Task[None] | None = None
        self._exchange: Exchange | None = None  # a request served from callbacks
        self._dispatching = False
        self._current: Request | None = None  # being parsed
        self._url: list[bytes] = []
        self._header_bytes = 0
        self._hosts = 0
        self._reading_paused = False
        self.closed = False
        self.busy = False  # a request is being handled
        #: Set by a relay while it streams an upstream body: the agent's buffer is full / has room.
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._stop_reading = False  # after an upgrade, a refusal with an unread body, or an error
        self.last_data = server.clock()
        self._error: Malformed | None = None
        #: The proxy's: the token this connection's last fast request carried, with its check.
        self.last_token: tokens.LastToken | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (asyncio's, or uvloop's, which does not subclass asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        self._server.track(self)

    def data_received(self, data: bytes) -> None:
        if self._stop_reading:
            return
        self.last_data = self._server.clock()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT or Upgrade: the request itself is served (its Upgrade header is
            # hop-by-hop and never forwarded); whatever follows is not read.
            self._stop_reading = True
        except httptools.HttpParserCallbackError:
            error, self._error = self._error, None
            self._malformed(error if isinstance(error, Malformed) else Malformed(400, "malformed request"))
        except httptools.HttpParserError as exc:
            self._malformed(Malformed(400, f"malformed request: {exc}"))
        if self._queue and not self.busy and not self._ended:
            self._next()  # after the whole read: a small request's body has arrived with its head

    def eof_received(self) -> bool | None:
        # The agent closed its side. Like aiohttp (and most servers), that is an agent that
        # went away: the transport closes, and a request in flight is cancelled and audited.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._parser = DETACHED_PARSER  # nothing is parsed after this: no cycle keeps self alive
        self._server.connections.discard(self)
        if self._current is not None:
            self._current.body._wake()
        for item in self._queue:
            if isinstance(item, Request):
                item.body._wake()
        if self.busy:
            if self._task is not None and not self._task.done():
                self._task.cancel()  # the handler audits a client disconnect
            exchange, self._exchange = self._exchange, None
            if exchange is not None:
                exchange.lost()  # likewise, from callbacks
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the agent closed the connection"))
            self._drain.exception()  # retrieved: no "never retrieved" noise if nobody waits
        self._server.forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.on_resume is not None:
            self.on_resume()
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    # --- llhttp callbacks -------------------------------------------------------------------

    def _stash(self, error: Malformed) -> Malformed:
        # httptools replaces a callback's exception with HttpParserCallbackError: keep ours
        self._error = error
        return error

    def on_message_begin(self) -> None:
        self._current = Request(self)
        self._url = []
        self._header_bytes = 0
        self._hosts = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._header_bytes += len(url)
        if self._header_bytes > MAX_TARGET:
            raise self._stash(Malformed(414, f"the request target is longer than {MAX_TARGET} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._current
        if req is None or req.target:  # trailers of a chunked body: never forwarded
            return
        size = self._header_bytes = self._header_bytes + len(name) + len(value)
        found = req.headers
        if size > MAX_HEADERS_BYTES or len(found) >= MAX_HEADERS:
            raise self._stash(Malformed(431, "the request headers are too large"))
        text = value.decode("latin-1")
        known = _KINDS.get(name)
        if known is None:
            found.append((name.decode("latin-1"), text))
            kind = _SPECIAL.get(name.lower())
            if kind is None:
                return  # most headers: kept, nothing to look at
        else:
            kind, spelled = known
            found.append((spelled, text))
            if kind == _PLAIN:
                return
        if kind == _AUTHORIZATION:
            if req.authorization is None:
                req.authorization = text
        elif kind == _TOKEN_HEADER:
            if req.token_header is None:
                req.token_header = text
        elif kind == _CONTENT_LENGTH:
            req.content_length = int(text)  # llhttp checked the digits and refused duplicates
        elif kind == _HOST:
            self._hosts += 1
            if self._hosts > 1:
                raise self._stash(Malformed(400, "more than one Host header"))
        elif kind == _TRANSFER_ENCODING:
            if text.strip().lower() != "chunked" or req.chunked:
                raise self._stash(Malformed(400, "a Transfer-Encoding other than chunked is not accepted"))
            req.chunked = True
        elif kind == _EXPECT:
            req.expect = text
        else:  # Connection
            req.connection = text if req.connection is None else f"{req.connection}, {text}"

    def on_headers_complete(self) -> None:
        req = self._current
        assert req is not None
        parser = self._parser
        if req.connection is None and parser.should_keep_alive():
            # llhttp keeps a request without Connection alive only for HTTP/1.1 (1.0, 0.9,
            # 2.0 and 3.0 need "keep-alive"; other versions it refuses): the version is
            # known without get_http_version's str.format, 1.6 % of a request
            version = "1.1"
            req.keep_alive = True
        else:
            version = parser.get_http_version()
            if version not in ("1.1", "1.0"):
                raise self._stash(Malformed(505 if version.startswith("2") else 400, f"HTTP/{version} is not served here"))
            req.keep_alive = version == "1.1" and parser.should_keep_alive()
        req.version = version
        req.method = parser.get_method().decode("ascii")
        req.target = b"".join(self._url).decode("latin-1") or "/"
        if req.content_length == 0:
            req.body.end()
        self._queue.append(req)
        if len(self._queue) > 1 or self.busy:
            self.pause_reading()  # pipelined: one request ahead is enough

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.body.feed(body)

    def on_message_complete(self) -> None:
        if self._current is not None:
            self._current.body.end()
            self._current = None

    # --- serving ----------------------------------------------------------------------------

    def _malformed(self, error: Malformed) -> None:
        self._stop_reading = True
        if self._current is not None:
            self._current.body.broken = True
            self._current.body.end()
            if self._current in self._queue:
                # the head was read, the body broke (bad chunk framing): the handler sees a short body
                self._current = None
        self._queue.append(error)

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def _next(self) -> None:
        """Serve the queued requests, one at a time, as long as each ends at once."""
        if self._dispatching:
            return  # a request that ended at once, inside the loop below
        self._dispatching = True
        try:
            while not self.busy and self._queue and not self._ended:
                item = self._queue.popleft()
                if isinstance(item, Malformed):
                    self.answer_malformed(item)
                    self.close()
                    return
                if not self._queue and not item.body.paused:
                    # paused while a previous request was answered (pipelining): this one's
                    # body may still be on its way
                    self.resume_reading()
                self.busy = True
                self._start(item)
        finally:
            self._dispatching = False

    def _start(self, item: Request) -> None:
        work: Exchange | Coroutine[Any, Any, None] | None = None
        body = item.body
        if self._fast is not None and body.eof and not body.broken and not self._server.draining:
            try:
                work = self._fast(item, self)
            except Exception as exc:  # a bug must cost one connection, never the listener
                log.error("connection failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
                self.close()
                return
        if work is None:
            work = self._handler(item, self)
        if isinstance(work, Exchange):
            if self.busy:  # not finished at once
                self._exchange = work
        else:
            self._task = asyncio.get_running_loop().create_task(self._run(item, work))

    async def _run(self, item: Request, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            self.close()  # the agent left while the request was handled; the handler audited it
            return
        except Exception as exc:  # a bug must cost one connection, never the listener
            log.error("connection failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
            self.close()
            return
        self._task = None
        self.finished(item)

    def finished(self, item: Request) -> None:
        """The response to ``item`` has been written (or the connection given up): serve the next."""
        self.busy = False
        self._exchange = None
        self.on_pause = self.on_resume = None
        if self.closed or not item.keep_alive or self._server.draining or not item.body.eof:
            # not kept alive; or a body the handler did not take: its framing is unknown from here
            self.close()
            return
        item.body.discard()
        if not self._queue and self._stop_reading:
            self.close()  # after an upgrade or an error nothing more is read
            return
        self._next()

    def answer_malformed(self, error: Malformed) -> None:
        import json

        body = json.dumps({"error": {"type": "invalid_request", "message": error.message}}).encode()
        self.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (error.status, reason_phrase(error.status), len(body), body)
        )

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the agent has read enough that its buffer has room."""
        if not self.write_paused or self.closed:
            if self.closed:
                raise ConnectionResetError("the agent closed the connection")
            return
        self._drain = asyncio.get_running_loop().create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def close(self) -> None:
        self._ended = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """End the connection without a clean end: the agent sees a cut response."""
        self._ended = True
        if self.transport is not None:
            self.transport.abort()
        self._stop_reading = True

    @property
    def idle(self) -> bool:
        return not self.busy and not self._queue


class Reply:
    """Writes one response to the agent with the right framing for the request.

    Writes are corked until the end of the response or ``uncork()``, which the
    relay calls before it waits for more of a body: a small answer, head and
    body, leaves in one ``send`` instead of two (on loopback the syscall is most
    of what relaying a small response costs), and a stream still sends each
    event as soon as its chunk has been read.
    """

    __slots__ = ("_buf", "_chunked", "_conn", "_corked", "_no_body", "keep_alive", "sent", "started", "status")

    def __init__(self, conn: AgentConnection, request: Request) -> None:
        self._conn = conn
        self._chunked = False
        self._no_body = request.method == "HEAD"
        self._corked = True
        self._buf: list[bytes] = []
        self.keep_alive = request.keep_alive
        self.started = False
        self.sent = 0
        self.status = 0

    def _out(self, data: bytes) -> None:
        if self._corked:
            self._buf.append(data)
        else:
            self._conn.write(data)

    def uncork(self) -> None:
        """Send what is held and write through from now on (a stream: every event at once)."""
        self._corked = False
        if self._buf:
            self._conn.write(b"".join(self._buf))
            self._buf = []

    def discard(self) -> bool:
        """Forget a response none of which was sent yet, so another can be given; False if too late."""
        if not self._corked:
            return False
        self._buf = []
        self.started = self._chunked = False
        self.sent = self.status = 0
        return True

    def start(self, status: int, reason: bytes, headers: bytes, length: int | None) -> None:
        """The status line and ``headers`` (``Name: value\\r\\n`` lines) plus the framing."""
        self.started = True
        self.status = status
        if status in NO_BODY:
            self._no_body = True
            framing = b""
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif self._no_body:
            framing = b""
        elif self.keep_alive:
            self._chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            framing = b""  # HTTP/1.0 or closing: the body ends with the connection
        if not self.keep_alive or self._conn._server.draining:
            self.keep_alive = False
            framing += b"Connection: close\r\n"
        self._out(b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (status, reason, headers, framing))

    def write(self, data: bytes) -> None:
        if not data or self._no_body:
            return
        self.sent += len(data)
        if self._chunked:
            self._out(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._out(data)

    def end(self) -> None:
        if self._chunked:
            self._out(b"0\r\n\r\n")
        self.uncork()
        if not self.keep_alive:
            self._conn.close()

    def whole(self, status: int, headers: bytes, body: bytes, reason: bytes | None = None) -> None:
        """A complete small response at once."""
        self.start(status, reason or reason_phrase(status), headers, len(body))
        self.write(body)
        self.end()


class Listener:
    """The listening socket and its connections, with a drain for SIGTERM."""

    def __init__(self, handler: Handler, fast: FastHandler | None = None) -> None:
        self._handler = handler
        self._fast = fast
        self.connections: set[AgentConnection] = set()
        self.draining = False
        self._server: asyncio.Server | None = None
        self._gone: asyncio.Event | None = None
        self._sweep: asyncio.Handle | None = None
        #: The loop it was started on; None until then (tests drive connections by hand).
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self.clock = time.monotonic

    async def start(self, host: str, port: int) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: AgentConnection(self._handler, self, self._fast), host, port, reuse_address=True, backlog=1024
        )
        # read untyped: uvloop's Server.sockets is a list where typeshed says tuple, and a
        # compiled (setup.py) read of a tuple-typed attribute checks its type
        sockets: Any = cast(Any, self._server).sockets
        self.port = int(sockets[0].getsockname()[1])

    def track(self, conn: AgentConnection) -> None:
        self.connections.add(conn)
        if self._sweep is None:
            self._arm_sweep()

    def _arm_sweep(self) -> None:
        if self._loop is not None and not self.draining:
            self._sweep = self._loop.call_later(IDLE_SECONDS / 5, self._close_idle)

    def _close_idle(self) -> None:
        """One sweep for all connections instead of a timer per connection and request.

        At most ``CLOSES_PER_TURN`` in one loop turn, then the rest on the next: idle
        connections of a burst fall due together, and closing them all at once holds the
        loop (256 sockets took 4 ms in the pool's reaper) while other requests wait.

        It runs only while there are connections. A timer re-armed forever is a few objects
        made anew at each sweep, which the allocator puts in whatever pool is at hand: after a
        burst of load, in the arenas the burst opened, where they would keep a whole arena.
        """
        self._sweep = None
        cutoff = self.clock() - IDLE_SECONDS
        closed = 0
        for conn in list(self.connections):
            if conn.idle and not conn._ended and conn.last_data < cutoff:
                conn.close()
                closed += 1
                if closed == CLOSES_PER_TURN:
                    break
        if closed == CLOSES_PER_TURN and self._loop is not None and not self.draining:
            self._sweep = self._loop.call_soon(self._close_idle)  # more may be due: the next turn
        elif self.connections:
            self._arm_sweep()

    def forget(self, conn: AgentConnection) -> None:
        if self._gone is not None and not self.connections:
            self._gone.set()

    async def drain(self, seconds: float) -> None:
        """Stop accepting; close idle connections; give the busy ones ``seconds`` to finish."""
        self.draining = True
        if self._sweep is not None:
            self._sweep.cancel()
        if self._server is not None:
            self._server.close()
        self._gone = asyncio.Event()
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._gone.wait()
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
