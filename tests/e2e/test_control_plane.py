"""The harness is a real cluster: admission, TokenRequest, OIDC discovery, controllers."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

pytestmark = pytest.mark.e2e


def _apply(cluster: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    out = cluster.kubectl("apply", "-o", "json", "-f", "-", input=yaml.safe_dump(manifest))
    result: dict[str, Any] = json.loads(out)
    return result


def _pod(namespace: str, name: str, sa: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"serviceAccountName": sa,
                 "containers": [{"name": "agent", "image": "example.invalid/agent:1"}]},
    }


def test_the_apiserver_reports_a_real_kubernetes_version(cluster: Any) -> None:
    version = cluster.request("GET", "/version")
    assert version["major"] == "1"
    assert int(version["minor"]) >= 30
    assert version["gitVersion"].startswith(f"v1.{version['minor']}.")


def test_the_serviceaccount_admission_plugin_mounts_the_api_token(cluster: Any, namespace: str) -> None:
    _apply(cluster, {"apiVersion": "v1", "kind": "ServiceAccount",
                     "metadata": {"name": "agent", "namespace": namespace}})
    pod = _apply(cluster, _pod(namespace, "agent", "agent"))
    volumes = [v["name"] for v in pod["spec"]["volumes"]]
    assert any(v.startswith("kube-api-access-") for v in volumes), volumes
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert any(m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" for m in mounts)
    assert pod["status"]["phase"] == "Pending"


def test_a_pod_bound_token_verifies_against_the_apiservers_own_jwks(cluster: Any, namespace: str) -> None:
    _apply(cluster, {"apiVersion": "v1", "kind": "ServiceAccount",
                     "metadata": {"name": "agent", "namespace": namespace}})
    pod = _apply(cluster, _pod(namespace, "agent", "agent"))
    uid = pod["metadata"]["uid"]
    token = cluster.token(namespace, "agent", audience="sidekey", pod_name="agent", pod_uid=uid, seconds=600)

    discovery = cluster.request("GET", "/.well-known/openid-configuration")
    assert discovery["issuer"] == cluster.issuer
    keys = KeySet.import_key_set(cluster.request("GET", "/openid/v1/jwks"))

    decoded = jwt.decode(token, keys, algorithms=["RS256"])
    claims = jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": discovery["issuer"]},
        aud={"essential": True, "value": "sidekey"},
        exp={"essential": True},
    )
    claims.validate(decoded.claims)
    bound = decoded.claims["kubernetes.io"]
    assert bound["namespace"] == namespace
    assert bound["pod"] == {"name": "agent", "uid": uid}
    assert bound["serviceaccount"]["name"] == "agent"
    assert 590 <= decoded.claims["exp"] - decoded.claims["iat"] <= 610

    foreign = cluster.token(namespace, "agent", audience="someone-else", pod_name="agent", pod_uid=uid)
    with pytest.raises(JoseError):
        claims.validate(jwt.decode(foreign, keys, algorithms=["RS256"]).claims)


def test_the_controller_manager_runs_deployments_and_namespaces(cluster: Any, namespace: str) -> None:
    _apply(cluster, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}}},
    })
    deadline = time.monotonic() + 30
    pods: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", "app=web", "-o", "json"))["items"]
        if len(pods) == 2:
            break
        time.sleep(0.2)
    assert len(pods) == 2, "the ReplicaSet controller did not create the Deployment's pods"
    owner = pods[0]["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ReplicaSet"
    root_ca = json.loads(cluster.kubectl("get", "configmap", "kube-root-ca.crt", "-n", namespace, "-o", "json"))
    assert "BEGIN CERTIFICATE" in root_ca["data"]["ca.crt"]

    # Garbage collection: deleting the Deployment removes its ReplicaSet and pods.
    cluster.kubectl("delete", "deployment", "web", "-n", namespace, "--wait=false")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = json.loads(cluster.kubectl("get", "replicasets,pods", "-n", namespace, "-o", "json"))["items"]
        if not left:
            break
        time.sleep(0.2)
    assert not left, "the garbage collector left dependents behind"


def test_a_deleted_namespace_goes_away(cluster: Any) -> None:
    from tests.support.namespaces import make_namespace

    name = make_namespace(cluster, "gone")
    cluster.kubectl("delete", "namespace", name, "--wait=true", "--timeout=60s")
    out = cluster.kubectl("get", "namespace", name, "--ignore-not-found", "-o", "name")
    assert out.strip() == ""
