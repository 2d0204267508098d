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
                 image: str = DEFAULT_SIDECAR_IMAGE,
                 policy_list: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A pod exactly as the sidekey webhook injects it: ``webhook/patching.py`` builds it.

    The guard tests feed the webhook's real output to the guard, so the two
    cannot drift: the pod the webhook writes is admitted, and each test breaks
    it in one way. ``image`` replaces the sidecar image afterwards (the webhook
    itself only writes allowed ones).
    """
    from sidekey.core import policies
    from sidekey.webhook import patching, settings

    pod = bare_pod(namespace, name, sa, annotations={contract.ANNOTATION_INJECT: "true"})
    objects = policy_list if policy_list is not None else [agent_policy(namespace)]
    parsed = [policies.parse({**o, "metadata": {"uid": f"uid-{i}", "generation": 1,
                                                "creationTimestamp": f"2026-01-0{i + 1}T00:00:00Z",
                                                **o["metadata"]}})
              for i, o in enumerate(objects)]
    injected, _ = patching.mutate(pod, parsed, settings.Settings(image=DEFAULT_SIDECAR_IMAGE))
    sidecar(injected)["image"] = image
    return injected


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
