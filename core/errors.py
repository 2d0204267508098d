"""The root of every error sidekey raises on purpose, and the one shape an error takes on the wire.

Three components and the core raise errors that end up in front of people:
in an HTTP answer, an AdmissionReview refusal, a status condition, a log
line. One root lets a caller catch "anything sidekey decided" apart from a
bug, and three branches say what kind of thing went wrong, so the message
can always say what to fix::

    SidekeyError                   message: for a person, says what to fix
    ├── InvalidInput (ValueError)  + field: where the bad value is (JSON path, key, variable)
    │     policies.PolicyError · llmpolicy.FieldError
    │     webhook: settings.SettingsError · reviews.BadReview · shapes.ShapeError · patching.BadPod
    │     proxy: settings.SettingsError · paths.PathError · listener.Malformed
    │     llmledger.LedgerError
    ├── Denied                     + reason: a stable label for metrics and audit lines
    │     tokens.TokenError · webhook patching.Refused
    │     proxy: refusals.Refusal (one per status) · llmrequests.LlmRefusal
    ├── Unavailable                something needed is not reachable or not ready (yet)
    │     webhook caching.Unavailable
    │     proxy: credentials.CredentialError · upstream.UpstreamError · llmslices.LedgerUnavailable
    │     httpclient.HttpError (also an OSError) ─ HttpTimeout (also a TimeoutError) · BodyTooLarge
    ├── kubeapi.ApiError           + status, reason: what the apiserver answered
    └── proxy decoding.DecodeError   a compressed upstream body that cannot be read

``proxy.routes.HostRefused`` stays an ``OSError``: a refusing resolver fails
with one, as getaddrinfo does, and both HTTP clients catch that. ``HttpError``
is an ``OSError`` for the same reason: callers that caught transport trouble as
``OSError`` keep catching it. ``tests/core/test_errors.py`` keeps this drawing and the classes in step.

Every class has a ``type``, a stable word for machines; an HTTP edge that
answers with an error uses ``body()``: ``{"error": {"type", "message"}}``, the
shape the sidecar has always answered with, so a client reads the same JSON
from all three components. Only the edges turn errors into HTTP; the core
never knows about status codes beyond what the apiserver said.
"""

from __future__ import annotations

from typing import Any, ClassVar


def body(type_: str, message: str) -> dict[str, Any]:
    """The error body every sidekey HTTP endpoint answers with."""
    return {"error": {"type": type_, "message": message}}


class SidekeyError(Exception):
    """An error sidekey raises on purpose; ``message`` says what to fix."""

    type: ClassVar[str] = "sidekey_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return body(self.type, self.message)


class InvalidInput(SidekeyError, ValueError):
    """A value from outside (a policy, a settings file, a review, an env var) that cannot be used.

    ``str()`` is ``"<field>: <message>"``, ready for a status condition or a
    log line; ``message`` alone is the explanation.
    """

    type = "invalid_input"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class Denied(SidekeyError):
    """A request, token or pod refused; ``reason`` labels it in metrics and audit lines."""

    type = "denied"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unavailable(SidekeyError):
    """Something needed is not reachable or not ready; trying again later may work."""

    type = "unavailable"
