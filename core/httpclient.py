"""A small HTTP/1.1 client for the control plane's calls: the apiserver and OAuth2 token endpoints.

Every agent pod pays the sidecar's memory, and aiohttp's client cost 14 MB of
RSS and a third of a second of start-up for a handful of JSON calls and a few
long watches. This client does only what those calls need, on asyncio and
llhttp (``httptools``, which the data plane uses too):

- keep-alive connections per origin (scheme, host, port, TLS context), a few
  idle ones kept; a reused connection the server had closed before answering
  is retried once on a fresh one;
- TLS from the caller's ``ssl.SSLContext``, the name checked against the URL's host;
- a connect timeout and a read timeout (the longest silence), never a total
  one: a watch stays open for minutes and must not be cut while it talks;
- a whole body up to a size limit (``request``), or the body chunk by chunk
  (``stream``, for watches), with reading paused while a chunk waits;
- an optional ``resolve`` step, so the sidecar can refuse a token URL whose
  name points at the pod itself (``proxy.routes.GuardedResolver``).

Not here, on purpose: redirects (an answer is what it is), cookies, proxies from
the environment, compression (it asks for identity and refuses anything else),
HEAD, and the data plane's streaming both ways (``proxy/upstream.py``).
Failures are ``HttpError`` (an ``OSError`` too, so code that caught aiohttp's
connection errors as ``OSError`` still does); a status code is never an error here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Final, cast

import httptools

from sidekey.core import errors

CONNECT_TIMEOUT: Final = 10.0
READ_TIMEOUT: Final = 60.0
#: A whole body larger than this is refused (``request``'s default ``limit``).
MAX_BODY: Final = 64 * 1024 * 1024
#: Idle connections kept per origin.
IDLE_PER_ORIGIN: Final = 4
#: An idle connection older than this is closed rather than reused (servers drop them).
IDLE_SECONDS: Final = 30.0
#: Reading pauses while this much of a streamed body waits for its reader.
PAUSE_ABOVE: Final = 256 * 1024

class _ClientDefault:
    """Stands for "the client's own read timeout" in a call's arguments."""


#: A call's ``read_timeout`` when not given: the one the Client was made with.
CLIENT_DEFAULT: Final = _ClientDefault()

#: ``resolve(host, port)``: the addresses to try, in order; raises OSError to refuse.
Resolve = Callable[[str, int], Awaitable[list[str]]]
#: scheme, host, port and the TLS context itself (not its id(), which a new context could
#: take over once the old one is freed): a connection is reused only under the context
#: that verified it.
_Key = tuple[str, str, int, ssl.SSLContext | None]


class HttpError(errors.Unavailable, OSError):
    """No complete answer: unreachable, TLS, closed, unparsable, too large. The message names no secret."""

    type = "http_error"


class HttpTimeout(HttpError, TimeoutError):
    """No connection within the connect timeout, or silence longer than the read timeout."""

    type = "http_timeout"


class BodyTooLarge(HttpError):
    """The answer's body is longer than the caller's limit; it was not read further."""

    type = "body_too_large"


class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time; llhttp's callbacks land here."""

    def __init__(self, key: _Key, forget: Callable[[_Connection], None]) -> None:
        self.key = key
        self._forget = forget
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._error: HttpError | None = None
        self._paused = False
        self._reset()

    def _reset(self) -> None:
        self.received = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self._info = False  # a 1xx answer is being skipped
        self._until_close = False
        self._chunks: list[bytes] = []
        self._buffered = 0

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (asyncio's, or uvloop's, which does not subclass asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self.complete:
            self.close()  # a server that talks when nothing was asked cannot be trusted with the next exchange
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            self.close()  # a second answer to one request (on_message_begin): the first stands
        except httptools.HttpParserError as exc:
            self._error = HttpError(f"an unparsable answer ({type(exc).__name__})")
            self.close()
        if self._buffered > PAUSE_ABOVE and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._forget(self)
        self._wake()

    # --- llhttp callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise HttpError("a second answer to one request")
        self.headers = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # trailers: not used
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._info = True  # 100 Continue, 103 Early Hints: the real answer follows
            return
        self.status = status
        self.head_done = True
        self._until_close = (
            "content-length" not in self.headers
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
            and status not in (204, 304)
        )

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._info:
            self._info = False
            return
        assert self._parser is not None
        self.keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the callback returns
        self.complete = True

    # --- the exchange ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self._error = None
        self._parser = httptools.HttpResponseParser(self)
        self.transport.write(data)

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and not self._until_close

    async def head(self, silence: float | None) -> None:
        while not self.head_done:
            self._check()
            if self.closed:
                raise HttpError("the server closed the connection before answering")
            await self._wait(silence)

    async def read(self, silence: float | None) -> bytes:
        """The body received since the last call; ``b""`` once it is complete."""
        while True:
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks, self._buffered = [], 0
                if self._paused and self.transport is not None and not self.closed:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self.complete:
                return b""
            self._check()
            if self.closed:
                if self._until_close:  # a body delimited by the end of the connection
                    self.complete = True
                    return b""
                raise HttpError("the server closed the connection in the middle of its answer")
            await self._wait(silence)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    async def _wait(self, silence: float | None) -> None:
        self._waiter = self._loop.create_future()
        try:
            async with asyncio.timeout(silence):
                await self._waiter
        except TimeoutError:
            self.close()
            raise HttpTimeout(f"no answer within {silence:g} s") from None
        finally:
            self._waiter = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Response:
    """A status, the headers (lower-case names, repeated ones joined with ", ") and a body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Stream:
    """An answer whose body is read as it arrives: ``async for chunk in stream``."""

    def __init__(self, conn: _Connection, read_timeout: float | None) -> None:
        self._conn = conn
        self._timeout = read_timeout
        self.status = conn.status
        self.headers = conn.headers

    async def read(self) -> bytes:
        """The next piece of the body; ``b""`` at its end."""
        return await self._conn.read(self._timeout)

    async def read_all(self, limit: int = MAX_BODY) -> bytes:
        """The rest of the body; ``BodyTooLarge`` (reading stops) past ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the answer is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    @property
    def complete(self) -> bool:
        return self._conn.complete


class Client:
    """Pooled keep-alive connections, ``request`` for a whole answer and ``stream`` for a long one.

    ``tls`` verifies https origins unless a call passes its own context;
    ``limit`` (0: none) caps the connections open at once, as each watch holds one.
    """

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        resolve: Resolve | None = None,
        limit: int = 0,
        idle_per_origin: int = IDLE_PER_ORIGIN,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float | None = READ_TIMEOUT,
    ) -> None:
        self._tls = tls
        self._resolve = resolve
        self._slots = asyncio.Semaphore(limit) if limit > 0 else None
        self._idle_per_origin = idle_per_origin
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[_Key, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        read_timeout: float | _ClientDefault | None = CLIENT_DEFAULT,
        limit: int = MAX_BODY,
    ) -> Response:
        """One exchange, its body read whole (at most ``limit`` bytes)."""
        async with self.stream(method, url, headers=headers, body=body, tls=tls, read_timeout=read_timeout) as s:
            data = await s.read_all(limit)
        return Response(s.status, s.headers, data)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        read_timeout: float | _ClientDefault | None = CLIENT_DEFAULT,
    ) -> AsyncIterator[Stream]:
        """One exchange whose body is read as it arrives; the connection is reused only if it was read to the end.

        ``read_timeout`` is the longest silence allowed (None: no limit), the client's own unless given.
        """
        if self._closed:
            raise HttpError("the HTTP client is closed")
        silence = self.read_timeout if isinstance(read_timeout, _ClientDefault) else read_timeout
        scheme, host, port, target, authority = _split(url)
        ctx = (tls or self._tls or _default_context()) if scheme == "https" else None
        data = _head(method, target, authority, headers, body)
        if self._slots is not None:
            await self._slots.acquire()
        conn: _Connection | None = None
        try:
            conn = await self._exchange((scheme, host, port, ctx), host, port, ctx, data, silence)
            if conn.headers.get("content-encoding", "identity").lower() != "identity":
                raise HttpError(f"the answer is {conn.headers['content-encoding'][:32]!r}-encoded; identity was asked for")
            yield Stream(conn, silence)
            if conn.reusable:
                self._put(conn)
                conn = None
        finally:
            if conn is not None:
                conn.close()
            if self._slots is not None:
                self._slots.release()

    async def _exchange(self, key: _Key, host: str, port: int, ctx: ssl.SSLContext | None, data: bytes,
                        read_timeout: float | None) -> _Connection:
        for attempt in range(2):
            conn = await self._acquire(key, host, port, ctx, fresh=attempt > 0)
            conn.send(data)
            try:
                await conn.head(read_timeout)
            except HttpError:
                stale = conn.reused and conn.closed and not conn.received
                conn.close()
                if stale and attempt == 0:
                    continue  # the server closed it while idle: once more on a new connection
                raise
            return conn
        raise AssertionError("unreachable")

    async def _acquire(self, key: _Key, host: str, port: int, ctx: ssl.SSLContext | None, *,
                       fresh: bool) -> _Connection:
        idle = None if fresh else self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                conn.reused = True
                return conn
            conn.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._connect(key, host, port, ctx)
        except TimeoutError:
            raise HttpTimeout(f"no connection to {host}:{port} within {self.connect_timeout:g} s") from None

    async def _connect(self, key: _Key, host: str, port: int, ctx: ssl.SSLContext | None) -> _Connection:
        loop = asyncio.get_running_loop()
        addresses = [host]  # an IP literal, or a name the loop resolves itself
        if self._resolve is not None and not _is_ip(host):
            try:
                addresses = await self._resolve(host, port)
            except OSError as exc:
                raise HttpError(str(exc) or f"{host} does not resolve ({type(exc).__name__})") from None
        last: Exception | None = None
        for address in addresses:
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(key, self._forget), address, port,
                    ssl=ctx, server_hostname=host if ctx is not None else None,
                )
            except ssl.SSLError as exc:
                raise HttpError(f"TLS with {host}:{port} failed ({getattr(exc, 'reason', None) or type(exc).__name__})"
                                ) from None
            except OSError as exc:
                last = exc
                continue
            self._all.add(conn)
            return conn
        name = type(last).__name__ if last is not None else "no address"
        raise HttpError(f"{host}:{port} cannot be reached ({name})")

    def _put(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= self._idle_per_origin:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.reused = False
        idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        """Close every connection, idle or busy (a watch in progress fails with HttpError)."""
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._idle.clear()


def _split(url: str) -> tuple[str, str, int, str, str]:
    """scheme, host, port, request target and Host header of an absolute http(s) URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url[:100]!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rpartition("@")[2]
    return scheme, parts.hostname, port, target, authority


def _head(method: str, target: str, authority: str, headers: Iterable[tuple[str, str]], body: bytes | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}", "Accept-Encoding: identity"]
    for name, value in headers:
        if any(c in name or c in value for c in "\r\n\0"):
            raise ValueError(f"header {name[:40]!r} holds a line break or NUL")  # never echo the value
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return data + body if body else data


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_DEFAULT: list[ssl.SSLContext] = []


def _default_context() -> ssl.SSLContext:
    """The system store, loaded once (loading it is slow)."""
    if not _DEFAULT:
        _DEFAULT.append(ssl.create_default_context())
    return _DEFAULT[0]
