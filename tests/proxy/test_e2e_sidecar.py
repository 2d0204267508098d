"""`sidekey proxy` end to end on the real apiserver, with the test playing the kubelet.

The test creates the Secret, the AgentPolicy, the RBAC the operator would
grant, and a pod in the injected shape; mints the pod-bound agent token and the
sidecar's API token with TokenRequest; starts `sidekey proxy` as a subprocess
with the env the webhook sets; then calls it with the real openai and
anthropic SDKs and curl against a local TLS upstream that checks the key.
The objects and the kubelet's part come from the shared harness
(``localcluster.subjects``, ``localcluster.podplayer``). Tests in this module
share one sidecar and run in file order (later ones
change the policy).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
import yaml

from sidekey.client import SidekeyAuth
from sidekey.core import contract
from sidekey.localcluster import podplayer, subjects
from sidekey.localcluster.cluster import free_port
from sidekey.localcluster.processes import Processes
from sidekey.localcluster.upstreams import MockLLM
from tests.support.kubectl import wait_until
from tests.support.namespaces import make_namespace
from tests.support.sidecars import SidecarView

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-e2e-openai-0000-first-key"
ROTATED_KEY = "sk-e2e-openai-1111-rotated-key"
ANTHROPIC_KEY = "sk-ant-e2e-2222-anthropic-key"
SA = "agent"
POD = "agent-pod"


def apply(cluster: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    return subjects.apply(cluster, manifest)


def http(
    method: str,
    url: str,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=h)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def policy_manifest(namespace: str, upstream: MockLLM, chat_methods: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": "llms", "namespace": namespace},
        "spec": {
            "subjects": {"serviceAccounts": [SA]},
            "upstreams": [
                {
                    "name": "openai",
                    "url": f"https://127.0.0.1:{upstream.port}/v1",
                    "caBundle": upstream.ca_pem,
                    "auth": {"type": "bearer", "secretRef": {"name": "llm-keys", "key": "openai"}},
                    "allow": [
                        {"methods": chat_methods, "paths": ["/chat/completions"]},
                        {"methods": ["GET"], "paths": ["/models", "/slow"]},
                    ],
                    "env": [{"name": "OPENAI_BASE_URL"}],
                },
                {
                    "name": "anthropic",
                    "url": f"https://127.0.0.1:{upstream.port}",
                    "caBundle": upstream.ca_pem,
                    "auth": {
                        "type": "header",
                        "secretRef": {"name": "llm-keys", "key": "anthropic"},
                        "header": {"name": "x-api-key"},
                    },
                    "allow": [{"methods": ["POST"], "paths": ["/v1/messages"]}],
                },
            ],
        },
    }


def secret_manifest(namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return subjects.secret(namespace, name, data)


@dataclass
class SharedSidecar(SidecarView):
    namespace: str
    running: podplayer.RunningSidecar
    token_file: Path
    upstream: MockLLM
    cluster: Any

    def token(self) -> str:
        return self.token_file.read_text()


@pytest.fixture(scope="module")
def sidecar(cluster: Any, crds: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedSidecar]:
    """The objects a team and the operator create (a Secret not named by the policy too), then the kubelet's part."""
    workdir = tmp_path_factory.mktemp("sidecar")
    namespace = make_namespace(cluster, "skproxy")
    upstream = MockLLM({"openai-current": OPENAI_KEY, "anthropic-current": ANTHROPIC_KEY},
                       reply="hello from upstream", word_gap=0.1)
    upstream.start()
    apply(cluster, secret_manifest(namespace, "not-yours", {"key": "sk-outside-the-policy"}))
    pod = podplayer.PodIdentity.of(subjects.create_subject(
        cluster, namespace, account=SA, pod=POD, secret_name="llm-keys",
        keys={"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY},
        upstreams=policy_manifest(namespace, upstream, ["POST"])["spec"]["upstreams"], policy_name="llms"),
        ip="10.244.0.7")
    token_file = workdir / "agent" / "token"
    token_file.parent.mkdir()
    token_file.write_text(podplayer.mint_agent_token(cluster, pod))
    with Processes(workdir / "logs") as procs:
        running = podplayer.start_sidecar(
            cluster, pod, procs, workdir, name="proxy",
            env={contract.ENV_AUDIENCE: contract.DEFAULT_AUDIENCE, contract.ENV_DRAIN_SECONDS: "10"})
        try:
            yield SharedSidecar(namespace, running, token_file, upstream, cluster)
        finally:
            upstream.stop()
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# --- the SDKs ---------------------------------------------------------------------------------


def openai_client(sc: SharedSidecar) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{sc.url}/openai",
        api_key="unused",
        max_retries=0,
        http_client=httpx2.Client(auth=SidekeyAuth(sc.token_file)),
    )


def test_the_openai_sdk_chats_through_the_sidecar_with_the_real_key(sidecar: SharedSidecar) -> None:
    with openai_client(sidecar) as client:
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "hello from upstream"
        assert [m.id for m in client.models.list()] == ["mock-model"]
    seen = sidecar.upstream.seen[-2:]
    assert all(s.key_ok and not s.caller_token_seen for s in seen)


def test_the_openai_sdk_streams_event_by_event(sidecar: SharedSidecar) -> None:
    arrivals: list[float] = []
    text = ""
    with openai_client(sidecar) as client:
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
                text += chunk.choices[0].delta.content
    assert text == "hello from upstream"
    assert arrivals[-1] - arrivals[0] > 0.15  # 0.1 s apart upstream: not buffered into one


def test_the_anthropic_sdk_with_the_token_as_its_api_key(sidecar: SharedSidecar) -> None:
    # the plain way: read the file and pass it as the api key (per client, so per request here)
    client = anthropic.Anthropic(base_url=f"{sidecar.url}/anthropic", api_key=sidecar.token(), max_retries=0)
    msg = client.messages.create(
        model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.content[0].text == "hello from upstream"  # type: ignore[union-attr]
    parts: list[str] = []
    with client.messages.stream(
        model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        parts.extend(stream.text_stream)
    assert "".join(parts) == "hello from upstream"
    seen = [s for s in sidecar.upstream.seen if s.path == "/v1/messages"]
    assert len(seen) == 2 and all(s.key_ok and not s.caller_token_seen for s in seen)


def test_curl_works_with_the_token_file(sidecar: SharedSidecar) -> None:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            "-H",
            f"Authorization: Bearer {sidecar.token()}",
            f"{sidecar.url}/openai/models",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, code = out.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["data"][0]["id"] == "mock-model"


def test_refusals_from_the_real_token_path(sidecar: SharedSidecar) -> None:
    cluster = sidecar.cluster
    other_aud = cluster.token(sidecar.namespace, SA, audience=cluster.issuer)
    status, body = http("GET", f"{sidecar.url}/openai/models", other_aud)
    assert status == 401 and b"audience" in body
    status, body = http("GET", f"{sidecar.url}/openai/models")
    assert status == 401
    status, _ = http("GET", f"{sidecar.url}/openai/v1/../models", sidecar.token())
    assert status == 400
    status, _ = http("DELETE", f"{sidecar.url}/openai/models", sidecar.token())
    assert status == 403
    status, _ = http("GET", f"{sidecar.url}/gemini/models", sidecar.token())
    assert status == 404


def test_the_sidecar_account_cannot_read_a_secret_outside_the_policy(sidecar: SharedSidecar) -> None:
    base = f"{sidecar.cluster.url}/api/v1/namespaces/{sidecar.namespace}/secrets"
    import ssl

    ctx = ssl.create_default_context(cafile=str(sidecar.cluster.ca_file))

    def get(url: str) -> int:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {sidecar.api_token}"})  # noqa: S310
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get(f"{base}/llm-keys") == 200
    assert get(f"{base}/not-yours") == 403
    assert get(base) == 403  # no listing of every Secret either


# --- live changes ----------------------------------------------------------------------------


def test_a_rotated_secret_is_used_within_two_seconds(sidecar: SharedSidecar) -> None:
    sidecar.upstream.keys = {"openai-rotated": ROTATED_KEY, "anthropic-current": ANTHROPIC_KEY}  # old one revoked
    apply(
        sidecar.cluster,
        secret_manifest(sidecar.namespace, "llm-keys", {"openai": ROTATED_KEY, "anthropic": ANTHROPIC_KEY}),
    )
    elapsed = wait_until(
        lambda: http("GET", f"{sidecar.url}/openai/models", sidecar.token())[0] == 200,
        2.0,
        "the rotated key in use",
    )
    assert elapsed < 2.0
    assert sidecar.upstream.seen[-1].key_ok


def test_prometheus_scrapes_request_counters_and_no_secret(sidecar: SharedSidecar, tmp_path: Path) -> None:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(binary).exists(), "Debian's prometheus package is needed (hack/system-packages.sh)"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "sidekey-sidecar",
                        "static_configs": [{"targets": [f"127.0.0.1:{sidecar.health_port}"]}],
                    }
                ],
            }
        )
    )
    prom = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prom.log").open("wb"),
    )
    try:

        def query(q: str) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            try:
                status, body = http("GET", url)
            except OSError:
                return []
            if status != 200:
                return []
            result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
            return result

        q = 'sidekey_requests_total{upstream="openai",decision="allowed"}'
        wait_until(lambda: bool(query(q)), 60, "Prometheus to scrape the sidecar", step=0.5)
        allowed = sum(float(r["value"][1]) for r in query(q))
        assert allowed >= 4
        denied = query('sidekey_requests_total{decision="denied"}')
        assert {r["metric"]["code"] for r in denied} >= {"401", "403"}
        assert query('sidekey_token_failures_total{reason="bad_audience"}')
        assert query("sidekey_jwks_refreshes_total")
        status, text = http("GET", f"{sidecar.health_url}/metrics")
        assert status == 200
        for secret in (OPENAI_KEY, ROTATED_KEY, ANTHROPIC_KEY, sidecar.token(), sidecar.api_token):
            assert secret.encode() not in text
        labels = json.dumps([r["metric"] for r in query('{__name__=~"sidekey_.*"}')])
        assert "sk-" not in labels and "eyJ" not in labels
    finally:
        prom.terminate()
        prom.wait(10)


def test_a_policy_edit_that_denies_takes_effect_within_two_seconds(sidecar: SharedSidecar) -> None:
    def chat_status() -> int:
        return http(
            "POST",
            f"{sidecar.url}/openai/chat/completions",
            sidecar.token(),
            json.dumps({"model": "m", "messages": []}).encode(),
            {"Content-Type": "application/json"},
        )[0]

    assert chat_status() == 200
    apply(sidecar.cluster, policy_manifest(sidecar.namespace, sidecar.upstream, ["GET"]))
    elapsed = wait_until(lambda: chat_status() == 403, 2.0, "the denial")
    assert elapsed < 2.0


def test_no_secret_or_token_in_any_log_or_audit_line(sidecar: SharedSidecar) -> None:
    text = sidecar.logs()
    audit = sidecar.running.audit()
    assert audit and {
        "request_id",
        "pod",
        "namespace",
        "service_account",
        "upstream",
        "method",
        "path",
        "status",
        "decision",
        "reason",
        "duration_ms",
    } <= set(audit[-1])
    for secret in (OPENAI_KEY, ROTATED_KEY, ANTHROPIC_KEY, sidecar.token(), sidecar.api_token):
        assert secret not in text


def test_sigterm_drains_an_open_stream_and_exits_zero(sidecar: SharedSidecar) -> None:
    received: list[bytes] = []
    port = int(sidecar.url.rsplit(":", 1)[1])

    def stream() -> None:
        status, body = http("GET", f"{sidecar.url}/openai/slow?n=15", sidecar.token())
        received.append(str(status).encode() + b" " + body)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return True
        return False

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: any(s.path == "/v1/slow" for s in sidecar.upstream.seen), 5, "the stream to start")
    sidecar.process.send_signal(signal.SIGTERM)
    wait_until(refused, 3, "the listener to close")  # no new connections while draining
    assert t.is_alive(), "the stream ended before the drain was observed"
    t.join(15)
    assert sidecar.process.wait(15) == 0
    assert received and received[0].startswith(b"200 ")
    assert received[0].count(b"data: ") == 15  # the whole stream arrived
