"""The request path: authenticate, authorise, attach the key, relay both ways.

    agent ──► listener (llhttp) ──► Proxy.fast: nothing to wait for (small body arrived, token
                                      │ cached, key static, an idle pooled connection)?
                                      │   yes: fastpath.Exchange, served from callbacks (no task)
                                      │   no, before the decision: Proxy.handle, a coroutine
                                      │   no, after it: the coroutine path from _forward on
                                      ▼
                                  Proxy.handle
                                      │ paths.parse, the token (cached), decision.authorise   (no I/O)
                                      │ hooks (after the decision, before the key is attached)
                                      │ the key, the headers, the body: upstreamheads.request_head
                                      ▼
                                  upstream.Pool ──► the upstream (llhttp): upstreamheads.response_head,
                                      │               the body relayed chunk by chunk (relaying.respond):
                                      │               decode? scrub, hooks
                                      ▼
                                  one audit line, one counter increment (Proxy.finish)

Every request ends in exactly one audit line and one counter increment, on
every path (refused, forwarded, cut by either side), with the upstream's
label once the route is known. The order of checks is deliberate: a
malformed target is refused before anything else (400), the caller is
authenticated before the route is looked up (so an unauthenticated caller
learns nothing about upstreams), and the rate limit only counts requests the
policy allows. Refusals are ``refusals.Refusal`` exceptions, rendered in one
place (``Proxy.refuse``); their messages tell the agent's developer what to
fix and never echo a token or a key.

This module holds the Proxy: its wiring, the dispatch between the two paths,
the coroutine path up to the upstream's answer, and the accounting both paths
share (``finish``, ``refuse``, ``histogram``, ``resend``: what
``fastpath.Owner`` asks of it). The heads on the upstream side are built and
read in ``upstreamheads``, the answer relayed to the agent in ``relaying``,
the callback exchange followed in ``fastpath``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

from sidekey.core import httpclient, logs, tokens
from sidekey.proxy import audit as auditing
from sidekey.proxy import (
    credentials,
    decision,
    decoding,
    fastpath,
    headers,
    listener,
    llmexchange,
    metrics,
    metrictypes,
    paths,
    refusals,
    relaying,
    routes,
    scrubbing,
    upstream,
    upstreamheads,
)

log = logging.getLogger("sidekey.proxy")

#: Bodies up to this size are read at once and sent with their length; larger ones are streamed.
SMALL_BODY: Final = relaying.SMALL_BODY
_JSON_HEAD: Final = b"Content-Type: application/json\r\n"

# the names the tests and the bench knew before the split
_Decoder = decoding.Decoder
_redacted = auditing.redacted
_without_param = headers.without_param
_forward_headers = headers.forward_request
_upstream_request = upstreamheads.request_head
ChunkHook = relaying.ChunkHook

#: Called once a call is allowed, before the key is attached: may raise a Refusal
#: (a model not on the allow-list, a spent budget) or return a ChunkHook for the response.
#: ``body`` is the whole request body when it was small enough to be read at once, else None.
RequestHook = Callable[
    [routes.Route, tokens.Identity, listener.Request, "bytes | None", auditing.AuditRecord],
    "relaying.ChunkHook | None",
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
        #: Typed as the compiled classes, so ``inc`` and ``observe`` are C calls, not method lookups.
        self._counters: dict[
            tuple[str, str, int, str], tuple[metrictypes.CounterValue, metrictypes.HistogramValue | None]] = {}
        self._histograms: dict[tuple[metrictypes.Histogram, str], metrictypes.HistogramValue] = {}
        self._now = auditing.Stamp().now
        self._lines = auditing.LineEncoder(pod, namespace)
        #: The fast path's request heads, their per-route constant parts kept for the current table.
        self.heads = upstreamheads.RequestHeads()
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
        target = request.target
        record: auditing.AuditRecord = {
            "request_id": f"{self._boot}-{next(self._ids)}",
            "pod": self._pod,
            "namespace": self._namespace,
            "service_account": None,
            "upstream": None,
            "method": request.method,
            # redacted() leaves a target without a query as it is (up to its length bound)
            "path": target if "?" not in target and len(target) <= auditing.PATH_KEPT else auditing.redacted(target),
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
                status = self.refuse(reply, record, refusal)
                if request.has_body and not request.body.eof:
                    reply.keep_alive = False  # the unread body would be read as the next request
            except (ConnectionError, upstream.UpstreamError) as broke:
                # the agent left mid-body, or a failure after the status line was sent
                # (each except clause names its own exception: mypyc types the name per function)
                if reply.started:
                    status = reply.status
                    record["reason"] = getattr(broke, "reason", "upstream_broke_stream")
                else:
                    status = 499
                    record["reason"] = "client_disconnected"
                conn.abort()
            except Exception as exc:
                status = self._unexpected(reply, conn, record, exc)
        except asyncio.CancelledError:
            status = relaying.agent_left(record, reply.status)
            raise
        finally:
            self.finish(request, record, started, status)

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
        """A fast exchange's request once more, on a new connection, the coroutine way (``fastpath.Owner``)."""
        return self._run(request, conn, reply, record, started, self._exchange(
            request, conn, reply, route, data, timeout, False, None, scrubber, [], record, None, fresh=True))

    # --- the accounting: what both paths share (fastpath.Owner) --------------------------------

    def finish(self, request: listener.Request, record: auditing.AuditRecord, started: float, status: int) -> None:
        """The request's one audit line and one count: every path ends here exactly once."""
        elapsed = time.perf_counter() - started
        self.in_flight -= 1
        record["status"] = status
        record["duration_ms"] = auditing.duration_ms(elapsed)
        record["time"] = self._now()
        line = self._lines.encode(record)
        if line is None:
            self._audit.write(record)
        else:
            self._audit.write_line(line)
        # the count, inlined: the counter child and the duration histogram child are looked up
        # together, by one key, from the second request of each kind on
        key = (record["upstream"] or "", request.method, status, record.get("decision", "error"))
        children = self._counters.get(key)
        if children is None:
            children = self._children(key)
        children[0].inc()
        duration = children[1]
        if duration is not None:
            duration.observe(elapsed)

    def _children(
        self, key: tuple[str, str, int, str]
    ) -> tuple[metrictypes.CounterValue, metrictypes.HistogramValue | None]:
        """The request counter's child for ``key`` and the duration histogram's for its upstream (cached)."""
        upstream_name, method, status, decided = key
        counter: metrictypes.CounterValue = metrics.REQUESTS.labels(upstream_name, metrics.method_label(method), str(status), decided)
        children = (counter, self.histogram(metrics.DURATION, upstream_name) if upstream_name else None)
        if len(self._counters) < 4096:
            self._counters[key] = children
        return children

    def _unexpected(self, reply: listener.Reply, conn: listener.AgentConnection,
                    record: auditing.AuditRecord, exc: Exception) -> int:
        """A bug on either path: logged, and the request cut or answered 500; its status."""
        log.error("request failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
        if reply.started:
            conn.abort()
            return reply.status
        return self.refuse(reply, record, refusals.Internal(
            "internal_error", "the sidecar failed on this request; see its logs"))

    def refuse(self, reply: listener.Reply, record: auditing.AuditRecord, refusal: refusals.Refusal) -> int:
        """Answer ``refusal`` as its JSON error and note it in ``record``: the one place refusals are rendered."""
        if refusal.decision is not None:
            record["decision"] = refusal.decision
        record["reason"] = refusal.reason
        if refusal.upstream is not None:
            record["upstream"] = refusal.upstream
        head = _JSON_HEAD + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in refusal.extra_headers())
        reply.whole(refusal.status, head, refusal.encoded())
        return refusal.status

    def histogram(self, family: metrictypes.Histogram, upstream_name: str) -> metrictypes.HistogramValue:
        """The child of a per-upstream histogram, cached (``labels`` costs more than the observation)."""
        key = (family, upstream_name)
        cached = self._histograms.get(key)
        if cached is not None:
            return cached
        child: metrictypes.HistogramValue = family.labels(upstream_name)
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
        answer relayed from the upstream protocol's callbacks (``fastpath.Exchange``), with no
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
        identity = validator.again(conn.last_token, token)  # the token this connection sent last
        if identity is None:
            if not self._token_cache:
                validator._cache.clear()  # the benchmark knob (SIDEKEY_TOKEN_CACHE=0), as in _handle
            try:
                # a new token is checked here too: with the keys loaded that is CPU work only
                identity = validator.validate_now(token)
            except tokens.TokenError:
                return None  # refused by _handle, with its metric and message
            if identity is None:
                return None  # an unknown kid: _handle refetches the keys
            if self._token_cache:
                conn.last_token = validator.last(token, identity)
        started, record, reply = self._begin(request, conn)
        try:
            record["service_account"] = identity.service_account
            table = self._table()
            try:
                route = decision.authorise(target, identity, table, request.method, length)
            except refusals.Refusal as refusal:
                if isinstance(refusal, refusals.RateLimited):
                    metrics.RATE_LIMITED.labels(refusal.upstream or "").inc()
                status = self.refuse(reply, record, refusal)
                self.finish(request, record, started, status)
                conn.finished(request)
                return fastpath.ANSWERED
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
            data = self.heads.build(table, request, route, cred, target, body)
            timeout = route.timeout.sock_read or float(route.upstream.limits.timeout_seconds)
            exchange = fastpath.Exchange(self, request, conn, reply, record, started, route, cred.scrubber,
                                         up_conn, data, timeout)
            up_conn.send(data, head_method=request.method == "HEAD", timeout=timeout, watcher=exchange)
            return exchange
        except Exception as exc:  # a bug costs this request a 500, never the audit line
            status = self._unexpected(reply, conn, record, exc)
            self.finish(request, record, started, status)
            conn.finished(request)
            return fastpath.ANSWERED

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
        except paths.PathError as bad_path:
            raise refusals.BadRequest("bad_path", str(bad_path)) from None
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
            except tokens.TokenError as refused:
                metrics.TOKEN_FAILURES.labels(refused.reason).inc()
                raise refusals.Unauthenticated(refused.reason, refused.message) from None
        record["service_account"] = identity.service_account
        try:
            route = decision.authorise(target, identity, self._table(), request.method, request.content_length)
        except refusals.RateLimited as limited:
            metrics.RATE_LIMITED.labels(limited.upstream or "").inc()
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
        chunk_hooks: list[relaying.ChunkHook] = []
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
        data = upstreamheads.request_head(request.method, route, target, lines, body, length)
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
        chunk_hooks: list[relaying.ChunkHook],
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
            self.histogram(metrics.UPSTREAM_DURATION, route.name).observe(time.perf_counter() - started)
            status = await relaying.respond(conn, reply, up_conn, scrubber, chunk_hooks, record, exchange)
        except upstream.UpstreamError as exc:
            up_conn.abandon()
            if reply.started:
                raise
            raise upstreamheads.failure(route, exc) from None
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
            raise upstreamheads.failure(route, exc) from None
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
