"""The chart's CRD is the top-level crds/ file, neither more nor less."""

from __future__ import annotations

import os

import yaml

from sidekey.localcluster import helm
from tests.chart import crd_template


def test_the_chart_crd_template_is_generated_from_crds() -> None:
    wanted = crd_template.render()
    if os.environ.get("SIDEKEY_UPDATE_GOLDENS") == "1":
        crd_template.TEMPLATE.write_text(wanted)
    assert crd_template.TEMPLATE.read_text() == wanted, (
        "charts/sidekey/templates/crd-agentpolicies.yaml drifted from crds/; "
        "regenerate it with SIDEKEY_UPDATE_GOLDENS=1 pytest tests/chart/test_crd.py")


def test_the_rendered_crd_has_the_same_name_and_spec_as_crds() -> None:
    source = yaml.safe_load(crd_template.SOURCE.read_text())
    [rendered] = helm.template(show_only=["templates/crd-agentpolicies.yaml"])
    assert rendered["metadata"]["name"] == source["metadata"]["name"]
    assert rendered["spec"] == source["spec"]


def test_the_crd_is_kept_on_uninstall_by_default_and_on_request_only() -> None:
    [kept] = helm.template(show_only=["templates/crd-agentpolicies.yaml"])
    assert kept["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    [not_kept] = helm.template({"crds": {"keep": False}}, show_only=["templates/crd-agentpolicies.yaml"])
    assert "helm.sh/resource-policy" not in (not_kept["metadata"].get("annotations") or {})


def test_the_crd_can_be_left_out_when_the_cluster_has_it() -> None:
    docs = helm.template({"crds": {"enabled": False}},
                         extra=["--api-versions", "sidekey.io/v1alpha1/AgentPolicy"])
    assert not [d for d in docs if d["kind"] == "CustomResourceDefinition"]


def test_leaving_the_crd_out_of_a_cluster_without_it_fails_with_why() -> None:
    """Without the CRD the bypass guard cannot resolve its params and would refuse every pod."""
    proc = helm.run("template", "sidekey", str(helm.CHART), "--kube-version", helm.KUBE_VERSION,
                    *helm.value_args({"crds": {"enabled": False}}), check=False)
    assert proc.returncode != 0
    assert "crds.enabled=false needs the AgentPolicy CRD" in proc.stderr


def test_the_escalation_guard_checks_as_many_upstreams_and_subjects_as_the_crd_allows() -> None:
    """One rule per upstream and per subject (the message must name it): as many as maxItems."""
    crd = yaml.safe_load(crd_template.SOURCE.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    upstreams = spec["upstreams"]["maxItems"]
    subjects = spec["subjects"]["properties"]["serviceAccounts"]["maxItems"]
    [policy, _] = helm.template(show_only=["templates/guard-escalation.yaml"])
    rules = [v["expression"] for v in policy["spec"]["validations"]]
    assert sum("resource('secrets')" in r for r in rules) == upstreams
    assert sum("subresource('token')" in r for r in rules) == subjects
    assert len(rules) == upstreams + subjects
