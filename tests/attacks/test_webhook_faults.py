"""The running webhook under bad input and load: a clear 4xx or the no-op answer, never a 5xx or a crash.

Malformed AdmissionReviews are posted over real HTTPS to a real ``sidekey
webhook`` process; afterwards it must still be alive and answer a good review
correctly. Concurrent admissions go both straight to the webhook (200 reviews
at once, each answered for its own uid) and through the apiserver (pods
created in parallel, each stored with its sidecar).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from sidekey.core import contract
from tests.support.namespaces import make_namespace
from tests.support.webhook import RunningWebhook, running_webhook
from tests.webhook import reviewing

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hook(cluster: Any, crds: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningWebhook]:
    with running_webhook(cluster, tmp_path_factory.mktemp("webhook-faults")) as h:
        yield h


def _post_many(hook: RunningWebhook, bodies: list[bytes], path: str = contract.WEBHOOK_PATH,
               content_type: str = "application/json") -> list[tuple[int, bytes]]:
    ctx = ssl.create_default_context(cadata=hook.ca.cert_pem.decode())

    async def run() -> list[tuple[int, bytes]]:
        connector = aiohttp.TCPConnector(ssl=ctx, limit=100)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
            async def one(body: bytes) -> tuple[int, bytes]:
                async with s.post(hook.url + path, data=body, headers={"Content-Type": content_type}) as r:
                    return r.status, await r.read()

            return list(await asyncio.gather(*(one(b) for b in bodies)))

    return asyncio.run(run())


def _good_review(uid: str = "good-uid") -> bytes:
    return reviewing.body(reviewing.review(reviewing.pod("agents"), uid=uid))


MALFORMED: dict[str, bytes] = {
    "empty-body": b"",
    "not-json": b"{not json",
    "json-array": b"[]",
    "json-null": b"null",
    "json-string": b'"AdmissionReview"',
    "binary": bytes(range(256)),
    "invalid-utf8-in-json": b'{"kind": "AdmissionReview", "x": "\xff\xfe"}',
    "wrong-kind": json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "Pod", "request": {}}).encode(),
    "wrong-version": json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                                 "request": {"uid": "u"}}).encode(),
    "no-request": json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
    "missing-uid": json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                               "request": {"kind": {"kind": "Pod"}}}).encode(),
    "uid-not-a-string": reviewing.body(reviewing.review(reviewing.pod(), uid=123)),  # type: ignore[arg-type]
    "object-missing": reviewing.body(reviewing.review(None)),
    "object-a-list": reviewing.body(reviewing.review([1, 2])),  # type: ignore[arg-type]
    "spec-a-string": reviewing.body(reviewing.review({"metadata": {}, "spec": "x"})),
    "containers-not-a-list": reviewing.body(reviewing.review({"metadata": {}, "spec": {"containers": {"a": 1}}})),
    "annotations-not-strings": reviewing.body(reviewing.review(
        {"metadata": {"annotations": {"sidekey.io/inject": True}}, "spec": {"containers": []}})),
    "non-pod-object": reviewing.body(reviewing.review({"kind": "Secret"}, kind="Secret", resource="secrets")),
    "deeply-nested": b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": '
                     + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "oversized": b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "x": "'
                 + b"A" * (8 << 20) + b'"}',
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_review_gets_a_4xx_or_an_answer_never_a_5xx(hook: RunningWebhook, case: str) -> None:
    [(status, body)] = _post_many(hook, [MALFORMED[case]])
    assert status < 500, (case, status, body[:300])
    if status == 200:
        response = json.loads(body)["response"]
        assert response["uid"]
        if not response.get("allowed"):
            assert response["status"]["message"], "a refusal must say why"
    assert hook.process.running
    [(ok, good)] = _post_many(hook, [_good_review()])
    assert ok == 200 and json.loads(good)["response"]["uid"] == "good-uid"


def test_a_wrong_content_type_or_path_gets_a_4xx(hook: RunningWebhook) -> None:
    [(status, _)] = _post_many(hook, [_good_review()], content_type="text/plain")
    assert 400 <= status < 500 or status == 200
    [(status, _)] = _post_many(hook, [_good_review()], path="/mutate/../admin")
    assert 400 <= status < 500
    assert hook.process.running


def test_200_concurrent_reviews_are_each_answered_for_their_own_uid(hook: RunningWebhook) -> None:
    uids = [f"uid-{i}" for i in range(200)]
    answers = _post_many(hook, [_good_review(u) for u in uids])
    assert [s for s, _ in answers] == [200] * 200
    got = [json.loads(b)["response"] for _, b in answers]
    assert [r["uid"] for r in got] == uids
    patches = {r.get("patch") for r in got}
    assert len(patches) == 1 and None not in patches, "identical pods must get identical patches"
    ops = json.loads(base64.b64decode(next(iter(patches))))
    assert any(op["path"].startswith("/spec/initContainers") for op in ops)


def test_pods_created_in_parallel_through_the_apiserver_all_get_their_sidecar(
        cluster: Any, hook: RunningWebhook) -> None:
    ns = make_namespace(cluster, "skconcurrent")
    try:
        errors: list[str] = []

        def create(i: int) -> None:
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"agent-{i}", "namespace": ns,
                                "annotations": {contract.ANNOTATION_INJECT: "true"}},
                   "spec": {"containers": [{"name": "agent", "image": "example.invalid/agent:1"}]}}
            try:
                cluster.kubectl("create", "-f", "-", input=json.dumps(pod))
            except Exception as exc:
                errors.append(f"{i}: {getattr(exc, 'stderr', exc)}")

        threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        pods = json.loads(cluster.kubectl("get", "pods", "-n", ns, "-o", "json"))["items"]
        assert len(pods) == 16
        for p in pods:
            assert p["spec"]["initContainers"][0]["name"] == contract.SIDECAR_CONTAINER_NAME
            assert p["spec"]["automountServiceAccountToken"] is False
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
