"""Which pods would read a policy's Secrets once their account is granted: the guard's shape, read from existing pods."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sidekey.core import contract
from sidekey.operator import exposure
from sidekey.webhook import settings as webhook_settings
from sidekey.webhook import sidecars

AUDIENCES = frozenset({"sidekey", "sts.amazonaws.com"})


def _token_volume(name: str, audience: str | None = None) -> dict[str, Any]:
    token: dict[str, Any] = {"path": "token", "expirationSeconds": 3607}
    if audience is not None:
        token["audience"] = audience
    return {"name": name, "projected": {"sources": [{"serviceAccountToken": token}]}}


def _pod(*, containers: list[dict[str, Any]], init: list[dict[str, Any]] | None = None,
         volumes: list[dict[str, Any]] | None = None, account: str | None = "late",
         ephemeral: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": containers, "volumes": volumes or []}
    if account:
        spec["serviceAccountName"] = account
    if init:
        spec["initContainers"] = init
    if ephemeral:
        spec["ephemeralContainers"] = ephemeral
    return {"metadata": {"namespace": "team", "name": "p", "uid": "u1"}, "spec": spec}


def _mounting(name: str, *volumes: str) -> dict[str, Any]:
    return {"name": name, "image": "x", "volumeMounts": [{"name": v, "mountPath": f"/m/{v}"} for v in volumes]}


BARE = _pod(containers=[_mounting("agent", "kube-api-access-abcde")],
            volumes=[_token_volume("kube-api-access-abcde")])
INJECTED = _pod(
    init=[_mounting(contract.SIDECAR_CONTAINER_NAME, contract.API_TOKEN_VOLUME)],
    containers=[_mounting("agent", contract.AGENT_TOKEN_VOLUME)],
    volumes=[_token_volume(contract.API_TOKEN_VOLUME), _token_volume(contract.AGENT_TOKEN_VOLUME, "sidekey")])


def test_a_bare_pod_holds_its_api_token_in_the_agent_container() -> None:
    found = exposure.exposed(BARE, agent_audiences=AUDIENCES)
    assert found == exposure.ExposedPod("team", "p", "u1", "late", "agent", "kube-api-access-abcde")


def test_a_pod_in_the_injected_shape_is_not_exposed() -> None:
    assert exposure.exposed(INJECTED, agent_audiences=AUDIENCES) is None


@pytest.mark.parametrize(("pod", "container"), [
    # an agent mounting the sidecar's own API volume
    (_pod(init=[_mounting(contract.SIDECAR_CONTAINER_NAME, contract.API_TOKEN_VOLUME)],
          containers=[_mounting("agent", contract.API_TOKEN_VOLUME)],
          volumes=[_token_volume(contract.API_TOKEN_VOLUME)]), "agent"),
    # a hand-made token of the apiserver's audience under another name
    (_pod(containers=[_mounting("agent", "mine")],
          volumes=[_token_volume("mine", "https://kubernetes.default.svc")]), "agent"),
    # a regular container named like the sidecar is an agent container (the guard's rule)
    (_pod(containers=[_mounting(contract.SIDECAR_CONTAINER_NAME, "kube-api-access-x")],
          volumes=[_token_volume("kube-api-access-x")]), contract.SIDECAR_CONTAINER_NAME),
    # an init container, and an ephemeral (kubectl debug) one
    (_pod(init=[_mounting("setup", "kube-api-access-x")], containers=[_mounting("agent")],
          volumes=[_token_volume("kube-api-access-x")]), "setup"),
    (_pod(init=[_mounting(contract.SIDECAR_CONTAINER_NAME, contract.API_TOKEN_VOLUME)],
          containers=[_mounting("agent", contract.AGENT_TOKEN_VOLUME)],
          ephemeral=[_mounting("debugger", contract.API_TOKEN_VOLUME)],
          volumes=[_token_volume(contract.API_TOKEN_VOLUME)]), "debugger"),
])
def test_any_container_but_the_native_sidecar_holding_an_api_token_is_exposed(
        pod: dict[str, Any], container: str) -> None:
    found = exposure.exposed(pod, agent_audiences=AUDIENCES)
    assert found is not None and found.container == container


def test_tokens_of_the_agent_audiences_are_not_api_credentials() -> None:
    pod = _pod(containers=[_mounting("agent", "aws")], volumes=[_token_volume("aws", "sts.amazonaws.com")])
    assert exposure.exposed(pod, agent_audiences=AUDIENCES) is None


def test_a_pod_with_automount_off_holds_nothing() -> None:
    assert exposure.exposed(_pod(containers=[_mounting("agent")]), agent_audiences=AUDIENCES) is None


def test_a_pod_naming_no_account_runs_as_default() -> None:
    pod = _pod(containers=[_mounting("agent", "kube-api-access-x")],
               volumes=[_token_volume("kube-api-access-x")], account=None)
    found = exposure.exposed(pod, agent_audiences=AUDIENCES)
    assert found is not None and found.service_account == "default"


# --- pods that predate the policy with a sidecar of their own ------------------------------

IMAGES = frozenset({webhook_settings.DEFAULT_IMAGE})


def _webhook_injected(account: str = "late") -> dict[str, Any]:
    """A pod whose sidecar and API volume are exactly what the webhook builds."""
    settings = webhook_settings.Settings()
    spec, _ = sidecars.resolve({}, settings)
    return _pod(init=[copy.deepcopy(dict(sidecars.container(spec, settings)))],
                containers=[_mounting("agent", contract.AGENT_TOKEN_VOLUME)],
                volumes=[dict(sidecars.api_volume()), _token_volume(contract.AGENT_TOKEN_VOLUME, "sidekey")],
                account=account)


def test_the_sidecar_the_webhook_builds_passes_the_vetting() -> None:
    pod = _webhook_injected()
    sidecar = pod["spec"]["initContainers"][0]
    assert exposure.sidecar_problem(pod["spec"], sidecar, images=IMAGES) is None
    assert exposure.exposed(pod, agent_audiences=AUDIENCES, vet_sidecar=True, sidecar_images=IMAGES) is None


def _sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = pod["spec"]["initContainers"][0]
    return found


def _api_volume(pod: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(v for v in pod["spec"]["volumes"] if v["name"] == contract.API_TOKEN_VOLUME)
    return found


LOOKALIKES: dict[str, Any] = {
    "own-command": lambda p: _sidecar(p).update(command=["sh", "-c", "cat /var/run/secrets/*/token"]),
    "extra-args": lambda p: _sidecar(p).update(args=["--debug"]),
    "other-image": lambda p: _sidecar(p).update(image="evil.example/sidekey:0.1.0"),
    "api-host-env": lambda p: _sidecar(p)["env"].append({"name": "KUBERNETES_SERVICE_HOST", "value": "evil.example"}),
    "api-server-env": lambda p: _sidecar(p)["env"].append({"name": contract.ENV_API_SERVER, "value": "https://evil.example"}),
    "preload-env": lambda p: _sidecar(p)["env"].append({"name": "LD_PRELOAD", "value": "/x.so"}),
    "env-from-secret": lambda p: _sidecar(p)["env"].append(
        {"name": contract.ENV_AUDIENCE, "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}}),
    "env-from": lambda p: _sidecar(p).update(envFrom=[{"configMapRef": {"name": "x"}}]),
    "code-mount": lambda p: _sidecar(p)["volumeMounts"].append({"name": "code", "mountPath": "/opt/sidekey/lib"}),
    "no-root-ca": lambda p: _api_volume(p)["projected"]["sources"].pop(1),
    "extra-source": lambda p: _api_volume(p)["projected"]["sources"].append({"secret": {"name": "x"}}),
    "token-audience": lambda p: _api_volume(p)["projected"]["sources"][0]["serviceAccountToken"].update(
        audience="https://evil.example"),
    "other-ca": lambda p: _api_volume(p)["projected"]["sources"][1]["configMap"].update(name="my-ca"),
    "agents-uid": lambda p: _sidecar(p)["securityContext"].update(runAsUser=1000),
    "shared-pids": lambda p: p["spec"].update(shareProcessNamespace=True),
    "host-pids": lambda p: p["spec"].update(hostPID=True),
    # a command of the pod author's run beside the token, or a way into the sidecar's files
    "exec-probe": lambda p: _sidecar(p).update(livenessProbe={"exec": {"command": ["sh", "-c", "leak"]}}),
    "post-start-hook": lambda p: _sidecar(p).update(lifecycle={"postStart": {"exec": {"command": ["leak"]}}}),
    "privileged-agent": lambda p: p["spec"]["containers"][0].update(securityContext={"privileged": True}),
    "host-path": lambda p: p["spec"]["volumes"].append({"name": "node", "hostPath": {"path": "/var/lib/kubelet"}}),
    "debug-the-sidecar": lambda p: p["spec"].update(ephemeralContainers=[
        {"name": "debugger", "image": "busybox", "targetContainerName": contract.SIDECAR_CONTAINER_NAME}]),
    "not-native": lambda p: _sidecar(p).pop("restartPolicy"),
    # The pod's addresses as plain values: the sidecar refuses an upstream resolving to
    # its own pod by these, so a made-up one lets a hosts entry hairpin the key to the agent.
    "pod-ips-value": lambda p: _env(p, contract.ENV_POD_IPS).update(value="192.0.2.1") or
        _env(p, contract.ENV_POD_IPS).pop("valueFrom"),
    "pod-ip-other-field": lambda p: _env(p, contract.ENV_POD_IP)["valueFrom"]["fieldRef"].update(
        fieldPath="status.hostIP"),
    "pod-uid-value": lambda p: _sidecar(p)["env"].remove(_env(p, contract.ENV_POD_UID)) or
        _sidecar(p)["env"].append({"name": contract.ENV_POD_UID, "value": "another-pods-uid"}),
    # a repeated name: the kubelet lets the later entry win
    "pod-ips-twice": lambda p: _sidecar(p)["env"].append({"name": contract.ENV_POD_IPS, "value": "192.0.2.1"}),
}


def _env(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e for e in _sidecar(pod)["env"] if e["name"] == name)
    return found


@pytest.mark.parametrize("name", sorted(LOOKALIKES))
def test_a_lookalike_sidecar_holds_a_new_grant_back(name: str) -> None:
    pod = _webhook_injected()
    LOOKALIKES[name](pod)
    found = exposure.exposed(pod, agent_audiences=AUDIENCES, vet_sidecar=True, sidecar_images=IMAGES)
    assert found is not None and found.container == contract.SIDECAR_CONTAINER_NAME
    assert found.lookalike
    # an account granted already is not re-vetted (its pods since passed the guard)
    assert exposure.exposed(pod, agent_audiences=AUDIENCES) is None


def test_the_vetting_never_quotes_a_value() -> None:
    pod = _webhook_injected()
    _sidecar(pod)["env"].append({"name": "EVIL", "value": "sk-secret-value"})
    _sidecar(pod)["command"] = ["sh", "-c", "echo sk-secret-value"]
    found = exposure.exposed(pod, agent_audiences=AUDIENCES, vet_sidecar=True, sidecar_images=IMAGES)
    assert found is not None and "sk-secret-value" not in repr(found)


def test_the_fields_the_vetting_expects_are_the_ones_the_webhook_writes() -> None:
    pod = _webhook_injected()
    written = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
               for e in _sidecar(pod)["env"] if "valueFrom" in e}
    assert written == exposure.SIDECAR_FIELD_ENV


@pytest.mark.parametrize(("shape", "annotation"), [
    ("shared-pids", contract.ANNOTATION_ALLOW_SHARED_PROCESS_NAMESPACE),
    ("host-pids", contract.ANNOTATION_ALLOW_HOST_PID),
    ("privileged-agent", contract.ANNOTATION_ALLOW_PRIVILEGED),
    ("host-path", contract.ANNOTATION_ALLOW_HOST_PATH),
])
def test_a_risk_the_pod_accepted_with_the_guards_override_holds_nothing_back(shape: str, annotation: str) -> None:
    # The guard admits a new subject pod with the override, so one that predates the
    # policy is not held back for it either (it would be, forever, with nothing to fix).
    pod = _webhook_injected()
    LOOKALIKES[shape](pod)
    pod["metadata"]["annotations"] = {annotation: "true"}
    assert exposure.exposed(pod, agent_audiences=AUDIENCES, vet_sidecar=True, sidecar_images=IMAGES) is None
    pod["metadata"]["annotations"] = {annotation: "yes"}  # only "true" is an override, as in the guard
    assert exposure.exposed(pod, agent_audiences=AUDIENCES, vet_sidecar=True, sidecar_images=IMAGES) is not None


# --- legacy token Secrets ------------------------------------------------------------------------

def _legacy(account: str | None, type_: str = exposure.LEGACY_TOKEN_TYPE) -> dict[str, Any]:
    annotations = {exposure.LEGACY_TOKEN_ACCOUNT: account} if account else {}
    return {"type": type_, "metadata": {"namespace": "team", "name": "old-token", "uid": "s1",
                                        "annotations": annotations},
            "data": {"token": "ZXlKaGJHY2lPaUpTVXpJMU5pSjk="}}


def test_a_legacy_token_secret_holds_its_accounts_grant_back() -> None:
    found = exposure.legacy_token(_legacy("late"))
    assert found is not None and found.secret and found.service_account == "late"
    assert "ZXlK" not in repr(found)  # names only, never the token


def test_other_secrets_hold_nothing_back() -> None:
    assert exposure.legacy_token(_legacy("late", type_="Opaque")) is None
    assert exposure.legacy_token(_legacy(None)) is None


# --- the memory of exposed pods that went ---------------------------------------------------


def _gone(uid: str, namespace: str = "team", account: str = "late") -> exposure.ExposedPod:
    return exposure.ExposedPod(namespace, f"pod-{uid}", uid, account, "agent", "kube-api-access-x")


def test_a_pod_that_went_is_remembered_for_the_token_caches_ttl_by_namespace_and_account() -> None:
    gone = exposure.RecentlyGone(ttl=15, capacity=10)
    gone.went(_gone("a"), now=100)
    gone.went(_gone("a"), now=105)  # seen gone again: keeps the first time
    gone.went(_gone("b", namespace="other"), now=101)
    assert [(t, p.uid) for t, p in gone.recent("team", {"late"}, now=110)] == [(100, "a")]
    assert gone.recent("team", {"agent"}, now=110) == []
    assert gone.since("a") == 100 and gone.blind_until("team", now=110) is None
    assert gone.recent("team", {"late"}, now=115) == [] and len(gone) == 1  # a expired, b not yet
    assert len(gone.recent("other", {"late"}, now=115.9)) == 1
    gone.forget("b")
    assert len(gone) == 0


def test_a_full_memory_forgets_nothing_its_namespace_waits_instead() -> None:
    gone = exposure.RecentlyGone(ttl=15, capacity=2)
    gone.went(_gone("a"), now=100)
    gone.went(_gone("b", namespace="other"), now=101)
    gone.went(_gone("c", namespace="third"), now=102)  # no room: third goes blind
    assert len(gone) == 2 and gone.since("c") is None
    assert gone.blind_until("third", now=103) == 117
    assert gone.blind_until("team", now=103) is None
    gone.went(_gone("d", namespace="fourth"), now=103)
    gone.went(_gone("e", namespace="fifth"), now=104)  # and past as many blind namespaces: all
    assert gone.blind_until("team", now=105) == 119
    assert gone.blind_until("third", now=118) == 119  # its own wait is over, everyone's is not
    assert gone.blind_until("third", now=119) is None and gone.blind_until("team", now=119) is None
    # once the old entries expire there is room again
    gone.went(_gone("f"), now=120)
    assert gone.since("f") == 120 and gone.blind_until("team", now=120) is None


def test_a_bare_pods_last_state_is_what_the_memory_keeps_and_an_injected_one_is_not() -> None:
    # the controller checks a deleted pod as for a new grant (its sidecar vetted)
    assert exposure.exposed(BARE, agent_audiences=AUDIENCES, vet_sidecar=True) is not None
    assert exposure.exposed(_webhook_injected(), agent_audiences=AUDIENCES, vet_sidecar=True,
                            sidecar_images=IMAGES) is None
