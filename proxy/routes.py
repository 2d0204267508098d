"""The live routing table: policies and Secrets, watched and compiled into routes.

A ``Route`` is everything a request to one upstream needs, prepared when a
policy or Secret changes rather than per request: the origin, TLS context,
header strip set, rate-limit bucket and the credential to attach. Watch
events rebuild the table at once, so edits and rotations apply to the next
request. The table is replaced wholesale; a request in flight keeps the
route it started with.

RBAC grants the sidecar's account only the Secrets its policies name
(``resourceNames``), so each Secret is watched by name with a ``metadata.name``
field selector. A 403 on AgentPolicies means no policy grants this account
yet: that is an empty policy set, retried until one appears.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Final, TypedDict

from sidekey.core import contract, kubeapi, policies, reflector
from sidekey.proxy import credentials, limits, metrics
from sidekey.proxy.route import Origin as Origin
from sidekey.proxy.route import Route as Route
from sidekey.proxy.route import Timeouts as Timeouts

log = logging.getLogger("sidekey.proxy.routes")

#: Request headers never forwarded: hop-by-hop (RFC 9110 §7.6.1), the Host
#: (the policy decides it), and every header an SDK may carry the caller's token in.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",
    }
)
CALLER_TOKEN_HEADERS: Final = ("authorization", "x-api-key", "api-key")
#: Headers some upstream frameworks honour to change the method or the path
#: *after* the sidecar checked both against the policy: never forwarded.
OVERRIDE_HEADERS: Final = frozenset(
    {"x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url"}
)
#: How long to wait for a TCP/TLS connection before giving up with 504.
CONNECT_TIMEOUT: Final = 30.0


class HostRefused(OSError):
    """The policy's hostname resolves somewhere the key must never go."""


class ResolveResult(TypedDict):
    """One address of a name (the shape aiohttp's resolvers return, which ``proxy.upstream`` reads)."""

    hostname: str
    host: str
    port: int
    family: int
    proto: int
    flags: int


class SystemResolver:
    """getaddrinfo in the loop's thread pool, so /etc/hosts and the pod's resolv.conf apply."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family,
                                       flags=socket.AI_ADDRCONFIG)
        results: list[ResolveResult] = []
        for fam, _, proto, _, address in infos:
            if fam == socket.AF_INET6 and len(address) >= 4 and address[3]:
                # a scope id: a link-local address keeps its zone ("fe80::1%eth0")
                found, service = await loop.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                text, number = found, int(service)
            else:
                text, number = str(address[0]), int(address[1])
            results.append(ResolveResult(hostname=host, host=text, port=number, family=fam, proto=proto,
                                         flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        if not results:
            raise OSError(None, f"{host} has no usable address")
        return results

    async def close(self) -> None:
        pass


class GuardedResolver:
    """Resolves through getaddrinfo (so /etc/hosts applies) and refuses local targets.

    Every container of the pod can write its shared /etc/hosts, so a policy
    hostname could be pointed at the agent itself. Names resolving to
    loopback, link-local, unspecified or any of this pod's own IPs (every
    entry of ``status.podIPs``: a dual-stack pod has two) are refused; an IP
    literal in the policy URL never reaches a resolver and is trusted as written.

    What this cannot see: a Service ClusterIP whose endpoints include this
    pod. kube-proxy rewrites the destination after the connection leaves the
    socket, so from inside the pod the peer is the ClusterIP, and only reading
    the Service's EndpointSlices (which the sidecar's account may not) would
    tell. With TLS that is harmless (the agent holds no certificate for the
    upstream's name); for an ``insecure`` upstream docs/security.md says what
    the policy author must make sure of.
    """

    def __init__(self, pod_ips: frozenset[str]) -> None:
        self._inner = SystemResolver()
        self._pod_ips = frozenset(ipaddress.ip_address(ip) for ip in pod_ips if ip)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for r in results:
            ip = ipaddress.ip_address(r["host"].split("%", 1)[0])
            mapped = getattr(ip, "ipv4_mapped", None)
            if mapped is not None:
                ip = mapped
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip in self._pod_ips:
                raise HostRefused(
                    f"{host} resolves to {ip}, a loopback, link-local or this pod's own address; "
                    "refused (write the IP literal in the policy URL if that is really meant)"
                )
        return results

    async def addresses(self, host: str, port: int) -> list[str]:
        """The checked addresses of ``host``, for ``httpclient.Client(resolve=...)`` (the OAuth2 token URL)."""
        return [r["host"] for r in await self.resolve(host, port, socket.AF_UNSPEC)]

    async def close(self) -> None:
        await self._inner.close()


class TlsContexts:
    """One verifying context per distinct CA bundle (loading the system store is slow)."""

    def __init__(self) -> None:
        self._system: ssl.SSLContext | None = None
        self._custom: dict[str, ssl.SSLContext] = {}

    def get(self, ca_bundle: str | None) -> ssl.SSLContext:
        if ca_bundle is None:
            if self._system is None:
                self._system = ssl.create_default_context()
            return self._system
        ctx = self._custom.get(ca_bundle)
        if ctx is None:
            # the policy's bundle replaces the system store: a private upstream is
            # trusted only through the CA its policy names
            ctx = ssl.create_default_context(cadata=ca_bundle)
            self._custom[ca_bundle] = ctx
        return ctx


class Routes:
    """Watches this pod's policies and their Secrets and keeps ``table`` current."""

    def __init__(
        self,
        api: kubeapi.ApiClient,
        *,
        namespace: str,
        service_account: str,
        on_rebuild: Callable[[], None] | None = None,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.service_account = service_account
        self.table: dict[str, Route] = {}
        self.selection: policies.Selection | None = None
        self._on_rebuild = on_rebuild
        self._tls = TlsContexts()
        self._secrets: dict[str, reflector.Reflector] = {}
        self._secret_tasks: dict[str, asyncio.Task[None]] = {}
        self._initial_secrets: frozenset[str] | None = None
        self.policies = reflector.Reflector(
            api,
            f"/apis/{contract.GROUP}/{contract.VERSION}/namespaces/{namespace}/{contract.PLURAL}",
            forbidden_is_empty=True,
            on_change=self._policies_changed,
            on_error=lambda exc: metrics.APISERVER_ERRORS.labels("agentpolicies").inc(),
        )
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.policies.run(), name="watch-agentpolicies")

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._secret_tasks.values()] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def ready(self) -> bool:
        """Policies read once, and each Secret they named then tried once."""
        if not self.policies.synced.is_set() or self._initial_secrets is None:
            return False
        return all(self._secrets[n].attempted.is_set() for n in self._initial_secrets if n in self._secrets)

    # --- watches -------------------------------------------------------------------------

    def _policies_changed(self) -> None:
        parsed: list[policies.AgentPolicy] = []
        invalid = 0
        for key, obj in self.policies.objects.items():
            try:
                parsed.append(policies.parse(policies.raw(obj)))
            except policies.PolicyError as exc:
                invalid += 1
                log.warning("ignoring AgentPolicy %s: %s", key, exc)
        self.selection = policies.select(parsed, self.service_account)
        metrics.POLICY_RELOADS.labels("invalid" if invalid else "ok").inc()
        wanted = frozenset(up.auth.secret_name for _, up in self.selection.upstreams.values())
        for name in wanted - self._secrets.keys():
            self._watch_secret(name)
        for name in set(self._secrets) - wanted:
            self._secrets.pop(name)
            task = self._secret_tasks.pop(name)
            task.cancel()
        if self._initial_secrets is None:
            self._initial_secrets = wanted
        self.rebuild()

    def _watch_secret(self, name: str) -> None:
        def changed() -> None:
            metrics.SECRET_RELOADS.labels("ok" if watch.objects else "missing").inc()
            self.rebuild()

        watch = reflector.Reflector(
            self.api,
            f"/api/v1/namespaces/{self.namespace}/secrets",
            field_selector=f"metadata.name={name}",
            forbidden_is_empty=True,
            on_change=changed,
            on_error=lambda exc: metrics.APISERVER_ERRORS.labels("secrets").inc(),
        )
        self._secrets[name] = watch
        self._secret_tasks[name] = asyncio.create_task(watch.run(), name=f"watch-secret-{name}")

    def secret_data(self, name: str) -> dict[str, str] | None:
        watch = self._secrets.get(name)
        if watch is None:
            return None
        obj = watch.objects.get(f"{self.namespace}/{name}")
        return None if obj is None else credentials.decode_secret(obj)

    # --- compiling ---------------------------------------------------------------------------

    def rebuild(self) -> None:
        selection = self.selection
        old = self.table
        table: dict[str, Route] = {}
        if selection is not None:
            for name, (policy, up) in selection.upstreams.items():
                try:
                    table[name] = self._route(name, policy, up, old.get(name))
                except (ssl.SSLError, ValueError) as exc:
                    log.warning(
                        "upstream %s of AgentPolicy %s is unusable: %s", name, policy.name, type(exc).__name__
                    )
        self.table = table
        if self._on_rebuild is not None:
            self._on_rebuild()

    def _route(
        self, name: str, policy: policies.AgentPolicy, up: policies.Upstream, previous: Route | None
    ) -> Route:
        data = self.secret_data(up.auth.secret_name)
        cred: credentials.Credential | None = None
        unavailable: str | None = None
        try:
            # the token URL gets its own verification (its own bundle or the system store),
            # never this upstream's context
            cred = credentials.build(up.auth, data, insecure=up.insecure, tls=self._tls.get)
        except credentials.CredentialError as exc:
            unavailable = exc.message
            if data is not None:
                metrics.SECRET_RELOADS.labels("invalid").inc()
        if (
            cred is not None
            and cred.oauth is not None
            and previous is not None
            and previous.credential is not None
            and previous.credential.oauth is not None
            and cred.oauth.same_as(previous.credential.oauth)
        ):
            cred.oauth.adopt(previous.credential.oauth)
        rpm = up.limits.requests_per_minute
        bucket: limits.TokenBucket | None = None
        if rpm is not None:
            same = previous is not None and previous.bucket is not None and previous.bucket.capacity == rpm
            bucket = previous.bucket if same and previous is not None else limits.TokenBucket(rpm)
        # accept-encoding: the sidecar asks for identity itself (see relaying.respond)
        strip = set(HOP_BY_HOP) | set(CALLER_TOKEN_HEADERS) | OVERRIDE_HEADERS | {"accept-encoding"}
        if up.auth.type == "header":
            strip.add(up.auth.header_name.lower())
        host = f"[{up.host}]" if ":" in up.host else up.host
        tls = self._tls.get(up.ca_bundle) if up.scheme == "https" else None
        return Route(
            name=name,
            upstream=up,
            policy=policy.name,
            origin=f"{up.scheme}://{host}:{up.port}",
            pool=(up.scheme, up.host, up.port, tls),
            strip=frozenset(strip),
            bucket=bucket,
            timeout=Timeouts(
                sock_connect=min(CONNECT_TIMEOUT, up.limits.timeout_seconds),
                sock_read=up.limits.timeout_seconds,
            ),
            credential=cred,
            unavailable=unavailable,
        )


def describe(table: Mapping[str, Route]) -> list[dict[str, Any]]:
    """A safe summary of the table for logs: names and hosts, no credentials."""
    return [
        {"upstream": r.name, "policy": r.policy, "origin": r.origin, "available": r.unavailable is None}
        for r in table.values()
    ]
