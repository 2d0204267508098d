"""What the operator tests build: policies, Secrets, accounts, and the chart's lists (the running operator is in tests/support)."""

from __future__ import annotations

import base64
import uuid
from typing import Any

#: An image on the chart's sidecar.imageAllowList (what sidekey.io/image picks from).
ALLOWED_SIDECAR_IMAGE = "mirror.example/sidekey:test-current"
#: A namespace in the chart's webhook.excludedNamespaces; unique per test run.
EXCLUDED_NAMESPACE = f"sk-excluded-{uuid.uuid4().hex[:8]}"


def secret(name: str, namespace: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def service_account(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace}}


def policy(name: str, namespace: str, *, secret_name: str = "openai", key: str = "api-key",
           upstream: str = "openai", env: str | None = "OPENAI_BASE_URL",
           service_accounts: tuple[str, ...] = ("agent",), url: str = "https://api.openai.com/v1"
           ) -> dict[str, Any]:
    up: dict[str, Any] = {
        "name": upstream, "url": url,
        "auth": {"type": "bearer", "secretRef": {"name": secret_name, "key": key}},
        "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
    }
    if env:
        up["env"] = [{"name": env}]
    return {"apiVersion": "sidekey.io/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"subjects": {"serviceAccounts": list(service_accounts)}, "upstreams": [up]}}
