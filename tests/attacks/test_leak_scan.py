"""The leak scan: run the flows with distinctive secrets, then search everywhere they could leak.

The attacker's world's Secret holds canary values (``world.KEYS``) whose raw,
URL-encoded and base64 forms are all distinct. With the real operator and
webhook running, the test drives every kind of flow through the sidecar
(allowed calls on every auth type, streams, echoing upstreams, denials,
forged tokens, refused hosts, an unusable credential), creates an injected
pod through the webhook and a policy whose Secret key is missing, and lets
the operator reconcile. Then it searches every log, audit line, metrics
page, error body, Event, policy status, RBAC object and stored pod spec for
any form of any canary, and for the tokens: zero hits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sidekey.core import contract
from tests.attacks import leaks, world
from tests.attacks.world import World
from tests.guards import admission
from tests.support.operator import RunningOperator, start_operator
from tests.support.webhook import RunningWebhook, running_webhook

pytestmark = pytest.mark.e2e


@dataclass
class Scan:
    w: World
    operator: RunningOperator
    hook: RunningWebhook
    responses: list[bytes] = field(default_factory=list)

    def needles(self) -> dict[bytes, str]:
        found: dict[bytes, str] = {}
        for name, value in world.KEYS.items():
            if len(value) >= 12:
                found.update({f: f"key {name}" for f in leaks.forms(value)})
        found.update({f: "basic pair" for f in leaks.basic_forms(world.KEYS["username"], world.KEYS["password"])})
        found.update({f: "OAuth2 access token" for f in leaks.forms(world.ACCESS_TOKEN)})
        for name, token in (("agent token", self.w.token), ("api token", self.w.sidecar.api_token)):
            found[token.encode()] = name
            found[token.split(".")[2].encode()] = f"{name} signature"
        return found


def _flows(w: World) -> list[bytes]:
    """Every kind of request, answered every way; the raw answers are kept for the scan."""
    answers = []
    targets = [
        "/openai/models", "/openai/stream?n=3&gap=0.01", "/openai/redirect", "/openai/admin",
        "/openai/../x", "/nope/models", "/via-localhost/models", "/slowpoke/slow?s=0.1",
        *(f"/{r}/leak/{e}" for r in ("bearer-leak", "query-leak", "header-leak", "basic-leak", "oauth-leak")
          for e in ("body", "header", "location", "reason")),
        "/query-leak/leak/body?key=attacker-supplied",
    ]
    for target in targets:
        answers.append(w.request(target, w.token).raw)
    answers.append(w.request("/openai/chat/completions", w.token, method="POST", body=b'{"model":"m"}').raw)
    answers.append(w.request("/openai/models", None).raw)
    answers.append(w.request("/openai/models", w.token[:-4] + "AAAA").raw)
    answers.append(w.request("/openai/models", w.sidecar.api_token).raw)
    answers.append(w.request("/openai/models", None, headers={"x-api-key": w.token + "x"}).raw)
    return answers


@pytest.fixture(scope="module")
def scan(cluster: Any, attack_world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scan]:
    w = attack_world
    workdir = tmp_path_factory.mktemp("leak-scan")
    op = start_operator(cluster, workdir, "--sidecar-image", "ghcr.io/sidekey/sidekey:0.1.0")
    try:
        with running_webhook(cluster, workdir / "webhook") as hook:
            s = Scan(w, op, hook)
            s.responses.extend(_flows(w))
            # a policy the operator must report on: its Secret key does not exist
            broken = world.policy_manifest(w.namespace, [{
                "name": "broken-route", "url": "https://api.example.com", "auth": {
                    "type": "bearer", "secretRef": {"name": world.SECRET_NAME, "key": "no-such-key"}},
                "allow": [{"methods": ["GET"], "paths": ["/**"]}]}], name="broken")
            world.apply(cluster, broken)
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "scanned", "namespace": w.namespace,
                                "annotations": {contract.ANNOTATION_INJECT: "true"}},
                   "spec": {"serviceAccountName": world.SA,
                            "containers": [{"name": "agent", "image": "example.invalid/agent:1"}]}}
            deadline = time.monotonic() + 20
            answer = admission.create(cluster, pod)
            while not answer.admitted and time.monotonic() < deadline:  # the webhook config loads async
                time.sleep(0.5)
                answer = admission.create(cluster, pod)
            assert answer.admitted, answer.message
            s.responses.extend(_flows(w))  # again, now that the operator has reconciled
            world.wait_until(lambda: _statuses_written(cluster, w.namespace), 30, "the operator's status")
            time.sleep(1.5)  # the sidecar flushes audit lines every second
            yield s
    finally:
        op.stop()
        cluster.kubectl("delete", "agentpolicy", "broken", "-n", w.namespace, "--ignore-not-found")
        cluster.kubectl("delete", "pod", "scanned", "-n", w.namespace, "--ignore-not-found", "--wait=false")
        cluster.kubectl("delete", "namespace", op.namespace, "--wait=false", check=False)


def _statuses_written(cluster: Any, namespace: str) -> bool:
    items = json.loads(cluster.kubectl("get", "agentpolicies", "-n", namespace, "-o", "json"))["items"]
    return len(items) >= 2 and all((p.get("status") or {}).get("conditions") for p in items)


def _sources(s: Scan, cluster: Any) -> dict[str, bytes]:
    def kubectl(*args: str) -> bytes:
        return str(cluster.kubectl(*args)).encode()

    return {
        "sidecar logs and audit lines": s.w.sidecar.logs().encode(),
        "sidecar metrics": world.get(s.w.sidecar.health_port, "/metrics", None).raw,
        "answers to the agent": b"\n".join(s.responses),
        "operator logs": s.operator.output().encode(),
        "operator metrics": s.operator.metrics().encode(),
        "webhook logs": Path(s.hook.process.log).read_bytes(),
        "webhook metrics": s.hook.get("/metrics")[1].encode(),
        "Events": kubectl("get", "events", "-A", "-o", "json"),
        "AgentPolicies and their status": kubectl("get", "agentpolicies", "-A", "-o", "json"),
        "stored pod specs": kubectl("get", "pods", "-A", "-o", "json"),
        "Roles and RoleBindings": kubectl("get", "roles,rolebindings", "-A", "-o", "json"),
        "ConfigMaps": kubectl("get", "configmaps", "-A", "-o", "json"),
    }


def test_the_flows_really_carried_the_keys(scan: Scan) -> None:
    """Without this the scan could find nothing because nothing secret ever moved."""
    sent = b"".join(s.raw_path.encode() + json.dumps(s.headers).encode() for s in scan.w.upstream.seen)
    for name in ("openai", "query", "header"):
        assert leaks.find(sent, leaks.forms(world.KEYS[name])), f"the upstream never received key {name}"
    statuses = json.loads(scan.w.cluster.kubectl("get", "agentpolicies", "-n", scan.w.namespace, "-o", "json"))
    assert "no-such-key" in json.dumps(statuses), "the broken policy's status does not name the missing key"


SOURCES = ["sidecar logs and audit lines", "sidecar metrics", "answers to the agent", "operator logs",
           "operator metrics", "webhook logs", "webhook metrics", "Events", "AgentPolicies and their status",
           "stored pod specs", "Roles and RoleBindings", "ConfigMaps"]


@pytest.mark.parametrize("source", SOURCES)
def test_no_form_of_any_secret_or_token_appears(cluster: Any, scan: Scan, source: str) -> None:
    text = _sources(scan, cluster)[source]
    assert text, f"{source} is empty: the scan would prove nothing"
    needles = scan.needles()
    hits = leaks.find(text, needles)
    assert hits == [], f"{source}: {sorted({needles[h] for h in hits})} found"
