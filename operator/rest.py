"""The operator's writes (and the few reads it makes itself) to the apiserver.

kopf watches; this module writes. It is a thin JSON-over-aiohttp client on
the shared ``apiconfig.ApiConfig`` (in-cluster or kubeconfig), because the
operator is asynchronous from end to end and every call here is one HTTP
request: a thread pool around the synchronous ``kubernetes`` client would add
nothing but latency. Errors are ``kubeapi.ApiError`` with the apiserver's
Status fields; ``transient`` says whether a retry can help.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import aiohttp

from sidekey.core import apiconfig, kubeapi

FIELD_MANAGER = "sidekey-operator"
PatchType = Literal["merge", "apply", "json"]
_CONTENT_TYPES: dict[PatchType, str] = {
    "merge": "application/merge-patch+json",
    "apply": "application/apply-patch+yaml",
    "json": "application/json-patch+json",
}


def transient(exc: BaseException) -> bool:
    """Whether retrying later can help: conflicts, throttling, server or network trouble."""
    if isinstance(exc, kubeapi.ApiError):
        return exc.status in (0, 408, 409, 429) or exc.status >= 500
    return isinstance(exc, (aiohttp.ClientError, TimeoutError, ConnectionError, OSError))


def terminating(exc: BaseException) -> bool:
    """The apiserver refused to create in a namespace that is being deleted."""
    return (isinstance(exc, kubeapi.ApiError) and exc.status == 403
            and "being terminated" in exc.message)


class Rest(kubeapi.ApiClient):
    """``async with Rest(config) as rest``: the shared apiserver client, plus writes."""

    def __init__(self, config: apiconfig.ApiConfig) -> None:
        super().__init__(config, limit=20)

    async def __aenter__(self) -> Rest:
        await super().__aenter__()
        return self

    async def get(self, path: str, params: Mapping[str, str] | None = None
                  ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path, params=params)
        except kubeapi.ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: Any) -> dict[str, Any]:
        return await self.request("POST", path, body=body,
                                  params={"fieldManager": FIELD_MANAGER})

    async def replace(self, path: str, body: Any) -> dict[str, Any]:
        return await self.request("PUT", path, body=body, params={"fieldManager": FIELD_MANAGER})

    async def patch(self, path: str, body: Any, kind: PatchType = "merge") -> dict[str, Any]:
        params = {"fieldManager": FIELD_MANAGER}
        if kind == "apply":
            params["force"] = "true"
        return await self.request("PATCH", path, body=body, params=params,
                                  content_type=_CONTENT_TYPES[kind])

    async def delete(self, path: str) -> bool:
        """Delete; False when it was already gone."""
        try:
            await self.request("DELETE", path)
        except kubeapi.ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True


# --- Paths --------------------------------------------------------------------


def secret_path(namespace: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/secrets" + (f"/{name}" if name else "")


def role_path(namespace: str, name: str = "") -> str:
    return (f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles"
            + (f"/{name}" if name else ""))


def role_binding_path(namespace: str, name: str = "") -> str:
    return (f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings"
            + (f"/{name}" if name else ""))


def policy_path(namespace: str, name: str = "") -> str:
    from sidekey.core import contract

    return (f"/apis/{contract.GROUP}/{contract.VERSION}/namespaces/{namespace}/{contract.PLURAL}"
            + (f"/{name}" if name else ""))


def pods_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods"


def events_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/events"


def webhook_configuration_path(name: str) -> str:
    return f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
