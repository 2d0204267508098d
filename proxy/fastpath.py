"""A request served from callbacks: no task, no future, no await.

``forwarding.Proxy.fast`` takes a request that needs no waiting (its small
body has arrived, its token is cached, its key is static, an idle pooled
connection is there), writes it upstream and hands the rest to an
``Exchange`` here, which the upstream protocol then drives::

    Proxy.fast ── upstream send ──► Exchange.head_ready   the head checked and scrubbed
                                        │ small compressed body?  gathered whole, decoded at the end
                                        │ else: relaying.Relay, each chunk as it is read
                                        ▼
                                    Exchange.done / failed / lost   (agent left)
                                        │ the connection released or dropped
                                        ▼
                                    Owner.finish: one audit line, one counter increment

The coroutine path exists for everything else, and this one must stay its
twin: same checks, same order, same outcomes (tests/proxy and tests/attacks
run both). A stale pooled connection that fails before any answer is resent
once on a new one through the coroutine path (``Owner.resend``), which then
writes the audit line.

The point of this path is CPU, so what the exchange needs from the proxy is
the small ``Owner`` protocol (the proxy itself satisfies it; nothing is
allocated to bind it), and ``Exchange`` keeps ``__slots__``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, Protocol

from sidekey.proxy import decoding, listener, metrics, relaying, upstream, upstreamheads

if TYPE_CHECKING:
    from sidekey.proxy import audit as auditing
    from sidekey.proxy import refusals, routes, scrubbing

log = logging.getLogger("sidekey.proxy")


class Owner(Protocol):
    """What a fast exchange needs from the proxy that started it."""

    def finish(self, request: listener.Request, record: auditing.AuditRecord, started: float, status: int) -> None:
        """Write the request's one audit line and count it (``record`` is complete but for the end)."""

    def refuse(self, reply: listener.Reply, record: auditing.AuditRecord, refusal: refusals.Refusal) -> int:
        """Answer ``refusal`` as JSON, note it in ``record``; its status."""

    def histogram(self, family: Any, upstream_name: str) -> Any:
        """The histogram child of ``family`` for an upstream (cached)."""

    def resend(
        self,
        request: listener.Request,
        conn: listener.AgentConnection,
        reply: listener.Reply,
        record: auditing.AuditRecord,
        started: float,
        route: routes.Route,
        data: bytes,
        timeout: float,
        scrubber: scrubbing.Scrubber,
    ) -> Coroutine[Any, Any, None]:
        """Send ``data`` again on a new connection and relay its answer, audited: the coroutine path."""


class Answered(listener.Exchange):
    """What ``Proxy.fast`` returns for a request it answered at once (a refusal): nothing to
    stop when the agent leaves (the base class's ``lost``)."""


ANSWERED: Final = Answered()

_HEAD, _WHOLE, _STREAM = 0, 1, 2


class Exchange(listener.Exchange):
    """One request on the fast path, followed from the upstream protocol's callbacks.

    It does what ``Proxy._exchange`` and ``relaying.respond`` do for a request without
    hooks or an LLM step, in the same order and with the same outcomes (the
    tests in tests/proxy and tests/attacks run both paths): the answer's head
    is checked and scrubbed when it is parsed, the body relayed to the agent as
    it arrives (a small one leaves with the head in one send), the pooled
    connection released and the audit line written when it ends. A stale pooled
    connection that fails before any answer is retried once on a new one, in a
    task, as the slow path does.
    """

    __slots__ = (
        "_block", "_conn", "_data", "_decoder", "_ended", "_owner", "_parts", "_phase", "_reason", "_record",
        "_relay", "_reply", "_request", "_route", "_scrubber", "_sent_at", "_sse", "_started", "_status",
        "_task", "_timeout", "_up",
    )

    def __init__(
        self,
        owner: Owner,
        request: listener.Request,
        conn: listener.AgentConnection,
        reply: listener.Reply,
        record: auditing.AuditRecord,
        started: float,
        route: routes.Route,
        scrubber: scrubbing.Scrubber,
        up: upstream.UpstreamConnection,
        data: bytes,
        timeout: float,
    ) -> None:
        self._owner = owner
        self._request = request
        self._conn = conn
        self._reply = reply
        self._record = record
        self._started = started
        self._route = route
        self._scrubber = scrubber
        self._up = up
        self._data = data
        self._timeout = timeout
        self._sent_at = time.perf_counter()
        self._phase = _HEAD
        self._status = 0
        self._reason = b""
        self._block = b""
        self._decoder: decoding.Decoder | None = None
        self._parts: list[bytes] = []
        self._relay: relaying.Relay | None = None
        self._sse = False
        self._task: asyncio.Task[None] | None = None
        self._ended = False

    # --- upstream.Watcher ---------------------------------------------------------------

    def head_ready(self) -> None:
        try:
            up = self._up
            self._owner.histogram(metrics.UPSTREAM_DURATION, self._route.name).observe(
                time.perf_counter() - self._sent_at)
            status, reason, block, decoder, length, sse = upstreamheads.response_head(up, self._scrubber)
            self._status = status
            if decoder is not None and length is not None and length <= relaying.SMALL_BODY:
                # a small compressed body: read whole, decoded, scrubbed, sent with its new length
                self._decoder, self._reason, self._block = decoder, reason, block
                self._phase = _WHOLE
                up.set_sink(self._parts.append)
                return
            reply = self._reply
            relay = relaying.Relay(reply, self._scrubber, decoder, [], sse)
            if length is None or length > relaying.SMALL_BODY or decoder is not None:
                self._record["streamed"] = True
            reply.start(status, reason, block, length if decoder is None else None)
            conn = self._conn
            conn.on_pause, conn.on_resume = up.pause, up.resume
            if conn.write_paused:
                up.pause()
            self._relay, self._sse, self._phase = relay, sse, _STREAM
            up.set_sink(relay.feed)
        except upstream.UpstreamError:
            raise
        except Exception as exc:
            log.error("request failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
            raise upstream.Broken("the relay failed") from None

    def fed(self) -> None:
        if self._phase == _STREAM:
            self._reply.uncork()  # a stream: the head now, then every chunk as it is read

    def done(self) -> None:
        try:
            self._done()
        except Exception as exc:
            self._broke(exc)

    def failed(self, exc: upstream.UpstreamError) -> None:
        self._guarded(lambda: self._failed(exc))

    def _guarded(self, step: Callable[[], None]) -> None:
        """A bug in a step costs this request (cut, audited), never a hung connection."""
        try:
            step()
        except Exception as exc:
            self._broke(exc)

    def _broke(self, exc: Exception) -> None:
        log.error("request failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
        self._up.abandon()
        self._conn.abort()
        if not self._ended:
            self._record["reason"] = "internal_error"
            self._complete(self._reply.status or 500)

    def _done(self) -> None:
        reply, record = self._reply, self._record
        if self._phase == _WHOLE:
            decoder = self._decoder
            assert decoder is not None
            try:
                data = decoder.feed(b"".join(self._parts)) + decoder.flush()
            except decoding.DecodeError:
                self._failed(upstream.Unacceptable("the upstream sent a corrupt or oversized compressed body"))
                return
            body = self._scrubber.scrub(data)
            reply.whole(self._status, self._block, body, self._reason)
            record["bytes_out"] = len(body)
        else:
            relay = self._relay
            assert relay is not None
            try:
                relay.finish()
            except upstream.UpstreamError as exc:
                # as in the slow path: the status is gone, the agent sees a cut response
                self._up.abandon()
                record["reason"] = exc.reason
                self._conn.abort()
                self._complete(reply.status)
                return
            reply.end()
            record["bytes_out"] = reply.sent
        self._up.release()
        self._complete(self._status)

    def _failed(self, exc: upstream.UpstreamError) -> None:
        up = self._up
        if self._phase == _HEAD and isinstance(exc, upstream.Broken) and up.reused and not up.received_any:
            # a pooled connection the upstream closed while it sat idle: once more on a new one
            up.abandon()
            self._task = asyncio.get_running_loop().create_task(self._retry())
            return
        up.abandon()
        if self._phase == _STREAM and not self._reply.discard():
            # the status is gone: end the connection so the agent sees a cut stream,
            # not a clean end of a truncated body
            self._record["reason"] = "upstream_broke_stream"
            self._record["bytes_out"] = self._reply.sent
            log.info("upstream stream broke: %s", type(exc).__name__)
            self._conn.abort()
            self._complete(self._status)
            return
        # nothing reached the agent yet: it gets a clean 502 (504 for a timeout)
        self._complete(self._owner.refuse(self._reply, self._record, upstreamheads.failure(self._route, exc)))

    # --- listener.Exchange ------------------------------------------------------------------

    def lost(self) -> None:
        """The agent left before the answer was done: audited as the slow path's cancellation."""
        if self._task is not None:
            self._task.cancel()  # the resend audits it
            return
        if self._ended:
            return
        record = self._record
        if self._phase == _STREAM:
            relay = self._relay
            if self._sse and relay is not None and relay.final:
                record["reason"] = "stream_complete"
            record["bytes_out"] = self._reply.sent
        self._up.abandon()
        status = relaying.agent_left(record, self._reply.status)
        self._ended = True
        self._owner.finish(self._request, record, self._started, status)

    # --- the end ------------------------------------------------------------------------------

    def _complete(self, status: int) -> None:
        if self._ended:
            return
        self._ended = True
        self._owner.finish(self._request, self._record, self._started, status)
        self._conn.finished(self._request)

    async def _retry(self) -> None:
        request, conn = self._request, self._conn
        self._ended = True  # from here the resend writes the audit line
        try:
            await self._owner.resend(request, conn, self._reply, self._record, self._started, self._route,
                                     self._data, self._timeout, self._scrubber)
        except asyncio.CancelledError:
            conn.close()
            return
        conn.finished(request)
