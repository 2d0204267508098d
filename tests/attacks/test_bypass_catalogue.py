"""The bypass catalogue: every way a pod could run as a subject account while holding an API token.

On the real apiserver, with both guards applied from ``helm template`` and the
real ``sidekey webhook`` registered. Each case asks the apiserver and reads
its answer: refused, and nothing stored. A control case shows the ordinary
path (an annotated pod through the webhook) is admitted, so the refusals are
not a cluster that refuses everything.

At the end every stored pod in the cluster that carries the sidecar is read
back, and no container but the sidecar may mount an API-audience token.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidekey.core import contract
from tests.guards import admission, manifests
from tests.support.namespaces import make_namespace
from tests.support.webhook import RunningWebhook, running_webhook

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def guarded(cluster: Any, crds: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, RunningWebhook]]:
    """Guards, a running webhook, and a namespace whose ``agent`` account is a policy subject."""
    text = admission.install_guards(cluster)
    namespace = make_namespace(cluster, "skbypass")
    try:
        with running_webhook(cluster, tmp_path_factory.mktemp("bypass-webhook")) as hook:
            for obj in (manifests.service_account(namespace, "agent"), manifests.secret(namespace),
                        manifests.agent_policy(namespace)):
                assert admission.apply(cluster, obj).admitted
            answer = admission.wait_until_enforced(cluster, manifests.bare_pod(namespace, "probe"))
            assert not answer.admitted, "the bypass guard did not take effect within 30 s"
            _wait_for_webhook(cluster, namespace)
            yield namespace, hook
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        admission.remove_guards(cluster, text)


def _wait_for_webhook(cluster: Any, namespace: str) -> None:
    probe = manifests.bare_pod(namespace, "webhook-probe", annotations={contract.ANNOTATION_INJECT: "true"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = admission.create(cluster, probe, dry_run=True)
        if answer.admitted and answer.obj and answer.obj["spec"].get("initContainers"):
            return
        time.sleep(0.3)
    raise AssertionError("the webhook configuration was not live within 20 s")


def _injected_through_the_webhook(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    pod = manifests.bare_pod(namespace, name, annotations={contract.ANNOTATION_INJECT: "true"})
    answer = admission.create(cluster, pod)
    assert answer.admitted and answer.obj, answer.message
    return answer.obj


def _without_webhook(pod: dict[str, Any]) -> dict[str, Any]:
    """A hand-made injected-looking pod: no inject annotation, so the webhook never sees it."""
    pod["metadata"]["annotations"].pop(contract.ANNOTATION_INJECT, None)
    return pod


def _hand_injected(ns: str, name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    pod = _without_webhook(manifests.injected_pod(ns, name))
    change(pod)
    return pod


def _api_token_volume(pod: dict[str, Any]) -> None:
    pod["spec"]["volumes"].append({"name": "my-api-token", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}]}})
    manifests.agent(pod)["volumeMounts"].append({"name": "my-api-token", "mountPath": "/var/run/t"})


def _mount_sidecar_volume(pod: dict[str, Any]) -> None:
    manifests.agent(pod)["volumeMounts"].append(
        {"name": contract.API_TOKEN_VOLUME, "mountPath": "/stolen", "readOnly": True})


def _secret_env(pod: dict[str, Any]) -> None:
    manifests.agent(pod)["env"].append({"name": "KEY", "valueFrom": {
        "secretKeyRef": {"name": manifests.SECRET, "key": "api-key"}}})


def _secret_env_from(pod: dict[str, Any]) -> None:
    manifests.agent(pod)["envFrom"] = [{"secretRef": {"name": manifests.SECRET}}]


def _secret_volume(pod: dict[str, Any]) -> None:
    pod["spec"]["volumes"].append({"name": "k", "secret": {"secretName": manifests.SECRET}})
    manifests.agent(pod)["volumeMounts"].append({"name": "k", "mountPath": "/k"})


def _doctored_image(pod: dict[str, Any]) -> None:
    manifests.sidecar(pod)["image"] = "evil.example/sidekey:0.1.0"


def _automount_on(pod: dict[str, Any]) -> None:
    pod["spec"]["automountServiceAccountToken"] = True


def _agent_as_second_sidecar(pod: dict[str, Any]) -> None:
    twin = copy.deepcopy(manifests.sidecar(pod))
    twin["name"] = "sidekey-proxy-2"
    twin["image"] = manifests.AGENT_IMAGE
    pod["spec"]["initContainers"].append(twin)


def _sidecar_as_regular_container(pod: dict[str, Any]) -> None:
    sidecar = pod["spec"]["initContainers"].pop(0)
    sidecar.pop("restartPolicy")
    sidecar["image"] = manifests.AGENT_IMAGE
    pod["spec"]["containers"].append(sidecar)


#: id -> a pod manifest builder (namespace -> pod). Every one must be refused.
POD_CASES: dict[str, Callable[[str], dict[str, Any]]] = {
    "bare-pod": lambda ns: manifests.bare_pod(ns, "bare"),
    "inject-false": lambda ns: manifests.bare_pod(ns, "opted-out", annotations={contract.ANNOTATION_INJECT: "false"}),
    "pre-stamped-status-annotation": lambda ns: manifests.bare_pod(
        ns, "stamped", annotations={contract.ANNOTATION_STATUS: '{"injected":true,"policies":["openai"]}'}),
    "stamped-and-opted-out": lambda ns: manifests.bare_pod(ns, "stamped-out", annotations={
        contract.ANNOTATION_STATUS: '{"injected":true}', contract.ANNOTATION_INJECT: "false"}),
    "doctored-sidecar-image": lambda ns: _hand_injected(ns, "doctored", _doctored_image),
    "image-annotation-outside-the-allow-list": lambda ns: manifests.bare_pod(ns, "image-note", annotations={
        contract.ANNOTATION_INJECT: "true", contract.ANNOTATION_IMAGE: "evil.example/sidekey:0.1.0"}),
    "agent-mounts-the-sidecars-api-volume": lambda ns: _hand_injected(ns, "mounts-api", _mount_sidecar_volume),
    "agent-with-its-own-api-token-projection": lambda ns: _hand_injected(ns, "own-token", _api_token_volume),
    "agent-reads-the-secret-by-env": lambda ns: _hand_injected(ns, "secret-env", _secret_env),
    "agent-reads-the-secret-by-envfrom": lambda ns: _hand_injected(ns, "secret-envfrom", _secret_env_from),
    "agent-reads-the-secret-by-volume": lambda ns: _hand_injected(ns, "secret-volume", _secret_volume),
    "automount-left-on": lambda ns: _hand_injected(ns, "automount", _automount_on),
    "a-second-sidecar-named-like-ours": lambda ns: _hand_injected(ns, "twin", _agent_as_second_sidecar),
    "sidecar-as-a-regular-container": lambda ns: _hand_injected(ns, "regular", _sidecar_as_regular_container),
}


NO_SIDECAR = "must run with the sidekey sidecar"
API_TOKEN = "only the sidekey-proxy sidecar may hold it"
SECRET_REF = "reference a Secret of that policy"
#: What each refusal must say (the guard's or the webhook's own words).
WHY = {
    "bare-pod": NO_SIDECAR, "inject-false": NO_SIDECAR, "pre-stamped-status-annotation": NO_SIDECAR,
    "stamped-and-opted-out": NO_SIDECAR, "sidecar-as-a-regular-container": NO_SIDECAR,
    "doctored-sidecar-image": "is not on the sidekey chart's allow-list",
    "image-annotation-outside-the-allow-list": "is not on the sidecar image allow-list",
    "agent-mounts-the-sidecars-api-volume": API_TOKEN, "agent-with-its-own-api-token-projection": API_TOKEN,
    "a-second-sidecar-named-like-ours": API_TOKEN,
    "agent-reads-the-secret-by-env": SECRET_REF, "agent-reads-the-secret-by-envfrom": SECRET_REF,
    "agent-reads-the-secret-by-volume": SECRET_REF,
    "automount-left-on": "must set automountServiceAccountToken: false",
}


def test_control_an_annotated_pod_through_the_webhook_is_admitted(
        cluster: Any, guarded: tuple[str, RunningWebhook]) -> None:
    ns, _ = guarded
    stored = _injected_through_the_webhook(cluster, ns, "control")
    assert stored["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME


@pytest.mark.parametrize("case", list(POD_CASES))
def test_a_pod_that_would_hold_an_api_token_as_a_subject_is_refused(
        cluster: Any, guarded: tuple[str, RunningWebhook], case: str) -> None:
    ns, _ = guarded
    pod = POD_CASES[case](ns)
    answer = admission.create(cluster, pod)
    assert not answer.admitted, f"{case} was admitted:\n{json.dumps(answer.obj)[:1500]}"
    assert WHY[case] in answer.message, answer.message
    assert not admission.exists(cluster, "pod", ns, pod["metadata"]["name"])


def _ephemeral(cluster: Any, ns: str, pod: str, container: dict[str, Any]) -> admission.Answer:
    stored = json.loads(cluster.kubectl("get", "pod", pod, "-n", ns, "-o", "json"))
    stored["spec"]["ephemeralContainers"] = [*stored["spec"].get("ephemeralContainers", []), container]
    return admission.kubectl(cluster, "replace", "--subresource=ephemeralcontainers", "-o", "json", "-f", "-",
                             input=json.dumps(stored))


EPHEMERAL_CASES: dict[str, dict[str, Any]] = {
    "debug-container-aimed-at-the-sidecar": {
        "name": "dbg", "image": "busybox", "targetContainerName": contract.SIDECAR_CONTAINER_NAME},
    "debug-container-mounting-the-sidecars-api-volume": {
        "name": "dbg2", "image": "busybox",
        "volumeMounts": [{"name": contract.API_TOKEN_VOLUME, "mountPath": "/t"}]},
    "debug-container-reading-the-secret": {
        "name": "dbg3", "image": "busybox", "envFrom": [{"secretRef": {"name": manifests.SECRET}}]},
}


@pytest.mark.parametrize("case", list(EPHEMERAL_CASES))
def test_an_ephemeral_container_that_reaches_the_sidecar_or_its_token_is_refused(
        cluster: Any, guarded: tuple[str, RunningWebhook], case: str) -> None:
    ns, _ = guarded
    name = f"eph-{list(EPHEMERAL_CASES).index(case)}"
    _injected_through_the_webhook(cluster, ns, name)
    answer = _ephemeral(cluster, ns, name, EPHEMERAL_CASES[case])
    assert not answer.admitted, f"{case} was admitted"
    stored = json.loads(cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json"))
    assert not stored["spec"].get("ephemeralContainers")


def test_kubectl_debug_aimed_at_the_sidecar_is_refused(cluster: Any, guarded: tuple[str, RunningWebhook]) -> None:
    ns, _ = guarded
    _injected_through_the_webhook(cluster, ns, "kubectl-debug")
    answer = admission.kubectl(cluster, "debug", "-n", ns, "kubectl-debug", "--image=busybox",
                               f"--target={contract.SIDECAR_CONTAINER_NAME}", "-c", "dbg")
    assert not answer.admitted, answer.message


def _api_audience_volumes(pod: dict[str, Any], issuer: str) -> set[str]:
    """Volumes that give a container a credential the apiserver accepts."""
    names: set[str] = set()
    for v in pod["spec"].get("volumes") or []:
        if v["name"].startswith(contract.KUBE_API_ACCESS_PREFIX):
            names.add(v["name"])
        for src in (v.get("projected") or {}).get("sources") or []:
            sat = src.get("serviceAccountToken")
            if sat is not None and sat.get("audience") in (None, "", issuer, "https://kubernetes.default.svc"):
                names.add(v["name"])
        if "secret" in v:
            names.add(v["name"])  # a service-account-token Secret is one; any Secret is suspect here
    return names


def test_no_stored_injected_pod_gives_an_api_token_to_any_container_but_the_sidecar(
        cluster: Any, guarded: tuple[str, RunningWebhook]) -> None:
    ns, _ = guarded
    # a few more shapes through the webhook: several containers, init containers, a labelled namespace
    many = manifests.bare_pod(ns, "many", annotations={contract.ANNOTATION_INJECT: "true"})
    many["spec"]["initContainers"] = [{"name": "setup", "image": "busybox"}]
    many["spec"]["containers"].append({"name": "tool", "image": "example.invalid/tool:1"})
    assert admission.create(cluster, many).admitted
    pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json"))["items"]
    injected = [p for p in pods if any(c["name"] == contract.SIDECAR_CONTAINER_NAME
                                       for c in p["spec"].get("initContainers") or [])]
    assert len(injected) >= 2
    for pod in injected:
        where = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        credential_volumes = _api_audience_volumes(pod, cluster.issuer)
        assert pod["spec"].get("automountServiceAccountToken") is False, where
        for c in [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"],
                  *(pod["spec"].get("ephemeralContainers") or [])]:
            if c["name"] == contract.SIDECAR_CONTAINER_NAME:
                continue
            mounted = {m["name"] for m in c.get("volumeMounts") or []}
            assert not mounted & credential_volumes, f"{where}: {c['name']} mounts {mounted & credential_volumes}"
            assert not mounted & {contract.API_TOKEN_VOLUME}, where


@pytest.mark.parametrize("failure_policy", ["Ignore", "Fail"])
def test_with_the_webhook_down_an_opted_in_subject_pod_is_never_created_without_its_sidecar(
        cluster: Any, guarded: tuple[str, RunningWebhook], failure_policy: str, tmp_path: Path) -> None:
    ns, hook = guarded
    hook.process.stop()
    config = json.loads(cluster.kubectl("get", "mutatingwebhookconfiguration", hook.config_name, "-o", "json"))
    for entry in config["webhooks"]:
        entry["failurePolicy"] = failure_policy
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        config["metadata"].pop(key, None)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(config))
    time.sleep(2)  # the apiserver reloads webhook configurations asynchronously
    name = f"down-{failure_policy.lower()}"
    pod = manifests.bare_pod(ns, name, annotations={contract.ANNOTATION_INJECT: "true"})
    answer = admission.create(cluster, pod)
    assert not answer.admitted, answer.message
    assert not admission.exists(cluster, "pod", ns, name)
    if failure_policy == "Ignore":
        assert "sidekey.io/inject" in answer.message, answer.message  # the guard's own refusal


# --- escalation: a policy author who may not read the Secret cannot point the key elsewhere ---------

MALLORY = "mallory"


@pytest.fixture(scope="module")
def mallory(cluster: Any, guarded: tuple[str, RunningWebhook]) -> str:
    """``mallory`` may write AgentPolicies in the guarded namespace, not read its Secrets."""
    ns, _ = guarded
    for obj in [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "policy-editor", "namespace": ns},
         "rules": [{"apiGroups": [contract.GROUP], "resources": [contract.PLURAL],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "policy-editor", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "policy-editor"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": MALLORY}]},
        manifests.service_account(ns, "mallory-bot"),
    ]:
        assert admission.apply(cluster, obj).admitted
    deadline = time.monotonic() + 20
    while not cluster.kubectl("auth", "can-i", "create", f"{contract.PLURAL}.{contract.GROUP}", "-n", ns,
                              f"--as={MALLORY}", check=False).strip().startswith("yes"):
        assert time.monotonic() < deadline, "RBAC for mallory did not apply"
        time.sleep(0.2)
    return ns


def _edit(policy: dict[str, Any], change: str) -> dict[str, Any]:
    edited = copy.deepcopy(policy)
    up = edited["spec"]["upstreams"][0]
    if change == "url-to-the-attackers-host":
        up["url"] = "https://attacker.example/v1"
    elif change == "own-account-as-subject":
        edited["spec"]["subjects"]["serviceAccounts"].append("mallory-bot")
    elif change == "allow-every-path":
        up["allow"] = [{"methods": ["*"], "paths": ["/**"]}]
    return edited


ESCALATIONS = ["new-policy-naming-the-secret", "url-to-the-attackers-host", "own-account-as-subject",
               "allow-every-path"]


@pytest.mark.parametrize("case", ESCALATIONS)
def test_a_policy_author_who_cannot_read_the_secret_cannot_redirect_its_key(
        cluster: Any, mallory: str, case: str) -> None:
    ns = mallory
    if case == "new-policy-naming-the-secret":
        manifest = manifests.agent_policy(ns, "mallorys", subjects=["mallory-bot"], url="https://attacker.example")
        answer = admission.create(cluster, manifest, as_user=MALLORY)
    else:
        stored = json.loads(cluster.kubectl("get", "agentpolicy", "openai", "-n", ns, "-o", "json"))
        answer = admission.kubectl(cluster, "replace", "-o", "json", "-f", "-",
                                   input=json.dumps(_edit(stored, case)), as_user=MALLORY)
    assert not answer.admitted, f"{case} was admitted"
    assert manifests.SECRET in answer.message, answer.message
    stored = json.loads(cluster.kubectl("get", "agentpolicy", "openai", "-n", ns, "-o", "json"))
    assert stored["spec"]["upstreams"][0]["url"] == "https://api.openai.com/v1"
    assert stored["spec"]["subjects"]["serviceAccounts"] == ["agent"]


def test_the_count_of_bypass_cases() -> None:
    assert len(POD_CASES) + len(EPHEMERAL_CASES) + 1 + 2 >= 7
