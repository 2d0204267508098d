"""The operator on a real control plane: status, Secrets, conflicts, RBAC, pods.

The operator runs as a subprocess (``sidekey operator``) against the session's
kube-apiserver; the controller-manager's garbage collector does the deleting.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.operator.support import ALLOWED_SIDECAR_IMAGE, EXCLUDED_NAMESPACE, policy, secret, service_account
from tests.support.kubectl import apply, condition, get, wait_for
from tests.support.namespaces import make_namespace
from tests.support.operator import SIDECAR_IMAGE, RunningOperator

pytestmark = pytest.mark.e2e
KEY_VALUE = "sk-live-UNIQUE-7f3a9c-never-shown"


def _ready(cluster: Any, ns: str, name: str, status: str = "True", timeout: float = 15.0
           ) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        p = get(cluster, "agentpolicy", name, ns)
        c = condition(p, "Ready")
        if p and c and c["status"] == status and c["observedGeneration"] == p["metadata"]["generation"]:
            return p
        return None
    result: dict[str, Any] = wait_for(f"{ns}/{name} Ready={status}", check, timeout)
    return result


def _as(cluster: Any, token: str, path: str) -> int:
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    req = urllib.request.Request(cluster.url + path, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# --- status -------------------------------------------------------------------------------


def test_a_policy_whose_secret_exists_becomes_ready(cluster: Any, operator: RunningOperator,
                                                   namespace: str) -> None:
    apply(cluster, service_account("agent", namespace), secret("openai", namespace, **{"api-key": KEY_VALUE}))
    apply(cluster, policy("agents", namespace))
    p = _ready(cluster, namespace, "agents")
    status = p["status"]
    assert status["observedGeneration"] == p["metadata"]["generation"]
    assert status["upstreamCount"] == 1
    ready, resolved = condition(p, "Ready"), condition(p, "SecretsResolved")
    assert ready is not None and resolved is not None
    assert ready["reason"] == "Ready" and "agent" in ready["message"]
    assert resolved["status"] == "True" and resolved["reason"] == "Resolved"
    assert ready["lastTransitionTime"]
    # kubectl get shows the printer columns
    table = cluster.kubectl("get", "apol", "-n", namespace)
    header, row = table.split("\n")[:2]
    starts = [m.start() for m in re.finditer(r"\S+", header)]  # columns are fixed-width
    cells = {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)}
    assert list(cells)[:2] == ["NAME", "UPSTREAMS"]
    assert (cells["NAME"], cells["UPSTREAMS"], cells["READY"]) == ("agents", "1", "True")
    # no kopf finalizer or state annotation on the policy
    assert not p["metadata"].get("finalizers")
    assert not any("kopf" in k for k in (p["metadata"].get("annotations") or {}))
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json")
    reasons = {e["reason"] for e in json.loads(events)["items"]
               if e["involvedObject"]["name"] == "agents"}
    assert {"Ready", "RBACUpdated"} <= reasons


def test_a_missing_secret_is_reported_and_clears_within_seconds(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    apply(cluster, policy("agents", namespace))
    p = _ready(cluster, namespace, "agents", "False")
    resolved = condition(p, "SecretsResolved")
    assert resolved is not None
    assert (resolved["status"], resolved["reason"]) == ("False", "SecretNotFound")
    assert "'openai'" in resolved["message"] and "'api-key'" in resolved["message"]
    assert condition(p, "Ready")["reason"] == "SecretsUnresolved"  # type: ignore[index]

    apply(cluster, secret("openai", namespace, other="x"))
    p = wait_for("KeyNotFound", lambda: (c := condition(get(cluster, "agentpolicy", "agents", namespace),
                                                         "SecretsResolved")) and c["reason"] == "KeyNotFound" and c)
    assert "no key 'api-key'" in p["message"]

    apply(cluster, secret("openai", namespace, **{"api-key": ""}))
    wait_for("KeyEmpty", lambda: (c := condition(get(cluster, "agentpolicy", "agents", namespace),
                                                 "SecretsResolved")) and c["reason"] == "KeyEmpty")

    started = time.monotonic()
    apply(cluster, secret("openai", namespace, **{"api-key": KEY_VALUE}))
    _ready(cluster, namespace, "agents", "True", timeout=10)
    assert time.monotonic() - started < 5

    started = time.monotonic()
    cluster.kubectl("delete", "secret", "openai", "-n", namespace)
    _ready(cluster, namespace, "agents", "False", timeout=10)
    assert time.monotonic() - started < 5
    warnings = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json"))["items"]
    assert any(e["type"] == "Warning" and e["reason"] == "SecretsUnresolved" for e in warnings)


def test_a_policy_the_schema_accepts_but_the_parser_refuses_gets_a_clear_condition(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    apply(cluster, service_account("agent", namespace), secret("openai", namespace, **{"api-key": "k"}))
    apply(cluster, policy("agents", namespace))
    _ready(cluster, namespace, "agents")
    wait_for("role", lambda: get(cluster, "role", "sidekey-policy-agents", namespace))
    # Go's URL parser (the CEL isURL) accepts any digits as a port; ours does not.
    apply(cluster, policy("agents", namespace, url="https://api.example.com:99999/v1"))
    p = _ready(cluster, namespace, "agents", "False")
    ready = condition(p, "Ready")
    assert ready is not None and ready["reason"] == "InvalidSpec"
    assert ready["message"].startswith("spec.upstreams[0].url:")
    # an invalid policy grants nothing
    wait_for("role removed", lambda: get(cluster, "role", "sidekey-policy-agents", namespace) is None)
    assert get(cluster, "rolebinding", "sidekey-policy-agents", namespace) is None
    # and fixing it restores everything
    apply(cluster, policy("agents", namespace))
    _ready(cluster, namespace, "agents")
    wait_for("role back", lambda: get(cluster, "role", "sidekey-policy-agents", namespace))
    assert operator.process.poll() is None


def test_a_newer_policy_giving_the_same_upstream_is_in_conflict_until_the_older_goes(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    apply(cluster, secret("openai", namespace, **{"api-key": "k"}))
    apply(cluster, policy("older", namespace))
    _ready(cluster, namespace, "older")
    time.sleep(1.1)  # creationTimestamp has one-second resolution
    apply(cluster, policy("newer", namespace, env="OTHER_URL"))
    p = _ready(cluster, namespace, "newer", "False")
    ready = condition(p, "Ready")
    assert ready is not None and ready["reason"] == "Conflict"
    assert "'older'" in ready["message"] and "'openai'" in ready["message"]
    assert condition(get(cluster, "agentpolicy", "older", namespace), "Ready")["status"] == "True"  # type: ignore[index]
    # the env var alone conflicts too
    apply(cluster, policy("envclash", namespace, upstream="azure"))
    p = _ready(cluster, namespace, "envclash", "False")
    assert "OPENAI_BASE_URL" in condition(p, "Ready")["message"]  # type: ignore[index]
    # the older one goes: the newer one takes over
    cluster.kubectl("delete", "agentpolicy", "older", "-n", namespace)
    _ready(cluster, namespace, "newer", "True")


# --- RBAC ---------------------------------------------------------------------------------


def test_the_subject_can_read_exactly_the_referenced_secret(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    apply(cluster, service_account("agent", namespace), service_account("bystander", namespace),
          secret("openai", namespace, **{"api-key": "k"}), secret("other", namespace, token="t"))
    apply(cluster, policy("agents", namespace))
    _ready(cluster, namespace, "agents")
    token = cluster.token(namespace, "agent", audience=cluster.issuer)
    base = f"/api/v1/namespaces/{namespace}/secrets"
    assert _as(cluster, token, f"{base}/openai") == 200
    assert _as(cluster, token, f"{base}?fieldSelector=metadata.name%3Dopenai") == 200
    assert _as(cluster, token, f"{base}?fieldSelector=metadata.name%3Dopenai&watch=1&timeoutSeconds=1") == 200
    assert _as(cluster, token, f"{base}/other") == 403
    assert _as(cluster, token, base) == 403
    assert _as(cluster, token, f"/apis/sidekey.io/v1alpha1/namespaces/{namespace}/agentpolicies") == 200
    assert _as(cluster, token, "/api/v1/namespaces/default/secrets/openai") == 403
    # no subresource, no write
    assert _as(cluster, token, f"/apis/sidekey.io/v1alpha1/namespaces/{namespace}/agentpolicies/agents/status") == 403
    other = cluster.token(namespace, "bystander", audience=cluster.issuer)
    assert _as(cluster, other, f"{base}/openai") == 403
    # the policy's audience is refused by the apiserver altogether
    agent_token = cluster.token(namespace, "agent", audience="sidekey")
    assert _as(cluster, agent_token, f"{base}/openai") == 401


def test_editing_the_policy_moves_the_grant_to_the_new_secret(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    apply(cluster, service_account("agent", namespace), service_account("second", namespace),
          secret("openai", namespace, **{"api-key": "k"}), secret("rotated", namespace, **{"api-key": "k2"}))
    apply(cluster, policy("agents", namespace))
    _ready(cluster, namespace, "agents")
    apply(cluster, policy("agents", namespace, secret_name="rotated", service_accounts=("agent", "second")))
    _ready(cluster, namespace, "agents")
    role = wait_for("role updated", lambda: (r := get(cluster, "role", "sidekey-policy-agents", namespace))
                    and r["rules"][0]["resourceNames"] == ["rotated"] and r)
    assert role["rules"][1] == {"apiGroups": ["sidekey.io"], "resources": ["agentpolicies"],
                                "verbs": ["get", "list", "watch"]}
    binding = get(cluster, "rolebinding", "sidekey-policy-agents", namespace)
    assert binding is not None
    assert sorted(s["name"] for s in binding["subjects"]) == ["agent", "second"]
    base = f"/api/v1/namespaces/{namespace}/secrets"
    token = cluster.token(namespace, "second", audience=cluster.issuer)
    assert _as(cluster, token, f"{base}/rotated") == 200
    assert _as(cluster, token, f"{base}/openai") == 403


def test_a_hand_edited_role_or_deleted_binding_is_put_back(cluster: Any, operator: RunningOperator, namespace: str) -> None:
    apply(cluster, secret("openai", namespace, **{"api-key": "k"}))
    apply(cluster, policy("agents", namespace))
    _ready(cluster, namespace, "agents")
    wait_for("role", lambda: get(cluster, "role", "sidekey-policy-agents", namespace))
    cluster.kubectl("patch", "role", "sidekey-policy-agents", "-n", namespace, "--type=json", "-p",
                    json.dumps([{"op": "remove", "path": "/rules/0/resourceNames"}]))
    wait_for("role restored", lambda: (r := get(cluster, "role", "sidekey-policy-agents", namespace))
             and r["rules"][0].get("resourceNames") == ["openai"])
    cluster.kubectl("delete", "rolebinding", "sidekey-policy-agents", "-n", namespace)
    wait_for("binding recreated", lambda: get(cluster, "rolebinding", "sidekey-policy-agents", namespace))


def test_a_role_of_the_same_name_that_someone_else_owns_is_not_taken_over(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    apply(cluster, secret("openai", namespace, **{"api-key": "k"}), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "sidekey-policy-agents", "namespace": namespace},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]})
    apply(cluster, policy("agents", namespace))
    p = _ready(cluster, namespace, "agents", "False")
    ready = condition(p, "Ready")
    assert ready is not None and ready["reason"] == "RoleConflict"
    role = get(cluster, "role", "sidekey-policy-agents", namespace)
    assert role is not None and role["rules"][0]["resources"] == ["configmaps"]
    # once the other Role is gone, the operator (retrying with backoff) takes its place
    cluster.kubectl("delete", "role", "sidekey-policy-agents", "-n", namespace)
    _ready(cluster, namespace, "agents", "True", timeout=30)


def test_deleting_the_policy_removes_its_role_and_binding(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    apply(cluster, secret("openai", namespace, **{"api-key": "k"}))
    apply(cluster, policy("agents", namespace))
    _ready(cluster, namespace, "agents")
    role = wait_for("role", lambda: get(cluster, "role", "sidekey-policy-agents", namespace))
    ref = role["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["name"], ref["controller"]) == ("AgentPolicy", "agents", True)
    cluster.kubectl("delete", "agentpolicy", "agents", "-n", namespace)
    wait_for("role gone", lambda: get(cluster, "role", "sidekey-policy-agents", namespace) is None, 30)
    wait_for("binding gone",
             lambda: get(cluster, "rolebinding", "sidekey-policy-agents", namespace) is None, 30)


def test_a_namespace_with_policies_is_deleted_without_getting_stuck(
        cluster: Any, operator: RunningOperator) -> None:
    ns = make_namespace(cluster, "sk-del")
    apply(cluster, secret("openai", ns, **{"api-key": "k"}), policy("agents", ns))
    _ready(cluster, ns, "agents")
    cluster.kubectl("delete", "namespace", ns, "--wait=false")
    wait_for("namespace gone", lambda: get(cluster, "namespace", ns) is None, 60, 0.5)


# --- secrecy, pods, endpoints ------------------------------------------------------------------


def test_no_secret_value_reaches_status_events_or_logs(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    apply(cluster, secret("openai", namespace, **{"api-key": KEY_VALUE}))
    apply(cluster, policy("agents", namespace, key="wrong-key"))
    _ready(cluster, namespace, "agents", "False")
    apply(cluster, policy("agents", namespace))
    _ready(cluster, namespace, "agents")
    encoded = base64.b64encode(KEY_VALUE.encode()).decode()
    seen = (cluster.kubectl("get", "agentpolicy", "agents", "-n", namespace, "-o", "yaml")
            + cluster.kubectl("get", "events", "-n", namespace, "-o", "yaml")
            + operator.output() + operator.metrics())
    assert KEY_VALUE not in seen and encoded not in seen


def _pod(name: str, ns: str, *, annotation: str | None = None, sidecar_image: str | None = None
         ) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns,
                     "annotations": {"sidekey.io/inject": annotation} if annotation else {}},
        "spec": {"containers": [{"name": "agent", "image": "example.invalid/agent:1"}]},
    }
    if sidecar_image:
        pod["spec"]["initContainers"] = [{"name": "sidekey-proxy", "image": sidecar_image,
                                          "restartPolicy": "Always"}]
    return pod


def _pod_events(cluster: Any, ns: str, reason: str) -> set[str]:
    items = json.loads(cluster.kubectl("get", "events", "-n", ns, "-o", "json"))["items"]
    return {e["involvedObject"]["name"] for e in items if e["reason"] == reason}


def test_an_opted_in_pod_without_the_sidecar_is_reported(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    before = operator.metric("sidekey_uninjected_pods")
    apply(cluster, _pod("bare", namespace, annotation="true"),
          _pod("injected", namespace, annotation="true", sidecar_image=SIDECAR_IMAGE),
          _pod("opted-out", namespace, annotation="false"),
          _pod("not-asked", namespace))
    wait_for("SidecarMissing event", lambda: "bare" in _pod_events(cluster, namespace, "SidecarMissing"))
    wait_for("gauge", lambda: operator.metric("sidekey_uninjected_pods") == before + 1)
    time.sleep(0.5)
    assert _pod_events(cluster, namespace, "SidecarMissing") == {"bare"}
    event = next(e for e in json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json"))["items"]
                 if e["reason"] == "SidecarMissing")
    assert event["type"] == "Warning" and "recreate" in event["message"]
    cluster.kubectl("delete", "pod", "bare", "-n", namespace, "--wait=false")
    wait_for("gauge back", lambda: operator.metric("sidekey_uninjected_pods") == before)


def test_a_labelled_namespace_opts_its_pods_in(cluster: Any, operator: RunningOperator) -> None:
    ns = make_namespace(cluster, "sk-lbl", labels={"sidekey.io/inject": "enabled"})
    try:
        apply(cluster, _pod("plain", ns), _pod("opted-out", ns, annotation="false"))
        wait_for("SidecarMissing event", lambda: "plain" in _pod_events(cluster, ns, "SidecarMissing"))
        time.sleep(0.5)
        assert _pod_events(cluster, ns, "SidecarMissing") == {"plain"}
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_a_pod_with_an_older_sidecar_is_counted_as_outdated(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    before = operator.metric("sidekey_outdated_sidecars")
    apply(cluster, _pod("old", namespace, annotation="true", sidecar_image="ghcr.io/sidekey/sidekey:0.0.1"))
    wait_for("outdated gauge", lambda: operator.metric("sidekey_outdated_sidecars") == before + 1)
    wait_for("event", lambda: "old" in _pod_events(cluster, namespace, "SidecarOutdated"))
    cluster.kubectl("delete", "pod", "old", "-n", namespace, "--wait=false")
    wait_for("gauge back", lambda: operator.metric("sidekey_outdated_sidecars") == before)


def test_pods_in_an_excluded_namespace_are_never_reported_missing_the_sidecar(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    # Bug: the operator warned SidecarMissing about pods the webhook never injects
    # (webhook.excludedNamespaces), even in a labelled namespace.
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": EXCLUDED_NAMESPACE, "labels": {"sidekey.io/inject": "enabled"}}})
    try:
        apply(cluster, _pod("legacy", EXCLUDED_NAMESPACE, annotation="true"),
              _pod("control", namespace, annotation="true"))
        # the control pod, created at the same time, is reported: events are flowing
        wait_for("control reported", lambda: "control" in _pod_events(cluster, namespace, "SidecarMissing"))
        time.sleep(1.0)
        assert _pod_events(cluster, EXCLUDED_NAMESPACE, "SidecarMissing") == set()
    finally:
        cluster.kubectl("delete", "namespace", EXCLUDED_NAMESPACE, "--wait=false", check=False)


def test_a_pod_running_an_allow_listed_sidecar_image_is_not_outdated(
        cluster: Any, operator: RunningOperator, namespace: str) -> None:
    # Bug: a pod that picked an allow-listed image (sidekey.io/image) was
    # reported SidecarOutdated for as long as it ran.
    before = operator.metric("sidekey_outdated_sidecars")
    apply(cluster, _pod("mirrored", namespace, annotation="true", sidecar_image=ALLOWED_SIDECAR_IMAGE),
          _pod("old", namespace, annotation="true", sidecar_image="ghcr.io/sidekey/sidekey:0.0.1"))
    wait_for("old reported", lambda: "old" in _pod_events(cluster, namespace, "SidecarOutdated"))
    time.sleep(1.0)
    assert _pod_events(cluster, namespace, "SidecarOutdated") == {"old"}
    assert operator.metric("sidekey_outdated_sidecars") == before + 1


def test_health_and_metrics_endpoints_answer(cluster: Any, operator: RunningOperator) -> None:
    assert operator.get(operator.health_port, "/healthz") == (200, "ok")
    assert operator.get(operator.health_port, "/readyz") == (200, '{"ready": true, "failing": {}}')
    text = operator.metrics()
    for name in ("sidekey_operator_reconciles_total", "sidekey_operator_reconcile_duration_seconds_bucket",
                 "sidekey_operator_errors", "sidekey_uninjected_pods", "sidekey_outdated_sidecars",
                 "sidekey_operator_blocked_subject_pods"):
        assert name in text, name
    assert operator.metric('sidekey_operator_reconciles_total{result="ready"}') >= 1
