"""The operator works with exactly the RBAC docs/operator.md gives the chart, and no more.

The rules are read from the documentation's YAML block, bound to a service
account, and the operator runs with a TokenRequest token of that account.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidekey.core import contract
from tests.operator.support import policy, secret
from tests.support.kubectl import apply, condition, get, wait_for
from tests.support.operator import RunningOperator, start_operator

pytestmark = pytest.mark.e2e
DOC = Path(__file__).resolve().parents[2] / "docs" / "operator.md"


def documented_rules() -> dict[str, list[dict[str, Any]]]:
    text = DOC.read_text()
    match = re.search(r"<!-- operator-rbac[^>]*-->\s*```yaml\n(.*?)```", text, re.S)
    assert match, "docs/operator.md lost its operator-rbac YAML block"
    rules: dict[str, list[dict[str, Any]]] = yaml.safe_load(match.group(1))
    return rules


@pytest.fixture(scope="module")
def restricted_operator(cluster: Any, crds: Any, tmp_path_factory: pytest.TempPathFactory
                        ) -> Iterator[tuple[RunningOperator, str]]:
    from tests.support.namespaces import make_namespace

    rules = documented_rules()
    ns = make_namespace(cluster, "sk-rbac")
    suffix = uuid.uuid4().hex[:6]
    webhook_configuration = f"sidekey-rbac-{suffix}"
    role_name = f"sidekey-operator-{suffix}"
    apply(cluster,
          {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "operator", "namespace": ns}},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
           "metadata": {"name": role_name}, "rules": rules["clusterRules"]},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
           "metadata": {"name": role_name},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
           "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}]},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
           "metadata": {"name": "sidekey-operator", "namespace": ns}, "rules": rules["releaseNamespaceRules"]},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": "sidekey-operator", "namespace": ns},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sidekey-operator"},
           "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}]},
          {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
           "metadata": {"name": webhook_configuration},
           "webhooks": [{"name": "inject.sidekey.io", "admissionReviewVersions": ["v1"],
                         "sideEffects": "None", "failurePolicy": "Ignore",
                         "clientConfig": {"url": "https://127.0.0.1:1/mutate"},
                         "objectSelector": {"matchLabels": {"sidekey.io/never": "matches"}},
                         "rules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                    "operations": ["CREATE"], "resources": ["pods"]}]}]})
    token = cluster.token(ns, "operator", audience=cluster.issuer, seconds=3600)
    workdir = tmp_path_factory.mktemp("rbac")
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "op",
        "clusters": [{"name": "c", "cluster": {"server": cluster.url,
                                               "certificate-authority": str(cluster.ca_file)}}],
        "users": [{"name": "op", "user": {"token": token}}],
        "contexts": [{"name": "op", "context": {"cluster": "c", "user": "op"}}],
    }))
    op = start_operator(cluster, workdir, "--webhook-configuration", webhook_configuration,
                        namespace=ns, kubeconfig=kubeconfig)
    try:
        yield op, webhook_configuration
    finally:
        op.stop()
        for kind, name in (("clusterrolebinding", role_name), ("clusterrole", role_name),
                           ("mutatingwebhookconfiguration", webhook_configuration)):
            cluster.kubectl("delete", kind, name, check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_with_only_the_documented_rbac_policies_become_ready_and_get_their_grants(
        cluster: Any, restricted_operator: tuple[RunningOperator, str], namespace: str) -> None:
    op, _ = restricted_operator
    apply(cluster, secret("openai", namespace, **{"api-key": "k"}), policy("agents", namespace))
    p = wait_for("Ready", lambda: (c := condition(get(cluster, "agentpolicy", "agents", namespace), "Ready"))
                 and c["status"] == "True" and c)
    assert p["reason"] == "Ready"
    assert get(cluster, "role", "sidekey-policy-agents", namespace) is not None
    assert get(cluster, "rolebinding", "sidekey-policy-agents", namespace) is not None
    assert not refusals(op.output()), op.output()[-3000:]


def refusals(output: str) -> list[str]:
    """The operator's log lines that tell of the apiserver refusing it.

    Each JSON line is read without its ``time``: a timestamp such as
    ``03:56:13.403Z`` holds "403" and once failed this test with no refusal
    in the log. Lines that are not JSON (a traceback) are read whole.
    """
    found = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            text = line
        else:
            text = json.dumps({k: v for k, v in record.items() if k != "time"}) \
                if isinstance(record, dict) else line
        if "Forbidden" in text or re.search(r"(?<![\w.:])403(?![\w.:])", text):
            found.append(line)
    return found


def test_refusals_are_told_from_timestamps() -> None:
    quiet = '{"time":"2026-12-02T03:56:13.403Z","level":"info","message":"Ready"}'
    assert refusals(quiet) == []
    for refused in ('{"time":"2026-12-02T03:56:13.100Z","level":"error",'
                    '"message":"APIForbiddenError: (403) Forbidden"}',
                    '{"time":"x","level":"error","message":"status 403 from the apiserver"}',
                    'kubernetes.client.exceptions.ApiException: (403)'):
        assert refusals(quiet + "\n" + refused) == [refused]


def test_with_only_the_documented_rbac_tls_is_issued_and_the_ca_bundle_set(
        cluster: Any, restricted_operator: tuple[RunningOperator, str]) -> None:
    op, webhook_configuration = restricted_operator
    assert get(cluster, "secret", contract.WEBHOOK_TLS_SECRET, op.namespace) is not None
    wait_for("caBundle", lambda: (get(cluster, "mutatingwebhookconfiguration", webhook_configuration)
                                  or {})["webhooks"][0]["clientConfig"].get("caBundle"))


def test_with_only_the_documented_rbac_uninjected_pods_are_reported(
        cluster: Any, restricted_operator: tuple[RunningOperator, str], namespace: str) -> None:
    apply(cluster, {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "bare", "namespace": namespace,
                                 "annotations": {"sidekey.io/inject": "true"}},
                    "spec": {"containers": [{"name": "agent", "image": "example.invalid/a:1"}]}})
    wait_for("event", lambda: "SidecarMissing" in cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=bare"))
