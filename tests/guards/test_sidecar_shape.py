"""The bypass guard and the webhook agree on the sidecar, to the field.

The pod is the webhook's own output (``webhook/patching.py`` via
``manifests.injected_pod``), sent to the real apiserver with the guard as
``helm template`` renders it: admitted. Then each single deviation a
look-alike sidecar could carry, every one of which would let the sidecar's
API token reach someone else, or run code beside it, is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sidekey.core import contract
from tests.guards import admission, manifests

pytestmark = pytest.mark.e2e

Change = Callable[[dict[str, Any]], None]


def _env(name: str, value: str) -> Change:
    def change(pod: dict[str, Any]) -> None:
        manifests.sidecar(pod)["env"].append({"name": name, "value": value})
    return change


def _field_env(name: str, path: str) -> Change:
    def change(pod: dict[str, Any]) -> None:
        for e in manifests.sidecar(pod)["env"]:
            if e["name"] == name:
                e["valueFrom"]["fieldRef"]["fieldPath"] = path
    return change


def _set_env(name: str, value: str) -> Change:
    def change(pod: dict[str, Any]) -> None:
        for e in manifests.sidecar(pod)["env"]:
            if e["name"] == name:
                e["value"] = value
    return change


def _drop_env(name: str) -> Change:
    def change(pod: dict[str, Any]) -> None:
        side = manifests.sidecar(pod)
        side["env"] = [e for e in side["env"] if e["name"] != name]
    return change


def _site_packages_overlay(pod: dict[str, Any]) -> None:
    pod["spec"]["volumes"].append({"name": "patched", "configMap": {"name": "patched-sidekey"}})
    manifests.sidecar(pod)["volumeMounts"].append(
        {"name": "patched", "mountPath": "/opt/sidekey/lib/python3.11/site-packages/sidekey/core",
         "readOnly": True})


def _mount(**changes: Any) -> Change:
    def change(pod: dict[str, Any]) -> None:
        manifests.sidecar(pod)["volumeMounts"][0].update(changes)
    return change


def _api_sources(change_sources: Callable[[list[dict[str, Any]]], None]) -> Change:
    def change(pod: dict[str, Any]) -> None:
        [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == contract.API_TOKEN_VOLUME]
        change_sources(volume["projected"]["sources"])
    return change


def _without_ca(sources: list[dict[str, Any]]) -> None:
    sources[:] = [s for s in sources if "configMap" not in s]


def _other_ca(sources: list[dict[str, Any]]) -> None:
    sources[1]["configMap"]["name"] = "my-own-ca"


def _lifetime(sources: list[dict[str, Any]]) -> None:
    sources[0]["serviceAccountToken"]["expirationSeconds"] = 86400


def _audience(sources: list[dict[str, Any]]) -> None:
    sources[0]["serviceAccountToken"]["audience"] = "https://kubernetes.default.svc"


def _security(change_context: Callable[[dict[str, Any]], None]) -> Change:
    def change(pod: dict[str, Any]) -> None:
        change_context(manifests.sidecar(pod)["securityContext"])
    return change


def _field(**fields: Any) -> Change:
    def change(pod: dict[str, Any]) -> None:
        manifests.sidecar(pod).update(fields)
    return change


#: One deviation each from the webhook's sidecar, and what the refusal names.
DEVIATIONS: dict[str, tuple[Change, str]] = {
    "env-kubernetes-service-host": (_env("KUBERNETES_SERVICE_HOST", "attacker.example"), "exactly the env"),
    "env-kubernetes-service-port": (_env("KUBERNETES_SERVICE_PORT", "443"), "exactly the env"),
    "env-pythonpath": (_env("PYTHONPATH", "/tmp/evil"), "PYTHONPATH"),
    "env-pythonwarnings-and-browser": (
        lambda p: (_env("PYTHONWARNINGS", "ignore::antigravity.x")(p), _env("BROWSER", "sh -c leak")(p)),
        "PYTHONWARNINGS"),
    "env-pythonstartup": (_env("PYTHONSTARTUP", "/tmp/evil.py"), "exactly the env"),
    "env-ld-preload": (_env("LD_PRELOAD", "/tmp/evil.so"), "LD_PRELOAD"),
    "env-path": (_env("PATH", "/tmp/evil:/usr/bin"), "exactly the env"),
    "env-requests-ca-bundle": (_env("SSL_CERT_FILE", "/tmp/ca.pem"), "exactly the env"),
    "env-api-server": (_env(contract.ENV_API_SERVER, "https://attacker.example"), contract.ENV_API_SERVER),
    "env-fieldref-changed": (_field_env(contract.ENV_POD_UID, "metadata.name"), "exactly the env"),
    "env-audience-changed": (_set_env(contract.ENV_AUDIENCE, "https://kubernetes.default.svc"), "exactly the env"),
    "env-port-not-a-number": (_set_env(contract.ENV_PROXY_PORT, "8787x"), "exactly the env"),
    "env-missing": (_drop_env(contract.ENV_POD_UID), "exactly the env"),
    "env-from": (_field(envFrom=[{"configMapRef": {"name": "evil"}}]), "envFrom"),
    "configmap-over-site-packages": (_site_packages_overlay, "must mount only"),
    "api-mount-writable": (_mount(readOnly=False), "must mount only"),
    "api-mount-moved": (_mount(mountPath="/var/run/elsewhere"), "must mount only"),
    "api-mount-subpath": (_mount(subPath="token"), "must mount only"),
    "volume-without-kube-root-ca": (_api_sources(_without_ca), "ca.crt from kube-root-ca.crt"),
    "volume-with-another-ca": (_api_sources(_other_ca), "ca.crt from kube-root-ca.crt"),
    "token-lifetime-a-day": (_api_sources(_lifetime), "apiserver token"),
    "token-audience-set": (_api_sources(_audience), "apiserver token"),
    "health-port-on-the-node": (lambda p: manifests.sidecar(p)["ports"][0].update(hostPort=8788),
                                "must expose exactly its health port"),
    "another-port": (lambda p: manifests.sidecar(p)["ports"].append(
        {"name": "debug", "containerPort": 5678, "protocol": "TCP"}), "must expose exactly its health port"),
    "runs-as-root": (_security(lambda sc: sc.update(runAsUser=0)), "security context"),
    "adds-net-admin": (_security(lambda sc: sc["capabilities"].update(add=["NET_ADMIN"])), "security context"),
    "keeps-capabilities": (_security(lambda sc: sc.pop("capabilities")), "security context"),
    "writable-root": (_security(lambda sc: sc.update(readOnlyRootFilesystem=False)), "security context"),
    "seccomp-unconfined": (_security(lambda sc: sc.update(seccompProfile={"type": "Unconfined"})),
                           "security context"),
    "no-security-context": (lambda p: manifests.sidecar(p).pop("securityContext"), "security context"),
    "relative-command": (_field(command=["sidekey", "proxy"]), "must run the command"),
    "extra-args": (_field(args=["--log-level=debug"]), "must run the command"),
    "working-dir": (_field(workingDir="/tmp"), "workingDir"),
    "lifecycle-hook": (_field(lifecycle={"preStop": {"sleep": {"seconds": 1}}}), "lifecycle"),
    "termination-message-is-the-token": (
        _field(terminationMessagePath=f"{contract.API_TOKEN_DIR}/{contract.API_TOKEN_FILENAME}"),
        "terminationMessagePath"),
    # Pod-level: with service links a Service named kubernetes in the namespace
    # sets the sidecar's KUBERNETES_SERVICE_HOST/PORT (the apiserver defaults an
    # absent enableServiceLinks to true, so dropping it is the same deviation).
    "service-links-enabled": (lambda p: p["spec"].update(enableServiceLinks=True), "enableServiceLinks: false"),
    "service-links-left-to-the-default": (lambda p: p["spec"].pop("enableServiceLinks"),
                                          "enableServiceLinks: false"),
}


def _denied(answer: admission.Answer, fragment: str) -> None:
    assert not answer.admitted, f"expected a denial, the apiserver admitted it: {answer.message[:300]}"
    assert "bypass-guard" in answer.message, answer.message
    assert fragment in answer.message, answer.message


def test_the_pod_the_webhook_builds_is_admitted_by_the_guard(cluster: Any, subject_namespace: str) -> None:
    pod = manifests.injected_pod(subject_namespace, "as-built")
    answer = admission.create(cluster, pod)
    assert answer.admitted, answer.message
    assert answer.obj is not None
    stored = manifests.sidecar(answer.obj)
    built = manifests.sidecar(pod)
    for key in ("env", "volumeMounts", "securityContext", "command"):
        assert stored[key] == built[key], key
    assert answer.obj["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize("case", list(DEVIATIONS))
def test_a_sidecar_that_deviates_in_one_way_is_refused(cluster: Any, subject_namespace: str, case: str) -> None:
    change, fragment = DEVIATIONS[case]
    pod = manifests.injected_pod(subject_namespace, f"dev-{list(DEVIATIONS).index(case)}")
    change(pod)
    _denied(admission.create(cluster, pod, dry_run=True), fragment)


def test_a_sidecar_on_another_port_the_pod_picked_is_admitted(cluster: Any, subject_namespace: str) -> None:
    """sidekey.io/port is a per-pod choice: any port number passes, the webhook checked it."""
    pod = manifests.injected_pod(subject_namespace, "other-port")
    _set_env(contract.ENV_PROXY_PORT, "9000")(pod)
    answer = admission.create(cluster, pod, dry_run=True)
    assert answer.admitted, answer.message
