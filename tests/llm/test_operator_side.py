"""The operator's side, without a cluster: invalid LLM fields become a condition; ledgers and the Spend column."""

from __future__ import annotations

from typing import Any

from sidekey.core import llmledger, policies
from sidekey.operator import ledger, rbac, verdicts


def raw(**llm: Any) -> dict[str, Any]:
    return {"apiVersion": "sidekey.io/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": "p", "namespace": "team", "uid": "uid-p"},
            "spec": {"subjects": {"serviceAccounts": ["agent", "other"]}, "upstreams": [{
                "name": "openai", "url": "https://api.openai.com/v1",
                "auth": {"type": "bearer", "secretRef": {"name": "k", "key": "k"}},
                "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}], **llm}]}}


def test_an_invalid_llm_field_is_an_invalid_spec_condition_naming_it() -> None:
    parsed = verdicts.parse(raw(api="openai", budgets=[{"tokens": 10, "window": "1w"}]))
    assert isinstance(parsed, policies.PolicyError)
    verdict = verdicts.invalid(raw(), parsed)
    assert verdict.ready.reason == "InvalidSpec"
    assert verdict.ready.message.startswith("spec.upstreams[0].budgets[0].window:")


def test_one_ledger_per_service_account_budget_and_subject_and_the_role_grants_exactly_those() -> None:
    policy = policies.parse(raw(api="openai", budgets=[{"tokens": 100, "window": "1h"},
                                                       {"tokens": 900, "window": "24h", "scope": "serviceAccount"}]))
    places = llmledger.places(policy)
    assert [(p.service_account, p.index) for p in places] == [("agent", 1), ("other", 1)]
    [rule] = [r for r in rbac.role(policy)["rules"] if r.get("resources") == ["leases"]]
    assert rule["resourceNames"] == sorted(p.name for p in places) and rule["verbs"] == ["get", "update"]
    lease = ledger.new_lease(places[0], policy, now=1_764_547_200.0)
    assert lease["metadata"]["ownerReferences"][0]["uid"] == "uid-p"
    assert llmledger.loads(lease["metadata"]["annotations"][llmledger.ANNOTATION]).tokens == 900


def test_a_policy_without_service_account_budgets_grants_no_lease() -> None:
    policy = policies.parse(raw(api="openai", budgets=[{"tokens": 100, "window": "1h"}]))
    assert not [r for r in rbac.role(policy)["rules"] if r.get("resources") == ["leases"]]


def test_the_spend_column_shows_the_most_spent_budget() -> None:
    entries = [{"upstream": "a", "serviceAccount": "x", "window": "1h", "tokens": 1000, "spent": 100},
               {"upstream": "b", "serviceAccount": "y", "window": "24h", "tokens": 200, "spent": 150}]
    assert ledger.spend_column(entries) == "150/200 per 24h (b/y)"
    assert ledger.spend_column([]) == ""
