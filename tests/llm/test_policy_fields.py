"""The LLM fields of an upstream: api, models, budgets, capMaxTokens (core/llmpolicy.py)."""

from __future__ import annotations

from typing import Any

import pytest

from sidekey.core import contract, llmpolicy, policies


def manifest(**llm: Any) -> dict[str, Any]:
    up: dict[str, Any] = {
        "name": "openai", "url": "https://api.openai.com/v1",
        "auth": {"type": "bearer", "secretRef": {"name": "openai", "key": "api-key"}},
        "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
        **llm,
    }
    return {"apiVersion": contract.API_VERSION, "kind": contract.KIND,
            "metadata": {"name": "p", "namespace": "team", "uid": "u"},
            "spec": {"subjects": {"serviceAccounts": ["agent"]}, "upstreams": [up]}}


def test_an_upstream_without_api_is_paths_only() -> None:
    assert policies.parse(manifest()).upstreams[0].llm is None


def test_api_models_and_budgets_parse() -> None:
    up = policies.parse(manifest(
        api="openai", models=["gpt-4.1*", "o3"],
        budgets=[{"tokens": 1000, "window": "1h", "scope": "pod"},
                 {"tokens": 50000, "window": "24h", "scope": "serviceAccount"}],
        capMaxTokens=False)).upstreams[0]
    assert up.llm is not None
    assert up.llm.api == "openai" and up.llm.cap_max_tokens is False
    assert [b.window_seconds for b in up.llm.budgets] == [3600, 86400]
    assert up.llm.budgets[1].scope == "serviceAccount"
    assert up.llm.budgets[1].label == "50000 tokens per 24h per serviceAccount"


def test_scope_defaults_to_pod_and_capping_to_on() -> None:
    llm = policies.parse(manifest(api="anthropic", budgets=[{"tokens": 5, "window": "30m"}])).upstreams[0].llm
    assert llm is not None and llm.budgets[0].scope == "pod" and llm.cap_max_tokens is True


@pytest.mark.parametrize(("pattern", "model", "allowed"), [
    ("gpt-4.1*", "gpt-4.1", True),
    ("gpt-4.1*", "gpt-4.1-mini-2025-04-14", True),
    ("gpt-4.1*", "gpt-4o", False),
    ("gpt-4.1", "gpt-4.1-mini", False),
    ("gpt-4.1", "gpt-4.1", True),
    ("*", "anything", True),
    ("claude-sonnet-4*", "claude-opus-4", False),
    ("ft:gpt-4o:org::abc", "ft:gpt-4o:org::abc", True),
])
def test_model_patterns_are_exact_or_a_star_suffixed_prefix(pattern: str, model: str, allowed: bool) -> None:
    llm = llmpolicy.Llm(api="openai", models=(llmpolicy.ModelPattern(pattern),), budgets=())
    assert llm.allows_model(model) is allowed


def test_no_models_means_any_model() -> None:
    assert llmpolicy.Llm(api="openai", models=(), budgets=()).allows_model("whatever")


@pytest.mark.parametrize(("fields", "where", "says"), [
    ({"models": ["gpt-4o"]}, "spec.upstreams[0].models", "needs api"),
    ({"budgets": [{"tokens": 1, "window": "1h"}]}, "spec.upstreams[0].budgets", "needs api"),
    ({"api": "gemini"}, "spec.upstreams[0].api", "openai, anthropic"),
    ({"api": "openai", "models": ["gpt-*-mini"]}, "spec.upstreams[0].models[0]", "prefix ending in '*'"),
    ({"api": "openai", "models": ["*gpt"]}, "spec.upstreams[0].models[0]", "not a model name"),
    ({"api": "openai", "budgets": [{"tokens": 0, "window": "1h"}]}, "spec.upstreams[0].budgets[0].tokens",
     "between 1 and"),
    ({"api": "openai", "budgets": [{"tokens": True, "window": "1h"}]}, "spec.upstreams[0].budgets[0].tokens",
     "integer"),
    ({"api": "openai", "budgets": [{"tokens": 9, "window": "1w"}]}, "spec.upstreams[0].budgets[0].window",
     "30m, 1h, 24h or 30d"),
    ({"api": "openai", "budgets": [{"tokens": 9, "window": "400d"}]}, "spec.upstreams[0].budgets[0].window",
     "between 1m and 366d"),
    ({"api": "openai", "budgets": [{"tokens": 9}]}, "spec.upstreams[0].budgets[0].window", "is required"),
    ({"api": "openai", "budgets": [{"tokens": 9, "window": "1h", "scope": "namespace"}]},
     "spec.upstreams[0].budgets[0].scope", "pod, serviceAccount"),
    ({"api": "openai", "budgets": [{"tokens": 9, "window": "1h"}, {"tokens": 8, "window": "1h"}]},
     "spec.upstreams[0].budgets[1]", "repeats"),
    ({"api": "openai", "capMaxTokens": "no"}, "spec.upstreams[0].capMaxTokens", "boolean"),
])
def test_bad_llm_fields_say_which_field_and_what_to_fix(fields: dict[str, Any], where: str, says: str) -> None:
    with pytest.raises(policies.PolicyError) as caught:
        policies.parse(manifest(**fields))
    assert caught.value.field == where
    assert says in caught.value.message


def test_windows_are_fixed_and_aligned_to_the_epoch() -> None:
    day = llmpolicy.Budget(10, "24h", 86400, "pod")
    midnight = 1_764_547_200  # 2025-12-01T00:00:00Z
    noon = midnight + 12 * 3600
    assert day.window_start(noon) == midnight
    assert day.window_end(noon) == midnight + 86400
    assert day.window_start(midnight) == midnight  # the start belongs to its own window
