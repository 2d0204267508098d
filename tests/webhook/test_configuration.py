"""The MutatingWebhookConfiguration the tests register (the chart renders the same shape)."""

from __future__ import annotations

from typing import Any

import pytest

from sidekey.core import contract
from sidekey.webhook import configuration


def config() -> dict[str, Any]:
    return configuration.mutating_webhook_configuration(
        ca_bundle="Q0E=", url="https://127.0.0.1:8443", own_namespace="sidekey-system")


def test_every_entry_is_safe_to_fail_closed() -> None:
    for hook in config()["webhooks"]:
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["timeoutSeconds"] <= 5
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["matchPolicy"] == "Equivalent"
        assert hook["failurePolicy"] == "Fail"
        assert hook["objectSelector"] == {}
        assert hook["matchConditions"], "only opted-in pods may reach the webhook"
        assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": ["kube-node-lease", "kube-public", "kube-system", "sidekey-system"]} in (
            hook["namespaceSelector"]["matchExpressions"])
        ops = {(tuple(r["resources"]), tuple(r["operations"])) for r in hook["rules"]}
        assert ops == {(("pods",), ("CREATE",)), (("pods/ephemeralcontainers",), ("UPDATE",))}


def test_the_two_entries_call_their_own_paths() -> None:
    first, second = config()["webhooks"]
    assert first["name"] == contract.WEBHOOK_NAME
    assert first["clientConfig"]["url"] == "https://127.0.0.1:8443" + contract.WEBHOOK_PATH
    assert second["name"] == contract.WEBHOOK_NAMESPACE_NAME
    assert second["clientConfig"]["url"] == "https://127.0.0.1:8443" + contract.WEBHOOK_NAMESPACE_PATH
    assert {"key": contract.LABEL_INJECT, "operator": "In", "values": [contract.LABEL_INJECT_ENABLED]} in (
        second["namespaceSelector"]["matchExpressions"])


def test_a_service_reference_is_accepted_for_the_chart_shape() -> None:
    out = configuration.mutating_webhook_configuration(
        ca_bundle="Q0E=", service={"name": "sidekey-webhook", "namespace": "sidekey", "port": 443})
    assert out["webhooks"][1]["clientConfig"]["service"]["path"] == contract.WEBHOOK_NAMESPACE_PATH


def test_exactly_one_client_config_is_required() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        configuration.mutating_webhook_configuration(ca_bundle="Q0E=")
