"""The request path: authenticate, authorise, attach the key, stream both ways.

Every request ends in exactly one audit line and one counter increment. The
order of checks is deliberate: a malformed target is refused before anything
else (400), the caller is authenticated before the route is looked up (so
an unauthenticated caller learns nothing about upstreams), and the rate
limit only counts requests the policy allows.

Errors are JSON (``{"error": {"type", "message"}}``) with messages that tell
the agent's developer what to fix and never echo a token or a key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Final
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidekey.core import logs, tokens
from sidekey.proxy import credentials, metrics, paths, routes, scrubbing

log = logging.getLogger("sidekey.proxy")

#: Bodies up to this size are read at once (cheaper); larger ones are streamed.
SMALL_BODY: Final = 64 * 1024
#: Response headers that describe the hop, not the message.
RESPONSE_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Headers aiohttp's client would add on its own; the agent's own are forwarded instead.
SKIP_AUTO_HEADERS: Final = ("User-Agent", "Accept-Encoding", "Accept", "Content-Type")

#: Encodings the sidecar can undo to scrub a body, should an upstream ignore its
#: ``Accept-Encoding: identity``. A compressed body hides an echoed key from the
#: scrubber, and compression on loopback saves nothing, so bodies go to the
#: agent uncompressed.
_DECODABLE: Final = frozenset({"gzip", "x-gzip", "deflate"})
_JSON: Final = "application/json"
_DENIALS: Final = frozenset({400, 401, 403, 404, 413, 429})


class _BodyTooLarge(Exception):
    pass


class Proxy:
    """The aiohttp low-level handler of the agent-facing listener."""

    def __init__(
        self,
        *,
        table: Callable[[], dict[str, routes.Route]],
        validator: Callable[[], tokens.Validator | None],
        ready: Callable[[], bool],
        session: aiohttp.ClientSession,
        audit: logs.AuditWriter,
        pod: str,
        namespace: str,
    ) -> None:
        self._table = table
        self._validator = validator
        self._ready = ready
        self.session = session
        self._audit = audit
        self._pod = pod
        self._namespace = namespace
        self._ids = itertools.count(1)
        self._boot = os.urandom(4).hex()
        self._counters: dict[tuple[str, str, int, str], Any] = {}
        self._histograms: dict[tuple[int, str], Any] = {}
        self.in_flight = 0
        self._stamp_second = -1
        self._stamp_text = ""
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)

    # --- the handler ---------------------------------------------------------------------

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        self.in_flight += 1
        record: dict[str, Any] = {
            "request_id": f"{self._boot}-{next(self._ids)}",
            "pod": self._pod,
            "namespace": self._namespace,
            "service_account": None,
            "upstream": None,
            "method": request.method,
            "path": _redacted(request.raw_path),
        }
        status = 500
        upstream_label = ""
        try:
            try:
                response, status = await self._handle(request, record)
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception as exc:
                if record.get("streamed"):
                    raise  # the status line is sent; aiohttp closes the connection
                log.error("request failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
                response, status = _refuse(
                    record,
                    500,
                    "internal_error",
                    "api_error",
                    "the sidecar failed on this request; see its logs",
                )
            upstream_label = record["upstream"] or ""
            return response
        except asyncio.CancelledError:
            record.setdefault("decision", "allowed")
            record["reason"] = "client_disconnected"
            status = 499
            raise
        finally:
            elapsed = time.perf_counter() - started
            self.in_flight -= 1
            record["status"] = status
            record["duration_ms"] = round(elapsed * 1000, 3)
            record["time"] = self._timestamp()
            self._audit.write(record)
            self._count(upstream_label, request.method, status, record.get("decision", "error"), elapsed)

    def _timestamp(self) -> str:
        """RFC 3339 UTC with milliseconds; strftime runs once a second, not per request."""
        now = time.time()
        second = int(now)
        if second != self._stamp_second:
            self._stamp_second = second
            self._stamp_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp_text}.{int((now - second) * 1000):03d}Z"

    def _count(self, upstream: str, method: str, status: int, decision: str, elapsed: float) -> None:
        key = (upstream, method, status, decision)
        child = self._counters.get(key)
        if child is None:
            child = metrics.REQUESTS.labels(upstream, metrics.method_label(method), str(status), decision)
            if len(self._counters) < 4096:
                self._counters[key] = child
        child.inc()
        if upstream:
            self._histogram(metrics.DURATION, upstream).observe(elapsed)

    def _histogram(self, family: Any, upstream: str) -> Any:
        key = (id(family), upstream)
        child = self._histograms.get(key)
        if child is None:
            child = family.labels(upstream)
            if len(self._histograms) < 1024:
                self._histograms[key] = child
        return child

    async def _handle(
        self, request: web.BaseRequest, record: dict[str, Any]
    ) -> tuple[web.StreamResponse, int]:
        validator = self._validator()
        if validator is None or not self._ready():
            return _refuse(
                record,
                503,
                "not_ready",
                "unavailable",
                "the sidecar is starting: its keys or policies are not loaded yet",
            )
        try:
            target = paths.parse(request.raw_path)
        except paths.PathError as exc:
            return _refuse(record, 400, "bad_path", "invalid_request", str(exc))
        # --- who is calling
        token = _caller_token(request)
        if token is None:
            metrics.TOKEN_FAILURES.labels("missing").inc()
            return _refuse(
                record,
                401,
                "missing",
                "authentication_error",
                "no token: send the pod's token (the file in SIDEKEY_TOKEN_FILE) as "
                "'Authorization: Bearer <token>' or as the SDK's API key",
            )
        identity = validator.cached(token)
        if identity is None:
            try:
                identity = await validator.validate(token)
            except tokens.TokenError as exc:
                metrics.TOKEN_FAILURES.labels(exc.reason).inc()
                return _refuse(record, 401, exc.reason, "authentication_error", exc.message)
        record["service_account"] = identity.service_account
        # --- what it may call
        route = self._table().get(target.route)
        if route is None:
            return _refuse(
                record,
                404,
                "unknown_upstream",
                "not_found",
                f"no AgentPolicy gives service account {identity.service_account!r} an "
                f"upstream named {target.route[:63]!r}",
            )
        record["upstream"] = route.name
        method = request.method
        if not route.upstream.allows(method, target.segments):
            return _refuse(
                record,
                403,
                "not_allowed",
                "permission_error",
                f"AgentPolicy {route.policy!r} does not allow {method} "
                f"{target.path or '/'} on upstream {route.name!r}; "
                "add a matching allow rule (methods and paths)",
            )
        length = request.content_length
        max_body = route.upstream.limits.max_request_bytes
        if length is not None and length > max_body:
            return _refuse(
                record,
                413,
                "too_large",
                "request_too_large",
                f"request body is {length} bytes; upstream {route.name!r} allows at most "
                f"{max_body} (limits.maxRequestBytes)",
            )
        if route.bucket is not None:
            wait = route.bucket.take()
            if wait:
                metrics.RATE_LIMITED.labels(route.name).inc()
                response, status = _refuse(
                    record,
                    429,
                    "rate_limited",
                    "rate_limit_error",
                    f"upstream {route.name!r} allows {int(route.bucket.capacity)} requests per minute "
                    "from this pod (limits.requestsPerMinute)",
                )
                response.headers["Retry-After"] = route.bucket.retry_after(wait)
                return response, status
        cred = route.credential
        if cred is None:
            return _refuse(
                record,
                503,
                "credential_unavailable",
                "unavailable",
                f"upstream {route.name!r} has no usable credential: {route.unavailable}",
            )
        record["decision"] = "allowed"
        record["reason"] = "ok"
        return await self._forward(request, route, cred, target, record)

    # --- forwarding ---------------------------------------------------------------------------

    async def _forward(
        self,
        request: web.BaseRequest,
        route: routes.Route,
        cred: credentials.Credential,
        target: paths.Target,
        record: dict[str, Any],
    ) -> tuple[web.StreamResponse, int]:
        up = route.upstream
        headers = _forward_headers(request, route.strip)
        scrubber = cred.scrubber
        if cred.oauth is not None:
            try:
                access = await cred.oauth.token(self.session, route.ssl)
            except credentials.CredentialError as exc:
                record["reason"] = "oauth_failed"
                return _error(
                    exc.status,
                    "api_error" if exc.status == 502 else "unavailable",
                    f"upstream {route.name!r}: {exc.message}",
                ), exc.status
            headers.append(("Authorization", f"Bearer {access}"))
            scrubber = cred.oauth.scrubber
        else:
            headers.extend(cred.headers)
        query = target.query
        if cred.query is not None:
            query = _without_param(query, cred.query[0])
            query = (
                f"{query}&{cred.query[0]}={cred.query[1]}" if query else f"{cred.query[0]}={cred.query[1]}"
            )
        headers.append(("Accept-Encoding", "identity"))
        url = route.origin + up.base_path + target.path
        if query:
            url = f"{url}?{query}"
        # --- the body
        data: Any = None
        length = request.content_length
        limiter: _Limiter | None = None
        record["bytes_in"] = length or 0
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() == "100-continue" and request.version >= (1, 1):
            # the call is allowed: invite the body (curl waits a second otherwise)
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length is not None and length <= SMALL_BODY:
            data = await request.content.read() if length else b""
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        elif request.body_exists:
            limiter = _Limiter(request.content, up.limits.max_request_bytes)
            data = limiter.iterate()
        started = time.perf_counter()
        try:
            upstream = await self.session.request(
                request.method,
                URL(url, encoded=True),
                headers=CIMultiDict(headers),
                data=data,
                ssl=route.ssl,
                allow_redirects=False,
                timeout=route.timeout,
                skip_auto_headers=SKIP_AUTO_HEADERS,
            )
        except TimeoutError:  # before ClientError: ServerTimeoutError is both
            record["reason"] = "upstream_timeout"
            return _error(
                504,
                "timeout_error",
                f"upstream {route.name!r} did not answer within "
                f"{up.limits.timeout_seconds} s (limits.timeoutSeconds)",
            ), 504
        except (
            _BodyTooLarge,
            aiohttp.ClientPayloadError,
            aiohttp.ClientOSError,
            aiohttp.ClientConnectionError,
        ) as exc:
            if limiter is not None and limiter.exceeded:
                record["decision"], record["reason"] = "denied", "too_large"
                return _error(
                    413,
                    "request_too_large",
                    f"request body exceeds {up.limits.max_request_bytes} bytes "
                    f"(limits.maxRequestBytes of upstream {route.name!r})",
                ), 413
            return self._upstream_failed(route, exc, record)
        except aiohttp.ClientError as exc:
            return self._upstream_failed(route, exc, record)
        self._histogram(metrics.UPSTREAM_DURATION, route.name).observe(time.perf_counter() - started)
        if limiter is not None:
            record["bytes_in"] = limiter.total
        try:
            result = await self._respond(request, upstream, scrubber, record)
        except BaseException:
            upstream.close()  # a half-read response never goes back to the pool
            raise
        upstream.release()
        return result

    def _upstream_failed(
        self, route: routes.Route, exc: BaseException, record: dict[str, Any]
    ) -> tuple[web.StreamResponse, int]:
        record["reason"] = "upstream_error"
        os_error = getattr(exc, "os_error", None)
        if isinstance(os_error, routes.HostRefused) or isinstance(exc.__cause__, routes.HostRefused):
            record["reason"] = "host_refused"
            message = str(os_error if isinstance(os_error, routes.HostRefused) else exc.__cause__)
            return _error(502, "api_error", f"upstream {route.name!r}: {message}"), 502
        if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
            record["reason"] = "upstream_tls"
            return _error(
                502,
                "api_error",
                f"upstream {route.name!r}: TLS verification failed "
                "(check the certificate, or the policy's caBundle)",
            ), 502
        log.info("upstream %s failed: %s", route.name, type(exc).__name__)
        return _error(
            502, "api_error", f"upstream {route.name!r} could not be reached ({type(exc).__name__})"
        ), 502

    async def _respond(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        scrubber: scrubbing.Scrubber,
        record: dict[str, Any],
    ) -> tuple[web.StreamResponse, int]:
        status = upstream.status
        out_headers: CIMultiDict[str] = CIMultiDict()
        raw = upstream.headers
        codings = [c.strip().lower() for v in raw.getall("Content-Encoding", ()) for c in v.split(",")]
        codings = [c for c in codings if c and c != "identity"]
        encoding = ", ".join(codings)
        decoder: _Decoder | None = None
        if codings:
            if len(codings) > 1 or codings[0] not in _DECODABLE:
                upstream.close()
                record["reason"] = "upstream_encoding"
                return _error(502, "api_error",
                              f"the upstream answered with Content-Encoding {encoding!r} although the "
                              "sidecar asked for identity; such a body cannot be checked for the key"), 502
            decoder = _Decoder()
        # one search over all values; per-header scrubbing only when something matched
        dirty = scrubber.contains_text("\n".join(raw.values()))
        scrub_text = scrubber.scrub_text
        for name, value in raw.items():
            lowered = name.lower()
            if lowered in RESPONSE_HOP_BY_HOP or (
                    decoder is not None and lowered in ("content-encoding", "content-length")):
                continue
            out_headers.add(name, scrub_text(value) if dirty else value)
        # upstreams echo keys in the reason phrase too ("401 Invalid key sk-...")
        reason = scrub_text(upstream.reason) if upstream.reason else upstream.reason
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY:
            data = await upstream.read()
            if decoder is not None:
                try:
                    data = decoder.feed(data) + decoder.flush()
                except (zlib.error, _DecodedTooLarge):
                    record["reason"] = "upstream_encoding"
                    return _error(502, "api_error", f"the upstream sent a corrupt {encoding} body"), 502
            body = scrubber.scrub(data)
            record["bytes_out"] = len(body)
            small = web.Response(status=status, reason=reason, headers=out_headers)
            small.body = body
            return small, status
        response = web.StreamResponse(status=status, reason=reason, headers=out_headers)
        record["streamed"] = True
        await response.prepare(request)
        stream = scrubber.stream()
        sent = 0
        try:
            async for chunk in upstream.content.iter_any():
                data = stream.feed(decoder.feed(chunk) if decoder is not None else chunk)
                if data:
                    sent += len(data)
                    await response.write(data)
        except (aiohttp.ClientError, TimeoutError, zlib.error, _DecodedTooLarge) as exc:
            # the status is gone; end the connection so the agent sees a cut stream,
            # not a clean end of a truncated body
            record["reason"] = "upstream_broke_stream"
            record["bytes_out"] = sent
            log.info("upstream stream broke: %s", type(exc).__name__)
            upstream.close()
            if request.transport is not None:
                request.transport.abort()
            return response, status
        tail = stream.feed(decoder.flush()) + stream.flush() if decoder is not None else stream.flush()
        if tail:
            sent += len(tail)
            await response.write(tail)
        await response.write_eof()
        record["bytes_out"] = sent
        return response, status


class _DecodedTooLarge(Exception):
    pass


class _Decoder:
    """Undoes gzip or deflate (zlib framing, detected) with a bound on the output.

    Only an upstream that ignored ``Accept-Encoding: identity`` gets here; the
    bound keeps a small compressed body from growing without limit in memory.
    """

    LIMIT: Final = 256 * 1024 * 1024

    def __init__(self) -> None:
        self._z = zlib.decompressobj(wbits=47)
        self._out = 0

    def feed(self, data: bytes) -> bytes:
        room = self.LIMIT - self._out + 1
        out = self._z.decompress(data, room)
        self._out += len(out)
        if self._out > self.LIMIT or self._z.unconsumed_tail:
            raise _DecodedTooLarge()
        return out

    def flush(self) -> bytes:
        out = self._z.flush()
        self._out += len(out)
        if self._out > self.LIMIT:
            raise _DecodedTooLarge()
        return out


class _Limiter:
    """Streams the request body up and stops at the policy's size limit."""

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self._content = content
        self._limit = limit
        self.exceeded = False
        self.total = 0

    async def iterate(self) -> AsyncIterator[bytes]:
        async for chunk in self._content.iter_any():
            self.total += len(chunk)
            if self.total > self._limit:
                self.exceeded = True
                raise _BodyTooLarge()
            yield chunk


def _caller_token(request: web.BaseRequest) -> str | None:
    headers = request.headers
    auth = headers.get("Authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key") or headers.get("api-key") or None


def _forward_headers(request: web.BaseRequest, strip: frozenset[str]) -> list[tuple[str, str]]:
    headers = request.headers
    drop = strip
    connection = headers.get("Connection")
    if connection:
        drop = strip | {t.strip().lower() for t in connection.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


def _without_param(query: str, name: str) -> str:
    """The caller's query minus any value it gave for the credential's parameter."""
    if not query:
        return query
    kept = [p for p in query.split("&") if unquote_plus(p.split("=", 1)[0]) != name]
    return "&".join(kept)


def _redacted(raw: str) -> str:
    """The request target for the audit line: query values are replaced."""
    path, sep, query = raw.partition("?")
    if not sep:
        return path[:2048]
    names = "&".join(f"{p.split('=', 1)[0]}=REDACTED" for p in query.split("&") if p)
    return f"{path}?{names}"[:2048]


def _error(status: int, kind: str, message: str) -> web.Response:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    response = web.Response(status=status, body=body, content_type=_JSON)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="sidekey"'
    return response


def _refuse(
    record: dict[str, Any], status: int, reason: str, kind: str, message: str
) -> tuple[web.Response, int]:
    record["decision"] = "denied" if status in _DENIALS else "error"
    record["reason"] = reason
    return _error(status, kind, message), status
