"""Fuzzing the webhook's patch builder against the real apiserver's validation.

Random pod specs (several containers and init containers, env, ports,
volumes, resources, annotation overrides, either service account) are first
sent through a server-side dry run, so the builder sees what the apiserver
really sends after its ServiceAccount admission step. Then:

1. the patch applies (RFC 6902) to that pod;
2. the patched pod passes the apiserver's own validation (a second dry run);
3. the stored shape holds no API token outside the sidecar;
4. admitting the stored shape again gives an empty patch (idempotence).

Examples are bounded (``max_examples=40``) so CI stays fast; each costs two
dry runs. No webhook is registered here: the builder is called in-process.
"""

from __future__ import annotations

import copy
import json
import urllib.error
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidekey.core import contract, policies
from sidekey.webhook import patching
from sidekey.webhook import settings as settings_mod
from tests.support.webhook import E2E_SETTINGS

pytestmark = pytest.mark.e2e

SETTINGS = settings_mod.from_mapping(E2E_SETTINGS)
POLICY = policies.parse({
    "apiVersion": contract.API_VERSION, "kind": contract.KIND,
    "metadata": {"name": "fuzz", "namespace": "x", "uid": "u", "generation": 1,
                 "creationTimestamp": "2026-01-01T00:00:00Z"},
    "spec": {"subjects": {"serviceAccounts": ["agent"]}, "token": {"expirationSeconds": 900},
             "upstreams": [{"name": "openai", "url": "https://api.openai.com/v1",
                            "auth": {"type": "bearer", "secretRef": {"name": "k", "key": "api-key"}},
                            "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
                            "env": [{"name": "OPENAI_BASE_URL"}]}]},
})

NAMES = st.sampled_from(["agent", "tool", "worker", "shell", "web", "db"])
ENV = st.fixed_dictionaries({"name": st.sampled_from(["OPENAI_BASE_URL", "MODE", "LOG", "HOME", "X_1"]),
                             "value": st.text("abc:/0123456789", max_size=12)})
QUANTITY = st.sampled_from(["10m", "100m", "1", "64Mi", "128Mi"])


@st.composite
def container(draw: st.DrawFn, name: str, volumes: list[str]) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": draw(st.sampled_from(["busybox", "example.invalid/a:1"]))}
    env = draw(st.lists(ENV, max_size=3, unique_by=lambda e: e["name"]))
    if env:
        c["env"] = env
    if draw(st.booleans()):
        # below the sidecar's ports (8787, 8788, and 9000-9100 by annotation): a clash is a refusal
        c["ports"] = [{"containerPort": draw(st.integers(1024, 8000))}]
    if draw(st.booleans()):
        c["resources"] = {"requests": {"cpu": draw(QUANTITY)}}
    mounts = draw(st.lists(st.sampled_from(volumes), max_size=2, unique=True)) if volumes else []
    if mounts:
        c["volumeMounts"] = [{"name": v, "mountPath": f"/mnt/{v}"} for v in mounts]
    if draw(st.booleans()):
        c["command"] = ["sh", "-c", "true"]
    return c


@st.composite
def user_pod(draw: st.DrawFn) -> dict[str, Any]:
    volumes = draw(st.lists(st.sampled_from(["data", "cache", "tmp"]), max_size=3, unique=True))
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    split = draw(st.integers(0, len(names) - 1))
    init, main = names[:split], names[split:]
    annotations = {contract.ANNOTATION_INJECT: "true"}
    if draw(st.booleans()):
        annotations[contract.ANNOTATION_PORT] = str(draw(st.integers(9000, 9100)))
    if draw(st.booleans()):
        annotations[contract.ANNOTATION_CPU_REQUEST] = draw(st.sampled_from(["50m", "200m"]))
    spec: dict[str, Any] = {
        "containers": [draw(container(n, volumes)) for n in main],
        "restartPolicy": draw(st.sampled_from(["Always", "OnFailure", "Never"])),
    }
    if init:
        spec["initContainers"] = [draw(container(n, volumes)) for n in init]
    if volumes:
        spec["volumes"] = [{"name": v, "emptyDir": {}} for v in volumes]
    if draw(st.booleans()):
        spec["serviceAccountName"] = "agent"
    if draw(st.booleans()):
        spec["automountServiceAccountToken"] = True
    if draw(st.booleans()):
        spec["securityContext"] = {"runAsUser": draw(st.integers(1000, 2000)), "runAsNonRoot": True}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "fuzz-", "annotations": annotations}, "spec": spec}


def _dry_run(cluster: Any, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    try:
        out: dict[str, Any] = cluster.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", pod)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"the apiserver refused the pod: {exc.read().decode()[:800]}\n"
                             f"{json.dumps(pod)[:2000]}") from None
    return out


def _as_sent(stored: dict[str, Any]) -> dict[str, Any]:
    """What a CREATE review carries: the object without server-set metadata and status."""
    pod = copy.deepcopy(stored)
    for key in ("uid", "resourceVersion", "creationTimestamp", "managedFields", "name"):
        pod["metadata"].pop(key, None)
    pod.pop("status", None)
    return pod


@pytest.fixture(scope="module")
def fuzz_namespace(cluster: Any) -> Any:
    from tests.support.namespaces import make_namespace

    ns = make_namespace(cluster, "skfuzz")
    cluster.kubectl("create", "serviceaccount", "agent", "-n", ns)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@settings(max_examples=40, deadline=15_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(pod=user_pod())
def test_a_random_pod_is_patched_into_a_valid_idempotent_injected_pod(
        cluster: Any, fuzz_namespace: str, pod: dict[str, Any]) -> None:
    admitted = _as_sent(_dry_run(cluster, fuzz_namespace, pod))  # after ServiceAccount admission
    outcome = patching.patch(admitted, [POLICY], SETTINGS)
    assert outcome.patch, "an opted-in pod must be patched"
    mutated = jsonpatch.apply_patch(admitted, list(outcome.patch))
    stored = _as_sent(_dry_run(cluster, fuzz_namespace, mutated))  # the apiserver's own validation
    spec = stored["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME
    assert not any(v["name"].startswith(contract.KUBE_API_ACCESS_PREFIX) for v in spec.get("volumes", []))
    for c in [*spec["initContainers"][1:], *spec["containers"]]:
        mounts = {m["name"] for m in c.get("volumeMounts") or []}
        assert contract.API_TOKEN_VOLUME not in mounts, c["name"]
    assert [c["name"] for c in spec["containers"]] == [c["name"] for c in pod["spec"]["containers"]]
    again = patching.patch(stored, [POLICY], SETTINGS)
    assert list(again.patch) == [], f"re-admission changed the pod: {list(again.patch)[:5]}"
