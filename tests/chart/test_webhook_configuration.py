"""The chart's MutatingWebhookConfiguration routes exactly as the webhook's own template.

The webhook's tests register ``sidekey.webhook.configuration`` by URL; users get
the chart's rendering. Both must send the same requests (rules, selectors, CEL
conditions) or a feature tested in one would silently be missing in the other,
as `kubectl debug` once was.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from sidekey.localcluster import binaries
from sidekey.webhook import configuration

CHART = Path(__file__).resolve().parents[2] / "charts" / "sidekey"
ROUTING = ("rules", "matchConditions", "sideEffects", "admissionReviewVersions", "matchPolicy",
           "reinvocationPolicy", "failurePolicy")


def _rendered() -> dict[str, object]:
    helm = binaries.find().helm
    out = subprocess.run(
        [str(helm), "template", "sidekey", str(CHART), "--namespace", "sidekey-system",
         "--kube-version", "1.36.3", "--show-only", "templates/webhook-mutatingwebhookconfiguration.yaml"],
        capture_output=True, text=True, check=True, timeout=60)
    doc: dict[str, object] = yaml.safe_load(out.stdout)
    return doc


def test_the_chart_routes_every_request_the_webhook_template_routes() -> None:
    chart = {w["name"]: w for w in _rendered()["webhooks"]}  # type: ignore[attr-defined]
    ours = configuration.mutating_webhook_configuration(
        ca_bundle="", service={"name": "sidekey-webhook", "namespace": "sidekey-system", "port": 443},
        own_namespace="sidekey-system")
    assert set(chart) == {w["name"] for w in ours["webhooks"]}
    for want in ours["webhooks"]:
        got = chart[want["name"]]
        for key in ROUTING:
            assert got[key] == want[key], f"{want['name']}: {key} differs"
        assert got["clientConfig"]["service"]["path"] == want["clientConfig"]["service"]["path"]
        assert _selector(got) == _selector(want), want["name"]


def _selector(webhook: dict[str, Any]) -> set[tuple[str, str, frozenset[str]]]:
    return {(e["key"], e["operator"], frozenset(e.get("values", [])))
            for e in webhook["namespaceSelector"]["matchExpressions"]}
