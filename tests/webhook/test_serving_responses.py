"""The handler and the HTTP layer: answers for good, refused and bad input."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidekey.core import contract
from sidekey.webhook import caching, patching, reviews, serving, settings
from sidekey.webhook import metrics as metrics_mod
from tests.webhook import reviewing

POLICY = {
    "apiVersion": "sidekey.io/v1alpha1", "kind": "AgentPolicy",
    "metadata": {"name": "openai", "namespace": "agents", "creationTimestamp": "2026-01-01T00:00:00Z"},
    "spec": {"subjects": {"serviceAccounts": ["agent"]}, "upstreams": [{
        "name": "openai", "url": "https://api.openai.com/v1",
        "auth": {"type": "bearer", "secretRef": {"name": "openai-key", "key": "api-key"}},
        "allow": [{"paths": ["/**"]}], "env": [{"name": "OPENAI_BASE_URL"}]}]},
}


def handler(*, cluster_minor: int | None = 36, own: str | None = "sidekey-system") -> serving.Handler:
    return serving.Handler(settings.Settings(), caching.StaticPolicies([POLICY]),
                           metrics=metrics_mod.Metrics(), own_namespace=own, cluster_minor=cluster_minor)


async def answer(h: serving.Handler, doc: dict[str, Any], **kw: Any) -> tuple[int, dict[str, Any]]:
    return await h.review(reviewing.body(doc), **kw)


def count(h: serving.Handler, result: str, reason: str) -> float:
    value = h.metrics.registry.get_sample_value(
        "sidekey_webhook_admissions_total", {"result": result, "reason": reason})
    return value or 0.0


# --- Injection ----------------------------------------------------------------


async def test_an_annotated_pod_gets_a_patch_that_echoes_the_uid() -> None:
    h = handler()
    doc = reviewing.review(reviewing.pod(), uid="u-1")
    status, out = await answer(h, doc)
    assert status == 200
    resp = out["response"]
    assert resp["uid"] == "u-1" and resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    ops = reviews.decoded_patch(out)
    assert any(op["path"] == "/spec/initContainers" for op in ops)
    assert count(h, "injected", "annotation") == 1


async def test_a_dry_run_review_gets_the_same_patch() -> None:
    h = handler()
    _, real = await answer(h, reviewing.review(reviewing.pod(), uid="u"))
    _, dry = await answer(h, reviewing.review(reviewing.pod(), uid="u", dry_run=True))
    assert reviews.decoded_patch(real) == reviews.decoded_patch(dry) != []


async def test_an_opted_out_pod_is_allowed_untouched_even_in_an_opted_in_namespace() -> None:
    h = handler()
    status, out = await answer(h, reviewing.review(reviewing.pod(inject="false")), namespace_opted_in=True)
    assert status == 200 and out["response"]["allowed"] is True and "patch" not in out["response"]
    assert count(h, "skipped", "opted-out") == 1


async def test_a_pod_without_annotation_is_injected_only_via_the_namespace_path() -> None:
    h = handler()
    _, plain = await answer(h, reviewing.review(reviewing.pod(inject=None)))
    _, labelled = await answer(h, reviewing.review(reviewing.pod(inject=None)), namespace_opted_in=True)
    assert "patch" not in plain["response"]
    assert reviews.decoded_patch(labelled)
    assert count(h, "skipped", "not-opted-in") == 1 and count(h, "injected", "namespace-label") == 1


@pytest.mark.parametrize(("namespace", "reason"), [
    ("kube-system", "system-namespace"), ("kube-public", "system-namespace"),
    ("kube-node-lease", "system-namespace"), ("sidekey-system", "own-namespace"),
])
async def test_system_namespaces_and_its_own_are_never_injected(namespace: str, reason: str) -> None:
    h = handler()
    _, out = await answer(h, reviewing.review(reviewing.pod(namespace), namespace=namespace),
                          namespace_opted_in=True)
    assert out["response"]["allowed"] is True and "patch" not in out["response"]
    assert count(h, "skipped", reason) == 1


async def test_a_pod_no_policy_names_gets_the_sidecar_and_a_warning() -> None:
    _, out = await answer(handler(), reviewing.review(reviewing.pod(sa="lonely")))
    assert reviews.decoded_patch(out)
    assert any("no AgentPolicy names service account lonely" in w for w in out["response"]["warnings"])


async def test_an_old_cluster_without_native_sidecars_is_refused_clearly() -> None:
    _, out = await answer(handler(cluster_minor=28), reviewing.review(reviewing.pod()))
    assert out["response"]["allowed"] is False
    assert "no native sidecars" in out["response"]["status"]["message"]


async def test_a_refused_pod_is_denied_with_403_and_the_override_annotation() -> None:
    h = handler()
    _, out = await answer(h, reviewing.review(reviewing.pod(hostNetwork=True)))
    resp = out["response"]
    assert resp["allowed"] is False and resp["status"]["code"] == 403
    assert contract.ANNOTATION_ALLOW_HOST_NETWORK in resp["status"]["message"]
    assert count(h, "denied", "host-network") == 1


async def test_an_unexpected_failure_denies_the_pod_instead_of_answering_500(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug")
    monkeypatch.setattr(patching, "patch", boom)
    h = handler()
    status, out = await answer(h, reviewing.review(reviewing.pod()))
    assert status == 200 and out["response"]["allowed"] is False
    assert "internal error" in out["response"]["status"]["message"]
    assert count(h, "error", "internal") == 1


# --- Ephemeral containers -----------------------------------------------------


def _injected_pod() -> dict[str, Any]:
    pod = reviewing.pod()
    new, _ = patching.mutate(pod, [], settings.Settings())
    return new


def _debug(pod: dict[str, Any], **container: Any) -> dict[str, Any]:
    new = copy.deepcopy(pod)
    new["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox", **container}]
    return reviewing.review(new, operation="UPDATE", sub_resource="ephemeralcontainers", old=pod)


async def test_a_debug_container_aimed_at_the_sidecar_is_refused() -> None:
    h = handler()
    _, out = await answer(h, _debug(_injected_pod(), targetContainerName=contract.SIDECAR_CONTAINER_NAME))
    assert out["response"]["allowed"] is False
    assert "targets the sidecar" in out["response"]["status"]["message"]
    assert count(h, "denied", "debug-sidecar") == 1


@pytest.mark.parametrize("volume", sorted(contract.SIDEKEY_VOLUMES))
async def test_a_debug_container_mounting_a_sidekey_volume_is_refused(volume: str) -> None:
    _, out = await answer(handler(), _debug(_injected_pod(), volumeMounts=[
        {"name": volume, "mountPath": "/x"}]))
    assert out["response"]["allowed"] is False
    assert volume in out["response"]["status"]["message"]


async def test_a_debug_container_aimed_at_an_agent_is_allowed_without_a_patch() -> None:
    h = handler()
    _, out = await answer(h, _debug(_injected_pod(), targetContainerName="agent"))
    assert out["response"]["allowed"] is True and "patch" not in out["response"]
    assert count(h, "allowed", "ephemeral") == 1


# --- Bad input ----------------------------------------------------------------


@pytest.mark.parametrize(("raw", "says"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "JSON object"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                 "request": {"uid": "x"}}).encode(), "admissionReviewVersions"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "Pod"}).encode(), "expected kind"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), "request"),
])
async def test_malformed_reviews_get_a_400_that_says_what_to_fix(raw: bytes, says: str) -> None:
    h = handler()
    status, out = await h.review(raw)
    assert status == 400 and says in out["error"]["message"]
    assert out["error"]["type"] == "invalid_review"
    assert count(h, "error", "bad-request") == 1


async def test_a_review_without_uid_gets_a_400() -> None:
    doc = reviewing.review(reviewing.pod())
    del doc["request"]["uid"]
    status, out = await answer(handler(), doc)
    assert status == 400 and "uid" in out["error"]["message"]


async def test_a_review_of_another_kind_gets_the_no_op_answer() -> None:
    doc = reviewing.review({"kind": "ConfigMap"}, kind="ConfigMap", resource="configmaps", uid="cm")
    status, out = await answer(handler(), doc)
    assert status == 200 and out["response"] == {"uid": "cm", "allowed": True}


async def test_a_pod_review_without_object_is_denied_as_bad_request() -> None:
    status, out = await answer(handler(), reviewing.review(None))
    assert status == 200 and out["response"]["allowed"] is False
    assert out["response"]["status"]["code"] == 400


@pytest.mark.parametrize("spec", [{"containers": "agent"}, {"volumes": [1]},
                                  {"containers": [{"name": "a", "env": {"A": "b"}}]}])
async def test_a_malformed_pod_is_denied_as_bad_request(spec: dict[str, Any]) -> None:
    obj = {"metadata": {"annotations": {"sidekey.io/inject": "true"}}, "spec": spec}
    status, out = await answer(handler(), reviewing.review(obj))
    assert status == 200 and out["response"]["allowed"] is False
    assert out["response"]["status"]["code"] == 400


async def test_a_pod_update_that_is_not_debugging_is_a_no_op() -> None:
    h = handler()
    _, out = await answer(h, reviewing.review(reviewing.pod(), operation="UPDATE", old=reviewing.pod()))
    assert out["response"]["allowed"] is True and "patch" not in out["response"]


# --- HTTP ---------------------------------------------------------------------


async def _client(h: serving.Handler) -> TestClient[web.Request, web.Application]:
    client = TestClient(TestServer(serving.make_app(h)))
    await client.start_server()
    return client


async def test_an_oversized_body_gets_413_and_the_server_keeps_serving() -> None:
    client = await _client(handler())
    try:
        resp = await client.post(contract.WEBHOOK_PATH, data=b"x" * (serving.MAX_BODY_BYTES + 1))
        assert resp.status == 413
        assert (await resp.json())["error"]["type"] == "request_too_large"
        assert "exceeds" in (await resp.json())["error"]["message"]
        ok = await client.post(contract.WEBHOOK_PATH, data=reviewing.body(reviewing.review(reviewing.pod())))
        assert ok.status == 200
    finally:
        await client.close()


async def test_both_paths_health_and_metrics_are_served() -> None:
    h = handler()
    client = await _client(h)
    try:
        for path in (contract.WEBHOOK_PATH, contract.WEBHOOK_NAMESPACE_PATH):
            resp = await client.post(path, data=reviewing.body(reviewing.review(reviewing.pod(inject=None))))
            assert resp.status == 200
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200
        assert (await client.get(contract.WEBHOOK_PATH)).status == 405
        text = await (await client.get("/metrics")).text()
        assert 'sidekey_webhook_admissions_total{reason="not-opted-in",result="skipped"} 1.0' in text
        assert 'sidekey_webhook_admissions_total{reason="namespace-label",result="injected"} 1.0' in text
        assert "sidekey_webhook_admission_duration_seconds_bucket" in text
    finally:
        await client.close()


async def test_readyz_fails_until_the_policies_are_listed() -> None:
    class NotYet(caching.StaticPolicies):
        @property
        def ready(self) -> bool:
            return False

    h = serving.Handler(settings.Settings(), NotYet(), metrics=metrics_mod.Metrics())
    client = await _client(h)
    try:
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert await resp.json() == {"ready": False, "failing": {"policies": "AgentPolicies not listed yet"}}
    finally:
        await client.close()


async def test_kubectl_debug_general_profile_may_trace_an_agent_but_not_gain_sys_admin() -> None:
    h = handler()
    _, traced = await answer(h, _debug(_injected_pod(), targetContainerName="agent",
                                       securityContext={"capabilities": {"add": ["SYS_PTRACE"]}}))
    assert traced["response"]["allowed"] is True
    _, admin = await answer(h, _debug(_injected_pod(), targetContainerName="agent",
                                      securityContext={"capabilities": {"add": ["SYS_ADMIN"]}}))
    assert admin["response"]["allowed"] is False
    assert contract.ANNOTATION_ALLOW_CAPABILITIES in admin["response"]["status"]["message"]
