"""Both ends of an exchange with the upstream, as data: the head the sidecar
sends, the head it reads back, and the refusal the agent gets when no usable
answer came.

No sockets here: both request paths (the coroutine one in ``forwarding`` and
the callback one in ``fastpath``) build and read heads through these
functions, so the two send the same bytes and take the same answers the same
way, which ``tests/proxy/test_fast_request_head.py`` pins byte for byte.

Up: the route's base path, the agent's path and query (with a query key
swapped in for any the agent sent), ``Host`` for the upstream, the agent's
forwardable headers, the key, ``Accept-Encoding: identity`` (a body the
sidecar cannot decode cannot be scrubbed), and the framing the sidecar
chose. The fast path's ``RequestHeads`` keeps the per-route constant parts
(host line, key lines) and only joins the per-request ones.

Down: the status, a reason phrase scrubbed (upstreams echo keys there too),
the header block filtered and scrubbed, and a decoder when the body is
compressed in a way the sidecar can undo; any other coding is refused, since
such a body could carry the key unseen.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from sidekey.proxy import decoding, headers, listener, refusals, upstream

if TYPE_CHECKING:
    from sidekey.core import policies
    from sidekey.proxy import credentials, paths, routes, scrubbing

log = logging.getLogger("sidekey.proxy")

_EVENT_STREAM: Final = b"text/event-stream"
#: Routes whose head parts are kept at most; more (many policy reloads) and the cache starts over.
_KEPT_ROUTES: Final = 1024


def _host(up: policies.Upstream) -> str:
    """The ``Host`` value for the upstream: IPv6 in brackets, the port unless it is the scheme's."""
    host = f"[{up.host}]" if ":" in up.host else up.host
    if up.port != (443 if up.scheme == "https" else 80):
        host = f"{host}:{up.port}"
    return host


def _keyed_query(query: str, param: tuple[str, str]) -> str:
    """The agent's query with the key's parameter set to the key (any the agent sent is dropped)."""
    name, value = param
    query = headers.without_param(query, name)
    return f"{query}&{name}={value}" if query else f"{name}={value}"


def request_head(
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
        query = _keyed_query(query, cred.query)
    path = up.base_path + target.path
    if query:
        path = f"{path}?{query}"
    head = [f"{method} {path or '/'} HTTP/1.1\r\nHost: {_host(up)}\r\n"]
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


class RequestHeads:
    """``request_head`` for a whole body and a static key, its per-route constant parts built once.

    The fast path's: the host line and the key lines of a route do not change while
    its routing table lives, so they are joined once and kept (bounded), keyed by the
    route's id with the route held so that id cannot be reused. A new table empties
    the cache, so the old routes (and their keys) are not kept.
    """

    __slots__ = ("_parts", "_table")

    def __init__(self) -> None:
        self._parts: dict[int, tuple[routes.Route, str, str, str]] = {}
        self._table: object = None

    def build(
        self,
        table: object,
        request: listener.Request,
        route: routes.Route,
        cred: credentials.Credential,
        target: paths.Target,
        body: bytes,
    ) -> bytes:
        """The bytes to send for ``request`` on ``route`` of ``table`` (the table it was looked up in)."""
        if table is not self._table:
            self._parts.clear()  # a new table: the old routes (and their keys) are not kept
            self._table = table
        entry = self._parts.get(id(route))
        if entry is None or entry[0] is not route:
            up = route.upstream
            key_lines = "".join([f"{k}: {v}\r\n" for k, v in cred.headers])
            entry = (route, up.base_path, f" HTTP/1.1\r\nHost: {_host(up)}\r\n",
                     f"{key_lines}Accept-Encoding: identity\r\n")
            if len(self._parts) >= _KEPT_ROUTES:
                self._parts.clear()
            self._parts[id(route)] = entry
        _, base, host_line, tail = entry
        query = target.query
        if cred.query is not None:
            query = _keyed_query(query, cred.query)
        path = base + target.path
        if query:
            path = f"{path}?{query}"
        method = request.method
        agent = headers.forward_lines(request.headers, request.connection, route.strip)
        end = f"Content-Length: {len(body)}\r\n\r\n" if body or method in ("POST", "PUT", "PATCH") else "\r\n"
        data = f"{method} {path or '/'}{host_line}{agent}{tail}{end}".encode("utf-8", "surrogateescape")
        return data + body if body else data


def response_head(
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
    # one search over the whole block, names and values together: an upstream may echo the key
    # as a header *name* ("sk-live-...: 1"); a match becomes as many ``*`` (a token character)
    block = up_conn.header_block(decoded=decoder is not None)
    if block:
        block = scrubber.scrub(block)
    # upstreams echo keys in the reason phrase too ("401 Invalid key sk-...")
    reason = scrubber.scrub(up_conn.reason) if up_conn.reason else listener.reason_phrase(status)
    return status, reason, block, decoder, up_conn.content_length, block.lower().find(_EVENT_STREAM) >= 0


def failure(route: routes.Route, exc: upstream.UpstreamError) -> refusals.UpstreamFailure:
    """The refusal for an upstream that gave no usable answer: 504 for a timeout, else 502.

    Its message names the upstream and what to check, never the key.
    """
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
