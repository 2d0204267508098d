"""What the proxy tests share: signing keys and tokens, policies, a recording upstream, a fake apiserver.

``conftest.py`` turns some of these into fixtures; test modules (and
``bench_sidecar.py``) import the rest from here, never from a conftest or
another test module.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from joserfc import jwk, jwt
from multidict import CIMultiDict

from bench.requestpath import CollectingTransport
from sidekey.core import contract, policies, tokens
from sidekey.proxy import forwarding, listener, routes

ISSUER = "https://127.0.0.1:6443"
NAMESPACE = "team"
POD = "agent-0"
POD_UID = "uid-0"
SA = "agent"
KEY = jwk.RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})


def mint(*, exp_in: int = 600, pod_uid: str = POD_UID, aud: str = "sidekey", **extra: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": [aud],
        "sub": f"system:serviceaccount:{NAMESPACE}:{SA}",
        "exp": now + exp_in,
        "iat": now,
        "nbf": now,
        "kubernetes.io": {
            "namespace": NAMESPACE,
            "pod": {"name": POD, "uid": pod_uid},
            "serviceaccount": {"name": SA, "uid": "sa-uid"},
        },
        **extra,
    }
    return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, KEY)


@dataclass
class Received:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    url: str
    port: int
    received: list[Received] = field(default_factory=list)
    token_requests: list[Received] = field(default_factory=list)
    oauth_lifetime: int = 3600
    oauth_issued: int = 0
    slow_abandoned: bool | None = None

    @property
    def last(self) -> Received:
        return self.received[-1]


def _upstream_app(state: Upstream) -> web.Application:
    async def record(request: web.Request) -> Received:
        body = await request.read()
        r = Received(request.method, request.raw_path, dict(request.headers), body)
        state.received.append(r)
        return r

    async def echo(request: web.Request) -> web.Response:
        r = await record(request)
        return web.json_response(
            {"method": r.method, "path": r.raw_path, "headers": r.headers, "body_len": len(r.body)}
        )

    async def sse(request: web.Request) -> web.StreamResponse:
        await record(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f'data: {{"n": {i}, "t": {time.time()}}}\n\n'.encode())
            await asyncio.sleep(0.2)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.StreamResponse:
        r = await record(request)
        size = int(request.query.get("size", "0"))
        resp = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "X-Body-Sha": str(len(r.body))}
        )
        await resp.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            await resp.write(chunk[:n])
            sent += n
        await resp.write_eof()
        return resp

    async def leak(request: web.Request) -> web.StreamResponse:
        """An upstream that echoes every credential it received, in pieces."""
        r = await record(request)
        secrets = [
            r.headers.get("Authorization", ""),
            r.headers.get("X-Api-Key", ""),
            request.query.get("key", ""),
        ]
        text = " | ".join(s for s in secrets if s)
        resp = web.StreamResponse(status=401, headers={"X-Echo": text, "Content-Type": "text/plain"})
        await resp.prepare(request)
        payload = f"error: bad credential {text} (encoded: {base64.b64encode(text.encode()).decode()})\n"
        data = payload.encode()
        for i in range(0, len(data), 5):  # tiny chunks: secrets straddle boundaries
            await resp.write(data[i : i + 5])
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    async def redirect(request: web.Request) -> web.Response:
        r = await record(request)
        q = request.query_string
        return web.Response(
            status=302,
            headers={"Location": f"https://elsewhere.example/next?{q}"},
            text=f"moved {r.raw_path}",
        )

    async def slow(request: web.Request) -> web.Response:
        await record(request)
        await asyncio.sleep(float(request.query.get("s", "5")))
        transport = request.transport
        state.slow_abandoned = transport is None or transport.is_closing()
        return web.Response(text="late")

    async def broken(request: web.Request) -> web.StreamResponse:
        await record(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def gz(request: web.Request) -> web.Response:
        await record(request)
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb") as f:
            f.write(b"compressed hello " * 100)
        return web.Response(
            body=buf.getvalue(), headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    async def gz_leak(request: web.Request) -> web.StreamResponse:
        # a large compressed error page echoing the key, streamed in pieces
        await record(request)
        page = b"x" * 100_000 + request.headers.get("Authorization", "").encode() + b"y" * 100_000
        data = gzip.compress(page)
        resp = web.StreamResponse(status=500, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
        await resp.prepare(request)
        for i in range(0, len(data), 7):
            await resp.write(data[i : i + 7])
        await resp.write_eof()
        return resp

    async def double_encoding(request: web.Request) -> web.Response:
        await record(request)
        headers = CIMultiDict([("Content-Encoding", "identity"), ("Content-Encoding", "gzip")])
        return web.Response(body=gzip.compress(request.headers.get("Authorization", "").encode()),
                            headers=headers)

    async def bomb(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(body=gzip.compress(b"\0" * 4_000_000), headers={"Content-Encoding": "gzip"})

    async def brotli(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(body=b"\x1b\x00\x00", headers={"Content-Encoding": "br"})

    async def token(request: web.Request) -> web.Response:
        body = await request.read()
        r = Received(request.method, request.raw_path, dict(request.headers), body)
        state.token_requests.append(r)
        expected = "Basic " + base64.b64encode(b"my-client:client-secret-123").decode()
        if r.headers.get("Authorization") != expected:
            return web.json_response({"error": "invalid_client"}, status=401)
        state.oauth_issued += 1
        return web.json_response(
            {
                "access_token": f"access-{state.oauth_issued}-abcdefgh",
                "token_type": "Bearer",
                "expires_in": state.oauth_lifetime,
            }
        )

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/base/sse", sse)
    app.router.add_route("*", "/base/big", big)
    app.router.add_route("*", "/base/leak", leak)
    app.router.add_route("*", "/base/redirect", redirect)
    app.router.add_route("*", "/base/slow", slow)
    app.router.add_route("*", "/base/broken", broken)
    app.router.add_route("*", "/base/gzip", gz)
    app.router.add_route("*", "/base/gzip-leak", gz_leak)
    app.router.add_route("*", "/base/brotli", brotli)
    app.router.add_route("*", "/base/double-encoding", double_encoding)
    app.router.add_route("*", "/base/bomb", bomb)
    app.router.add_post("/oauth/token", token)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


class StaticRoutes(routes.Routes):
    """The routing table from given policies and Secrets, no apiserver."""

    def __init__(self, secrets: dict[str, dict[str, str]]) -> None:
        super().__init__(None, namespace=NAMESPACE, service_account=SA)  # type: ignore[arg-type]
        self.secrets = secrets

    def secret_data(self, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    def set_policies(self, *objs: Mapping[str, Any]) -> None:
        self.selection = policies.select([policies.parse(policies.raw(o)) for o in objs], SA)
        self.rebuild()


def policy(*upstreams: Mapping[str, Any], name: str = "p") -> dict[str, Any]:
    return {
        "apiVersion": "sidekey.io/v1alpha1",
        "kind": "AgentPolicy",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": "u",
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"subjects": {"serviceAccounts": [SA]}, "upstreams": list(upstreams)},
    }


@dataclass
class Running:
    url: str
    routes: StaticRoutes
    audit: io.StringIO
    proxy: forwarding.Proxy
    validator: tokens.Validator

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.getvalue().splitlines()]


ProxyFactory = Callable[..., Awaitable[Running]]


def bearer_upstream(url: str, **extra: Any) -> dict[str, Any]:
    up: dict[str, Any] = {
        "name": "openai",
        "url": f"{url}/base",
        "insecure": True,
        "auth": {"type": "bearer", "secretRef": {"name": "keys", "key": "openai"}},
        "allow": [{"methods": ["*"], "paths": ["/**"]}],
    }
    up.update(extra)
    return up


SECRET = "sk-live-0123456789abcdef"
SECRETS = {"keys": {"openai": SECRET}}


# --- a small apiserver, for the sidecar process --------------------------------------------


POLICIES_PATH = f"/apis/{contract.GROUP}/{contract.VERSION}/namespaces/{NAMESPACE}/{contract.PLURAL}"
SECRETS_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets"


class FakeApi:
    """An apiserver that serves discovery, the JWKS, and lists and watches of policies and Secrets."""

    def __init__(self) -> None:
        self.policies: dict[str, dict[str, Any]] = {}
        self.secrets: dict[str, dict[str, Any]] = {}
        self.forbid_policies = True
        self.rv = 1
        self.changed = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0
        #: Budget ledger Leases by name (get and update, as a sidecar's Role allows).
        self.leases: dict[str, dict[str, Any]] = {}
        #: When set, a Lease update is never answered (an apiserver that went slow); each one calls this.
        self.hang_lease_updates: Callable[[], None] | None = None

    def bump(self) -> None:
        self.rv += 1
        self.changed.set()
        self.changed = asyncio.Event()

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": ISSUER, "jwks_uri": "https://evil.example/jwks"})

    async def jwks(self, request: web.Request) -> web.Response:
        if "application/jwk-set+json" not in request.headers.get("Accept", ""):
            return web.json_response({"kind": "Status", "code": 406}, status=406)
        return web.json_response({"keys": [KEY.as_dict(private=False)]})

    async def collection(
        self, request: web.Request, objs: dict[str, dict[str, Any]], forbidden: bool
    ) -> web.StreamResponse:
        if forbidden:
            return web.json_response(
                {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "forbidden"}, status=403
            )
        fs = request.query.get("fieldSelector", "")
        name = fs.split("=", 1)[1] if fs else None
        items = [o for n, o in objs.items() if name is None or n == name]
        if request.query.get("watch") != "true":
            return web.json_response({"items": items, "metadata": {"resourceVersion": str(self.rv)}})
        # a "watch" that ends at the next change: the reflector then resumes, and
        # its resourceVersion is stale, so answer 410 to make it relist
        resp = web.StreamResponse()
        await resp.prepare(request)
        if int(request.query.get("resourceVersion", "0")) < self.rv:
            await resp.write(json.dumps({"type": "ERROR", "object": {"code": 410}}).encode() + b"\n")
            return resp
        await self.changed.wait()
        return resp

    async def policies_handler(self, request: web.Request) -> web.StreamResponse:
        return await self.collection(request, self.policies, self.forbid_policies)

    async def secrets_handler(self, request: web.Request) -> web.StreamResponse:
        return await self.collection(request, self.secrets, False)

    async def lease(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.leases:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        if request.method == "PUT":
            if self.hang_lease_updates is not None:
                self.hang_lease_updates()
                await asyncio.Event().wait()
            body = await request.json()
            if body["metadata"].get("resourceVersion") != self.leases[name]["metadata"]["resourceVersion"]:
                return web.json_response({"kind": "Status", "code": 409, "reason": "Conflict"}, status=409)
            self.rv += 1
            body["metadata"]["resourceVersion"] = str(self.rv)
            self.leases[name] = body
        return web.json_response(self.leases[name])

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_route("*", f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{{name}}", self.lease)
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/openid/v1/jwks", self.jwks)
        app.router.add_get(POLICIES_PATH, self.policies_handler)
        app.router.add_get(SECRETS_PATH, self.secrets_handler)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.bump()
        assert self.runner is not None
        await self.runner.cleanup()


def agent_request(method: str = "GET", target: str = "/", headers: list[tuple[str, str]] | None = None,
                  connection: str | None = None
                  ) -> tuple[listener.Request, listener.AgentConnection, CollectingTransport]:
    """A real request on a real agent connection (its transport collects what is written), for
    tests that call the request path's parts directly. Real objects, not look-alikes: compiled
    (setup.py), those parts check the type of what they are given."""

    async def handler(request: listener.Request, conn: listener.AgentConnection) -> None:
        raise AssertionError("not served here")

    conn = listener.AgentConnection(handler, listener.Listener(handler))
    transport = CollectingTransport()
    conn.connection_made(transport)
    request = listener.Request(conn)
    request.method, request.target, request.headers, request.connection = method, target, headers or [], connection
    return request, conn, transport

