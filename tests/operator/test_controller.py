"""The reconcile against an in-memory apiserver: writes, retries, quiet ends."""

from __future__ import annotations

import asyncio
import base64
import copy
import time
from collections.abc import Iterable
from typing import Any

import pytest

from sidekey.core import kubeapi, policies
from sidekey.operator import controller, metrics, queueing, recording
from tests.operator.support import policy


class FakeApi:
    """Objects by path; ``fail`` maps a (method, path) to errors raised in turn."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[tuple[str, str], list[kubeapi.ApiError]] = {}

    def _check(self, method: str, path: str) -> None:
        self.calls.append((method, path))
        errors = self.fail.get((method, path))
        if errors:
            raise errors.pop(0)

    async def get(self, path: str, params: Any = None) -> dict[str, Any] | None:
        self._check("GET", path)
        found = self.objects.get(path)
        return copy.deepcopy(found) if found is not None else None

    async def patch(self, path: str, body: Any, kind: str = "merge") -> dict[str, Any]:
        self._check("PATCH", path)
        if kind == "apply":
            self.objects[path] = copy.deepcopy(body)
        elif path.endswith("/status"):
            base = path.removesuffix("/status")
            if base not in self.objects:
                raise kubeapi.ApiError(404, "NotFound", "gone")
            self.objects[base]["status"] = copy.deepcopy(body["status"])
        return {}

    async def delete(self, path: str) -> bool:
        self._check("DELETE", path)
        return self.objects.pop(path, None) is not None

    async def create(self, path: str, body: Any) -> dict[str, Any]:
        self._check("POST", path)
        self.objects[f"{path}/{body['metadata']['name']}"] = copy.deepcopy(body)
        return {}


class Index:
    def __init__(self, *raws: dict[str, Any]) -> None:
        self.raws = list(raws)

    def __contains__(self, key: object) -> bool:
        return any(r["metadata"]["namespace"] == key for r in self.raws)

    def __getitem__(self, key: str) -> Iterable[policies.RawAgentPolicy]:
        return [r for r in self.raws if r["metadata"]["namespace"] == key]  # type: ignore[misc]


POLICY_PATH = "/apis/sidekey.io/v1alpha1/namespaces/team/agentpolicies/agents"
SECRET_PATH = "/api/v1/namespaces/team/secrets/openai"
ROLE_PATH = "/apis/rbac.authorization.k8s.io/v1/namespaces/team/roles/sidekey-policy-agents"


def _setup(secret_value: str | None = "sk-value", *, token_cache_seconds: float = 15.0
           ) -> tuple[FakeApi, controller.Controller, metrics.Metrics]:
    api = FakeApi()
    raw = policy("agents", "team")
    raw["metadata"].update(uid="u1", generation=1, creationTimestamp="2026-01-01T00:00:00Z")
    api.objects[POLICY_PATH] = raw
    if secret_value is not None:
        api.objects[SECRET_PATH] = {"data": {"api-key": base64.b64encode(secret_value.encode()).decode()}}
    stats = metrics.Metrics()
    ctl = controller.Controller(api, recording.Recorder(api), stats,  # type: ignore[arg-type]
                                token_cache_seconds=token_cache_seconds, watch_lag_seconds=0)
    ctl.attach(Index(raw))
    return api, ctl, stats


def _status(api: FakeApi) -> dict[str, Any]:
    status: dict[str, Any] = api.objects[POLICY_PATH]["status"]
    return status


async def test_a_reconcile_writes_role_binding_and_a_ready_status() -> None:
    api, ctl, stats = _setup()
    await ctl.reconcile(("team", "agents"))
    assert api.objects[ROLE_PATH]["rules"][0]["resourceNames"] == ["openai"]
    ready = next(c for c in _status(api)["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["observedGeneration"]) == ("True", 1)
    assert stats.registry.get_sample_value("sidekey_operator_reconciles_total", {"result": "ready"}) == 1


async def test_an_unchanged_world_makes_no_writes() -> None:
    api, ctl, _ = _setup()
    await ctl.reconcile(("team", "agents"))
    ctl.attach(Index(api.objects[POLICY_PATH]))  # the index now holds the written status
    api.calls.clear()
    await ctl.reconcile(("team", "agents"))
    assert all(method == "GET" for method, _ in api.calls), api.calls


async def test_a_transient_api_error_asks_the_queue_for_a_retry() -> None:
    api, ctl, stats = _setup()
    api.fail[("GET", SECRET_PATH)] = [kubeapi.ApiError(503, "ServiceUnavailable", "etcd hiccup")]
    with pytest.raises(queueing.Retry):
        await ctl.reconcile(("team", "agents"))
    assert "status" not in api.objects[POLICY_PATH]  # nothing half-written
    assert stats.registry.get_sample_value("sidekey_operator_errors_total", {"kind": "api"}) == 1
    await ctl.reconcile(("team", "agents"))
    assert next(c for c in _status(api)["conditions"] if c["type"] == "Ready")["status"] == "True"


async def test_the_queue_retries_a_transient_error_until_the_policy_is_ready() -> None:
    api, ctl, _ = _setup()
    api.fail[("GET", SECRET_PATH)] = [kubeapi.ApiError(500, "InternalError", "x")] * 2
    ctl.queue = queueing.Queue(ctl.reconcile, base_delay=0.01)
    task = asyncio.create_task(ctl.queue.run())
    ctl.queue.add(("team", "agents"))
    await asyncio.wait_for(ctl.queue.wait_idle(), 5)
    task.cancel()
    assert api.calls.count(("GET", SECRET_PATH)) == 3
    assert next(c for c in _status(api)["conditions"] if c["type"] == "Ready")["status"] == "True"


async def test_a_refused_rbac_write_is_a_condition_and_a_later_look() -> None:
    api, ctl, _ = _setup()
    api.fail[("PATCH", ROLE_PATH)] = [kubeapi.ApiError(403, "Forbidden", "roles is forbidden")]
    with pytest.raises(queueing.Retry):
        await ctl.reconcile(("team", "agents"))
    ready = next(c for c in _status(api)["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RBACFailed")
    assert "roles is forbidden" in ready["message"]


async def test_a_terminating_namespace_ends_the_reconcile_quietly() -> None:
    api, ctl, stats = _setup()
    api.fail[("PATCH", ROLE_PATH)] = [kubeapi.ApiError(
        403, "Forbidden", "unable to create new content in namespace team because it is being terminated")]
    await ctl.reconcile(("team", "agents"))  # no Retry, no error
    assert "status" not in api.objects[POLICY_PATH]
    assert stats.registry.get_sample_value("sidekey_operator_errors_total", {"kind": "reconcile"}) is None


async def test_a_policy_deleted_mid_reconcile_is_not_retried() -> None:
    api, ctl, _ = _setup()
    del api.objects[POLICY_PATH]  # gone from the apiserver, still in the index
    await ctl.reconcile(("team", "agents"))


async def test_the_secret_value_never_leaves_the_boundary() -> None:
    api, ctl, _ = _setup("sk-very-secret-value")
    await ctl.reconcile(("team", "agents"))
    assert any("/events/" in path for path in api.objects)  # Events were posted
    written = repr({k: v for k, v in api.objects.items() if k != SECRET_PATH})
    assert "sk-very-secret-value" not in written
    assert base64.b64encode(b"sk-very-secret-value").decode() not in written


# --- pods that predate the grant -----------------------------------------------------------

PODS_PATH = "/api/v1/namespaces/team/pods"
BINDING_PATH = "/apis/rbac.authorization.k8s.io/v1/namespaces/team/rolebindings/sidekey-policy-agents"
BARE_POD = {"metadata": {"namespace": "team", "name": "bare", "uid": "pod-1"},
            "spec": {"serviceAccountName": "agent",
                     "containers": [{"name": "agent", "image": "a", "volumeMounts": [
                         {"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
                     "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
                         {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}]}}


def _events(api: FakeApi) -> dict[str, dict[str, Any]]:
    return {e["reason"]: e for path, e in api.objects.items() if "/events/" in path}


async def test_a_bare_pod_of_the_subject_holds_the_grant_back_until_it_goes() -> None:
    api, ctl, stats = _setup(token_cache_seconds=0.3)
    api.objects[PODS_PATH] = {"items": [BARE_POD], "metadata": {}}
    await ctl.reconcile(("team", "agents"))
    assert api.objects[BINDING_PATH]["subjects"] == []
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert (held["status"], held["reason"]) == ("False", "UninjectedPods") and "bare" in held["message"]
    events = _events(api)
    assert events["GrantHeld"]["type"] == "Warning" and "bare" in events["GrantHeld"]["message"]
    reasons = [e["reason"] for path, e in api.objects.items() if "/events/" in path]
    assert reasons.count("GrantHeld") == 1  # Ready and SubjectsGranted say it in one Event
    assert stats.registry.get_sample_value("sidekey_operator_blocked_subject_pods") == 1

    # the pod goes: its DELETED event queues the policy, and the grant follows
    ctl.attach(Index(api.objects[POLICY_PATH]))
    ctl.pod_changed(BARE_POD, deleted=True)
    assert ctl.queue.depth == 1
    api.objects[PODS_PATH] = {"items": [], "metadata": {}}
    await ctl.reconcile(("team", "agents"))
    # the apiserver may accept the gone pod's token from its cache for a while yet
    assert api.objects[BINDING_PATH]["subjects"] == []
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert held["status"] == "False" and "bare (deleted;" in held["message"]
    assert ctl.queue.depth == 1  # a timer brings the reconcile back
    await asyncio.sleep(0.35)
    ctl.attach(Index(api.objects[POLICY_PATH]))
    await ctl.reconcile(("team", "agents"))
    assert [s["name"] for s in api.objects[BINDING_PATH]["subjects"]] == ["agent"]
    assert next(c for c in _status(api)["conditions"] if c["type"] == "Ready")["status"] == "True"
    assert stats.registry.get_sample_value("sidekey_operator_blocked_subject_pods") == 0
    assert "GrantReleased" in _events(api)


async def test_only_pod_events_that_change_the_hold_queue_a_reconcile() -> None:
    _api, ctl, _ = _setup()
    await ctl.reconcile(("team", "agents"))
    injected = {"metadata": {"namespace": "team", "name": "ok", "uid": "pod-2"},
                "spec": {"serviceAccountName": "agent", "containers": [{"name": "agent"}]}}
    ctl.pod_changed(injected, deleted=False)
    other_account = {**BARE_POD, "spec": {**BARE_POD["spec"], "serviceAccountName": "bystander"}}
    ctl.pod_changed(other_account, deleted=False)
    assert ctl.queue.depth == 0
    ctl.pod_changed(BARE_POD, deleted=False)  # a granted account gains a bare pod: revoke
    assert ctl.queue.depth == 1


async def test_the_pods_of_a_subject_are_listed_page_by_page() -> None:
    api, ctl, _ = _setup()
    pages = [{"items": [], "metadata": {"continue": "next"}}, {"items": [BARE_POD], "metadata": {}}]
    seen: list[Any] = []
    plain_get = api.get

    async def get(path: str, params: Any = None) -> dict[str, Any] | None:
        if path == PODS_PATH:
            seen.append(dict(params))
            return pages[len(seen) - 1]
        return await plain_get(path, params)

    api.get = get  # type: ignore[method-assign]
    await ctl.reconcile(("team", "agents"))
    assert [p.get("continue") for p in seen] == [None, "next"]
    assert seen[0]["fieldSelector"] == "spec.serviceAccountName=agent"
    assert api.objects[BINDING_PATH]["subjects"] == []


def _lookalike() -> dict[str, Any]:
    return {"metadata": {"namespace": "team", "name": "lookalike", "uid": "pod-3"},
            "spec": {"serviceAccountName": "agent",
                     "initContainers": [{"name": "sidekey-proxy", "image": "ghcr.io/sidekey/sidekey:0.1.0",
                                         "restartPolicy": "Always", "command": ["sh", "-c", "leak"],
                                         "volumeMounts": [{"name": "sidekey-api-access",
                                                           "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
                     "containers": [{"name": "agent", "image": "a"}],
                     "volumes": [{"name": "sidekey-api-access", "projected": {"sources": [
                         {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}]}}]}}


async def test_a_lookalike_sidecar_holds_back_a_new_grant() -> None:
    api, ctl, _ = _setup()
    api.objects[PODS_PATH] = {"items": [_lookalike()], "metadata": {}}
    await ctl.reconcile(("team", "agents"))
    assert api.objects[BINDING_PATH]["subjects"] == []
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert "lookalike" in held["message"] and "not the injected sidecar" in held["message"]
    assert "leak" not in held["message"]  # names what differs, never the value


async def test_an_account_granted_already_is_not_revoked_for_its_sidecars() -> None:
    # Its pods since passed the guard; an upgrade that changes the sidecar's
    # command must not revoke every grant.
    api, ctl, _ = _setup()
    await ctl.reconcile(("team", "agents"))
    assert [s["name"] for s in api.objects[BINDING_PATH]["subjects"]] == ["agent"]
    api.objects[PODS_PATH] = {"items": [_lookalike()], "metadata": {}}
    ctl.attach(Index(api.objects[POLICY_PATH]))
    ctl.pod_changed(_lookalike(), deleted=False)
    assert ctl.queue.depth == 0  # nothing to re-run for it
    await ctl.reconcile(("team", "agents"))
    assert [s["name"] for s in api.objects[BINDING_PATH]["subjects"]] == ["agent"]


async def test_a_gone_pod_that_settles_during_another_policys_reconcile_is_no_crash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Two policies hold the grant of one account back for the same bare pod. The
    # pod goes; while one policy's reconcile is writing its status, the other's
    # runs after the token cache's TTL and forgets the pod. The first must then
    # look again soon, not fail on the pod it no longer finds (min() of nothing).
    # The clock is moved by hand, so a slow machine cannot change what is tested.
    real, offset = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])
    api, ctl, _ = _setup(token_cache_seconds=60)
    other = policy("other", "team")
    other["metadata"].update(uid="u2", generation=1, creationTimestamp="2026-01-02T00:00:00Z")
    other_path = POLICY_PATH.replace("/agents", "/other")
    api.objects[other_path] = other
    ctl.attach(Index(api.objects[POLICY_PATH], other))
    api.objects[PODS_PATH] = {"items": [BARE_POD], "metadata": {}}
    await ctl.reconcile(("team", "agents"))
    await ctl.reconcile(("team", "other"))
    api.objects[PODS_PATH] = {"items": [], "metadata": {}}
    ctl.attach(Index(api.objects[POLICY_PATH], api.objects[other_path]))
    await ctl.reconcile(("team", "agents"))  # the pod is gone: settling, still held
    ctl.attach(Index(api.objects[POLICY_PATH], api.objects[other_path]))

    plain_patch = api.patch
    inside = False

    async def patch(path: str, body: Any, kind: str = "merge") -> dict[str, Any]:
        nonlocal inside
        if path == other_path + "/status" and not inside:
            inside = True
            offset[0] += 61  # the token cache's TTL passes meanwhile
            await ctl.reconcile(("team", "agents"))  # and this one forgets the pod
        return await plain_patch(path, body, kind)

    api.patch = patch  # type: ignore[method-assign]
    await ctl.reconcile(("team", "other"))  # raised ValueError before the fix
    assert inside
    assert ctl.queue.depth >= 1  # it looks again (and then grants)


SECRETS_PATH = "/api/v1/namespaces/team/secrets"
LEGACY_TOKEN = {"type": "kubernetes.io/service-account-token",
                "metadata": {"namespace": "team", "name": "agent-token", "uid": "secret-1",
                             "annotations": {"kubernetes.io/service-account.name": "agent"}},
                "data": {"token": base64.b64encode(b"eyJ-the-legacy-token").decode()}}


async def test_a_legacy_token_secret_of_the_subject_holds_the_grant_back_until_it_goes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real, offset = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])
    api, ctl, stats = _setup(token_cache_seconds=60)
    seen: list[Any] = []
    plain_get = api.get

    async def get(path: str, params: Any = None) -> dict[str, Any] | None:
        if path == SECRETS_PATH:
            seen.append(dict(params))
        return await plain_get(path, params)

    api.get = get  # type: ignore[method-assign]
    api.objects[SECRETS_PATH] = {"items": [LEGACY_TOKEN], "metadata": {}}
    await ctl.reconcile(("team", "agents"))
    assert seen[0]["fieldSelector"] == "type=kubernetes.io/service-account-token"
    assert api.objects[BINDING_PATH]["subjects"] == []
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert (held["status"], held["reason"]) == ("False", "LegacyTokenSecrets")
    assert "Secret agent-token" in held["message"] and "recreate" not in held["message"]
    written = repr([_status(api), list(_events(api).values())])
    assert LEGACY_TOKEN["data"]["token"] not in written and "the-legacy-token" not in written
    assert stats.registry.get_sample_value("sidekey_operator_blocked_subject_pods") == 0  # no pod

    # its change events reach the policy naming its account, and no other
    ctl.attach(Index(api.objects[POLICY_PATH]))
    ctl.secret_changed("team", "agent-token", {**LEGACY_TOKEN, "metadata": {
        **LEGACY_TOKEN["metadata"], "annotations": {"kubernetes.io/service-account.name": "bystander"}}})
    assert ctl.queue.depth == 0
    ctl.secret_changed("team", "agent-token", LEGACY_TOKEN)
    assert ctl.queue.depth == 1

    # deleted: its token may authenticate from the apiserver's cache a little longer, then the grant
    api.objects[SECRETS_PATH] = {"items": [], "metadata": {}}
    await ctl.reconcile(("team", "agents"))
    assert api.objects[BINDING_PATH]["subjects"] == []
    offset[0] += 61
    ctl.attach(Index(api.objects[POLICY_PATH]))
    await ctl.reconcile(("team", "agents"))
    assert [s["name"] for s in api.objects[BINDING_PATH]["subjects"]] == ["agent"]


# --- after an operator restart ---------------------------------------------------------------


def _restarted(api: FakeApi, stats: metrics.Metrics | None = None) -> controller.Controller:
    """A new operator process on the same apiserver: nothing in memory, the policy as served."""
    ctl = controller.Controller(api, recording.Recorder(api), stats or metrics.Metrics(),  # type: ignore[arg-type]
                                token_cache_seconds=60, watch_lag_seconds=0)
    ctl.attach(Index(api.objects[POLICY_PATH]))
    return ctl


async def test_a_restart_right_after_a_held_pod_went_does_not_grant_before_the_token_cache_expires(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The held pod goes and the operator restarts at once: the new instance never
    # saw the pod, and the apiserver may still accept a token copied from it. Before
    # the grace, it granted in its first reconcile.
    real, offset = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])
    api, old, _ = _setup(token_cache_seconds=60)
    api.objects[PODS_PATH] = {"items": [BARE_POD], "metadata": {}}
    await old.reconcile(("team", "agents"))
    assert api.objects[BINDING_PATH]["subjects"] == []
    api.objects[PODS_PATH] = {"items": [], "metadata": {}}  # deleted; then the restart

    stats = metrics.Metrics()
    ctl = _restarted(api, stats)
    await ctl.reconcile(("team", "agents"))
    assert api.objects[BINDING_PATH]["subjects"] == []
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert (held["status"], held["reason"]) == ("False", "OperatorRestarted")
    assert "service account agent waits until" in held["message"] and "restarted" in held["message"]
    ready = next(c for c in _status(api)["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "GrantHeld")
    assert "restarted" in _events(api)["GrantHeld"]["message"]
    assert stats.registry.get_sample_value("sidekey_operator_blocked_subject_pods") == 0  # no pod known
    assert ctl.queue.depth == 1  # a timer brings the reconcile back when the grace ends

    offset[0] += 30  # still within the grace: another reconcile grants nothing
    ctl.attach(Index(api.objects[POLICY_PATH]))
    await ctl.reconcile(("team", "agents"))
    assert api.objects[BINDING_PATH]["subjects"] == []
    offset[0] += 31
    ctl.attach(Index(api.objects[POLICY_PATH]))
    await ctl.reconcile(("team", "agents"))
    assert [s["name"] for s in api.objects[BINDING_PATH]["subjects"]] == ["agent"]
    assert next(c for c in _status(api)["conditions"] if c["type"] == "Ready")["status"] == "True"
    assert "GrantReleased" in _events(api)


async def test_the_restart_grace_counts_from_the_policys_first_listing_not_the_process_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A pod deleted after the new instance started but before it first listed the
    # policy's pods was never seen either.
    real, offset = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])
    api, old, _ = _setup(token_cache_seconds=60)
    api.objects[PODS_PATH] = {"items": [BARE_POD], "metadata": {}}
    await old.reconcile(("team", "agents"))
    ctl = _restarted(api)
    offset[0] += 120  # long after the start; the pod goes only now
    api.objects[PODS_PATH] = {"items": [], "metadata": {}}
    await ctl.reconcile(("team", "agents"))
    assert api.objects[BINDING_PATH]["subjects"] == []


async def test_after_a_restart_accounts_already_bound_keep_their_grant_and_new_policies_get_theirs_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real, offset = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])
    api, old, _ = _setup(token_cache_seconds=60)
    await old.reconcile(("team", "agents"))
    assert [s["name"] for s in api.objects[BINDING_PATH]["subjects"]] == ["agent"]
    ctl = _restarted(api)
    api.calls.clear()
    await ctl.reconcile(("team", "agents"))
    assert [s["name"] for s in api.objects[BINDING_PATH]["subjects"]] == ["agent"]
    assert all(method == "GET" for method, _ in api.calls), api.calls  # nothing changed
    assert ctl.queue.depth == 0

    # a policy no operator reconciled before: nothing was held, so nothing waits
    fresh = policy("fresh", "team", service_accounts=("newcomer",))
    fresh["metadata"].update(uid="u3", generation=1, creationTimestamp="2026-01-03T00:00:00Z")
    fresh_path = POLICY_PATH.replace("/agents", "/fresh")
    api.objects[fresh_path] = fresh
    ctl.attach(Index(api.objects[POLICY_PATH], fresh))
    await ctl.reconcile(("team", "fresh"))
    binding = api.objects[BINDING_PATH.replace("-agents", "-fresh")]
    assert [s["name"] for s in binding["subjects"]] == ["newcomer"]


async def test_a_first_reconcile_that_fails_after_a_restart_starts_the_grace_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The pods that failed run listed were never remembered (``_held``): one
    # deleted after it is as unseen as one deleted before the restart.
    real, offset = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])
    api, old, _ = _setup(token_cache_seconds=60)
    api.objects[PODS_PATH] = {"items": [BARE_POD], "metadata": {}}
    await old.reconcile(("team", "agents"))
    ctl = _restarted(api)
    api.fail[("GET", ROLE_PATH)] = [kubeapi.ApiError(503, "ServiceUnavailable", "x")]
    with pytest.raises(queueing.Retry):
        await ctl.reconcile(("team", "agents"))  # listed the pod, remembered nothing
    offset[0] += 61
    api.objects[PODS_PATH] = {"items": [], "metadata": {}}  # the pod goes only now
    await ctl.reconcile(("team", "agents"))
    assert api.objects[BINDING_PATH]["subjects"] == []
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert held["reason"] == "OperatorRestarted"


# --- pods that went before their account was named ----------------------------------------


def _clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    real, offset = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])
    return offset


def _of(account: str, uid: str = "pod-9", name: str = "copied", namespace: str = "team"
        ) -> dict[str, Any]:
    pod = copy.deepcopy(BARE_POD)
    pod["metadata"].update(uid=uid, name=name, namespace=namespace)
    pod["spec"]["serviceAccountName"] = account
    return pod


def _name(api: FakeApi, ctl: controller.Controller, *accounts: str) -> None:
    """What the admin does: the policy now names ``accounts`` (a new generation)."""
    raw = api.objects[POLICY_PATH]
    raw["spec"]["subjects"]["serviceAccounts"] = list(accounts)
    raw["metadata"]["generation"] += 1
    ctl.attach(Index(raw))


def _subjects(api: FakeApi) -> list[str]:
    return [s["name"] for s in api.objects[BINDING_PATH]["subjects"]]


async def test_a_bare_pod_that_went_before_its_account_was_named_holds_the_new_grant_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Someone who may create pods as ``late`` (nobody's subject) runs a bare pod, copies
    # its token and deletes it. The admin names ``late`` a moment later: no pod is left
    # to list, but the apiserver may still accept the copied token from its cache.
    # Before the memory of every exposed pod that goes, this granted at once.
    offset = _clock(monkeypatch)
    api, ctl, _ = _setup(token_cache_seconds=60)
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent"]
    ctl.pod_changed(_of("late"), deleted=False)
    assert ctl.queue.depth == 0  # nobody names late: nothing to reconcile
    ctl.pod_changed(_of("late"), deleted=True)
    assert ctl.queue.depth == 0

    offset[0] += 5
    _name(api, ctl, "agent", "late")
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent"]  # late waits, agent keeps its grant
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert (held["status"], held["reason"]) == ("False", "UninjectedPods")
    assert "copied (deleted;" in held["message"] and "late" in held["message"]
    assert next(c for c in _status(api)["conditions"] if c["type"] == "Ready")["reason"] == "GrantHeld"
    assert "copied" in _events(api)["GrantHeld"]["message"]
    assert ctl.queue.depth == 1  # a timer brings the reconcile back when the cache has let go

    offset[0] += 54  # 59 s after the deletion: still held
    ctl.attach(Index(api.objects[POLICY_PATH]))
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent"]
    offset[0] += 1.5
    ctl.attach(Index(api.objects[POLICY_PATH]))
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent", "late"]
    assert next(c for c in _status(api)["conditions"] if c["type"] == "Ready")["status"] == "True"


async def test_only_exposed_pods_of_the_namespace_that_went_hold_a_new_grant_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch)
    api, ctl, _ = _setup(token_cache_seconds=60)
    injected = {"metadata": {"namespace": "team", "name": "ok", "uid": "pod-2"},
                "spec": {"serviceAccountName": "late", "containers": [{"name": "agent"}]}}
    ctl.pod_changed(injected, deleted=True)  # held no API token: nothing to remember
    ctl.pod_changed(_of("late", namespace="elsewhere"), deleted=True)  # another namespace's
    ctl.pod_changed(_of("bystander"), deleted=True)  # another account's
    _name(api, ctl, "agent", "late")
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent", "late"]


async def test_a_pod_that_went_does_not_take_a_grant_back_from_an_account_bound_already(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Its pods lived while it was bound, so holding it back now gains nothing; and a
    # rollout that deletes pods with an older sidecar (a look-alike to the vetting)
    # must not revoke the grant.
    _clock(monkeypatch)
    api, ctl, _ = _setup(token_cache_seconds=60)
    await ctl.reconcile(("team", "agents"))
    ctl.pod_changed(_lookalike(), deleted=True)
    ctl.pod_changed(_of("agent"), deleted=True)
    ctl.attach(Index(api.objects[POLICY_PATH]))
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent"]
    assert ctl.queue.depth == 0


async def test_a_lookalike_sidecars_pod_that_went_holds_a_new_grant_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch)
    api, ctl, _ = _setup(token_cache_seconds=60)
    await ctl.reconcile(("team", "agents"))
    mimic = _lookalike()
    mimic["spec"]["serviceAccountName"] = "late"
    ctl.pod_changed(mimic, deleted=True)  # vetted as for a new grant: its sidecar is not ours
    _name(api, ctl, "agent", "late")
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent"]
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert "lookalike (deleted;" in held["message"]


async def test_an_edit_that_makes_a_policy_invalid_and_valid_again_keeps_the_hold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The invalid version forgets what it held (it grants nothing), but the pod
    # watch saw the held pod go, so the valid one again still waits for it.
    offset = _clock(monkeypatch)
    api, ctl, _ = _setup(token_cache_seconds=60)
    api.objects[PODS_PATH] = {"items": [BARE_POD], "metadata": {}}
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == []
    raw = api.objects[POLICY_PATH]
    good = copy.deepcopy(raw["spec"])
    raw["spec"]["upstreams"][0]["url"] = "not a url"
    raw["metadata"]["generation"] += 1
    ctl.attach(Index(raw))
    await ctl.reconcile(("team", "agents"))
    assert next(c for c in _status(api)["conditions"] if c["type"] == "Ready")["reason"] == "InvalidSpec"
    assert BINDING_PATH not in api.objects
    ctl.pod_changed(BARE_POD, deleted=True)
    api.objects[PODS_PATH] = {"items": [], "metadata": {}}
    offset[0] += 3
    raw = api.objects[POLICY_PATH]
    raw["spec"] = good
    raw["metadata"]["generation"] += 1
    ctl.attach(Index(raw))
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == []
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert "bare (deleted;" in held["message"]


async def test_past_its_capacity_the_memory_makes_the_namespace_wait_rather_than_forget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    offset = _clock(monkeypatch)
    api = FakeApi()
    raw = policy("agents", "team")
    raw["metadata"].update(uid="u1", generation=1, creationTimestamp="2026-01-01T00:00:00Z")
    api.objects[POLICY_PATH] = raw
    api.objects[SECRET_PATH] = {"data": {"api-key": base64.b64encode(b"sk-value").decode()}}
    ctl = controller.Controller(api, recording.Recorder(api), metrics.Metrics(),  # type: ignore[arg-type]
                                token_cache_seconds=60, gone_capacity=2, watch_lag_seconds=0)
    ctl.attach(Index(raw))
    await ctl.reconcile(("team", "agents"))
    for i in range(2):
        ctl.pod_changed(_of("bystander", uid=f"b{i}", name=f"b{i}"), deleted=True)
    offset[0] += 10
    ctl.pod_changed(_of("late", uid="lost", name="lost"), deleted=True)  # no room left for it
    _name(api, ctl, "agent", "late")
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent"]  # bound stays bound; late waits
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert (held["status"], held["reason"]) == ("False", "TooManyPodsGone")
    assert "service account late waits until" in held["message"] and "lost" not in held["message"]
    assert ctl.queue.depth == 1  # a timer brings the reconcile back when the wait ends
    offset[0] += 55  # the two remembered ones have expired, the lost one not yet
    ctl.attach(Index(api.objects[POLICY_PATH]))
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent"]
    offset[0] += 6
    ctl.attach(Index(api.objects[POLICY_PATH]))
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent", "late"]


async def test_a_new_grant_waits_a_moment_for_a_deletion_the_listing_missed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The pod is force-deleted just before the reconcile lists the account's pods, and
    # its DELETED event reaches the controller only after that listing (kopf batches
    # each object's events for 0.1 s). The new grant gives the watch that moment.
    _clock(monkeypatch)
    api = FakeApi()
    raw = policy("agents", "team", service_accounts=("agent", "late"))
    raw["metadata"].update(uid="u1", generation=1, creationTimestamp="2026-01-01T00:00:00Z")
    api.objects[POLICY_PATH] = raw
    api.objects[SECRET_PATH] = {"data": {"api-key": base64.b64encode(b"sk-value").decode()}}
    ctl = controller.Controller(api, recording.Recorder(api), metrics.Metrics(),  # type: ignore[arg-type]
                                token_cache_seconds=60, watch_lag_seconds=0.2)
    ctl.attach(Index(raw))
    plain_get = api.get

    async def get(path: str, params: Any = None) -> dict[str, Any] | None:
        found = await plain_get(path, params)
        if path == PODS_PATH and (params or {}).get("fieldSelector", "").endswith("=late"):
            loop = asyncio.get_running_loop()  # the event arrives 0.1 s after the listing
            loop.call_later(0.1, lambda: ctl.pod_changed(_of("late"), deleted=True))
        return found

    api.get = get  # type: ignore[method-assign]
    started = time.monotonic()
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent"]  # ["agent", "late"] without the wait
    assert time.monotonic() - started >= 0.2
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert "copied (deleted;" in held["message"]

    # nothing new to grant (agent is bound, late held): no wait
    api.get = plain_get  # type: ignore[method-assign]
    ctl.attach(Index(api.objects[POLICY_PATH]))
    started = time.monotonic()
    await ctl.reconcile(("team", "agents"))
    assert time.monotonic() - started < 0.2


async def test_a_legacy_token_secret_deleted_before_its_account_was_named_holds_the_new_grant_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    offset = _clock(monkeypatch)
    api, ctl, _ = _setup(token_cache_seconds=60)
    await ctl.reconcile(("team", "agents"))
    late = copy.deepcopy(LEGACY_TOKEN)
    late["metadata"]["annotations"]["kubernetes.io/service-account.name"] = "late"
    ctl.secret_changed("team", "agent-token", late, deleted=True)
    _name(api, ctl, "agent", "late")
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent"]
    held = next(c for c in _status(api)["conditions"] if c["type"] == "SubjectsGranted")
    assert held["reason"] == "LegacyTokenSecrets" and "Secret agent-token" in held["message"]
    assert "deleted, the apiserver may accept its token" in held["message"]
    offset[0] += 61
    ctl.attach(Index(api.objects[POLICY_PATH]))
    await ctl.reconcile(("team", "agents"))
    assert _subjects(api) == ["agent", "late"]
