"""One upstream as a request sees it: ``Route``, built by ``routes`` when a policy or Secret changes.

A module of its own, and compiled (setup.py) with the request path, so that the
fast path reads a route's fields as C struct members: as a Python class in
``routes`` each read was a generic attribute lookup, about thirty a request.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from sidekey.core import policies
from sidekey.proxy import credentials, limits


@dataclass(frozen=True, slots=True)
class Timeouts:
    """An upstream's connect timeout and read timeout (the longest silence); never a total one."""

    sock_connect: float
    sock_read: float


#: The key of the upstream pool's idle connections: scheme, host, port and the TLS context
#: itself (not its id(), which a new context could take over once a policy edit freed the old
#: one), so a connection is reused only under the context that verified it.
Origin = tuple[str, str, int, ssl.SSLContext | None]


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstream: policies.Upstream
    policy: str
    origin: str  # scheme://host:port
    #: ``Origin``, built once here: the pool looks it up on every request; its TLS context
    #: (the policy's CA bundle or the system store) is None for plain HTTP
    pool: Origin
    strip: frozenset[str]
    bucket: limits.TokenBucket | None
    timeout: Timeouts
    credential: credentials.Credential | None
    unavailable: str | None  # why the credential is missing (503), never the secret
