"""The chart's ``_contract.tpl`` is generated from the contract and the sidecar builder, and in use.

A drift test (the file is what ``contract_template.render`` makes of today's
``core/contract.py`` and ``webhook/sidecars.py``), and checks on the rendered
chart that compare *values*: the objects helm renders carry the contract's
names, not a stale copy that merely contains the right substring somewhere.
"""

from __future__ import annotations

import os
import re
from typing import Any

from sidekey.core import contract
from sidekey.localcluster import helm
from tests.chart import contract_template


def _by_key(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata'].get('namespace', '')}/{d['metadata']['name']}": d for d in docs}


def test_the_contract_template_is_generated_from_the_contract_and_the_sidecar() -> None:
    wanted = contract_template.render()
    if os.environ.get("SIDEKEY_UPDATE_GOLDENS") == "1":
        contract_template.TEMPLATE.write_text(wanted)
    assert contract_template.TEMPLATE.read_text() == wanted, (
        "charts/sidekey/templates/_contract.tpl drifted from core/contract.py or webhook/sidecars.py; "
        "regenerate it with SIDEKEY_UPDATE_GOLDENS=1 pytest tests/chart/test_contract_template.py")


def test_a_changed_contract_value_changes_the_rendering(monkeypatch: Any) -> None:
    """The drift test can fail: the rendering follows the contract, value by value."""
    monkeypatch.setattr(contract, "SIDECAR_CONTAINER_NAME", "sidekey-proxy-2")
    monkeypatch.setattr(contract, "SIDECAR_API_TOKEN_EXPIRATION_SECONDS", 7200)
    text = contract_template.render()
    assert text != contract_template.TEMPLATE.read_text()
    assert "sidekey-proxy-2" in text
    assert "serviceAccountToken.expirationSeconds == 7200" in text


def test_the_guard_names_no_contract_value_of_its_own() -> None:
    """The guard and webhook templates take every contract name from the includes."""
    for template in ("guard-bypass.yaml", "webhook-mutatingwebhookconfiguration.yaml"):
        text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", (helm.CHART / "templates" / template).read_text(),
                      flags=re.S)  # comments may explain the names
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        for name in (contract.SIDECAR_CONTAINER_NAME, contract.API_TOKEN_VOLUME, contract.ENV_API_SERVER,
                     " ".join(contract.SIDECAR_COMMAND), "kube-public", "SYS_PTRACE", "NET_RAW",
                     contract.WEBHOOK_PATH + '"', contract.ANNOTATION_INJECT, contract.ANNOTATION_IMAGE,
                     contract.ANNOTATION_ALLOW_HOST_NETWORK, contract.ANNOTATION_ALLOW_HOST_PID,
                     contract.ANNOTATION_ALLOW_SHARED_PROCESS_NAMESPACE, contract.ANNOTATION_ALLOW_PRIVILEGED,
                     contract.ANNOTATION_ALLOW_HOST_PATH, contract.ANNOTATION_ALLOW_CAPABILITIES):
            assert name not in text, f"{template} spells {name!r} itself; include it from _contract.tpl"


def test_the_rendered_bypass_guard_carries_the_contracts_values() -> None:
    [policy, binding] = helm.template(show_only=["templates/guard-bypass.yaml"])
    assert policy["spec"]["paramKind"] == {"apiVersion": contract.API_VERSION, "kind": contract.KIND}
    [namespaces] = [e for e in policy["spec"]["matchConstraints"]["namespaceSelector"]["matchExpressions"]]
    assert namespaces["values"] == sorted(contract.SYSTEM_NAMESPACES)
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert variables["sidecarName"] == f"'{contract.SIDECAR_CONTAINER_NAME}'"
    assert variables["apiVolume"] == f"'{contract.API_TOKEN_VOLUME}'"
    import json

    assert json.loads(variables["sidecarCommand"]) == list(contract.SIDECAR_COMMAND)
    field_env = json.loads(variables["sidecarFieldEnv"])
    assert set(field_env) == {contract.ENV_POD_NAME, contract.ENV_POD_NAMESPACE, contract.ENV_POD_UID,
                              contract.ENV_POD_IP, contract.ENV_POD_IPS, contract.ENV_SERVICE_ACCOUNT}
    assert json.loads(variables["sidecarValueEnv"]) == {
        contract.ENV_PROXY_PORT: "", contract.ENV_HEALTH_PORT: str(contract.DEFAULT_HEALTH_PORT),
        contract.ENV_AUDIENCE: contract.DEFAULT_AUDIENCE}
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]


def test_chart_values_reach_the_guards_expectations() -> None:
    [policy, _] = helm.template({"sidecar": {"healthPort": 9999, "audience": "agents.example"}},
                                show_only=["templates/guard-bypass.yaml"])
    import json

    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert json.loads(variables["sidecarValueEnv"])[contract.ENV_HEALTH_PORT] == "9999"
    assert json.loads(variables["sidecarValueEnv"])[contract.ENV_AUDIENCE] == "agents.example"


def test_the_webhook_configuration_and_deployments_use_the_contracts_values() -> None:
    docs = _by_key(helm.template({"monitoring": {"enabled": True}}))
    config = docs["MutatingWebhookConfiguration//sidekey"]
    hooks = {h["name"]: h for h in config["webhooks"]}
    assert hooks[contract.WEBHOOK_NAME]["clientConfig"]["service"]["path"] == contract.WEBHOOK_PATH
    assert hooks[contract.WEBHOOK_NAMESPACE_NAME]["clientConfig"]["service"]["path"] == \
        contract.WEBHOOK_NAMESPACE_PATH
    first = hooks[contract.WEBHOOK_NAME]["matchConditions"][0]["expression"]
    assert f"'{contract.ANNOTATION_INJECT}'" in first and f"'{contract.SIDECAR_CONTAINER_NAME}'" in first
    selector = hooks[contract.WEBHOOK_NAMESPACE_NAME]["namespaceSelector"]["matchExpressions"][0]
    assert selector == {"key": contract.LABEL_INJECT, "operator": "In", "values": [contract.LABEL_INJECT_ENABLED]}
    webhook = docs["Deployment/sidekey-system/sidekey-webhook"]["spec"]["template"]["spec"]["containers"][0]
    assert webhook["readinessProbe"]["httpGet"]["path"] == contract.READY_PATH
    assert webhook["livenessProbe"]["httpGet"]["path"] == contract.HEALTHZ_PATH
    operator = docs["Deployment/sidekey-system/sidekey-operator"]["spec"]["template"]
    assert operator["metadata"]["annotations"]["prometheus.io/path"] == contract.METRICS_PATH
    assert operator["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == contract.READY_PATH
    monitors = [d for d in docs.values() if d["kind"] == "PodMonitor"]
    assert monitors, "monitoring.enabled renders a PodMonitor for the sidecars"
    for endpoint in monitors[0]["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] == contract.HEALTH_PORT_NAME
        assert endpoint["path"] == contract.METRICS_PATH
