"""The Role and RoleBinding a policy gets, built without a cluster."""

from __future__ import annotations

from typing import Any

from sidekey.core import contract, policies
from sidekey.operator import rbac
from tests.operator.support import policy


def _parsed(**kw: Any) -> policies.AgentPolicy:
    m = policy("agents", "team", **kw)
    m["metadata"]["uid"] = "uid-1"
    return policies.parse(m)


def test_the_role_names_exactly_the_referenced_secrets_and_reads_policies() -> None:
    role = rbac.role(_parsed())
    assert role["metadata"]["name"] == "sidekey-policy-agents"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["openai"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["sidekey.io"], "resources": ["agentpolicies"], "verbs": ["get", "list", "watch"]},
    ]
    ref = role["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("AgentPolicy", "uid-1", True)
    assert role["metadata"]["labels"][contract.LABEL_MANAGED_BY] == contract.MANAGED_BY


def test_the_binding_binds_each_service_account_of_the_namespace() -> None:
    binding = rbac.role_binding(_parsed(service_accounts=("b", "a")))
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "a", "namespace": "team"},
        {"kind": "ServiceAccount", "name": "b", "namespace": "team"},
    ]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "sidekey-policy-agents"}


def test_long_policy_names_give_valid_object_names_and_label_values() -> None:
    long = "a" * 253
    assert len(rbac.object_name(long)) <= 253
    assert rbac.object_name(long) != rbac.object_name("a" * 252 + "b")
    value = rbac.label_value(long)
    assert len(value) <= 63 and value[-1].isalnum()
    assert rbac.label_value("short") == "short"


def test_a_served_role_matches_regardless_of_order_and_differs_on_a_new_secret() -> None:
    wanted = rbac.role(_parsed())
    served: dict[str, Any] = {"metadata": {"labels": dict(wanted["metadata"]["labels"])},
                              "rules": [dict(r, verbs=list(reversed(r["verbs"]))) for r in wanted["rules"]]}
    assert rbac.role_matches(served, wanted)
    assert not rbac.role_matches(served, rbac.role(_parsed(secret_name="other")))
    assert rbac.owned_by({"metadata": {"ownerReferences": [{"uid": "uid-1", "controller": True}]}}, "uid-1")
    assert not rbac.owned_by({"metadata": {"ownerReferences": [{"uid": "uid-1"}]}}, "uid-1")
    assert not rbac.owned_by({"metadata": {}}, "uid-1")
