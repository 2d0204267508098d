"""An insecure (plain http) upstream: agent containers cannot sniff the pod's loopback.

The key crosses ``lo`` in the clear on its way to a plain-http upstream, and
with CAP_NET_RAW (in containerd's default set) an AF_PACKET socket reads it.
The webhook drops NET_RAW and NET_ADMIN from every agent container of such a
pod; the guard refuses a subject pod whose agents keep or add them.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.guards import admission, manifests

pytestmark = pytest.mark.e2e


@pytest.fixture
def insecure_namespace(cluster: Any, guards: str, namespace: str) -> tuple[str, dict[str, Any]]:
    policy = manifests.agent_policy(namespace, "local-llm", url="http://ollama.models.svc:11434")
    policy["spec"]["upstreams"][0]["insecure"] = True
    for obj in (manifests.service_account(namespace, "agent"), manifests.secret(namespace), policy):
        answer = admission.apply(cluster, obj)
        assert answer.admitted, answer.message
    assert not admission.wait_until_enforced(cluster, manifests.bare_pod(namespace, "probe")).admitted
    return namespace, policy


def _pod(namespace: str, policy: dict[str, Any], name: str) -> dict[str, Any]:
    pod = manifests.injected_pod(namespace, name, policy_list=[policy])
    pod["spec"].setdefault("initContainers", []).append(
        {"name": "setup", "image": manifests.AGENT_IMAGE, "securityContext": {"capabilities": {"drop": ["CHOWN"]}}})
    return pod


def _denied(answer: admission.Answer, container: str) -> None:
    assert not answer.admitted, f"expected a denial, the apiserver admitted it: {answer.message[:300]}"
    assert "bypass-guard" in answer.message, answer.message
    assert f"container(s) {container}" in answer.message and "NET_RAW" in answer.message, answer.message
    assert "upstream openai" in answer.message, answer.message


def test_the_webhook_drops_the_capabilities_and_the_guard_admits_the_pod(
        cluster: Any, insecure_namespace: tuple[str, dict[str, Any]]) -> None:
    ns, policy = insecure_namespace
    pod = manifests.injected_pod(ns, "dropped", policy_list=[policy])
    assert manifests.agent(pod)["securityContext"]["capabilities"]["drop"] == ["NET_ADMIN", "NET_RAW"]
    answer = admission.create(cluster, pod, dry_run=True)
    assert answer.admitted, answer.message


def test_an_agent_that_keeps_net_raw_is_refused(cluster: Any, insecure_namespace: tuple[str, dict[str, Any]]) -> None:
    ns, policy = insecure_namespace
    pod = manifests.injected_pod(ns, "kept", policy_list=[policy])
    manifests.agent(pod)["securityContext"]["capabilities"]["drop"] = ["NET_ADMIN"]
    _denied(admission.create(cluster, pod, dry_run=True), "agent")


def test_an_init_container_that_never_dropped_them_is_refused(
        cluster: Any, insecure_namespace: tuple[str, dict[str, Any]]) -> None:
    ns, policy = insecure_namespace
    _denied(admission.create(cluster, _pod(ns, policy, "init-keeps"), dry_run=True), "setup")


@pytest.mark.parametrize("cap", ["NET_RAW", "cap_net_admin", "ALL"])
def test_an_agent_that_adds_a_sniffing_capability_back_is_refused(
        cluster: Any, insecure_namespace: tuple[str, dict[str, Any]], cap: str) -> None:
    ns, policy = insecure_namespace
    pod = manifests.injected_pod(ns, f"adds-{cap.lower().replace('_', '-')}", policy_list=[policy])
    manifests.agent(pod)["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": [cap]}
    _denied(admission.create(cluster, pod, dry_run=True), "agent")


def test_an_agent_that_drops_all_passes(cluster: Any, insecure_namespace: tuple[str, dict[str, Any]]) -> None:
    ns, policy = insecure_namespace
    pod = manifests.injected_pod(ns, "drops-all", policy_list=[policy])
    manifests.agent(pod)["securityContext"] = {"capabilities": {"drop": ["ALL"]}}
    answer = admission.create(cluster, pod, dry_run=True)
    assert answer.admitted, answer.message


def test_with_https_upstreams_only_nothing_is_dropped_or_required(cluster: Any, subject_namespace: str) -> None:
    pod = manifests.injected_pod(subject_namespace, "secure-upstream")
    assert "securityContext" not in manifests.agent(pod)
    deadline = time.monotonic() + 5
    answer = admission.create(cluster, pod, dry_run=True)
    while not answer.admitted and time.monotonic() < deadline:
        time.sleep(0.3)
        answer = admission.create(cluster, pod, dry_run=True)
    assert answer.admitted, answer.message
