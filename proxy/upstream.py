"""The upstream side: pooled keep-alive connections, responses parsed by llhttp.

One pool per sidecar holds idle connections per origin (scheme, host,
port, TLS context), so a chat call reuses the TCP and TLS session of the
previous one. A connection carries one exchange at a time; the response
head is awaited, the body is handed chunk by chunk to a sink (the relay to
the agent) from the protocol callback itself, with no task or queue per
chunk. When the agent reads slowly the relay pauses this connection's reading
(back-pressure), and the read timeout is not counted while paused.

Timeouts: a connect timeout (TCP and TLS) and a read timeout, the longest
silence allowed while the sidecar waits for the upstream; never a total
one, so a long stream that keeps sending is never cut.

Only responses the sidecar can check for the key are relayed: a transfer
coding other than ``chunked`` (``gzip, chunked``) would carry a compressed
body past the scrubber, and ``101 Switching Protocols`` would open a tunnel;
both end the exchange as a failure (502).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from typing import ClassVar, Final, Protocol, cast

import httptools

from sidekey.core import errors
from sidekey.proxy import headers, routes

#: An idle pooled connection older than this is closed instead of reused (servers drop them).
#: Not Final: compiled, a Final is inlined where it is read, and the tests shorten this one.
IDLE_SECONDS = 15.0
#: The reaper closes at most this many connections per loop turn, so that requests in
#: flight are served between its batches (``Pool._reap``).
CLOSES_PER_TURN: Final = 16
#: Idle connections kept per origin: a bound on sockets, far above what a pod keeps in flight.
#: The reaper, not this cap, gives a burst's connections back. A cap below the concurrency
#: closes each surplus connection as it comes back and opens another for the next request:
#: at 64, 40 % of the requests at 256 agent connections paid a new upstream connection (a TLS
#: handshake on a real upstream), and the churn held 3 MB more after the burst.
IDLE_PER_ORIGIN: Final = 1024


class UpstreamError(errors.Unavailable):
    """The exchange failed; ``reason`` is the audit word, the message names no secret.

    ``reason`` is a ClassVar: compiled (setup.py), a plain class attribute of an exception
    is not seen from its instances."""

    reason: ClassVar[str] = "upstream_error"


class ConnectFailed(UpstreamError):
    pass


class TlsFailed(UpstreamError):
    reason: ClassVar[str] = "upstream_tls"


class Refused(UpstreamError):
    reason: ClassVar[str] = "host_refused"


class DnsFailed(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    reason: ClassVar[str] = "upstream_timeout"


class ConnectTimeout(ReadTimeout):
    pass


class Broken(UpstreamError):
    """The upstream closed, reset or sent an unparsable response."""


class Unacceptable(UpstreamError):
    """A response the sidecar will not relay (a transfer coding it cannot check, a protocol switch)."""

    reason: ClassVar[str] = "upstream_encoding"


Origin = routes.Origin

#: The response headers the connection reads or drops, by kind; any other is kept as it came.
_PLAIN, _LENGTH, _TRANSFER, _CODING, _HOP = range(5)
#: Every name ``headers.RESPONSE_DROP`` holds never reaches the agent; three are read first.
_READ: Final = {
    **dict.fromkeys(headers.RESPONSE_DROP, _HOP),
    b"content-length": _LENGTH, b"transfer-encoding": _TRANSFER, b"content-encoding": _CODING,
}
#: Those and the headers upstreams commonly send, in their usual spellings: a header
#: found here costs one dict lookup and no ``lower()``; any other spelling is lowercased.
_KINDS: Final = {
    spelled: kind
    for name, kind in {**dict.fromkeys((
        b"server", b"date", b"content-type", b"cache-control", b"vary",
        b"x-request-id", b"request-id", b"openai-processing-ms", b"openai-version", b"openai-organization",
        b"strict-transport-security", b"x-content-type-options", b"set-cookie", b"access-control-allow-origin",
        b"cf-ray", b"cf-cache-status", b"alt-svc", b"etag", b"last-modified", b"expires", b"location",
    ), _PLAIN), **_READ}.items()
    for spelled in (name, name.title(), name.upper())
}
#: The lengths of the names read or dropped: a header of any other length is kept, with no
#: lookup (a fresh name's hash and a dict probe per header: 1.5 % of a request's instructions).
_READ_LENGTHS: Final = frozenset(len(name) for name in _READ)


class Watcher(Protocol):
    """Follows an exchange from the protocol's callbacks, instead of futures (the fast path).

    ``head_ready`` runs inside the parser's callback and may set the sink; raising an
    ``UpstreamError`` there fails the exchange. ``fed`` runs after each read that did not
    end the exchange; ``done`` after the read that ended it, outside the parser, so the
    connection may go back to the pool (and carry the next exchange) from within it.
    ``failed`` is called at most once, and never after ``done``.
    """

    def head_ready(self) -> None: ...

    def fed(self) -> None: ...

    def done(self) -> None: ...

    def failed(self, exc: UpstreamError) -> None: ...


#: What a closed connection holds instead of its own parser (see listener.DETACHED_PARSER:
#: the parser's bound methods are a cycle with the connection that only the collector frees).
DETACHED_PARSER: Final = httptools.HttpResponseParser(object())


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream; one exchange at a time."""

    # no instance dict: a burst of connections leaves less of the heap behind
    __slots__ = (
        "_active", "_done", "_done_pending", "_drain", "_error", "_got_head", "_head", "_head_method",
        "_in_head", "_info", "_last", "_loop", "_parser", "_pending", "_pool", "_sink", "_timeout",
        "_until_close", "_watcher", "_write_paused", "chunked", "closed", "coded_at", "codings", "complete",
        "content_length", "head_parts", "idle_since", "keep_alive", "origin", "read_paused", "reason",
        "received_any", "reused", "sink_error", "status", "transport",
    )

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        # --- the exchange in progress
        self._head: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._watcher: Watcher | None = None
        self._done_pending = False  # the watcher's exchange ended in the read being parsed
        self._active = False  # an exchange was started and the connection not released since
        self._got_head = False
        self._head_method = False
        self._in_head = False
        self._info = False  # a 1xx response is being skipped
        self.status = 0
        self.reason = b""
        #: The head's kept header lines as ``name, b": ", value, b"\r\n"`` pieces, in order
        #: (hop-by-hop and framing dropped as they are read), and where each Content-Encoding
        #: line starts among them: dropped too when the sidecar decodes the body.
        self.head_parts: list[bytes] = []
        self.coded_at: list[int] = []
        self.content_length: int | None = None
        self.chunked = False
        self.codings: list[bytes] = []  # Content-Encoding values
        self._until_close = False
        self.complete = False
        self.keep_alive = False
        self.received_any = False
        self._sink: Callable[[bytes], None] | None = None
        self._pending: list[bytes] = []
        self.sink_error: BaseException | None = None
        # --- flow control and the read timeout
        self._timeout = 0.0
        self._last = 0.0
        self.read_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (asyncio's, or uvloop's, which does not subclass asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last = self._loop.time()
        self.received_any = True
        if not self._active:  # nothing asked: an idle connection that talks is broken
            self._close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            error, self._error = self._error, None
            self._fail(error if isinstance(error, UpstreamError) else Broken("the relay failed"))
            self._close()
        except httptools.HttpParserError as exc:
            self._fail(Broken(f"an unparsable response ({type(exc).__name__})"))
            self._close()
        watcher = self._watcher
        if watcher is not None:
            if self._done_pending:
                self._done_pending = False
                self._watcher = None
                watcher.done()  # may reuse this connection: nothing of it is touched after
            else:
                watcher.fed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self._active and not self.complete:
            if self._until_close and self._got_head:
                self._finish()  # a body delimited by the end of the connection
                watcher = self._watcher
                if watcher is not None:
                    self._done_pending = False
                    self._watcher = None
                    watcher.done()
            else:
                self._fail(Broken("the upstream closed the connection"))
        d = self._drain
        if d is not None and not d.done():
            d.set_exception(Broken("the upstream closed the connection"))
            d.exception()
        self._parser = DETACHED_PARSER  # nothing is parsed after this: no cycle keeps self alive

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    # --- llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # a second response to one request: whatever it holds must never reach the next caller
            raise self._stash(Broken("the upstream sent a response nobody asked for"))
        self._in_head = True
        self.head_parts = []
        self.coded_at = []
        self.codings = []
        self.content_length = None
        self.chunked = False
        self.reason = b""

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # trailers: never relayed
        # most headers are of a length no read or dropped name has: kept, nothing to look at
        if len(name) in _READ_LENGTHS:
            kind = _KINDS.get(name)
            if kind is None:
                kind = _READ.get(name.lower(), _PLAIN)
            if kind == _HOP:
                return  # the hop's, not the message's: never relayed
            if kind == _LENGTH:
                self.content_length = int(value)
                return  # the sidecar frames the body itself
            if kind == _TRANSFER:
                codings = [c.strip() for c in value.lower().split(b",") if c.strip()]
                if codings != [b"chunked"] or self.chunked:
                    raise self._stash(Unacceptable(
                        f"the upstream answered with Transfer-Encoding {value.decode('latin-1')[:64]!r}; "
                        "only chunked can be checked for the key"
                    ))
                self.chunked = True
                return
            if kind == _CODING:
                self.codings.append(value)
                self.coded_at.append(len(self.head_parts))
        parts = self.head_parts
        parts.append(name)  # four appends (primitives, compiled), no tuple per line
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")

    def header_block(self, decoded: bool) -> bytes:
        """The kept header lines, joined; without Content-Encoding when the body is ``decoded``."""
        parts = self.head_parts
        if decoded and self.coded_at:
            parts = parts.copy()
            for at in reversed(self.coded_at):
                del parts[at:at + 4]
        return b"".join(parts)

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise self._stash(Unacceptable("the upstream switched protocols (101), which the sidecar does not relay"))
            self._info = True  # 100 Continue, 103 Early Hints: skipped, the final answer follows
            return
        self.status = status
        self._got_head = True
        self._until_close = (
            not self.chunked and self.content_length is None and not self._head_method and status not in (204, 304)
        )
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)
        watcher = self._watcher
        if watcher is not None:
            try:
                watcher.head_ready()
            except UpstreamError as exc:
                raise self._stash(exc) from None
        if self._head_method:
            # llhttp cannot be told the answer is to HEAD; the head is the whole message
            self._parser = httptools.HttpResponseParser(self)
            self.keep_alive = self.content_length is not None or self.chunked
            self._finish()

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is None:
            self._pending.append(body)
            return
        try:
            sink(body)
        except UpstreamError as exc:
            raise self._stash(exc) from None

    def _stash(self, error: UpstreamError) -> UpstreamError:
        # httptools replaces a callback's exception with HttpParserCallbackError: keep ours
        self._error = error
        return error

    def on_message_complete(self) -> None:
        if self._info:
            self._info = False
            return
        if self.complete:
            return
        self.keep_alive = self._parser.should_keep_alive()
        self._finish()

    # --- the exchange -------------------------------------------------------------------------

    def send(self, data: bytes, *, head_method: bool, timeout: float, watcher: Watcher | None = None) -> None:
        """Start an exchange: ``data`` is the request head (and a small body).

        Without a ``watcher`` the exchange is followed by ``head()`` and ``relay()``'s
        futures; with one, by its callbacks (no future, no task wake-up).
        """
        assert self.transport is not None
        if watcher is None:
            self._head = self._loop.create_future()
            self._done = self._loop.create_future()
        else:
            self._head = self._done = None
        self._watcher = watcher
        self._done_pending = False
        self._active = True
        self._got_head = False
        self._head_method = head_method
        self.complete = False
        self.received_any = False
        self._sink = None
        self._pending = []
        self.sink_error = None
        self._timeout = timeout
        self._last = self._loop.time()
        self._pool.track(self)
        self.transport.write(data)

    @property
    def transport_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
            self._last = self._loop.time()  # sending counts: the upstream is reading

    async def drain(self) -> None:
        if self.closed:
            raise Broken("the upstream closed the connection")
        if not self._write_paused:
            return
        self._drain = self._loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None
        self._last = self._loop.time()

    async def head(self) -> None:
        assert self._head is not None
        await self._head

    def set_sink(self, sink: Callable[[bytes], None]) -> None:
        """The watcher's ``head_ready``: the body goes to ``sink`` as it is parsed."""
        self._sink = sink

    def relay(self, sink: Callable[[bytes], None]) -> asyncio.Future[None]:
        """Hand the body to ``sink`` from now on; the future ends with the body (or its failure)."""
        assert self._done is not None
        self._sink = sink
        pending, self._pending = self._pending, []
        try:
            for chunk in pending:
                sink(chunk)
        except UpstreamError as exc:
            self._fail(exc)
            self._close()
        return self._done

    def pause(self) -> None:
        """The agent's buffer is full: stop reading from the upstream until it drains."""
        if not self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self._last = self._loop.time()
            self.transport.resume_reading()

    def check_timeout(self, now: float) -> None:
        """Called by the pool's sweep: fail the exchange after ``timeout`` seconds of silence."""
        if self.complete or self.closed or not self._active:
            return
        if self.read_paused:
            self._last = now  # the agent is slow, not the upstream
        elif now - self._last >= self._timeout:
            self._fail(ReadTimeout(f"no answer within {self._timeout:g} s"))
            self._close()

    def _finish(self) -> None:
        self.complete = True
        self._pool.untrack(self)
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)
        if self._watcher is not None:
            self._done_pending = True  # told at the end of the read (data_received)

    def _fail(self, exc: UpstreamError) -> None:
        self.complete = True
        self.keep_alive = False
        self._pool.untrack(self)
        for fut in (self._head, self._done, self._drain):  # an upload waiting to write fails too
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # marked retrieved: the waiter may already be gone
        watcher = self._watcher
        if watcher is not None and not self._done_pending:
            # after a complete answer the failure (bytes nobody asked for) only ends the
            # connection: done() still comes, and release() drops it
            self._watcher = None
            watcher.failed(exc)

    def _close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def abandon(self) -> None:
        """The exchange will not be finished (the agent left, or a failure): drop the connection."""
        self.complete = True
        self._sink = None
        self._watcher = None
        self._done_pending = False
        self._close()

    def release(self) -> None:
        """Back to the pool if the exchange ended cleanly and both sides keep the connection."""
        if self.complete and self.keep_alive and not self.closed and self.sink_error is None:
            self._head = self._done = None
            self._sink = None
            self._watcher = None
            self._active = False
            # the agent's buffer may have been full when the answer ended (its last chunk
            # paused this connection, and the agent's resume now goes nowhere): an idle
            # connection reads again, or the next exchange on it would wait forever
            self.resume()
            self._pool.put(self)
        else:
            self.abandon()


class Pool:
    """Idle keep-alive connections per origin, and how new ones are made.

    Read timeouts are checked by one sweep every ``SWEEP_SECONDS`` over the
    connections with an exchange in progress, not by a timer per request
    (creating and cancelling a timer per request is churn in the loop's heap).
    """

    SWEEP_SECONDS: Final = 0.25

    def __init__(self, resolver: routes.GuardedResolver) -> None:
        self._resolver = resolver
        self._idle: dict[Origin, list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        self._busy: set[UpstreamConnection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._reaper: asyncio.Handle | None = None

    def track(self, conn: UpstreamConnection) -> None:
        self._busy.add(conn)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.SWEEP_SECONDS, self._sweep_busy)

    def untrack(self, conn: UpstreamConnection) -> None:
        self._busy.discard(conn)

    def _sweep_busy(self) -> None:
        self._sweep = None
        if not self._busy:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self._busy):
            conn.check_timeout(now)
        if self._busy:
            self._sweep = loop.call_later(self.SWEEP_SECONDS, self._sweep_busy)

    def idle_connection(self, route: routes.Route) -> UpstreamConnection | None:
        """An idle pooled connection to the route's origin, if one is fit to reuse (no I/O)."""
        idle = self._idle.get(route.pool)
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and not conn.transport_closing and now - conn.idle_since < IDLE_SECONDS:
                    conn.reused = True
                    return conn
                conn.abandon()
        return None

    async def acquire(self, route: routes.Route, *, fresh: bool = False) -> UpstreamConnection:
        """An idle connection to the route's origin, or (``fresh``, or none idle) a new one."""
        if not fresh:
            conn = self.idle_connection(route)
            if conn is not None:
                return conn
        origin = route.pool
        _, host, port, ctx = origin
        timeout = route.timeout.sock_connect or routes.CONNECT_TIMEOUT
        try:
            async with asyncio.timeout(timeout):
                return await self._connect(origin, host, port, ctx)
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {timeout:g} s") from None

    async def _connect(
        self, origin: Origin, host: str, port: int, ctx: ssl.SSLContext | None
    ) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            ipaddress.ip_address(host)
            addresses = [host]  # an IP literal in the policy is trusted as written
        except ValueError:
            try:
                results = await self._resolver.resolve(host, port, socket.AF_UNSPEC)
            # each except clause names its own exception: mypyc types the name per function
            except routes.HostRefused as refused:
                raise Refused(str(refused)) from None
            except OSError as unresolved:
                raise DnsFailed(f"its host {host!r} does not resolve ({type(unresolved).__name__})") from None
            addresses = [r["host"] for r in results]
        last: Exception | None = None
        for address in addresses:
            try:
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, origin), address, port,
                    ssl=ctx, server_hostname=host if ctx is not None else None,
                )
            except ssl.SSLError as tls_error:
                raise TlsFailed(f"TLS failed ({type(tls_error).__name__})") from None
            except OSError as exc:
                last = exc
                continue
            self._all.add(conn)
            return conn
        name = type(last).__name__ if last is not None else "no address"
        raise ConnectFailed(f"could not be reached ({name})")

    def put(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= IDLE_PER_ORIGIN:
            conn.abandon()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._reap)

    def _reap(self) -> None:
        """Close the connections idle for ``IDLE_SECONDS``: a burst's extra sockets (and their
        memory) are given back once it is over, not kept until the next burst pops them.

        At most ``CLOSES_PER_TURN`` in one loop turn, then the rest on the next: a burst's
        connections all fall due together, and 256 closed at once held the loop for 4 ms.
        """
        self._reaper = None
        now = time.monotonic()
        oldest = now
        closing: list[UpstreamConnection] = []
        for origin, idle in list(self._idle.items()):
            # the list is oldest first (put appends, idle_connection pops the newest)
            due = 0
            while (due < len(idle) and len(closing) + due < CLOSES_PER_TURN
                   and now - idle[due].idle_since >= IDLE_SECONDS):
                due += 1
            closing += idle[:due]
            del idle[:due]
            if idle:
                oldest = min(oldest, idle[0].idle_since)
            else:
                del self._idle[origin]
        for conn in closing:
            conn.abandon()
        if self._idle:
            loop = asyncio.get_running_loop()
            if len(closing) == CLOSES_PER_TURN and oldest + IDLE_SECONDS <= now:
                self._reaper = loop.call_soon(self._reap)  # more are due: the next turn
            else:
                self._reaper = loop.call_later(max(0.05, oldest + IDLE_SECONDS - now), self._reap)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        self._busy.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._all):
            conn.abandon()
        self._idle.clear()
        for timer in (self._sweep, self._reaper):
            if timer is not None:
                timer.cancel()
        self._sweep = self._reaper = None
