"""The chart's MutatingWebhookConfiguration: safe to fail closed, and what the e2e tests register.

There is one configuration, the chart's. The e2e tests and the demo register
it too, with each entry's ``clientConfig`` rewritten to the local webhook's
URL (``localcluster.helm.local_webhook_configuration``); everything that
routes a request (rules, matchConditions, selectors) is the chart's own.
"""

from __future__ import annotations

import base64
from typing import Any

from sidekey.core import contract
from sidekey.localcluster import helm

ROUTING = ("rules", "matchConditions", "sideEffects", "admissionReviewVersions", "matchPolicy",
           "reinvocationPolicy", "failurePolicy", "namespaceSelector", "timeoutSeconds")


def _chart() -> dict[str, Any]:
    [config] = helm.template(show_only=["templates/webhook-mutatingwebhookconfiguration.yaml"])
    return config


def test_every_entry_is_safe_to_fail_closed() -> None:
    for hook in _chart()["webhooks"]:
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["timeoutSeconds"] <= 10  # a stuck webhook delays opted-in pods by at most this
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["matchPolicy"] == "Equivalent"
        assert hook["failurePolicy"] == "Fail"
        assert hook.get("objectSelector", {}) == {}
        assert hook["matchConditions"], "only opted-in pods may reach the webhook"
        excluded = next(e for e in hook["namespaceSelector"]["matchExpressions"]
                        if e["key"] == "kubernetes.io/metadata.name")
        assert excluded["operator"] == "NotIn"
        assert set(contract.SYSTEM_NAMESPACES) | {helm.NAMESPACE} <= set(excluded["values"])
        ops = {(tuple(r["resources"]), tuple(r["operations"])) for r in hook["rules"]}
        assert ops == {(("pods",), ("CREATE",)), (("pods/ephemeralcontainers",), ("UPDATE",))}


def test_the_namespace_entry_selects_labelled_namespaces_only() -> None:
    hooks = {h["name"]: h for h in _chart()["webhooks"]}
    assert set(hooks) == {contract.WEBHOOK_NAME, contract.WEBHOOK_NAMESPACE_NAME}
    assert {"key": contract.LABEL_INJECT, "operator": "In", "values": [contract.LABEL_INJECT_ENABLED]} in (
        hooks[contract.WEBHOOK_NAMESPACE_NAME]["namespaceSelector"]["matchExpressions"])


def test_the_local_configuration_is_the_charts_pointed_at_a_url() -> None:
    chart = {h["name"]: h for h in _chart()["webhooks"]}
    local = helm.local_webhook_configuration("https://127.0.0.1:8443/", b"CA PEM", name="sidekey-e2e-1")
    assert local["metadata"]["name"] == "sidekey-e2e-1"
    paths = {contract.WEBHOOK_NAME: contract.WEBHOOK_PATH,
             contract.WEBHOOK_NAMESPACE_NAME: contract.WEBHOOK_NAMESPACE_PATH}
    for hook in local["webhooks"]:
        assert hook["clientConfig"] == {"url": "https://127.0.0.1:8443" + paths[hook["name"]],
                                        "caBundle": base64.b64encode(b"CA PEM").decode()}
        for key in ROUTING:
            assert hook[key] == chart[hook["name"]][key], f"{hook['name']}: {key} differs"
