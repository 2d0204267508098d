"""The sidecar's Prometheus metrics, all named ``sidekey_``.

A private registry keeps the default process collectors' names out and makes
tests independent. Label values come from the policy (upstream names) or from
small fixed sets (decisions, token failure reasons, methods), never from the
request, so an agent cannot blow up the cardinality; and never from a secret.
"""

from __future__ import annotations

from typing import Final

from sidekey.core import policies
from sidekey.proxy.metrictypes import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY: Final = CollectorRegistry(auto_describe=True)

REQUESTS: Final = Counter(
    "sidekey_requests",
    "Requests handled, by upstream, method, status code and decision.",
    ["upstream", "method", "code", "decision"],
    registry=REGISTRY,
)
DURATION: Final = Histogram(
    "sidekey_request_duration_seconds",
    "Time from request to the end of the response.",
    ["upstream"],
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
UPSTREAM_DURATION: Final = Histogram(
    "sidekey_upstream_duration_seconds",
    "Time until the upstream's response headers.",
    ["upstream"],
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TOKEN_FAILURES: Final = Counter(
    "sidekey_token_failures",
    "Caller tokens refused, by reason.",
    ["reason"],
    registry=REGISTRY,
)
JWKS_REFRESHES: Final = Counter(
    "sidekey_jwks_refreshes",
    "JWKS fetches, by result (changed, unchanged, error).",
    ["result"],
    registry=REGISTRY,
)
POLICY_RELOADS: Final = Counter(
    "sidekey_policy_reloads",
    "Policy set rebuilds, by result (ok, invalid).",
    ["result"],
    registry=REGISTRY,
)
SECRET_RELOADS: Final = Counter(
    "sidekey_secret_reloads",
    "Secret changes applied, by result (ok, missing, invalid).",
    ["result"],
    registry=REGISTRY,
)
APISERVER_ERRORS: Final = Counter(
    "sidekey_apiserver_errors",
    "Failed list/watch calls; the sidecar serves from its cache.",
    ["resource"],
    registry=REGISTRY,
)
IN_FLIGHT: Final = Gauge(
    "sidekey_in_flight_requests",
    "Requests being handled now.",
    registry=REGISTRY,
)
RATE_LIMITED: Final = Counter(
    "sidekey_rate_limited",
    "Requests refused with 429, by upstream.",
    ["upstream"],
    registry=REGISTRY,
)
READY: Final = Gauge("sidekey_ready", "1 once the JWKS and the policies are loaded.", registry=REGISTRY)

_KNOWN_METHODS: Final = policies.METHODS


def method_label(method: str) -> str:
    return method if method in _KNOWN_METHODS else "OTHER"


def exposition() -> bytes:
    return generate_latest(REGISTRY)
