"""``helm install`` as docs/install.md says, on a real node running the image ``hack/image`` builds.

tests/chart/test_install.py plays the kubelet (it starts the operator and the
webhook as local processes). Here nothing does: the kubelet starts the chart's
Deployments from the local image (imported into the node's containerd, never
pulled) with the chart's security context (UID 65532, read-only root, no
capabilities); they reach the apiserver through in-cluster config and the
``kubernetes`` Service; the operator issues the webhook's certificate; the
apiserver calls the webhook through its Service (kube-proxy's rules, the
webhook pods' endpoints); ``helm test`` runs its pod. Then the webhook goes
down (scaled to 0): the bypass guard, inside the apiserver, still refuses a
subject's pod without the sidecar, while pods elsewhere start. The module
ends with the documented uninstall.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509

from sidekey.core import contract
from sidekey.localcluster import helm, image, subjects
from tests.node import pods
from tests.support import install
from tests.support.install import documented, run_documented

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(900)]

RELEASE, NAMESPACE = helm.RELEASE, helm.NAMESPACE
OPERATOR, WEBHOOK = f"{RELEASE}-operator", f"{RELEASE}-webhook"
LOCAL_IMAGE_FLAGS = ["--set", f"image.repository={image.REPOSITORY}", "--set", f"image.tag={image.tag()}"]


def _json(cluster: Any, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


def _wait(what: str, probe: Callable[[], Any], timeout: float, diagnose: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose()}")


def _pods_report(cluster: Any, namespace: str = NAMESPACE) -> str:
    """Each pod's phase, container states and last log lines: what says why a Deployment is not Ready."""
    lines = []
    for pod in _json(cluster, "-n", namespace, "get", "pods")["items"]:
        name = pod["metadata"]["name"]
        lines.append(f"--- {name}: {pod['status'].get('phase')}")
        for status in pod["status"].get("containerStatuses", []) + pod["status"].get("initContainerStatuses", []):
            lines.append(f"  {status['name']}: ready={status.get('ready')} restarts={status.get('restartCount')} "
                         f"{json.dumps(status.get('state'))} last={json.dumps(status.get('lastState'))}")
        logs = cluster.kubectl("-n", namespace, "logs", name, "--all-containers", "--tail=15", check=False)
        lines += [f"  | {line}" for line in str(logs).splitlines()]
    lines.append(pods.events(cluster, namespace))
    return "\n".join(lines)


def _ready(cluster: Any, deployment: str, replicas: int) -> bool:
    found = cluster.kubectl("-n", NAMESPACE, "get", "deployment", deployment, "--ignore-not-found", "-o", "json")
    if not found.strip():
        return False
    status = json.loads(found).get("status", {})
    return bool(status.get("readyReplicas", 0) == replicas == status.get("updatedReplicas", 0)
                and status.get("replicas") == replicas)


@pytest.fixture(scope="module")
def local_image(node_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> image.Image:
    built = image.build_sidekey(tmp_path_factory.mktemp("image"))
    began = time.monotonic()
    node_cluster.import_image(built.archive)
    print(f"imported {built.name} into the node's containerd in {time.monotonic() - began:.1f}s")
    return built


@pytest.fixture(scope="module")
def release(node_cluster: Any, local_image: image.Image) -> Iterator[dict[str, Any]]:
    """The documented install with the local image; uninstalled (if still there) at the end."""
    install.adopt_crd(node_cluster, RELEASE, NAMESPACE)  # kept by an earlier release, or from crds/
    began = time.monotonic()
    [output] = run_documented(node_cluster, "install-local-image", helm_timeout=600)
    try:
        yield {"output": output, "installed_at": began}
    finally:
        helm.run("uninstall", RELEASE, "-n", NAMESPACE, "--ignore-not-found", "--wait", env=node_cluster.env(),
                 check=False, timeout=300)
        # Gone before the next module installs the chart again (a Terminating namespace refuses it).
        node_cluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=120s", check=False)


@pytest.fixture(scope="module")
def running(node_cluster: Any, release: dict[str, Any]) -> dict[str, float]:
    """The operator and both webhook replicas Ready; how long that took from `helm install`."""
    _wait("the operator Deployment Ready", lambda: _ready(node_cluster, OPERATOR, 1), 240,
          lambda: _pods_report(node_cluster))
    _wait("both webhook replicas Ready", lambda: _ready(node_cluster, WEBHOOK, 2), 240,
          lambda: _pods_report(node_cluster))
    took = time.monotonic() - release["installed_at"]
    print(f"operator and webhook Ready {took:.1f}s after helm install")
    return {"ready_after": took}


@pytest.fixture(scope="module")
def team(node_cluster: Any, running: dict[str, float]) -> dict[str, str]:
    """A team namespace with a key, a subject account and its AgentPolicy (Ready by the operator)."""
    namespace = subjects.namespace(node_cluster, "team")
    subjects.apply(node_cluster, subjects.service_account(namespace, "agent"),
                   subjects.secret(namespace, "openai-key", {"api-key": "sk-test-not-a-real-key"}),
                   subjects.policy(namespace, "openai", ["agent"], [{
                       "name": "openai", "url": "https://api.openai.example/v1",
                       "auth": {"type": "bearer", "secretRef": {"name": "openai-key", "key": "api-key"}},
                       "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
                       "env": [{"name": "OPENAI_BASE_URL"}]}]))

    def ready() -> bool:
        policy = _json(node_cluster, "-n", namespace, "get", "agentpolicy", "openai")
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in policy.get("status", {}).get("conditions", []))

    _wait("the operator to mark the AgentPolicy Ready", ready, 90, lambda: _pods_report(node_cluster))
    return {"namespace": namespace, "account": "agent"}


def _agent_pod(namespace: str, name: str, account: str, inject: str | None) -> dict[str, Any]:
    annotations = {contract.ANNOTATION_INJECT: inject} if inject is not None else {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
            "spec": {"serviceAccountName": account, "restartPolicy": "Never",
                     "containers": [{"name": "agent", "image": image.reference(), "args": ["--version"],
                                     "securityContext": {"runAsUser": 1000, "runAsNonRoot": True,
                                                         "allowPrivilegeEscalation": False,
                                                         "readOnlyRootFilesystem": True}}]}}


def _create(cluster: Any, manifest: dict[str, Any]) -> tuple[bool, str]:
    """``kubectl create``; (created, what kubectl said)."""
    out = cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(manifest), check=False)
    text = str(out)
    return text.lstrip().startswith("{"), text


# --- install ------------------------------------------------------------------


def test_the_documented_install_is_the_plain_one_with_the_local_image() -> None:
    [plain] = documented("install")
    [local] = documented("install-local-image")
    assert local == plain + LOCAL_IMAGE_FLAGS, shlex.join(local)


def test_the_operator_and_webhook_run_from_the_local_image_as_the_chart_says(
        node_cluster: Any, local_image: image.Image, running: dict[str, float]) -> None:
    for deployment in (OPERATOR, WEBHOOK):
        selector = ",".join(f"{k}={v}" for k, v in _json(node_cluster, "-n", NAMESPACE, "get", "deployment",
                                                         deployment)["spec"]["selector"]["matchLabels"].items())
        items = _json(node_cluster, "-n", NAMESPACE, "get", "pods", "-l", selector)["items"]
        assert items, deployment
        for pod in items:
            [container] = pod["spec"]["containers"]
            assert container["image"] == local_image.name
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert pod["spec"]["securityContext"]["runAsUser"] == contract.SIDECAR_UID
            [status] = pod["status"]["containerStatuses"]
            assert status["ready"] and status["restartCount"] == 0, _pods_report(node_cluster)
            # The kubelet ran what we built: the image ID is the archive's config digest.
            assert status["imageID"] == local_image.config_digest, status["imageID"]


def test_the_operator_issues_the_webhooks_certificate(node_cluster: Any, running: dict[str, float]) -> None:
    secret = _json(node_cluster, "-n", NAMESPACE, "get", "secret", contract.WEBHOOK_TLS_SECRET)
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"][contract.TLS_CERT_KEY]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert f"{WEBHOOK}.{NAMESPACE}.svc" in names
    ca = base64.b64decode(secret["data"][contract.TLS_CA_KEY])
    configuration = _json(node_cluster, "get", "mutatingwebhookconfiguration", contract.WEBHOOK_CONFIGURATION)
    for hook in configuration["webhooks"]:
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca
        assert hook["clientConfig"]["service"]["name"] == WEBHOOK
    # The serving certificate is signed by that CA (what the apiserver checks).
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))


def test_the_apiserver_calls_the_webhook_through_its_service(node_cluster: Any, team: dict[str, str]) -> None:
    created, out = _create(node_cluster, _agent_pod(team["namespace"], "injected", team["account"], "true"))
    assert created, out
    pod = json.loads(out)
    init = {c["name"]: c for c in pod["spec"].get("initContainers", [])}
    sidecar = init.get(contract.SIDECAR_CONTAINER_NAME)
    assert sidecar is not None, pod["spec"]
    assert sidecar["image"] == image.reference()
    assert sidecar["command"] == list(contract.SIDECAR_COMMAND)
    assert sidecar["restartPolicy"] == "Always"
    assert contract.ANNOTATION_STATUS in pod["metadata"]["annotations"]
    agent = next(c for c in pod["spec"]["containers"] if c["name"] == "agent")
    assert {e["name"] for e in agent.get("env", [])} >= {"OPENAI_BASE_URL"}


def test_the_injected_sidecar_runs_from_the_image_before_the_agent(node_cluster: Any, team: dict[str, str]) -> None:
    """The image as a sidecar: read-only root, its own UID, in-cluster config with the injected API token."""
    namespace = team["namespace"]
    pod = pods.wait_for_phase(node_cluster, namespace, "injected", {"Succeeded", "Failed"}, timeout=120)
    report = _pods_report(node_cluster, namespace)
    assert pod["status"]["phase"] == "Succeeded", report
    [sidecar] = [s for s in pod["status"]["initContainerStatuses"] if s["name"] == contract.SIDECAR_CONTAINER_NAME]
    [agent] = pod["status"]["containerStatuses"]
    sidecar_started = sidecar.get("state", {}).get("terminated", {}).get("startedAt") or \
        sidecar.get("lastState", {}).get("terminated", {}).get("startedAt")
    agent_started = agent["state"]["terminated"]["startedAt"]
    assert sidecar_started and sidecar_started <= agent_started, report
    assert agent["state"]["terminated"]["exitCode"] == 0, report
    logs = node_cluster.kubectl("-n", namespace, "logs", "injected", "-c", "agent")
    assert logs.strip() == f"sidekey {image.project_version()}"
    node_cluster.kubectl("-n", namespace, "delete", "pod", "injected", "--wait=false")


def test_helm_test_passes(node_cluster: Any, running: dict[str, float]) -> None:
    try:
        [output] = run_documented(node_cluster, "helm-test", helm_timeout=600)
    except helm.HelmFailed as exc:
        logs = node_cluster.kubectl("-n", NAMESPACE, "logs", f"{RELEASE}-test", check=False)
        pytest.fail(f"{exc}\nthe test pod's log:\n{logs}", pytrace=False)
    assert "Phase:          Succeeded" in output or "Phase: Succeeded" in output.replace("  ", " "), output


def test_helm_upgrade_changes_the_setting_and_the_pods_stay_ready(
        node_cluster: Any, running: dict[str, float]) -> None:
    run_documented(node_cluster, "upgrade", helm_timeout=600)
    configuration = _json(node_cluster, "get", "mutatingwebhookconfiguration", contract.WEBHOOK_CONFIGURATION)
    assert {hook["timeoutSeconds"] for hook in configuration["webhooks"]} == {5}
    values = json.loads(helm.run("get", "values", RELEASE, "-n", NAMESPACE, "-o", "json",
                                 env=node_cluster.env()).stdout)
    assert values["image"] == {"repository": image.REPOSITORY, "tag": image.tag()}  # --reuse-values kept them
    _wait("the operator Ready after the upgrade", lambda: _ready(node_cluster, OPERATOR, 1), 180,
          lambda: _pods_report(node_cluster))
    _wait("the webhook Ready after the upgrade", lambda: _ready(node_cluster, WEBHOOK, 2), 180,
          lambda: _pods_report(node_cluster))


# --- the webhook down ---------------------------------------------------------


def test_with_the_webhook_down_the_guard_refuses_a_subject_pod_and_other_pods_start(
        node_cluster: Any, team: dict[str, str]) -> None:
    node_cluster.kubectl("-n", NAMESPACE, "scale", "deployment", WEBHOOK, "--replicas=0")
    try:
        def gone() -> bool:
            return not _json(node_cluster, "-n", NAMESPACE, "get", "pods", "-l",
                             "app.kubernetes.io/component=webhook")["items"]

        _wait("the webhook pods to stop", gone, 120, lambda: _pods_report(node_cluster))
        # A subject's pod that opts out of injection, or opts in while nobody injects.
        for inject in ("false", None):
            created, out = _create(node_cluster, _agent_pod(team["namespace"], "bare", team["account"], inject))
            assert not created, f"a subject pod without the sidecar was admitted with the webhook down: {out}"
            assert "sidekey-bypass-guard" in out, out
        # Opted in with the webhook down: failurePolicy Fail refuses it too (the webhook is unreachable).
        created, out = _create(node_cluster, _agent_pod(team["namespace"], "optin", team["account"], "true"))
        assert not created, out
        # Everyone else is untouched: a pod in another namespace runs to completion.
        other = subjects.namespace(node_cluster, "other")
        try:
            created, out = _create(node_cluster, _agent_pod(other, "elsewhere", "default", None))
            assert created, out
            pod = pods.wait_for_phase(node_cluster, other, "elsewhere", {"Succeeded", "Failed"}, timeout=90)
            assert pod["status"]["phase"] == "Succeeded", pod["status"]
            logs = node_cluster.kubectl("-n", other, "logs", "elsewhere")
            assert logs.strip() == f"sidekey {image.project_version()}"
        finally:
            node_cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
    finally:
        node_cluster.kubectl("-n", NAMESPACE, "scale", "deployment", WEBHOOK, "--replicas=2")
    _wait("the webhook back", lambda: _ready(node_cluster, WEBHOOK, 2), 180, lambda: _pods_report(node_cluster))


def test_the_operator_and_webhook_logged_no_error_on_the_node(node_cluster: Any, running: dict[str, float]) -> None:
    """In-cluster config, the read-only root, the probes: whatever went wrong would be logged here."""
    for component in ("operator", "webhook"):
        for pod in _json(node_cluster, "-n", NAMESPACE, "get", "pods", "-l",
                         f"app.kubernetes.io/component={component}")["items"]:
            logs = node_cluster.kubectl("-n", NAMESPACE, "logs", pod["metadata"]["name"])
            assert logs.strip(), f"{component} logged nothing"
            bad = [line for line in logs.splitlines()
                   if "Traceback" in line or re.search(r'"level": ?"(error|critical)"', line, re.I)
                   or re.search(r"\bERROR\b", line)]
            assert not bad, f"{pod['metadata']['name']}:\n" + "\n".join(bad[:20])


# --- uninstall ------------------------------------------------------------------


def test_uninstall_leaves_what_the_docs_say(node_cluster: Any, release: dict[str, Any]) -> None:
    run_documented(node_cluster, "uninstall", helm_timeout=600)
    kubectl: Callable[..., str] = node_cluster.kubectl

    def nothing_left() -> bool:
        return not kubectl("-n", NAMESPACE, "get", "deployments,services,pods", "-o", "name").strip()

    _wait("the release's Deployments, Services and pods to go", nothing_left, 120)
    assert not kubectl("get", "mutatingwebhookconfiguration", contract.WEBHOOK_CONFIGURATION,
                       "--ignore-not-found", "-o", "name").strip()
    policies = kubectl("get", "validatingadmissionpolicies,validatingadmissionpolicybindings", "-o", "name")
    assert "sidekey" not in policies, policies
    # What stays: the CRD (resource-policy keep) and the operator's Secrets, which go with the namespace.
    assert kubectl("get", "customresourcedefinition", "agentpolicies.sidekey.io", "-o", "name").strip()
    secrets = kubectl("-n", NAMESPACE, "get", "secrets", "-o", "name").split()
    assert f"secret/{contract.WEBHOOK_TLS_SECRET}" in secrets
