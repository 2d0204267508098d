"""The attacker's world: a subject account with a policy, a recording upstream, a trap, a sidecar.

Every catalogue runs against a real ``sidekey proxy`` subprocess wired to the
real apiserver, started by ``localcluster.podplayer`` the way the kubelet
would (it mints the tokens with TokenRequest and resolves the downward API).
The upstream (``localcluster.upstreams.RecordingUpstream``) records every
request it receives, so "none reached the upstream" is read from its record,
not inferred from a status code. The trap is a plain TCP listener on another
port standing for the attacker's host: anything that connects to it is a leak.

This module is the catalogues' vocabulary: the canary secrets, the policy's
upstreams (one per auth type), the world as a fixture sees it, and raw HTTP
for requests no client library would send.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidekey.core import contract
from sidekey.localcluster import podplayer, subjects
from sidekey.localcluster.cluster import LocalCluster, free_port
from sidekey.localcluster.processes import Processes
from sidekey.localcluster.upstreams import RecordingUpstream as Upstream
from sidekey.localcluster.upstreams import Trap
from tests.support.kubectl import wait_until
from tests.support.sidecars import SidecarView

__all__ = ["Trap", "Upstream", "free_port", "wait_until"]

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


# --- Kubernetes objects ---------------------------------------------------------------------


def apply(cluster: LocalCluster, manifest: dict[str, Any]) -> dict[str, Any]:
    return subjects.apply(cluster, manifest)


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
    return subjects.policy(namespace, name, [SA], upstreams)


def secret_manifest(namespace: str, data: dict[str, str], name: str = SECRET_NAME) -> dict[str, Any]:
    return subjects.secret(namespace, name, data)


def grant(cluster: LocalCluster, namespace: str, secrets: list[str]) -> None:
    subjects.grant(cluster, namespace, SA, secrets)


def injected_pod(namespace: str, name: str = POD, sa: str = SA) -> dict[str, Any]:
    return subjects.injected_pod(namespace, name, sa)


def subject(cluster: LocalCluster, namespace: str, upstream_url: str,
            upstreams: list[dict[str, Any]] | None = None) -> str:
    """Account, Secret, policy, RBAC and pod; returns the pod's uid."""
    pod = subjects.create_subject(cluster, namespace, account=SA, pod=POD, secret_name=SECRET_NAME, keys=KEYS,
                                  upstreams=upstreams or upstream_specs(upstream_url), policy_name="attack")
    uid: str = pod["metadata"]["uid"]
    return uid


# --- the sidecar, started as the kubelet would --------------------------------------------------


@dataclass
class SubjectSidecar(SidecarView):
    cluster: LocalCluster
    namespace: str
    pod_uid: str
    running: podplayer.RunningSidecar
    workdir: Path
    agent_token: str
    _procs: Processes

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self._procs.stop_all()


def launch(cluster: LocalCluster, namespace: str, pod_uid: str, workdir: Path, *, pod_ip: str = POD_IP,
           hosts_file: Path | None = None, drain_seconds: str = "10", wait: bool = True) -> SubjectSidecar:
    """Start ``sidekey proxy`` with the files and env the injected spec gives it.

    With ``hosts_file`` the sidecar runs in a private mount namespace whose
    /etc/hosts is that file: the pod's shared /etc/hosts, as rewritten by an
    agent. The machine's own /etc/hosts is never touched.
    """
    pod = podplayer.PodIdentity(namespace, POD, pod_uid, SA, pod_ip)
    prefix: list[str] = []
    if hosts_file is not None:
        prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                  'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts_file)]
    procs = Processes(workdir / "logs")
    try:
        running = podplayer.start_sidecar(
            cluster, pod, procs, workdir, name="proxy", prefix=prefix, wait=wait,
            env={contract.ENV_AUDIENCE: contract.DEFAULT_AUDIENCE, contract.ENV_DRAIN_SECONDS: drain_seconds})
    except (TimeoutError, RuntimeError) as exc:
        procs.stop_all()
        raise AssertionError(f"the sidecar did not become ready: {exc}") from None
    agent_token = podplayer.mint_agent_token(cluster, pod)
    return SubjectSidecar(cluster, namespace, pod_uid, running, workdir, agent_token, procs)


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
    """The recording upstream, its redirects aimed at the trap, its token endpoint knowing the canary client."""
    with Upstream(trap.url, oauth_client=(KEYS["client_id"], KEYS["client_secret"]),
                  access_token=ACCESS_TOKEN) as up:
        yield up


@dataclass
class World:
    """What a catalogue test sees: the cluster, the subject's namespace and pod, upstream, trap and sidecar."""

    cluster: LocalCluster
    namespace: str
    pod_uid: str
    upstream: Upstream
    trap: Trap
    sidecar: SubjectSidecar

    @property
    def token(self) -> str:
        return self.sidecar.agent_token

    def request(self, target: str, token: str | None = None, **kw: Any) -> Response:
        return get(self.sidecar.port, target, token, **kw)
