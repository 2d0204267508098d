"""Pod shapes that would defeat the isolation are refused; documented overrides accept the risk."""

from __future__ import annotations

from typing import Any

import pytest

from sidekey.core import contract, policies
from sidekey.webhook import patching, settings
from tests.webhook import reviewing

SETTINGS = settings.Settings()
POLICY = policies.parse({
    "metadata": {"name": "p", "namespace": "agents"},
    "spec": {"subjects": {"serviceAccounts": ["agent"]}, "upstreams": [{
        "name": "openai", "url": "https://api.openai.com",
        "auth": {"type": "bearer", "secretRef": {"name": "openai-key", "key": "k"}},
        "allow": [{"paths": ["/**"]}]}]},
})


def refusal(pod: dict[str, Any], policy_list: list[policies.AgentPolicy] | None = None) -> patching.Refused:
    with pytest.raises(patching.Refused) as caught:
        patching.patch(pod, policy_list or [POLICY], SETTINGS)
    return caught.value


def agent(**fields: Any) -> dict[str, Any]:
    return {"name": "agent", "image": "x", **fields}


OVERRIDABLE = [
    ("host-network", contract.ANNOTATION_ALLOW_HOST_NETWORK, {"hostNetwork": True}),
    ("share-process-namespace", contract.ANNOTATION_ALLOW_SHARED_PROCESS_NAMESPACE,
     {"shareProcessNamespace": True}),
    ("host-pid", contract.ANNOTATION_ALLOW_HOST_PID, {"hostPID": True}),
    ("privileged", contract.ANNOTATION_ALLOW_PRIVILEGED,
     {"containers": [agent(securityContext={"privileged": True})]}),
    ("capabilities", contract.ANNOTATION_ALLOW_CAPABILITIES,
     {"containers": [agent(securityContext={"capabilities": {"add": ["SYS_ADMIN"]}})]}),
    ("host-path", contract.ANNOTATION_ALLOW_HOST_PATH,
     {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}),
]


@pytest.mark.parametrize(("reason", "annotation", "spec"), OVERRIDABLE)
def test_each_risky_shape_is_refused_with_its_override_annotation_named(
        reason: str, annotation: str, spec: dict[str, Any]) -> None:
    exc = refusal(reviewing.pod(**spec))
    assert exc.reason == reason
    assert annotation in exc.message


@pytest.mark.parametrize(("reason", "annotation", "spec"), OVERRIDABLE)
def test_the_override_annotation_accepts_the_risk(reason: str, annotation: str, spec: dict[str, Any]) -> None:
    out = patching.patch(reviewing.pod(annotations={annotation: "true"}, **spec), [POLICY], SETTINGS)
    assert out.patch


@pytest.mark.parametrize("cap", ["SYS_PTRACE", "sys_ptrace", "CAP_SYS_ADMIN", "ALL"])
def test_ptrace_and_admin_capabilities_are_refused_in_any_spelling(cap: str) -> None:
    exc = refusal(reviewing.pod(containers=[agent(securityContext={"capabilities": {"add": [cap]}})]))
    assert exc.reason == "capabilities"


def test_harmless_capabilities_are_allowed() -> None:
    pod = reviewing.pod(containers=[agent(securityContext={"capabilities": {"add": ["NET_BIND_SERVICE"]}})])
    assert patching.patch(pod, [POLICY], SETTINGS).patch


def test_a_privileged_regular_init_container_is_refused_too() -> None:
    exc = refusal(reviewing.pod(initContainers=[agent(name="setup", securityContext={"privileged": True})]))
    assert "container setup is privileged" in exc.message


@pytest.mark.parametrize("fields", [
    {"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "openai-key", "key": "k"}}}]},
    {"envFrom": [{"secretRef": {"name": "openai-key"}}]},
])
def test_reading_a_policy_secret_through_env_is_refused_without_override(fields: dict[str, Any]) -> None:
    exc = refusal(reviewing.pod(containers=[agent(**fields)],
                                annotations={a: "true" for _, a, _ in OVERRIDABLE}))
    assert exc.reason == "policy-secret" and "openai-key" in exc.message


def test_a_projected_policy_secret_is_refused() -> None:
    exc = refusal(reviewing.pod(volumes=[{"name": "k", "projected": {"sources": [
        {"secret": {"name": "openai-key"}}]}}]))
    assert exc.reason == "policy-secret"


def test_other_secrets_are_fine() -> None:
    pod = reviewing.pod(containers=[agent(envFrom=[{"secretRef": {"name": "app-config"}}])],
                        volumes=[{"name": "s", "secret": {"secretName": "tls"}}])
    assert patching.patch(pod, [POLICY], SETTINGS).patch


@pytest.mark.parametrize("audience", [None, "", "https://kubernetes.default.svc"])
def test_an_own_api_audience_token_projection_is_refused(audience: str | None) -> None:
    token: dict[str, Any] = {"path": "t"}
    if audience is not None:
        token["audience"] = audience
    exc = refusal(reviewing.pod(volumes=[{"name": "t", "projected": {"sources": [{"serviceAccountToken": token}]}}]))
    assert exc.reason == "api-token"


def test_a_token_projection_for_another_audience_is_fine() -> None:
    pod = reviewing.pod(volumes=[{"name": "vault", "projected": {"sources": [
        {"serviceAccountToken": {"audience": "vault", "path": "t"}}]}}])
    assert patching.patch(pod, [POLICY], SETTINGS).patch


@pytest.mark.parametrize("mount", [
    {"name": contract.API_TOKEN_VOLUME, "mountPath": "/api"},
    {"name": contract.AGENT_TOKEN_VOLUME, "mountPath": "/elsewhere", "readOnly": True},
    {"name": contract.AGENT_TOKEN_VOLUME, "mountPath": contract.AGENT_TOKEN_DIR},  # writable
    {"name": "mine", "mountPath": contract.AGENT_TOKEN_DIR},
])
def test_agent_containers_may_not_mount_sidekeys_volumes_or_paths(mount: dict[str, Any]) -> None:
    exc = refusal(reviewing.pod(containers=[agent(volumeMounts=[mount])],
                                volumes=[{"name": "mine", "emptyDir": {}}]))
    assert exc.reason == "sidekey-volume"


def test_a_container_named_like_the_sidecar_is_refused() -> None:
    exc = refusal(reviewing.pod(containers=[agent(name=contract.SIDECAR_CONTAINER_NAME)]))
    assert exc.reason == "reserved-name"


def test_a_container_port_the_sidecar_needs_is_refused_naming_the_port_annotation() -> None:
    exc = refusal(reviewing.pod(containers=[agent(ports=[{"containerPort": 8787}])]))
    assert exc.reason == "port" and contract.ANNOTATION_PORT in exc.message
    moved = reviewing.pod(containers=[agent(ports=[{"containerPort": 8787}])],
                          annotations={contract.ANNOTATION_PORT: "9000"})
    assert patching.patch(moved, [POLICY], SETTINGS).patch


@pytest.mark.parametrize(("annotation", "value", "says"), [
    (contract.ANNOTATION_PORT, "http", "not a port"),
    (contract.ANNOTATION_PORT, "70000", "not a port"),
    (contract.ANNOTATION_PORT, "8788", "health port"),
    (contract.ANNOTATION_CPU_REQUEST, "lots", "not a resource quantity"),
    (contract.ANNOTATION_MEMORY_REQUEST, "1Gi", "exceeds its limit"),
    (contract.ANNOTATION_IMAGE, "evil.example.com/sidekey:1", "allow-list"),
])
def test_bad_override_annotations_are_refused_naming_the_annotation(annotation: str, value: str, says: str) -> None:
    exc = refusal(reviewing.pod(annotations={annotation: value}))
    assert says in exc.message


def test_every_refusal_is_reported_at_once() -> None:
    exc = refusal(reviewing.pod(hostNetwork=True, hostPID=True))
    assert {r.reason for r in exc.refusals} == {"host-network", "host-pid"}


def test_a_policy_secret_is_refused_for_a_pod_no_policy_names_and_the_message_names_the_policy() -> None:
    """issue 14: any pod of the namespace, whatever its account, never only the policy's subjects."""
    exc = refusal(reviewing.pod(sa="bystander", containers=[agent(envFrom=[{"secretRef": {"name": "openai-key"}}])]))
    assert exc.reason == "policy-secret"
    assert "Secret openai-key, which AgentPolicy p names" in exc.message
    assert "whatever its service account" in exc.message


INSECURE = policies.parse({
    "metadata": {"name": "local", "namespace": "agents"},
    "spec": {"subjects": {"serviceAccounts": ["agent"]}, "upstreams": [{
        "name": "ollama", "url": "http://ollama.models.svc:11434", "insecure": True,
        "auth": {"type": "bearer", "secretRef": {"name": "ollama-key", "key": "k"}},
        "allow": [{"paths": ["/**"]}]}]},
})


@pytest.mark.parametrize("cap", ["NET_RAW", "cap_net_admin", "ALL"])
def test_an_agent_adding_a_sniffing_capability_beside_an_insecure_upstream_is_refused(cap: str) -> None:
    pod = reviewing.pod(containers=[agent(securityContext={"capabilities": {"add": [cap]}})],
                        annotations={contract.ANNOTATION_ALLOW_CAPABILITIES: "true"})
    exc = refusal(pod, [INSECURE])
    assert exc.reason == "sniffing-capabilities" and "upstream ollama is insecure" in exc.message


def test_the_same_capability_beside_https_upstreams_only_is_fine() -> None:
    pod = reviewing.pod(containers=[agent(securityContext={"capabilities": {"add": ["NET_RAW"]}})])
    assert patching.patch(pod, [POLICY], SETTINGS).patch


def test_beside_an_insecure_upstream_agents_drop_net_raw_and_net_admin_once() -> None:
    import jsonpatch

    pod = reviewing.pod(initContainers=[agent(name="setup", securityContext={"capabilities": {"drop": ["ALL"]}})],
                        containers=[agent(securityContext={"runAsUser": 1000, "capabilities": {"drop": ["CHOWN"]}})])
    out = patching.patch(pod, [INSECURE], SETTINGS)
    injected = jsonpatch.apply_patch(pod, out.patch)
    [main] = injected["spec"]["containers"]
    assert main["securityContext"] == {"runAsUser": 1000, "capabilities": {"drop": ["CHOWN", "NET_ADMIN", "NET_RAW"]}}
    setup = next(c for c in injected["spec"]["initContainers"] if c["name"] == "setup")
    assert setup["securityContext"] == {"capabilities": {"drop": ["ALL"]}}  # ALL already covers them
    assert out.status["droppedCapabilities"] == list(contract.SNIFFING_CAPABILITIES)
    assert patching.patch(injected, [INSECURE], SETTINGS).patch == []
