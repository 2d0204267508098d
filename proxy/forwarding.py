"""The request path: authenticate, authorise, attach the key, relay both ways.

    agent ──► listener (llhttp) ──► Proxy.handle
                                      │ paths.parse, the token (cached), decision.authorise   (no I/O)
                                      │ hooks (after the decision, before the key is attached)
                                      │ the key, the headers, the body
                                      ▼
                                  upstream.Pool ──► the upstream (llhttp), body relayed
                                      │               chunk by chunk: decode? scrub, hooks
                                      ▼
                                  one audit line, one counter increment

Every request ends in exactly one audit line and one counter increment, on
every path (refused, forwarded, cut by either side), with the upstream's
label once the route is known. The order of checks is deliberate: a
malformed target is refused before anything else (400), the caller is
authenticated before the route is looked up (so an unauthenticated caller
learns nothing about upstreams), and the rate limit only counts requests the
policy allows. Refusals are ``refusals.Refusal`` exceptions, rendered in one
place; their messages tell the agent's developer what to fix and never echo a
token or a key.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, Protocol

from sidekey.core import httpclient, logs, tokens
from sidekey.proxy import audit as auditing
from sidekey.proxy import (
    credentials,
    decision,
    decoding,
    headers,
    listener,
    llmexchange,
    metrics,
    paths,
    refusals,
    routes,
    scrubbing,
    upstream,
)

log = logging.getLogger("sidekey.proxy")

#: Bodies up to this size are read at once and sent with their length; larger ones are streamed.
SMALL_BODY: Final = 64 * 1024
_JSON_HEAD: Final = b"Content-Type: application/json\r\n"
_EVENT_STREAM: Final = b"text/event-stream"
#: The last event of a completed stream (OpenAI's and Anthropic's): a client may close right after.
_FINAL_EVENTS: Final = (b"data: [DONE]", b"event: message_stop")

# the names the tests and the bench knew before the split
_Decoder = decoding.Decoder
_redacted = auditing.redacted
_without_param = headers.without_param
_forward_headers = headers.forward_request


class ChunkHook(Protocol):
    """Sees every piece of an allowed response after scrubbing (an SSE event as it arrives)."""

    def chunk(self, data: bytes) -> bytes: ...

    def end(self) -> None: ...


#: Called once a call is allowed, before the key is attached: may raise a Refusal
#: (a model not on the allow-list, a spent budget) or return a ChunkHook for the response.
#: ``body`` is the whole request body when it was small enough to be read at once, else None.
RequestHook = Callable[
    [routes.Route, tokens.Identity, listener.Request, "bytes | None", auditing.AuditRecord], "ChunkHook | None"
]


class Proxy:
    """The handler of the agent-facing listener."""

    def __init__(
        self,
        *,
        table: Callable[[], dict[str, routes.Route]],
        validator: Callable[[], tokens.Validator | None],
        ready: Callable[[], bool],
        audit: logs.AuditWriter,
        pod: str,
        namespace: str,
        resolver: routes.GuardedResolver | None = None,
        session: httpclient.Client | None = None,
        hooks: Sequence[RequestHook] = (),
        token_cache: bool = True,
        llm: llmexchange.Gate | None = None,
    ) -> None:
        self._table = table
        self._validator = validator
        self._ready = ready
        guard = resolver or routes.GuardedResolver(frozenset())
        self.pool = upstream.Pool(guard)
        # for the OAuth2 token endpoint only, behind the same host checks as the upstreams
        self.session = session or credentials.token_client(guard.addresses)
        self._audit = audit
        self._pod = pod
        self._namespace = namespace
        self.hooks = list(hooks)
        #: The LLM step (models, token budgets) for upstreams with ``api`` set: proxy/llmexchange.py.
        #: Never absent (fail closed): without an apiserver only serviceAccount budgets are refused (503).
        self.llm = llm if llm is not None else llmexchange.Gate(
            api=None, namespace=namespace, pod=pod, pod_uid="", service_account="")
        self._token_cache = token_cache
        self._ids = itertools.count(1)
        self._boot = os.urandom(4).hex()
        self._counters: dict[tuple[str, str, int, str], Any] = {}
        self._histograms: dict[tuple[int, str], Any] = {}
        self._now = auditing.Stamp().now
        self._lines = auditing.LineEncoder(pod, namespace)
        #: Per route of the current table, the constant parts of its request head (fast path).
        self._heads: dict[int, tuple[routes.Route, str, str, str]] = {}
        self._heads_table: object = None
        self.in_flight = 0
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)

    # --- the handler ---------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> listener.Listener:
        """The agent-facing listener on ``host:port`` (0: any free port), serving this proxy."""
        server = listener.Listener(self.handle, self.fast)
        await server.start(host, port)
        return server

    async def close(self) -> None:
        self.pool.close()
        await self.session.close()

    async def handle(self, request: listener.Request, conn: listener.AgentConnection) -> None:
        started, record, reply = self._begin(request, conn)
        await self._run(request, conn, reply, record, started, self._handle(request, conn, reply, record))

    def _begin(
        self, request: listener.Request, conn: listener.AgentConnection
    ) -> tuple[float, auditing.AuditRecord, listener.Reply]:
        started = time.perf_counter()
        self.in_flight += 1
        record: auditing.AuditRecord = {
            "request_id": f"{self._boot}-{next(self._ids)}",
            "pod": self._pod,
            "namespace": self._namespace,
            "service_account": None,
            "upstream": None,
            "method": request.method,
            "path": auditing.redacted(request.target),
        }
        return started, record, listener.Reply(conn, request)

    async def _run(
        self,
        request: listener.Request,
        conn: listener.AgentConnection,
        reply: listener.Reply,
        record: auditing.AuditRecord,
        started: float,
        work: Coroutine[Any, Any, int],
    ) -> None:
        """Await the request's work; whatever happens, one audit line and one count."""
        status = 500
        try:
            try:
                status = await work
            except refusals.Refusal as refusal:
                status = self._refuse(reply, record, refusal)
                if request.has_body and not request.body.eof:
                    reply.keep_alive = False  # the unread body would be read as the next request
            except (ConnectionError, upstream.UpstreamError) as exc:
                # the agent left mid-body, or a failure after the status line was sent
                if reply.started:
                    status = reply.status
                    record["reason"] = getattr(exc, "reason", "upstream_broke_stream")
                else:
                    status = 499
                    record["reason"] = "client_disconnected"
                conn.abort()
            except Exception as exc:
                log.error("request failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
                if reply.started:
                    conn.abort()
                    status = reply.status
                else:
                    status = self._refuse(reply, record, refusals.Internal(
                        "internal_error", "the sidecar failed on this request; see its logs"))
        except asyncio.CancelledError:
            record.setdefault("decision", "allowed")
            if record.get("reason") == "stream_complete":
                status = reply.status  # the agent closed after the final event: a completed stream
                record["reason"] = "ok"
            else:
                record["reason"] = "client_disconnected"
                status = 499
            raise
        finally:
            self._finish(request, record, started, status)

    def _finish(self, request: listener.Request, record: auditing.AuditRecord, started: float, status: int) -> None:
        elapsed = time.perf_counter() - started
        self.in_flight -= 1
        record["status"] = status
        record["duration_ms"] = round(elapsed * 1000, 3)
        record["time"] = self._now()
        line = self._lines.encode(record)
        if line is None:
            self._audit.write(record)
        else:
            self._audit.write_line(line)
        self._count(record["upstream"] or "", request.method, status, record.get("decision", "error"), elapsed)

    def _refuse(self, reply: listener.Reply, record: auditing.AuditRecord, refusal: refusals.Refusal) -> int:
        if refusal.decision is not None:
            record["decision"] = refusal.decision
        record["reason"] = refusal.reason
        if refusal.upstream is not None:
            record["upstream"] = refusal.upstream
        head = _JSON_HEAD + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in refusal.extra_headers())
        reply.whole(refusal.status, head, refusal.encoded())
        return refusal.status

    def _count(self, upstream_name: str, method: str, status: int, decided: str, elapsed: float) -> None:
        key = (upstream_name, method, status, decided)
        child = self._counters.get(key)
        if child is None:
            child = metrics.REQUESTS.labels(upstream_name, metrics.method_label(method), str(status), decided)
            if len(self._counters) < 4096:
                self._counters[key] = child
        child.inc()
        if upstream_name:
            self._histogram(metrics.DURATION, upstream_name).observe(elapsed)

    def _histogram(self, family: Any, upstream_name: str) -> Any:
        key = (id(family), upstream_name)
        child = self._histograms.get(key)
        if child is None:
            child = family.labels(upstream_name)
            if len(self._histograms) < 1024:
                self._histograms[key] = child
        return child

    # --- the fast path -------------------------------------------------------------------

    def fast(
        self, request: listener.Request, conn: listener.AgentConnection
    ) -> listener.Exchange | Coroutine[Any, Any, None] | None:
        """Serve from callbacks a request that needs no waiting: the listener's fast handler.

        Taken when the body has fully arrived and is small, the token checks out without
        waiting (cached, or signed by a key already loaded: ``Validator.validate_now``), and
        (after the decision) the route's key is static, it is no LLM upstream and an idle
        pooled connection is there: then the request is written upstream here and the
        answer relayed from the upstream protocol's callbacks (``_FastExchange``), with no
        task and no future. The checks and their order are ``_handle``'s; a request that
        fails one before the decision is left to ``handle`` (None: nothing was done yet),
        one that needs waiting after it goes on as a coroutine from the decision on.
        """
        if self.hooks or request.chunked or request.expect is not None:
            return None
        length = request.content_length
        if length is not None and length > SMALL_BODY:
            return None
        validator = self._validator()
        if validator is None or not self._ready():
            return None
        try:
            target = paths.parse(request.target)
        except paths.PathError:
            return None
        token = headers.caller_token(request.authorization, request.token_header)
        if token is None:
            return None
        if not self._token_cache:
            validator._cache.clear()  # the benchmark knob (SIDEKEY_TOKEN_CACHE=0), as in _handle
        try:
            # a new token is checked here too: with the keys loaded that is CPU work only
            identity = validator.validate_now(token)
        except tokens.TokenError:
            return None  # refused by _handle, with its metric and message
        if identity is None:
            return None  # an unknown kid: _handle refetches the keys
        started, record, reply = self._begin(request, conn)
        try:
            record["service_account"] = identity.service_account
            table = self._table()
            try:
                route = decision.authorise(target, identity, table, request.method, length)
            except refusals.Refusal as refusal:
                if isinstance(refusal, refusals.RateLimited):
                    metrics.RATE_LIMITED.labels(refusal.upstream or "").inc()
                status = self._refuse(reply, record, refusal)
                self._finish(request, record, started, status)
                conn.finished(request)
                return _ANSWERED
            record["upstream"] = route.name
            record["decision"] = "allowed"
            record["reason"] = "ok"
            cred = route.credential
            assert cred is not None  # authorise refused a route without one
            up_conn = None
            if route.upstream.llm is None and cred.oauth is None:
                up_conn = self.pool.idle_connection(route)
            if up_conn is None:
                return self._run(request, conn, reply, record, started,
                                 self._forward(request, conn, reply, route, identity, target, record))
            body = request.body.take() if request.has_body else b""
            record["bytes_in"] = len(body)
            if table is not self._heads_table:
                self._heads.clear()  # a new table: the old routes (and their keys) are not kept
                self._heads_table = table
            data = self._fast_request(request, route, cred, target, body)
            timeout = route.timeout.sock_read or float(route.upstream.limits.timeout_seconds)
            exchange = _FastExchange(self, request, conn, reply, record, started, route, cred.scrubber,
                                     up_conn, data, timeout)
            up_conn.send(data, head_method=request.method == "HEAD", timeout=timeout, watcher=exchange)
            return exchange
        except Exception as exc:  # a bug costs this request a 500, never the audit line
            log.error("request failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
            if reply.started:
                conn.abort()
                status = reply.status
            else:
                status = self._refuse(reply, record, refusals.Internal(
                    "internal_error", "the sidecar failed on this request; see its logs"))
            self._finish(request, record, started, status)
            conn.finished(request)
            return _ANSWERED

    def _fast_request(
        self,
        request: listener.Request,
        route: routes.Route,
        cred: credentials.Credential,
        target: paths.Target,
        body: bytes,
    ) -> bytes:
        """``_upstream_request`` for a whole body and a static key, its constant parts built once."""
        entry = self._heads.get(id(route))
        if entry is None or entry[0] is not route:
            up = route.upstream
            host = f"[{up.host}]" if ":" in up.host else up.host
            if up.port != (443 if up.scheme == "https" else 80):
                host = f"{host}:{up.port}"
            key_lines = "".join([f"{k}: {v}\r\n" for k, v in cred.headers])
            entry = (route, up.base_path, f" HTTP/1.1\r\nHost: {host}\r\n", f"{key_lines}Accept-Encoding: identity\r\n")
            if len(self._heads) >= 1024:
                self._heads.clear()
            self._heads[id(route)] = entry
        _, base, host_line, tail = entry
        query = target.query
        if cred.query is not None:
            name, value = cred.query
            query = headers.without_param(query, name)
            query = f"{query}&{name}={value}" if query else f"{name}={value}"
        path = base + target.path
        if query:
            path = f"{path}?{query}"
        method = request.method
        agent = "".join([f"{k}: {v}\r\n" for k, v in headers.forward(request.headers, request.connection, route.strip)])
        end = f"Content-Length: {len(body)}\r\n\r\n" if body or method in ("POST", "PUT", "PATCH") else "\r\n"
        data = f"{method} {path or '/'}{host_line}{agent}{tail}{end}".encode("utf-8", "surrogateescape")
        return data + body if body else data

    # --- the decision --------------------------------------------------------------------

    async def _handle(
        self,
        request: listener.Request,
        conn: listener.AgentConnection,
        reply: listener.Reply,
        record: auditing.AuditRecord,
    ) -> int:
        validator = self._validator()
        if validator is None or not self._ready():
            raise refusals.NotReady(
                "not_ready", "the sidecar is starting: its keys or policies are not loaded yet"
            )
        try:
            target = paths.parse(request.target)
        except paths.PathError as exc:
            raise refusals.BadRequest("bad_path", str(exc)) from None
        token = headers.caller_token(request.authorization, request.token_header)
        if token is None:
            metrics.TOKEN_FAILURES.labels("missing").inc()
            raise refusals.Unauthenticated(
                "missing",
                "no token: send the pod's token (the file in SIDEKEY_TOKEN_FILE) as "
                "'Authorization: Bearer <token>' or as the SDK's API key",
            )
        if self._token_cache:
            identity = validator.cached(token)
        else:
            # the benchmark knob (SIDEKEY_TOKEN_CACHE=0): every call pays the full check
            validator._cache.clear()
            identity = None
        if identity is None:
            try:
                identity = await validator.validate(token)
            except tokens.TokenError as exc:
                metrics.TOKEN_FAILURES.labels(exc.reason).inc()
                raise refusals.Unauthenticated(exc.reason, exc.message) from None
        record["service_account"] = identity.service_account
        try:
            route = decision.authorise(target, identity, self._table(), request.method, request.content_length)
        except refusals.RateLimited as exc:
            metrics.RATE_LIMITED.labels(exc.upstream or "").inc()
            raise
        record["upstream"] = route.name
        record["decision"] = "allowed"
        record["reason"] = "ok"
        return await self._forward(request, conn, reply, route, identity, target, record)

    # --- forwarding ------------------------------------------------------------------------------

    async def _forward(
        self,
        request: listener.Request,
        conn: listener.AgentConnection,
        reply: listener.Reply,
        route: routes.Route,
        identity: tokens.Identity,
        target: paths.Target,
        record: auditing.AuditRecord,
    ) -> int:
        up = route.upstream
        cred = route.credential
        assert cred is not None  # authorise refused a route without one
        # --- the body: invite it (the call is allowed), then read a small one at once
        expect = request.expect
        if expect is not None and expect.lower() == "100-continue" and request.version == "1.1":
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        length = request.content_length
        body: bytes | None = None
        if not request.has_body:
            body = b""
        elif length is not None and length <= SMALL_BODY:
            body = await request.body.read_all()
        # --- LLM upstreams: the whole body is read, its model checked, its tokens reserved
        exchange: llmexchange.Exchange | None = None
        if up.llm is not None:
            if body is None and llmexchange.reads_body(up.llm, request.method, target.segments):
                body = await llmexchange.read_body(request.body, up.limits.max_request_bytes, route)
            exchange = await self.llm.admit(route, request.method, target.segments, body, record)
            if exchange is not None and exchange.body is not None:
                body = exchange.body
        try:
            return await self._forward_allowed(request, conn, reply, route, identity, target, record,
                                               body, length, exchange)
        finally:
            if exchange is not None:
                exchange.finish(record)

    async def _forward_allowed(
        self,
        request: listener.Request,
        conn: listener.AgentConnection,
        reply: listener.Reply,
        route: routes.Route,
        identity: tokens.Identity,
        target: paths.Target,
        record: auditing.AuditRecord,
        body: bytes | None,
        length: int | None,
        exchange: llmexchange.Exchange | None,
    ) -> int:
        up = route.upstream
        cred = route.credential
        assert cred is not None
        record["bytes_in"] = len(body) if body is not None else length or 0
        chunk_hooks: list[ChunkHook] = []
        for hook in self.hooks:
            extra = hook(route, identity, request, body, record)
            if extra is not None:
                chunk_hooks.append(extra)
        # --- the key and the head
        scrubber = cred.scrubber
        lines = headers.forward(request.headers, request.connection, route.strip)
        if cred.oauth is not None:
            try:
                access = await cred.oauth.token(self.session)
            except credentials.CredentialError as exc:
                raise refusals.UpstreamFailure(
                    "oauth_failed", f"upstream {route.name!r}: {exc.message}", exc.status
                ) from None
            lines.append(("Authorization", f"Bearer {access}"))
            scrubber = cred.oauth.scrubber
        else:
            lines.extend(cred.headers)
        streamed_body = body is None
        data = _upstream_request(request.method, route, target, lines, body, length)
        timeout = route.timeout.sock_read or float(up.limits.timeout_seconds)
        return await self._exchange(request, conn, reply, route, data, timeout, streamed_body, length,
                                    scrubber, chunk_hooks, record, exchange)

    async def _exchange(
        self,
        request: listener.Request,
        conn: listener.AgentConnection,
        reply: listener.Reply,
        route: routes.Route,
        data: bytes,
        read_timeout: float,
        streamed_body: bool,
        length: int | None,
        scrubber: scrubbing.Scrubber,
        chunk_hooks: list[ChunkHook],
        record: auditing.AuditRecord,
        exchange: llmexchange.Exchange | None,
        *,
        fresh: bool = False,
    ) -> int:
        """Send the request, relay the answer; a stale pooled connection is retried once."""
        started = time.perf_counter()
        up_conn = await self._send(route, data, request, read_timeout, fresh=fresh)
        try:
            if streamed_body:
                await self._upload(request, route, up_conn, length is None, record)
            try:
                await up_conn.head()
            except upstream.Broken:
                # a pooled connection the upstream closed while it sat idle fails before any
                # answer: the request (read whole, so it can be sent again) goes on a new one
                if streamed_body or not up_conn.reused or up_conn.received_any:
                    raise
                up_conn.abandon()
                up_conn = await self._send(route, data, request, read_timeout, fresh=True)
                await up_conn.head()
            self._histogram(metrics.UPSTREAM_DURATION, route.name).observe(time.perf_counter() - started)
            status = await self._respond(request, conn, reply, up_conn, scrubber, chunk_hooks, record, exchange)
        except upstream.UpstreamError as exc:
            up_conn.abandon()
            if reply.started:
                raise
            raise self._failure(route, exc) from None
        except BaseException:
            up_conn.abandon()  # a half-read response never goes back to the pool
            raise
        up_conn.release()
        return status

    async def _send(
        self, route: routes.Route, data: bytes, request: listener.Request, read_timeout: float, *,
        fresh: bool = False,
    ) -> upstream.UpstreamConnection:
        """A connection with the request head (and small body) on its way."""
        try:
            up_conn = await self.pool.acquire(route, fresh=fresh)
        except upstream.UpstreamError as exc:
            raise self._failure(route, exc) from None
        up_conn.send(data, head_method=request.method == "HEAD", timeout=read_timeout)
        return up_conn

    async def _upload(
        self,
        request: listener.Request,
        route: routes.Route,
        up_conn: upstream.UpstreamConnection,
        chunked: bool,
        record: auditing.AuditRecord,
    ) -> None:
        """Stream a large or chunked request body up, within the policy's size limit."""
        limit = route.upstream.limits.max_request_bytes
        total = 0
        body = request.body
        while chunk := await body.read():
            total += len(chunk)
            if total > limit:
                record["bytes_in"] = total
                up_conn.abandon()
                raise decision.too_large_stream(route)
            up_conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await up_conn.drain()
        if chunked:
            up_conn.write(b"0\r\n\r\n")
        record["bytes_in"] = total

    def _failure(self, route: routes.Route, exc: upstream.UpstreamError) -> refusals.UpstreamFailure:
        name = route.name
        if isinstance(exc, upstream.ReadTimeout):
            limit = route.upstream.limits.timeout_seconds
            what = "could not be connected to" if isinstance(exc, upstream.ConnectTimeout) else "did not answer"
            return refusals.UpstreamTimeout(
                exc.reason, f"upstream {name!r} {what} within {limit} s (limits.timeoutSeconds)"
            )
        if isinstance(exc, upstream.TlsFailed):
            return refusals.UpstreamFailure(
                exc.reason,
                f"upstream {name!r}: TLS verification failed (check the certificate, or the policy's caBundle)",
            )
        if isinstance(exc, upstream.Refused | upstream.Unacceptable | upstream.DnsFailed):
            return refusals.UpstreamFailure(exc.reason, f"upstream {name!r}: {exc}")
        log.info("upstream %s failed: %s", name, exc)
        return refusals.UpstreamFailure(exc.reason, f"upstream {name!r} {exc}")

    # --- the response ----------------------------------------------------------------------------

    async def _respond(
        self,
        request: listener.Request,
        conn: listener.AgentConnection,
        reply: listener.Reply,
        up_conn: upstream.UpstreamConnection,
        scrubber: scrubbing.Scrubber,
        chunk_hooks: list[ChunkHook],
        record: auditing.AuditRecord,
        exchange: llmexchange.Exchange | None = None,
    ) -> int:
        status, reason, block, decoder, length, sse = _response_head(up_conn, scrubber)
        if exchange is not None:
            llm_hook = exchange.response(status, sse)
            if llm_hook is not None:
                chunk_hooks = [*chunk_hooks, llm_hook]
                if llm_hook.whole and length is not None and length <= llmexchange.MAX_JSON_REPLY:
                    # the model list is filtered whole and sent with its new length
                    return await self._respond_decoded(
                        reply, up_conn, decoder, scrubber, chunk_hooks, status, reason, block, record
                    )
        if decoder is not None and length is not None and length <= SMALL_BODY:
            return await self._respond_decoded(
                reply, up_conn, decoder, scrubber, chunk_hooks, status, reason, block, record
            )
        relay = _Relay(reply, up_conn, scrubber.stream(), decoder, chunk_hooks, sse)
        if length is None or length > SMALL_BODY or decoder is not None:
            record["streamed"] = True
        reply.start(status, reason, block, length if decoder is None else None)
        conn.on_pause, conn.on_resume = up_conn.pause, up_conn.resume
        if conn.write_paused:
            up_conn.pause()
        done = up_conn.relay(relay.feed)
        try:
            if not done.done():
                reply.uncork()  # a stream: the head now, then every chunk as it is read
                await done
            else:
                done.result()  # a small body arrived with the head: head and body leave in one send
        except asyncio.CancelledError:
            if sse and relay.final:
                record["reason"] = "stream_complete"
            record["bytes_out"] = reply.sent
            raise
        except llmexchange.StreamCut:
            # the token budget ended the stream: its closing events are sent, end it cleanly
            up_conn.abandon()
            record["bytes_out"] = reply.sent
            if length is None:
                reply.end()
            else:
                conn.abort()
            return status
        except upstream.UpstreamError as exc:
            if reply.discard():
                raise  # nothing reached the agent yet (corked): it gets a clean 502 instead
            # the status is gone: end the connection so the agent sees a cut stream,
            # not a clean end of a truncated body
            record["reason"] = "upstream_broke_stream"
            record["bytes_out"] = reply.sent
            log.info("upstream stream broke: %s", type(exc).__name__)
            up_conn.abandon()
            conn.abort()
            return status
        relay.finish()
        reply.end()
        record["bytes_out"] = reply.sent
        return status

    async def _respond_decoded(
        self,
        reply: listener.Reply,
        up_conn: upstream.UpstreamConnection,
        decoder: decoding.Decoder | None,
        scrubber: scrubbing.Scrubber,
        chunk_hooks: list[ChunkHook],
        status: int,
        reason: bytes,
        block: bytes,
        record: auditing.AuditRecord,
    ) -> int:
        """A small compressed body: read whole, decoded, scrubbed, sent with its new length."""
        parts: list[bytes] = []
        await up_conn.relay(parts.append)
        try:
            data = b"".join(parts) if decoder is None else decoder.feed(b"".join(parts)) + decoder.flush()
        except decoding.DecodeError:
            raise upstream.Unacceptable("the upstream sent a corrupt or oversized compressed body") from None
        body = scrubber.scrub(data)
        for hook in chunk_hooks:
            body = hook.chunk(body)
            hook.end()
        reply.whole(status, block, body, reason)
        record["bytes_out"] = len(body)
        return status


def _upstream_request(
    method: str,
    route: routes.Route,
    target: paths.Target,
    lines: list[tuple[str, str]],
    body: bytes | None,
    length: int | None,
) -> bytes:
    """The request head for the upstream (and ``body``; None: the body is streamed after)."""
    up = route.upstream
    cred = route.credential
    assert cred is not None
    query = target.query
    if cred.query is not None:
        name, value = cred.query
        query = headers.without_param(query, name)
        query = f"{query}&{name}={value}" if query else f"{name}={value}"
    path = up.base_path + target.path
    if query:
        path = f"{path}?{query}"
    host = f"[{up.host}]" if ":" in up.host else up.host
    if up.port != (443 if up.scheme == "https" else 80):
        host = f"{host}:{up.port}"
    head = [f"{method} {path or '/'} HTTP/1.1\r\nHost: {host}\r\n"]
    head.extend(f"{k}: {v}\r\n" for k, v in lines)
    head.append("Accept-Encoding: identity\r\n")
    if body is None:
        head.append(f"Content-Length: {length}\r\n\r\n" if length is not None else "Transfer-Encoding: chunked\r\n\r\n")
    elif body or method in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
    else:
        head.append("\r\n")
    data = "".join(head).encode("utf-8", "surrogateescape")
    if body:
        data += body
    return data


def _response_head(
    up_conn: upstream.UpstreamConnection, scrubber: scrubbing.Scrubber
) -> tuple[int, bytes, bytes, decoding.Decoder | None, int | None, bool]:
    """The answer's status, reason, header block for the agent, decoder, length and whether SSE."""
    status = up_conn.status
    decoder: decoding.Decoder | None = None
    if up_conn.codings:
        codings = decoding.codings(v.decode("latin-1") for v in up_conn.codings)
        if codings:
            if len(codings) > 1 or codings[0] not in decoding.DECODABLE:
                encoding = ", ".join(codings)
                raise upstream.Unacceptable(
                    f"the upstream answered with Content-Encoding {encoding!r} although the "
                    "sidecar asked for identity; such a body cannot be checked for the key"
                )
            decoder = decoding.Decoder()
    block = headers.response_head(
        up_conn.headers, headers.DECODED_DROP if decoder is not None else headers.RESPONSE_DROP, scrubber
    )
    # upstreams echo keys in the reason phrase too ("401 Invalid key sk-...")
    reason = scrubber.scrub(up_conn.reason) if up_conn.reason else listener.reason_phrase(status)
    return status, reason, block, decoder, up_conn.content_length, _EVENT_STREAM in block.lower()


class _Answered:
    """What ``Proxy.fast`` returns for a request it answered at once (a refusal)."""

    def lost(self) -> None:
        pass


_ANSWERED: Final = _Answered()

_HEAD, _WHOLE, _STREAM = 0, 1, 2


class _FastExchange:
    """One request on the fast path, followed from the upstream protocol's callbacks.

    It does what ``Proxy._exchange`` and ``_respond`` do for a request without
    hooks or an LLM step, in the same order and with the same outcomes (the
    tests in tests/proxy and tests/attacks run both paths): the answer's head
    is checked and scrubbed when it is parsed, the body relayed to the agent as
    it arrives (a small one leaves with the head in one send), the pooled
    connection released and the audit line written when it ends. A stale pooled
    connection that fails before any answer is retried once on a new one, in a
    task, as the slow path does.
    """

    __slots__ = (
        "_block", "_conn", "_data", "_decoder", "_ended", "_parts", "_phase", "_proxy", "_reason", "_record",
        "_relay", "_reply", "_request", "_route", "_scrubber", "_sent_at", "_sse", "_started", "_status",
        "_task", "_timeout", "_up",
    )

    def __init__(
        self,
        proxy: Proxy,
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
        self._proxy = proxy
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
        self._relay: _Relay | None = None
        self._sse = False
        self._task: asyncio.Task[None] | None = None
        self._ended = False

    # --- upstream.Watcher ---------------------------------------------------------------

    def head_ready(self) -> None:
        try:
            self._head_ready()
        except upstream.UpstreamError:
            raise
        except Exception as exc:
            log.error("request failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
            raise upstream.Broken("the relay failed") from None

    def _head_ready(self) -> None:
        up = self._up
        proxy = self._proxy
        proxy._histogram(metrics.UPSTREAM_DURATION, self._route.name).observe(time.perf_counter() - self._sent_at)
        status, reason, block, decoder, length, sse = _response_head(up, self._scrubber)
        self._status = status
        if decoder is not None and length is not None and length <= SMALL_BODY:
            # a small compressed body: read whole, decoded, scrubbed, sent with its new length
            self._decoder, self._reason, self._block = decoder, reason, block
            self._phase = _WHOLE
            up.set_sink(self._parts.append)
            return
        reply = self._reply
        relay = _Relay(reply, up, self._scrubber.stream(), decoder, [], sse)
        if length is None or length > SMALL_BODY or decoder is not None:
            self._record["streamed"] = True
        reply.start(status, reason, block, length if decoder is None else None)
        conn = self._conn
        conn.on_pause, conn.on_resume = up.pause, up.resume
        if conn.write_paused:
            up.pause()
        self._relay, self._sse, self._phase = relay, sse, _STREAM
        up.set_sink(relay.feed)

    def fed(self) -> None:
        if self._phase == _STREAM:
            self._reply.uncork()  # a stream: the head now, then every chunk as it is read

    def done(self) -> None:
        self._guarded(self._done)

    def failed(self, exc: upstream.UpstreamError) -> None:
        self._guarded(lambda: self._failed(exc))

    def _guarded(self, step: Callable[[], None]) -> None:
        """A bug in a step costs this request (cut, audited), never a hung connection."""
        try:
            step()
        except Exception as exc:
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
        proxy = self._proxy
        self._complete(proxy._refuse(self._reply, self._record, proxy._failure(self._route, exc)))

    # --- listener.Exchange ------------------------------------------------------------------

    def lost(self) -> None:
        """The agent left before the answer was done: audited as the slow path's cancellation."""
        if self._task is not None:
            self._task.cancel()  # the retry's _run audits it
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
        record.setdefault("decision", "allowed")
        if record.get("reason") == "stream_complete":
            status = self._reply.status  # the agent closed after the final event: a completed stream
            record["reason"] = "ok"
        else:
            record["reason"] = "client_disconnected"
            status = 499
        self._ended = True
        self._proxy._finish(self._request, record, self._started, status)

    # --- the end ------------------------------------------------------------------------------

    def _complete(self, status: int) -> None:
        if self._ended:
            return
        self._ended = True
        self._proxy._finish(self._request, self._record, self._started, status)
        self._conn.finished(self._request)

    async def _retry(self) -> None:
        proxy, request, conn = self._proxy, self._request, self._conn
        self._ended = True  # from here _run writes the audit line
        scrubber = self._scrubber
        try:
            await proxy._run(request, conn, self._reply, self._record, self._started, proxy._exchange(
                request, conn, self._reply, self._route, self._data, self._timeout, False, None,
                scrubber, [], self._record, None, fresh=True))
        except asyncio.CancelledError:
            conn.close()
            return
        conn.finished(request)


class _Relay:
    """The body from the upstream to the agent, run from the upstream protocol's callback."""

    __slots__ = ("_decoder", "_hooks", "_reply", "_sse", "_stream", "_up", "final")

    def __init__(
        self,
        reply: listener.Reply,
        up: upstream.UpstreamConnection,
        stream: scrubbing.StreamScrubber,
        decoder: decoding.Decoder | None,
        hooks: list[ChunkHook],
        sse: bool = False,
    ) -> None:
        self._reply = reply
        self._up = up
        self._sse = sse  # only an event stream has a final event to look for
        self._stream = stream
        self._decoder = decoder
        self._hooks = hooks
        self.final = False

    def feed(self, chunk: bytes) -> None:
        if self._decoder is not None:
            try:
                chunk = self._decoder.feed(chunk)
            except decoding.DecodeError:
                raise upstream.Broken("a corrupt or oversized compressed body") from None
        data = self._stream.feed(chunk)
        if not data:
            return
        for hook in self._hooks:
            data = hook.chunk(data)
        self._reply.write(data)
        if self._sse:
            tail = data[-64:]
            self.final = any(f in tail for f in _FINAL_EVENTS)
        for hook in self._hooks:
            if getattr(hook, "stopped", False):
                raise llmexchange.StreamCut("the token budget ended the stream")

    def finish(self) -> None:
        tail = b""
        if self._decoder is not None:
            try:
                tail = self._decoder.flush()
            except decoding.DecodeError:
                raise upstream.Broken("a corrupt or oversized compressed body") from None
        data = self._stream.feed(tail) + self._stream.flush() if tail else self._stream.flush()
        for hook in self._hooks:
            if data:
                data = hook.chunk(data)
            hook.end()
        self._reply.write(data)

