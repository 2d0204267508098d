"""The decision: may this caller make this call, and through which route? No I/O.

``authorise`` takes what the request said (its parsed target, method and
declared length) and who is calling (the token's identity, checked before),
and returns the route to forward on or raises a ``refusals.Refusal``. It reads
the routing table and takes one token from the route's rate-limit bucket;
nothing else, so it is cheap to profile and easy to test without sockets.

The order is deliberate: the upstream is looked up only for an authenticated
caller (so a stranger learns nothing about upstreams), and the rate limit
counts only calls the policy allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from sidekey.core import policies, tokens
from sidekey.proxy import paths, refusals, routes

#: Allow-rule answers already computed: (id of the upstream, method, segments) -> (the
#: upstream, allowed). ``Upstream.allows`` is a pure function of frozen data; the entry
#: holds its upstream, so that id cannot be reused by another while the entry lives (a
#: rebuilt policy's upstream is a new object and gets its own answers). Bounded: short
#: paths only, and emptied when full.
_ALLOWED: Final[dict[tuple[int, str, tuple[str, ...]], tuple[policies.Upstream, bool]]] = {}
_ALLOWED_MAX: Final = 4096
_ALLOWED_LONGEST: Final = 256


def _allows(up: policies.Upstream, method: str, target: paths.Target) -> bool:
    key = (id(up), method, target.segments)
    hit = _ALLOWED.get(key)
    if hit is not None and hit[0] is up:
        return hit[1]
    allowed = up.allows(method, target.segments)
    if len(target.path) <= _ALLOWED_LONGEST:
        if len(_ALLOWED) >= _ALLOWED_MAX:
            _ALLOWED.clear()
        _ALLOWED[key] = (up, allowed)
    return allowed


def authorise(
    target: paths.Target,
    identity: tokens.Identity,
    table: Mapping[str, routes.Route],
    method: str,
    length: int | None,
) -> routes.Route:
    route = table.get(target.route)
    if route is None:
        raise refusals.UnknownUpstream(
            "unknown_upstream",
            f"no AgentPolicy gives service account {identity.service_account!r} an "
            f"upstream named {target.route[:63]!r}",
        )
    up = route.upstream
    if not _allows(up, method, target):
        raise refusals.NotAllowed(
            "not_allowed",
            f"AgentPolicy {route.policy!r} does not allow {method} "
            f"{target.path or '/'} on upstream {route.name!r}; "
            "add a matching allow rule (methods and paths)",
            upstream=route.name,
        )
    max_body = up.limits.max_request_bytes
    if length is not None and length > max_body:
        raise refusals.TooLarge(
            "too_large",
            f"request body is {length} bytes; upstream {route.name!r} allows at most "
            f"{max_body} (limits.maxRequestBytes)",
            upstream=route.name,
        )
    bucket = route.bucket
    if bucket is not None:
        wait = bucket.take()
        if wait:
            raise refusals.RateLimited(
                "rate_limited",
                f"upstream {route.name!r} allows {int(bucket.capacity)} requests per minute "
                "from this pod (limits.requestsPerMinute)",
                bucket.retry_after(wait),
                upstream=route.name,
            )
    if route.credential is None:
        raise refusals.Unavailable(
            "credential_unavailable",
            f"upstream {route.name!r} has no usable credential: {route.unavailable}",
            upstream=route.name,
        )
    return route


def too_large_stream(route: routes.Route) -> refusals.TooLarge:
    """A streamed body (no Content-Length) that grew past the limit on the way."""
    return refusals.TooLarge(
        "too_large",
        f"request body exceeds {route.upstream.limits.max_request_bytes} bytes "
        f"(limits.maxRequestBytes of upstream {route.name!r})",
        upstream=route.name,
    )
