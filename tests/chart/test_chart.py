"""The chart, checked offline with the real helm: lint, schema, goldens, contract names.

Goldens live in tests/chart/golden/ and are compared as parsed YAML (so a
comment or quoting change is not a diff). After a deliberate change, refresh
them with ``SIDEKEY_UPDATE_GOLDENS=1 pytest tests/chart/test_chart.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidekey.core import contract
from sidekey.localcluster import helm

GOLDEN = Path(__file__).with_name("golden")

#: Value sets with a golden each: the defaults, and the switches people flip.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "cert-manager": {"certManager": {"enabled": True}},
    "monitoring": {"monitoring": {"enabled": True, "labels": {"release": "prometheus"}}},
    "failure-policy-fail": {"webhook": {"failurePolicy": "Fail", "timeoutSeconds": 5,
                                        "reinvocationPolicy": "Never",
                                        "excludedNamespaces": ["legacy"]}},
    "failure-policy-ignore": {"webhook": {"failurePolicy": "Ignore"},
                              "networkPolicy": {"enabled": True},
                              "sidecar": {"imageAllowList": ["registry.example/sidekey:0.1.1"]},
                              "guards": {"extraTokenAudiences": ["sts.amazonaws.com"]}},
}


def _by_key(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata'].get('namespace', '')}/{d['metadata']['name']}": d for d in docs}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_chart_lints_strictly(name: str) -> None:
    out = helm.run("lint", "--strict", str(helm.CHART), "--kube-version", helm.KUBE_VERSION,
                   *helm.value_args(VALUE_SETS[name]))
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_rendered_chart_matches_its_golden(name: str) -> None:
    rendered = helm.template(VALUE_SETS[name])
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("SIDEKEY_UPDATE_GOLDENS") == "1":
        path.write_text(yaml.safe_dump_all(rendered, sort_keys=True))
    golden = [d for d in yaml.safe_load_all(path.read_text()) if d]
    got, want = _by_key(rendered), _by_key(golden)
    assert sorted(got) == sorted(want), "objects added or removed; see the update flag in the docstring"
    for key in want:
        assert got[key] == want[key], f"{key} differs from {path}"


@pytest.mark.parametrize("values, complaint", [
    ({"webhook": {"failurPolicy": "Fail"}}, "additional properties 'failurPolicy' not allowed"),
    ({"sidecarr": {}}, "additional properties 'sidecarr' not allowed"),
    ({"webhook": {"failurePolicy": "Sometimes"}}, "value must be one of 'Fail', 'Ignore'"),
    ({"webhook": {"timeoutSeconds": 60}}, "maximum"),
    ({"sidecar": {"port": "8787"}}, "got string, want integer"),
])
def test_the_schema_rejects_a_misspelled_or_wrong_value(values: dict[str, Any], complaint: str) -> None:
    proc = helm.run("template", "sidekey", str(helm.CHART), *helm.value_args(values), check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert complaint in proc.stderr, proc.stderr


def test_every_value_has_a_comment() -> None:
    """Each key has a comment right above it, except inside a default value such as resources."""
    lines = (helm.CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        parents = [(n, k) for n, k in parents if n < indent]
        if not any(k == "resources" for _, k in parents):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"values.yaml line {i + 1} has no comment: {line.strip()}"
        parents.append((indent, key))


class TestTheChartSpeaksTheContract:
    """Names the webhook, proxy and operator agree on (core/contract.py) appear as such."""

    def test_the_webhook_configuration_uses_the_contract_names_and_paths(self) -> None:
        [config] = helm.template(show_only=["templates/webhook-mutatingwebhookconfiguration.yaml"])
        assert config["metadata"]["name"] == contract.WEBHOOK_CONFIGURATION
        hooks = {h["name"]: h for h in config["webhooks"]}
        assert hooks[contract.WEBHOOK_NAME]["clientConfig"]["service"]["path"] == contract.WEBHOOK_PATH
        assert (hooks[contract.WEBHOOK_NAMESPACE_NAME]["clientConfig"]["service"]["path"]
                == contract.WEBHOOK_NAMESPACE_PATH)
        for hook in hooks.values():
            assert hook["failurePolicy"] == "Fail"
            assert "caBundle" not in hook["clientConfig"]
            excluded = hook["namespaceSelector"]["matchExpressions"][-1]["values"]
            assert set(contract.SYSTEM_NAMESPACES) | {"sidekey-system"} <= set(excluded)

    def test_the_tls_secret_is_the_contract_one(self) -> None:
        docs = _by_key(helm.template())
        webhook = docs["Deployment/sidekey-system/sidekey-webhook"]["spec"]["template"]["spec"]
        tls = next(v for v in webhook["volumes"] if v["name"] == "tls")
        assert tls["secret"]["secretName"] == contract.WEBHOOK_TLS_SECRET
        operator = docs["Deployment/sidekey-system/sidekey-operator"]["spec"]["template"]["spec"]
        args = operator["containers"][0]["args"]
        assert f"--tls-secret={contract.WEBHOOK_TLS_SECRET}" in args
        assert f"--webhook-configuration={contract.WEBHOOK_CONFIGURATION}" in args

    def test_the_settings_configmap_is_what_the_webhook_parses(self) -> None:
        from sidekey.webhook import settings

        [cm] = helm.template({"sidecar": {"imageAllowList": ["registry.example/sidekey:0.1.1"]}},
                             show_only=["templates/webhook-configmap.yaml"])
        parsed = settings.from_mapping(yaml.safe_load(cm["data"]["settings.yaml"]))
        assert parsed.image == "ghcr.io/sidekey/sidekey:0.1.0"
        assert parsed.allows_image("registry.example/sidekey:0.1.1")
        assert parsed.port == contract.DEFAULT_PROXY_PORT
        assert parsed.audience == contract.DEFAULT_AUDIENCE


class TestTheChartIsSafeByDefault:
    def test_every_pod_runs_as_non_root_with_a_read_only_root(self) -> None:
        for doc in helm.template():
            if doc["kind"] == "Deployment":
                spec = doc["spec"]["template"]["spec"]
            elif doc["kind"] == "Pod":
                spec = doc["spec"]
            else:
                continue
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert isinstance(spec["securityContext"]["runAsUser"], int)
            for c in spec["containers"]:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]

    def test_the_operator_is_a_single_replica_recreated_never_rolled(self) -> None:
        op = _by_key(helm.template())["Deployment/sidekey-system/sidekey-operator"]
        assert op["spec"]["replicas"] == 1
        assert op["spec"]["strategy"] == {"type": "Recreate"}

    def test_the_webhook_runs_two_replicas_with_a_disruption_budget(self) -> None:
        docs = _by_key(helm.template())
        assert docs["Deployment/sidekey-system/sidekey-webhook"]["spec"]["replicas"] == 2
        assert docs["PodDisruptionBudget/sidekey-system/sidekey-webhook"]["spec"]["minAvailable"] == 1

    def test_network_policies_are_on_by_default_and_open_only_the_webhook_port(self) -> None:
        """issue 14, Low "Webhook": the webhook's answers name policies; by default only its HTTPS port is open."""
        docs = _by_key(helm.template())
        policy = docs["NetworkPolicy/sidekey-system/sidekey-webhook"]["spec"]
        assert policy["policyTypes"] == ["Ingress"]
        assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == ["https"]
        narrowed = _by_key(helm.template({"networkPolicy": {"webhookFrom": [{"ipBlock": {"cidr": "10.0.0.0/24"}}]}}))
        rule = narrowed["NetworkPolicy/sidekey-system/sidekey-webhook"]["spec"]["ingress"][0]
        assert rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/24"}}]

    def test_the_webhook_never_reads_secrets(self) -> None:
        role = _by_key(helm.template())["ClusterRole//sidekey-webhook"]
        assert all("secrets" not in r["resources"] for r in role["rules"])

    def test_cert_manager_replaces_operator_managed_tls(self) -> None:
        docs = _by_key(helm.template(VALUE_SETS["cert-manager"]))
        config = docs["MutatingWebhookConfiguration//sidekey"]
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
            "sidekey-system/sidekey-webhook"
        cert = docs["Certificate/sidekey-system/sidekey-webhook"]
        assert cert["spec"]["secretName"] == contract.WEBHOOK_TLS_SECRET
        assert "sidekey-webhook.sidekey-system.svc" in cert["spec"]["dnsNames"]
        args = docs["Deployment/sidekey-system/sidekey-operator"]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--certificates=external" in args


def _triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


class TestTheChartGrantsWhatTheOperatorNeeds:
    """docs/operator.md lists the operator's rules (its e2e test runs with exactly those)."""

    def _documented(self) -> dict[str, Any]:
        text = (helm.ROOT / "docs" / "operator.md").read_text()
        match = re.search(r"<!-- operator-rbac[^>]*-->\s*```yaml\n(.*?)```", text, re.S)
        assert match, "docs/operator.md has no operator-rbac block"
        documented: dict[str, Any] = yaml.safe_load(match.group(1))
        return documented

    def test_the_cluster_role_is_exactly_the_documented_rules(self) -> None:
        role = _by_key(helm.template())["ClusterRole//sidekey-operator"]
        assert _triples(role["rules"]) == _triples(self._documented()["clusterRules"])
        narrowed = [r for r in role["rules"] if "patch" in r["verbs"]
                    and r["resources"] == ["mutatingwebhookconfigurations"]]
        assert narrowed == [{"apiGroups": ["admissionregistration.k8s.io"],
                             "resources": ["mutatingwebhookconfigurations"],
                             "resourceNames": [contract.WEBHOOK_CONFIGURATION], "verbs": ["patch"]}]

    def test_the_release_namespace_role_is_exactly_the_documented_rules(self) -> None:
        role = _by_key(helm.template())["Role/sidekey-system/sidekey-operator"]
        assert _triples(role["rules"]) == _triples(self._documented()["releaseNamespaceRules"])

    def test_with_cert_manager_the_operator_writes_no_tls(self) -> None:
        docs = _by_key(helm.template(VALUE_SETS["cert-manager"]))
        assert "Role/sidekey-system/sidekey-operator" not in docs
        rules = docs["ClusterRole//sidekey-operator"]["rules"]
        assert ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "patch") not in _triples(rules)


def test_another_release_name_keeps_every_reference_consistent() -> None:
    """Names follow the release; the operator's flags must follow with them."""
    docs = _by_key(helm.template(release="agents", namespace="ai"))
    op_args = docs["Deployment/ai/agents-sidekey-operator"]["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(a.split("=", 1) for a in op_args if a.startswith("--") and "=" in a)
    assert f"MutatingWebhookConfiguration//{flags['--webhook-configuration']}" in docs
    assert f"Service/ai/{flags['--webhook-service']}" in docs
    assert flags["--namespace"] == "ai"
    webhook = docs[f"Deployment/ai/{flags['--webhook-service']}"]["spec"]["template"]["spec"]
    tls = next(v for v in webhook["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == flags["--tls-secret"]
    config = docs[f"MutatingWebhookConfiguration//{flags['--webhook-configuration']}"]
    for hook in config["webhooks"]:
        assert hook["clientConfig"]["service"]["name"] == flags["--webhook-service"]
        assert "ai" in hook["namespaceSelector"]["matchExpressions"][-1]["values"]
    assert "ValidatingAdmissionPolicy//agents-sidekey-bypass-guard" in docs
    binding = docs["ValidatingAdmissionPolicyBinding//agents-sidekey-bypass-guard"]
    assert binding["spec"]["policyName"] == "agents-sidekey-bypass-guard"
