"""The guards with the real webhook registered: injected pods pass, a stopped webhook fails closed.

The webhook runs as a local process (``sidekey webhook``) with the settings the
chart renders, and the chart's own MutatingWebhookConfiguration is registered
with one change: its clientConfig is a URL on 127.0.0.1, because this control
plane has no kube-proxy to reach a Service (tests/chart covers the Service path).
"""

from __future__ import annotations

import base64
import copy
import shutil
import ssl
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidekey.core import certificates, contract
from sidekey.localcluster import helm, processes
from tests.guards import admission, manifests

pytestmark = pytest.mark.e2e


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LocalWebhook:
    process: processes.Process
    port: int
    configuration: dict[str, Any]


def _sidekey() -> str:
    found = shutil.which("sidekey", path=str(Path(sys.executable).parent))
    assert found, "the sidekey console script is not installed in the venv"
    return found


def _wait_ready(port: int, ca_file: Path, proc: processes.Process, timeout: float = 30.0) -> None:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=ctx, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the webhook was not ready within {timeout}s:\n{proc.tail()}")


def url_configuration(port: int, ca_pem: bytes, failure_policy: str) -> dict[str, Any]:
    """The chart's MutatingWebhookConfiguration, with URL clientConfigs on 127.0.0.1."""
    [rendered] = helm.template(show_only=["templates/webhook-mutatingwebhookconfiguration.yaml"])
    config = copy.deepcopy(rendered)
    for hook in config["webhooks"]:
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}",
                                "caBundle": base64.b64encode(ca_pem).decode()}
        hook["failurePolicy"] = failure_policy
    return config


@pytest.fixture
def webhook(cluster: Any, guards: str, tmp_path: Path) -> Iterator[LocalWebhook]:
    ca = certificates.make_ca("sidekey-test-ca")
    serving = certificates.issue(ca, "127.0.0.1", ip_addresses=["127.0.0.1"])
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    (tls_dir / contract.TLS_CERT_KEY).write_bytes(serving.cert_pem)
    (tls_dir / contract.TLS_KEY_KEY).write_bytes(serving.key_pem)
    (tls_dir / contract.TLS_CA_KEY).write_bytes(ca.cert_pem)
    [settings_map] = helm.template(show_only=["templates/webhook-configmap.yaml"])
    settings = tmp_path / "settings.yaml"
    settings.write_text(settings_map["data"]["settings.yaml"])
    port = free_port()
    procs = processes.Processes(tmp_path / "logs")
    proc = procs.start("webhook", [
        _sidekey(), "webhook", f"--port={port}", "--host=127.0.0.1", f"--tls-dir={tls_dir}",
        f"--settings={settings}", "--namespace=sidekey-system", f"--kubeconfig={cluster.kubeconfig}"])
    try:
        _wait_ready(port, tls_dir / contract.TLS_CA_KEY, proc)
        config = url_configuration(port, ca.cert_pem, "Fail")
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(config))
        yield LocalWebhook(proc, port, config)
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", "sidekey", "--ignore-not-found")
        procs.stop_all()


def _create_until_called(cluster: Any, pod: dict[str, Any], timeout: float = 20.0) -> admission.Answer:
    """Create a pod once the apiserver has picked up the webhook configuration.

    Webhook configurations, like policies, are loaded asynchronously; a server-side
    dry run that comes back injected shows they are live.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = admission.create(cluster, pod, dry_run=True)
        if probe.admitted and probe.obj and probe.obj["spec"].get("initContainers"):
            break
        time.sleep(0.3)
    return admission.create(cluster, pod)


def test_an_annotated_pod_created_through_the_webhook_is_admitted(
        cluster: Any, subject_namespace: str, webhook: LocalWebhook) -> None:
    pod = manifests.bare_pod(subject_namespace, "agent", annotations={contract.ANNOTATION_INJECT: "true"})
    answer = _create_until_called(cluster, pod)
    assert answer.admitted, answer.message
    assert answer.obj is not None
    spec = answer.obj["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [contract.SIDECAR_CONTAINER_NAME]
    assert spec["automountServiceAccountToken"] is False
    assert {m["name"] for m in spec["containers"][0]["volumeMounts"]} == {contract.AGENT_TOKEN_VOLUME}


def test_a_pod_of_a_labelled_namespace_is_injected_and_admitted(
        cluster: Any, subject_namespace: str, webhook: LocalWebhook) -> None:
    cluster.kubectl("label", "namespace", subject_namespace, "sidekey.io/inject=enabled")
    answer = _create_until_called(cluster, manifests.bare_pod(subject_namespace, "labelled"))
    assert answer.admitted, answer.message
    assert answer.obj is not None
    assert answer.obj["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME


@pytest.mark.parametrize("failure_policy", ["Fail", "Ignore"])
def test_with_the_webhook_stopped_an_opted_in_pod_is_refused_and_never_created(
        cluster: Any, subject_namespace: str, webhook: LocalWebhook, failure_policy: str) -> None:
    """With Fail the apiserver refuses; with Ignore the pod skips the webhook and the guard refuses."""
    pod = manifests.bare_pod(subject_namespace, "agent", annotations={contract.ANNOTATION_INJECT: "true"})
    assert _create_until_called(cluster, manifests.bare_pod(
        subject_namespace, "warm-up", annotations={contract.ANNOTATION_INJECT: "true"})).admitted
    webhook.process.stop()
    for hook in webhook.configuration["webhooks"]:
        hook["failurePolicy"] = failure_policy
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(webhook.configuration))
    # The apiserver loads the changed failurePolicy asynchronously: wait for its answer to change.
    expected = "bypass-guard" if failure_policy == "Ignore" else "inject.sidekey.io"
    deadline = time.monotonic() + 20
    answer = admission.create(cluster, pod, dry_run=True)
    while expected not in answer.message and time.monotonic() < deadline:
        time.sleep(0.3)
        answer = admission.create(cluster, pod, dry_run=True)
    answer = admission.create(cluster, pod)
    assert not answer.admitted, answer.message
    assert expected in answer.message, answer.message
    if failure_policy == "Ignore":
        assert 'annotate the pod with sidekey.io/inject: "true"' in answer.message, answer.message
    assert not admission.exists(cluster, "pod", subject_namespace, "agent")
