"""The webhook registered with a real kube-apiserver (ServiceAccount admission on).

`sidekey webhook` runs as a subprocess with a certificate for 127.0.0.1 and
is registered with the configuration ``webhook.configuration`` builds (URL
clientConfig plus caBundle). Pods are created with kubectl and read back
from the apiserver, so what is checked is what a kubelet would run.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidekey.core import certificates, contract, policies
from sidekey.webhook import patching, settings, sidecars
from tests.support.namespaces import make_namespace
from tests.support.webhook import E2E_SETTINGS, RunningWebhook, running_webhook

pytestmark = pytest.mark.e2e

SETTINGS = settings.from_mapping(E2E_SETTINGS)


@pytest.fixture(scope="module")
def webhook(cluster: Any, crds: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningWebhook]:
    with running_webhook(cluster, tmp_path_factory.mktemp("webhook")) as hook:
        yield hook


def apply(cluster: Any, manifest: dict[str, Any], *extra: str) -> dict[str, Any]:
    try:
        out = cluster.kubectl("create", "-o", "json", *extra, "-f", "-", input=yaml.safe_dump(manifest))
    except subprocess.CalledProcessError as exc:
        exc.add_note(f"kubectl: {exc.stderr}")
        raise
    doc: dict[str, Any] = json.loads(out)
    return doc


def refused(cluster: Any, manifest: dict[str, Any]) -> str:
    with pytest.raises(subprocess.CalledProcessError) as caught:
        apply(cluster, manifest)
    return str(caught.value.stderr)


def get(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json"))
    return doc


def pod(namespace: str, name: str = "agent", *, sa: str = "agent", inject: str | None = "true",
        annotations: dict[str, str] | None = None, containers: list[dict[str, Any]] | None = None,
        **spec: Any) -> dict[str, Any]:
    notes = dict(annotations or {})
    if inject is not None:
        notes[contract.ANNOTATION_INJECT] = inject
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "annotations": notes},
            "spec": {"serviceAccountName": sa,
                     "initContainers": [{"name": "setup", "image": "busybox"}],
                     "containers": containers or [
                         {"name": "agent", "image": "example.invalid/agent:1"},
                         {"name": "tool", "image": "example.invalid/tool:1",
                          "env": [{"name": "ANTHROPIC_BASE_URL", "value": "https://mine.example.com"}]}],
                     **spec}}


def policy_manifest(namespace: str, name: str = "llm") -> dict[str, Any]:
    return {
        "apiVersion": contract.API_VERSION, "kind": contract.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"subjects": {"serviceAccounts": ["agent"]}, "token": {"expirationSeconds": 900},
                 "upstreams": [
                     {"name": "openai", "url": "https://api.openai.com/v1",
                      "auth": {"type": "bearer", "secretRef": {"name": "openai-key", "key": "api-key"}},
                      "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
                      "env": [{"name": "OPENAI_BASE_URL"}]},
                     {"name": "anthropic", "url": "https://api.anthropic.com",
                      "auth": {"type": "header", "header": {"name": "x-api-key"},
                               "secretRef": {"name": "anthropic-key", "key": "api-key"}},
                      "allow": [{"methods": ["POST"], "paths": ["/v1/messages"]}],
                      "env": [{"name": "ANTHROPIC_BASE_URL"}]}]},
    }


@pytest.fixture
def agents(cluster: Any, webhook: RunningWebhook, namespace: str) -> str:
    """A namespace with an `agent` ServiceAccount and a policy naming it."""
    apply(cluster, {"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "agent", "namespace": namespace}})
    apply(cluster, policy_manifest(namespace))
    return namespace


def _mounts(container: dict[str, Any]) -> set[str]:
    return {m["name"] for m in container.get("volumeMounts") or []}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


# --- Injection ----------------------------------------------------------------


def test_an_annotated_pod_is_stored_with_the_sidecar_and_no_api_token_outside_it(
        cluster: Any, agents: str) -> None:
    apply(cluster, pod(agents))
    stored = get(cluster, agents, "agent")
    spec = stored["spec"]
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not any(n.startswith(contract.KUBE_API_ACCESS_PREFIX) for n in volumes), volumes
    assert volumes[contract.API_TOKEN_VOLUME] == sidecars.api_volume()
    assert volumes[contract.AGENT_TOKEN_VOLUME] == sidecars.agent_token_volume("sidekey", 900)

    sidecar, *rest = spec["initContainers"]
    want = sidecars.container(sidecars.resolve({}, SETTINGS)[0], SETTINGS)
    assert sidecar == want, "the stored sidecar differs from what the webhook injects (a default?)"
    assert [c["name"] for c in rest] == ["setup"]
    for c in [*rest, *spec["containers"]]:
        assert _mounts(c) == {contract.AGENT_TOKEN_VOLUME}, c["name"]
        assert _env(c)[contract.ENV_TOKEN_FILE] == contract.AGENT_TOKEN_PATH
        assert _env(c)[contract.ENV_URL] == "http://127.0.0.1:8787"
    by_name = {c["name"]: c for c in spec["containers"]}
    assert _env(by_name["agent"])["OPENAI_BASE_URL"] == "http://127.0.0.1:8787/openai"
    assert _env(by_name["agent"])["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8787/anthropic"
    assert _env(by_name["tool"])["ANTHROPIC_BASE_URL"] == "https://mine.example.com"  # never overwritten

    status = json.loads(stored["metadata"]["annotations"][contract.ANNOTATION_STATUS])
    assert status["policies"] == ["llm"] and status["tokenExpirationSeconds"] == 900


def test_the_stored_pod_admitted_again_yields_an_empty_patch(cluster: Any, agents: str) -> None:
    apply(cluster, pod(agents))
    stored = get(cluster, agents, "agent")
    policy = json.loads(cluster.kubectl("get", "agentpolicy", "llm", "-n", agents, "-o", "json"))
    assert patching.patch(stored, [policies.parse(policy)], SETTINGS).patch == []


def test_a_user_env_var_is_kept_and_the_creator_is_warned(cluster: Any, agents: str) -> None:
    out = cluster.kubectl("create", "-f", "-", input=yaml.safe_dump(pod(agents)), check=False)
    assert "Warning: container tool already sets ANTHROPIC_BASE_URL" in out, out
    assert get(cluster, agents, "agent")["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME


def test_a_dry_run_create_returns_the_injected_pod_and_stores_nothing(cluster: Any, agents: str) -> None:
    out = apply(cluster, pod(agents, "dry"), "--dry-run=server")
    assert out["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME
    assert cluster.kubectl("get", "pod", "dry", "-n", agents, "--ignore-not-found", "-o", "name") == ""


def test_an_opted_out_pod_is_untouched(cluster: Any, agents: str) -> None:
    apply(cluster, pod(agents, inject="false"))
    stored = get(cluster, agents, "agent")
    assert [c["name"] for c in stored["spec"]["initContainers"]] == ["setup"]
    assert any(v["name"].startswith(contract.KUBE_API_ACCESS_PREFIX) for v in stored["spec"]["volumes"])
    assert contract.ANNOTATION_STATUS not in stored["metadata"]["annotations"]


def _admissions(hook: RunningWebhook) -> float:
    _, text = hook.get("/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sidekey_webhook_admissions_total{"))


def test_a_pod_without_annotation_is_untouched_and_never_sent_to_the_webhook(
        cluster: Any, agents: str, webhook: RunningWebhook) -> None:
    before = _admissions(webhook)
    apply(cluster, pod(agents, inject=None))
    assert [c["name"] for c in get(cluster, agents, "agent")["spec"]["initContainers"]] == ["setup"]
    assert _admissions(webhook) == before, "matchConditions should keep this pod away from the webhook"
    apply(cluster, pod(agents, "in"))
    assert _admissions(webhook) > before


def test_a_labelled_namespace_injects_unless_the_pod_opts_out(cluster: Any, webhook: RunningWebhook) -> None:
    ns = make_namespace(cluster, labels={contract.LABEL_INJECT: contract.LABEL_INJECT_ENABLED})
    try:
        apply(cluster, pod(ns, "plain", sa="default", inject=None))
        apply(cluster, pod(ns, "out", sa="default", inject="false"))
        plain, out = get(cluster, ns, "plain"), get(cluster, ns, "out")
        assert plain["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME
        assert [c["name"] for c in out["spec"]["initContainers"]] == ["setup"]
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_a_pod_stamped_injected_without_the_sidecar_still_gets_it(cluster: Any, agents: str) -> None:
    stamped = pod(agents, annotations={contract.ANNOTATION_STATUS: '{"policies":["llm"]}'})
    apply(cluster, stamped)
    stored = get(cluster, agents, "agent")
    assert stored["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME
    assert not any(v["name"].startswith(contract.KUBE_API_ACCESS_PREFIX) for v in stored["spec"]["volumes"])


def test_a_pod_created_right_after_its_policy_gets_its_env(cluster: Any, webhook: RunningWebhook,
                                                           namespace: str) -> None:
    apply(cluster, {"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "agent", "namespace": namespace}})
    apply(cluster, policy_manifest(namespace, "fresh"))
    apply(cluster, pod(namespace))
    agent = get(cluster, namespace, "agent")["spec"]["containers"][0]
    assert _env(agent)["OPENAI_BASE_URL"] == "http://127.0.0.1:8787/openai"


# --- Refusals -----------------------------------------------------------------

REFUSED = {
    "host-network": ({"hostNetwork": True}, contract.ANNOTATION_ALLOW_HOST_NETWORK),
    "share-process-namespace": ({"shareProcessNamespace": True}, contract.ANNOTATION_ALLOW_SHARED_PROCESS_NAMESPACE),
    "host-pid": ({"hostPID": True}, contract.ANNOTATION_ALLOW_HOST_PID),
    "privileged": ({"containers": [{"name": "agent", "image": "x", "securityContext": {"privileged": True}}]},
                   contract.ANNOTATION_ALLOW_PRIVILEGED),
    "ptrace": ({"containers": [{"name": "agent", "image": "x",
                                "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}}}]},
               contract.ANNOTATION_ALLOW_CAPABILITIES),
    "host-path": ({"volumes": [{"name": "h", "hostPath": {"path": "/etc"}}]}, contract.ANNOTATION_ALLOW_HOST_PATH),
    "sidekey-volume": ({"containers": [{"name": "agent", "image": "x", "volumeMounts": [
        {"name": contract.API_TOKEN_VOLUME, "mountPath": "/api"}]}],
        "volumes": [{"name": contract.API_TOKEN_VOLUME, "emptyDir": {}}]}, "mounts sidekey's volume"),
    "own-api-token": ({"volumes": [{"name": "mine", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}]}}]},
        "only the sidecar may hold an API credential"),
    "policy-secret-env": ({"containers": [{"name": "agent", "image": "x", "env": [
        {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai-key", "key": "api-key"}}}]}]},
        "Secret openai-key"),
    "policy-secret-envfrom": ({"containers": [{"name": "agent", "image": "x",
                                               "envFrom": [{"secretRef": {"name": "anthropic-key"}}]}]},
                              "Secret anthropic-key"),
    "policy-secret-volume": ({"volumes": [{"name": "k", "secret": {"secretName": "openai-key"}}]},
                             "Secret openai-key"),
    "image-not-allowed": ({"__annotations__": {contract.ANNOTATION_IMAGE: "evil.example.com/x:1"}}, "allow-list"),
}


@pytest.mark.parametrize("shape", sorted(REFUSED))
def test_each_refused_shape_is_denied_with_its_message(cluster: Any, agents: str, shape: str) -> None:
    spec, says = REFUSED[shape]
    spec = dict(spec)
    annotations = spec.pop("__annotations__", {})
    stderr = refused(cluster, pod(agents, annotations=annotations, **spec))
    assert "denied the request" in stderr and "sidekey refused this pod" in stderr, stderr
    assert says in stderr, stderr


def test_an_override_annotation_admits_the_risky_shape(cluster: Any, agents: str) -> None:
    apply(cluster, pod(agents, annotations={contract.ANNOTATION_ALLOW_HOST_PID: "true"}, hostPID=True))
    assert get(cluster, agents, "agent")["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME


# --- Ephemeral containers -----------------------------------------------------


def _debug(cluster: Any, namespace: str, target: str) -> subprocess.CompletedProcess[str]:
    """`kubectl debug` itself: it adds an ephemeral container through the subresource."""
    return subprocess.run(
        ["kubectl", f"--kubeconfig={cluster.kubeconfig}", "debug", "agent", "-n", namespace,
         "--image=busybox", f"--target={target}", f"--container=debug-{target}", "--profile=general"],
        capture_output=True, text=True, timeout=60, check=False)


def test_a_kubectl_debug_container_aimed_at_the_sidecar_is_refused(cluster: Any, agents: str) -> None:
    apply(cluster, pod(agents))
    out = _debug(cluster, agents, contract.SIDECAR_CONTAINER_NAME)
    assert out.returncode != 0 and "targets the sidecar" in out.stderr, out.stderr
    ok = _debug(cluster, agents, "agent")
    assert ok.returncode == 0, ok.stderr
    names = [c["name"] for c in get(cluster, agents, "agent")["spec"]["ephemeralContainers"]]
    assert names == ["debug-agent"]


# --- Certificate rotation -----------------------------------------------------


def test_a_rotated_certificate_is_served_without_a_restart(cluster: Any, agents: str,
                                                           webhook: RunningWebhook) -> None:
    before = webhook.served_serial()
    fresh = certificates.issue(webhook.ca, "sidekey-webhook", ip_addresses=["127.0.0.1"])
    for name, data in (("tls.key", fresh.key_pem), ("tls.crt", fresh.cert_pem)):
        tmp = webhook.tls_dir / f".{name}"
        tmp.write_bytes(data)
        tmp.replace(webhook.tls_dir / name)
    deadline = time.monotonic() + 10
    while webhook.served_serial() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert webhook.served_serial() == fresh.certificate.serial_number
    assert webhook.process.running
    apply(cluster, pod(agents))
    assert get(cluster, agents, "agent")["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME


# --- Failure policy -----------------------------------------------------------


def test_with_the_webhook_stopped_only_opted_in_pods_are_refused(
        cluster: Any, crds: list[str], namespace: str, tmp_path: Path) -> None:
    with running_webhook(cluster, tmp_path) as hook:
        hook.process.stop()
        apply(cluster, pod(namespace, "plain", sa="default", inject=None))
        apply(cluster, pod(namespace, "out", sa="default", inject="false"))
        deadline = time.monotonic() + 10
        stderr = ""
        while time.monotonic() < deadline:
            try:
                apply(cluster, pod(namespace, "in", sa="default"))
            except subprocess.CalledProcessError as exc:
                stderr = exc.stderr
                break
            cluster.kubectl("delete", "pod", "in", "-n", namespace, "--wait=false")
            time.sleep(0.5)
        assert "failed calling webhook" in stderr, stderr
        assert cluster.kubectl("get", "pod", "in", "-n", namespace, "--ignore-not-found", "-o", "name") == ""
