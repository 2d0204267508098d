"""Pods and AgentPolicies for the guard tests, built by hand.

The pods take the shape the sidekey webhook injects (core/contract.py names
every part of it), so the guards can be tested without the webhook, plus the
broken variants an attacker or a mistake would produce.
"""

from __future__ import annotations

import copy
from typing import Any

from sidekey.core import contract

DEFAULT_SIDECAR_IMAGE = "ghcr.io/sidekey/sidekey:0.1.0"
AGENT_IMAGE = "example.invalid/agent:1"
SECRET = "openai-key"


def secret(namespace: str, name: str = SECRET) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "stringData": {"api-key": "sk-test-not-a-real-key"}}


def service_account(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}


def agent_policy(namespace: str, name: str = "openai", *, subjects: list[str] | None = None,
                 secret_name: str = SECRET, url: str = "https://api.openai.com/v1") -> dict[str, Any]:
    return {
        "apiVersion": contract.API_VERSION, "kind": contract.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "subjects": {"serviceAccounts": subjects or ["agent"]},
            "upstreams": [{
                "name": "openai", "url": url,
                "auth": {"type": "bearer", "secretRef": {"name": secret_name, "key": "api-key"}},
                "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
            }],
        },
    }


def bare_pod(namespace: str, name: str, sa: str = "agent",
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod as a user writes it, before any webhook."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
        "spec": {"serviceAccountName": sa,
                 "containers": [{"name": "agent", "image": AGENT_IMAGE}]},
    }


def injected_pod(namespace: str, name: str, sa: str = "agent",
                 image: str = DEFAULT_SIDECAR_IMAGE) -> dict[str, Any]:
    """A pod in the shape the webhook produces: the sidecar alone holds an API token."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "annotations": {contract.ANNOTATION_INJECT: "true",
                                     contract.ANNOTATION_STATUS: '{"injected":true}'}},
        "spec": {
            "serviceAccountName": sa,
            "automountServiceAccountToken": False,
            "initContainers": [{
                "name": contract.SIDECAR_CONTAINER_NAME, "image": image, "restartPolicy": "Always",
                "command": ["sidekey", "proxy"],
                "env": [{"name": contract.ENV_PROXY_PORT, "value": str(contract.DEFAULT_PROXY_PORT)},
                        {"name": contract.ENV_POD_NAME,
                         "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "volumeMounts": [{"name": contract.API_TOKEN_VOLUME, "mountPath": contract.API_TOKEN_DIR,
                                  "readOnly": True}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": contract.DEFAULT_HEALTH_PORT}},
            }],
            "containers": [{
                "name": "agent", "image": AGENT_IMAGE,
                "env": [{"name": contract.ENV_TOKEN_FILE, "value": contract.AGENT_TOKEN_PATH}],
                "volumeMounts": [{"name": contract.AGENT_TOKEN_VOLUME, "mountPath": contract.AGENT_TOKEN_DIR,
                                  "readOnly": True}],
            }],
            "volumes": [
                {"name": contract.API_TOKEN_VOLUME, "projected": {"sources": [
                    {"serviceAccountToken": {"path": contract.API_TOKEN_FILENAME,
                                             "expirationSeconds": contract.SIDECAR_API_TOKEN_EXPIRATION_SECONDS}},
                    {"configMap": {"name": "kube-root-ca.crt",
                                   "items": [{"key": "ca.crt", "path": contract.API_CA_FILENAME}]}},
                    {"downwardAPI": {"items": [{"path": contract.API_NAMESPACE_FILENAME,
                                                "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
                ]}},
                {"name": contract.AGENT_TOKEN_VOLUME, "projected": {"sources": [
                    {"serviceAccountToken": {"path": contract.AGENT_TOKEN_FILENAME,
                                             "audience": contract.DEFAULT_AUDIENCE,
                                             "expirationSeconds": contract.DEFAULT_TOKEN_EXPIRATION_SECONDS}},
                ]}},
            ],
        },
    }


def variant(pod: dict[str, Any], name: str) -> dict[str, Any]:
    """A deep copy of a pod under another name, to break in one way."""
    copied = copy.deepcopy(pod)
    copied["metadata"]["name"] = name
    return copied


def sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in pod["spec"]["initContainers"]
                                 if c["name"] == contract.SIDECAR_CONTAINER_NAME)
    return found


def agent(pod: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = pod["spec"]["containers"][0]
    return found
