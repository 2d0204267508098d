"""Which headers cross the sidecar, in each direction, in one pass each.

Up: the agent's headers minus the hop-by-hop ones, every header an SDK may
carry the caller's token in, the override headers an upstream framework
could honour to change the checked method or path, and whatever the agent
names in ``Connection``; the route's strip set holds all of them, computed
when the route is built. Down: the upstream's headers minus hop-by-hop and
framing (the sidecar frames the body itself), ``RESPONSE_DROP``, which the
upstream connection applies as it reads the head; ``upstreamheads`` scrubs
every form of the key from the names and values left.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol
from urllib.parse import unquote_plus

#: Response headers that describe the hop or the framing, not the message: never relayed.
#: ``upstream.UpstreamConnection`` drops them as it reads the head, and Content-Encoding too
#: when the sidecar decodes the body (its length and coding change).
RESPONSE_DROP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)


class _HasHeaders(Protocol):
    @property
    def headers(self) -> Any: ...


def caller_token(authorization: str | None, token_header: str | None) -> str | None:
    """The caller's token: ``Authorization: Bearer``, else the SDKs' ``x-api-key``/``api-key``."""
    if authorization is not None and (authorization.startswith("Bearer ") or authorization[:7].lower() == "bearer "):
        return authorization[7:].strip()
    return token_header or None


def _dropped(strip: frozenset[str]) -> frozenset[str]:
    """The names that never go up for ``strip``: those and ``Content-Length`` (cached per set)."""
    drop = _with_length.get(strip)
    if drop is None:
        drop = _with_length[strip] = strip | {"content-length"}  # the sidecar frames the body itself
    return drop


def forward(items: Iterable[tuple[str, str]], connection: str | None, strip: frozenset[str]) -> list[tuple[str, str]]:
    """The agent's headers that go up; ``connection`` is its Connection header, if any."""
    drop = _dropped(strip)
    if connection:
        drop = drop | {t.strip().lower() for t in connection.split(",")}
    return [(k, v) for k, v in items if k.lower() not in drop]


def forward_lines(items: Iterable[tuple[str, str]], connection: str | None, strip: frozenset[str]) -> str:
    """``forward``'s headers as ``Name: value\r\n`` lines, in one pass (the fast path's head).

    Whether a name goes up depends on the name and ``strip`` only (without a
    ``Connection`` header), so the answer is kept per spelling: the listener
    hands the common names over as shared strings, found without a ``lower()``.
    """
    if connection:  # names it lists go too: no memo per name then
        return "".join([f"{k}: {v}\r\n" for k, v in forward(items, connection, strip)])
    drop = _dropped(strip)
    kept = _kept.get(strip)
    if kept is None:
        if len(_kept) >= _KEPT_STRIPS:
            _kept.clear()
        kept = _kept[strip] = {}
    lines = []
    for k, v in items:
        keep = kept.get(k)
        if keep is None:
            keep = k.lower() not in drop
            if len(kept) < _KEPT_NAMES:
                kept[k] = keep
        if keep:
            lines.append(f"{k}: {v}\r\n")
    return "".join(lines)


#: Per strip set, whether each name seen goes up; bounded, names come from agents.
_kept: dict[frozenset[str], dict[str, bool]] = {}
_KEPT_STRIPS: Final = 256
_KEPT_NAMES: Final = 256
_with_length: dict[frozenset[str], frozenset[str]] = {}


def forward_request(request: _HasHeaders, strip: frozenset[str]) -> list[tuple[str, str]]:
    """``forward`` for anything with a ``headers`` mapping (a multidict or a Request's list)."""
    headers = request.headers
    if isinstance(headers, list):
        pairs: Iterable[tuple[str, str]] = headers
        connection = ", ".join(v for k, v in headers if k.lower() == "connection") or None
    else:
        assert isinstance(headers, Mapping)
        pairs = headers.items()
        connection = headers.get("Connection")
    return forward(pairs, connection, strip)


def without_param(query: str, name: str) -> str:
    """The caller's query minus any value it gave for the credential's parameter."""
    if not query:
        return query
    kept = [p for p in query.split("&") if unquote_plus(p.split("=", 1)[0]) != name]
    return "&".join(kept)
