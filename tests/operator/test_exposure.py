"""Which pods would read a policy's Secrets once their account is granted: the guard's shape, read from existing pods."""

from __future__ import annotations

from typing import Any

import pytest

from sidekey.core import contract
from sidekey.operator import exposure

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
