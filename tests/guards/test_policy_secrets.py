"""No pod of a namespace references a Secret that an AgentPolicy there names, whatever its account.

``pods/create`` normally implies reading every Secret of the namespace (a pod
can mount any of them). Once an AgentPolicy names a Secret, the bypass guard
takes that away for every pod: bare or injected, subject or not, through env,
envFrom, a secret volume or a projected one, in any kind of container. The
one escape hatch is the chart value ``guards.policySecretReaders``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from sidekey.core import contract
from tests.guards import admission, manifests

pytestmark = pytest.mark.e2e


def _reference(pod: dict[str, Any], how: str, secret: str = manifests.SECRET,
               where: str = "containers") -> None:
    spec = pod["spec"]
    container = {"name": "reader", "image": manifests.AGENT_IMAGE}
    if where == "containers":
        container = spec["containers"][0]
    elif where == "initContainers":
        spec.setdefault("initContainers", []).append(container)
    elif where == "look-alike-sidecar":
        container["name"] = contract.SIDECAR_CONTAINER_NAME
        container["restartPolicy"] = "Always"
        spec.setdefault("initContainers", []).append(container)
    if how == "env":
        container.setdefault("env", []).append({"name": "KEY", "valueFrom": {
            "secretKeyRef": {"name": secret, "key": "api-key"}}})
    elif how == "envFrom":
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    else:
        source: dict[str, Any] = ({"secret": {"secretName": secret}} if how == "volume"
                                  else {"projected": {"sources": [{"secret": {"name": secret}}]}})
        spec.setdefault("volumes", []).append({"name": "keys", **source})
        container.setdefault("volumeMounts", []).append({"name": "keys", "mountPath": "/keys"})


def _denied(answer: admission.Answer, secret: str = manifests.SECRET, policy: str = "openai") -> None:
    assert not answer.admitted, f"expected a denial, the apiserver admitted it: {answer.message[:300]}"
    assert "bypass-guard" in answer.message, answer.message
    assert secret in answer.message and f"AgentPolicy {policy}" in answer.message, answer.message
    assert "whatever its service account" in answer.message, answer.message


@pytest.mark.parametrize("how", ["env", "envFrom", "volume", "projected"])
@pytest.mark.parametrize("sa", ["bystander", "default"])
def test_a_pod_of_an_account_no_policy_names_may_not_reference_a_policy_secret(
        cluster: Any, subject_namespace: str, how: str, sa: str) -> None:
    pod = manifests.bare_pod(subject_namespace, f"{sa}-{how.lower()}", sa=sa)
    _reference(pod, how)
    _denied(admission.create(cluster, pod, dry_run=True))


@pytest.mark.parametrize("where", ["initContainers", "look-alike-sidecar"])
def test_no_kind_of_container_may_reference_it(cluster: Any, subject_namespace: str, where: str) -> None:
    pod = manifests.bare_pod(subject_namespace, f"in-{where.lower()}", sa="bystander")
    _reference(pod, "envFrom", where=where)
    _denied(admission.create(cluster, pod, dry_run=True))


def test_a_subject_of_one_policy_may_not_reference_another_policys_secret(
        cluster: Any, subject_namespace: str) -> None:
    for obj in (manifests.secret(subject_namespace, "github-token"),
                manifests.agent_policy(subject_namespace, "github", subjects=["someone-else"],
                                       secret_name="github-token")):
        assert admission.apply(cluster, obj).admitted
    pod = manifests.injected_pod(subject_namespace, "cross-policy")
    _reference(pod, "env", secret="github-token")
    answer = admission.create(cluster, pod, dry_run=True)
    deadline = time.monotonic() + 30
    while answer.admitted and time.monotonic() < deadline:  # the new param loads asynchronously
        time.sleep(0.3)
        answer = admission.create(cluster, pod, dry_run=True)
    _denied(answer, secret="github-token", policy="github")


def test_an_ephemeral_container_of_a_bystander_pod_may_not_reference_it(
        cluster: Any, subject_namespace: str) -> None:
    assert admission.create(cluster, manifests.bare_pod(subject_namespace, "bystander-debugged",
                                                        sa="bystander")).admitted
    patch = json.dumps({"spec": {"ephemeralContainers": [{
        "name": "debugger", "image": "busybox", "envFrom": [{"secretRef": {"name": manifests.SECRET}}]}]}})
    answer = admission.kubectl(cluster, "patch", "pod", "bystander-debugged", "-n", subject_namespace,
                               "--subresource=ephemeralcontainers", "--type=strategic", "-p", patch)
    _denied(answer)


def test_other_secrets_stay_usable_by_every_pod(cluster: Any, subject_namespace: str) -> None:
    pod = manifests.bare_pod(subject_namespace, "other-secret", sa="bystander")
    _reference(pod, "envFrom", secret="database")
    answer = admission.create(cluster, pod, dry_run=True)
    assert answer.admitted, answer.message


def test_the_escape_hatch_lets_exactly_the_listed_account_reference_it(
        cluster: Any, subject_namespace: str) -> None:
    listed = manifests.bare_pod(subject_namespace, "legacy", sa="bystander")
    _reference(listed, "envFrom")
    other = manifests.bare_pod(subject_namespace, "not-listed", sa="default")
    _reference(other, "envFrom")
    admission.install_guards(cluster, {"guards": {"policySecretReaders": [f"{subject_namespace}/bystander"]}})
    try:
        answer = admission.create(cluster, listed, dry_run=True)
        deadline = time.monotonic() + 30
        while not answer.admitted and time.monotonic() < deadline:
            time.sleep(0.3)
            answer = admission.create(cluster, listed, dry_run=True)
        assert answer.admitted, answer.message
        _denied(admission.create(cluster, other, dry_run=True))
    finally:
        admission.install_guards(cluster)
