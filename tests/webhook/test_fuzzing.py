"""Whatever arrives, the handler answers: never an exception, never a 5xx, never an internal error.

Pods are generated from ``webhook.shapes.POD`` itself: at every level a
field is either of its right type or any JSON at all, so the examples reach
deep into the checks with one wrong leaf as often as with none.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidekey.webhook import caching, serving, shapes
from sidekey.webhook import metrics as metrics_mod
from sidekey.webhook import settings as settings_mod
from tests.webhook import reviewing

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
LEAVES = {
    str: st.sampled_from(["agent", "sidekey-proxy", "sidekey-token", "sidekey-api-access", "openai-key",
                          "kube-api-access-x", "/var/run/secrets/sidekey.io/token", "SYS_PTRACE", ""]),
    bool: st.booleans(),
    int: st.sampled_from([8787, 8788, 80]),
}


def typed(schema: shapes.Schema) -> st.SearchStrategy[Any]:
    if schema is shapes.MAP_OF_STRINGS:
        right: st.SearchStrategy[Any] = st.dictionaries(
            st.sampled_from(["sidekey.io/inject", "sidekey.io/port", "sidekey.io/allow-host-pid", "x"]),
            st.sampled_from(["true", "false", "9000", "x"]), max_size=3)
    elif isinstance(schema, dict):
        right = st.fixed_dictionaries({}, optional={k: typed(v) for k, v in schema.items()})
    elif isinstance(schema, list):
        right = st.lists(typed(schema[0]), max_size=3)
    else:
        right = LEAVES[schema]
    return st.one_of(right, right, right, JSON)  # mostly right, sometimes anything


def _check(raw: bytes) -> None:
    h = serving.Handler(settings_mod.Settings(), caching.StaticPolicies(), metrics=metrics_mod.Metrics())
    status, out = asyncio.run(h.review(raw))
    assert status in (200, 400)
    if status == 200:
        assert out["response"]["uid"]
    internal = h.metrics.registry.get_sample_value(
        "sidekey_webhook_admissions_total", {"result": "error", "reason": "internal"})
    assert not internal, "a malformed pod reached code that assumed a well-formed one"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=typed(shapes.POD), operation=st.sampled_from(["CREATE", "UPDATE"]),
       sub=st.sampled_from([None, "ephemeralcontainers"]), opted_in=st.booleans())
def test_a_malformed_pod_never_causes_an_internal_error(pod: Any, operation: str, sub: str | None,
                                                        opted_in: bool) -> None:
    if opted_in and isinstance(pod, dict) and isinstance(pod.get("metadata"), dict):
        pod["metadata"]["annotations"] = {"sidekey.io/inject": "true"}
    _check(reviewing.body(reviewing.review(pod, operation=operation, sub_resource=sub, old=pod)))


@settings(max_examples=100, deadline=None)
@given(doc=JSON)
def test_any_json_gets_a_4xx_or_an_answer(doc: Any) -> None:
    _check(json.dumps(doc).encode())
