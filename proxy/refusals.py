"""Every answer the sidecar gives instead of the upstream's: one exception tree.

A refusal is raised where the reason is known and rendered in one place, so
every error body has the same shape (``{"error": {"type", "message"}}``), the
audit line gets its ``decision`` and ``reason`` from the same object, and no
code path can forget the ``WWW-Authenticate`` or ``Retry-After`` header::

    Refusal                      status  type                   decision
    ├── BadRequest                 400   invalid_request        denied
    ├── Unauthenticated            401   authentication_error   denied
    ├── NotAllowed                 403   permission_error       denied
    ├── UnknownUpstream            404   not_found              denied
    ├── TooLarge                   413   request_too_large      denied
    ├── RateLimited                429   rate_limit_error       denied
    ├── NotReady                   503   unavailable            error
    ├── Unavailable                503   unavailable            error
    ├── Internal                   500   api_error              error
    └── UpstreamFailure            502   api_error              allowed (the policy said yes)
        └── UpstreamTimeout        504   timeout_error          allowed

Messages say what to fix and never hold a token or a key: they are built
from policy names, limits and exception class names only.
"""

from __future__ import annotations

import json
from typing import ClassVar

from sidekey.core import errors


class Refusal(errors.Denied):
    """An answer of the sidecar's own; ``reason`` is the audit line's and the metrics' word.

    ``type`` is the error body's (``core/errors.py``), ``status`` the HTTP status.
    """

    status: ClassVar[int] = 400
    type = "invalid_request"
    #: The audit decision; ``None`` keeps the one already taken (an allowed call that failed upstream).
    decision: ClassVar[str | None] = "denied"

    def __init__(self, reason: str, message: str, *, upstream: str | None = None) -> None:
        super().__init__(reason, message)
        #: The route the refusal is about, once it is known (the audit line and the counter's label).
        self.upstream = upstream

    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        return ()

    def encoded(self) -> bytes:
        """The error body, as bytes for the sidecar's own listener."""
        return json.dumps(self.body()).encode()


class BadRequest(Refusal):
    pass


class Unauthenticated(Refusal):
    status = 401
    type = "authentication_error"

    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        return (("WWW-Authenticate", 'Bearer realm="sidekey"'),)


class NotAllowed(Refusal):
    status = 403
    type = "permission_error"


class UnknownUpstream(Refusal):
    status = 404
    type = "not_found"


class TooLarge(Refusal):
    status = 413
    type = "request_too_large"


class RateLimited(Refusal):
    status = 429
    type = "rate_limit_error"

    def __init__(self, reason: str, message: str, retry_after: str, *, upstream: str | None = None) -> None:
        super().__init__(reason, message, upstream=upstream)
        self.retry_after = retry_after

    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        return (("Retry-After", self.retry_after),)


class NotReady(Refusal):
    status = 503
    type = "unavailable"
    decision = "error"


class Unavailable(Refusal):
    status = 503
    type = "unavailable"
    decision = "error"


class Internal(Refusal):
    status = 500
    type = "api_error"
    decision = "error"


class UpstreamFailure(Refusal):
    status = 502
    type = "api_error"
    decision = None

    def __init__(self, reason: str, message: str, status: int = 502) -> None:
        super().__init__(reason, message)
        self.status = status  # type: ignore[misc]  # an OAuth endpoint's 503 keeps its own status
        if status != 502:
            self.type = "unavailable"  # type: ignore[misc]


class UpstreamTimeout(UpstreamFailure):
    status = 504
    type = "timeout_error"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message, 504)
        self.type = "timeout_error"  # type: ignore[misc]
