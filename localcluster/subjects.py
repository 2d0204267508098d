"""An agent's account on the local control plane, as a team and the operator would set it up.

Without a running operator and webhook, whoever starts a sidecar by hand
(the benchmarks, the attack catalogues, the soak) creates the objects
those two would leave behind: a ServiceAccount that a policy names, the
Secret with the key, the AgentPolicy, the Role and RoleBinding the operator
grants (``get``/``list``/``watch`` on exactly the named Secrets, and on the
policies), and a Pod in the injected shape that stays Pending (TokenRequest
binds the pod's tokens to it). The shapes here are the contract's, so a
rename in ``core/contract.py`` reaches every harness at once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from sidekey.core import contract
from sidekey.localcluster.cluster import LocalCluster

#: The Role and RoleBinding the operator grants a subject account (``sidekey-sidecar``).
GRANT_NAME = "sidekey-sidecar"


def apply(cluster: LocalCluster, *manifests: Mapping[str, Any]) -> dict[str, Any]:
    """``kubectl apply`` the manifests; return the last one as stored."""
    out = cluster.kubectl("apply", "-o", "json", "-f", "-", input=yaml.safe_dump_all([dict(m) for m in manifests]))
    stored: dict[str, Any] = json.loads(out)
    if stored.get("kind") == "List":
        last: dict[str, Any] = stored["items"][-1]
        return last
    return stored


def namespace(cluster: LocalCluster, prefix: str = "sk", labels: Mapping[str, str] | None = None,
              timeout: float = 30.0) -> str:
    """A fresh namespace, once its ``default`` ServiceAccount exists (the controller-manager makes it)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.kubectl("get", "serviceaccount", "default", "-n", name, "--ignore-not-found", "-o", "name").strip():
            return name
        time.sleep(0.1)
    raise TimeoutError(f"the controller-manager did not create {name}/default within {timeout:.0f}s")


def service_account(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}


def secret(namespace: str, name: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "stringData": dict(data)}


def policy(namespace: str, name: str, subjects: Sequence[str], upstreams: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": contract.API_VERSION, "kind": contract.KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"subjects": {"serviceAccounts": list(subjects)}, "upstreams": [dict(u) for u in upstreams]}}


def grant(cluster: LocalCluster, namespace: str, account: str, secrets: Sequence[str]) -> None:
    """The RBAC the operator grants a subject account: its Secrets by name, and the policies."""
    apply(cluster, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": GRANT_NAME, "namespace": namespace},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": list(secrets),
                   "verbs": ["get", "list", "watch"]},
                  {"apiGroups": [contract.GROUP], "resources": [contract.PLURAL],
                   "verbs": ["get", "list", "watch"]}]}, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": GRANT_NAME, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": GRANT_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]})


def injected_pod(namespace: str, name: str, account: str,
                 image: str = "ghcr.io/sidekey/sidekey:0.1.0") -> dict[str, Any]:
    """A pod in the shape the webhook injects, enough for the guards and TokenRequest's pod binding."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"serviceAccountName": account, "automountServiceAccountToken": False,
                     "initContainers": [{"name": contract.SIDECAR_CONTAINER_NAME, "image": image,
                                         "restartPolicy": "Always", "args": ["proxy"]}],
                     "containers": [{"name": "agent", "image": "example.invalid/agent:1"}]}}


def create_subject(cluster: LocalCluster, namespace: str, *, account: str, pod: str, secret_name: str,
                   keys: Mapping[str, str], upstreams: Sequence[Mapping[str, Any]],
                   policy_name: str = "agent") -> dict[str, Any]:
    """Account, Secret, AgentPolicy, the operator's grant and a Pending pod; returns the pod as stored."""
    apply(cluster, service_account(namespace, account), secret(namespace, secret_name, keys),
          policy(namespace, policy_name, [account], upstreams))
    grant(cluster, namespace, account, [secret_name])
    return apply(cluster, injected_pod(namespace, pod, account))
