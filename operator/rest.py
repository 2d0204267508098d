"""The operator's writes (and the few reads it makes itself) to the apiserver.

kopf watches; this module writes. It is a thin JSON-over-aiohttp client on
the shared ``kubeapi.ApiConfig`` (in-cluster or kubeconfig), because the
operator is asynchronous from end to end and every call here is one HTTP
request: a thread pool around the synchronous ``kubernetes`` client would add
nothing but latency. Errors are ``kubeapi.ApiError`` with the apiserver's
Status fields; ``transient`` says whether a retry can help.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

import aiohttp

from sidekey.core import kubeapi

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


class _Token:
    """The bearer token, re-read whenever its file changes (the kubelet rotates it)."""

    def __init__(self, path: os.PathLike[str] | None) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._value = ""

    def value(self) -> str:
        if self._path is None:
            return ""
        try:
            st = os.stat(self._path)
            stamp = (st.st_ino, st.st_mtime_ns)
            if stamp != self._stamp:
                with open(self._path) as fh:
                    self._value = fh.read().strip()
                self._stamp = stamp
        except OSError:
            pass
        return self._value


class Rest:
    """``async with Rest(config) as rest``: one pooled session to the apiserver."""

    def __init__(self, config: kubeapi.ApiConfig, *, timeout: float = 30.0) -> None:
        self.config = config
        self._token = _Token(config.token_file)
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Rest:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=20),
            timeout=aiohttp.ClientTimeout(total=self._timeout, connect=10),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def token(self) -> str:
        return self._token.value()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        if self._session is None:
            raise RuntimeError("Rest is not open: use 'async with Rest(config)'")
        headers = {"Accept": "application/json"}
        token = self._token.value()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        async with self._session.request(method, self.config.server + path, data=data,
                                         params=params or None, headers=headers) as resp:
            raw = await resp.read()
            if resp.status >= 300:
                raise _error(resp.status, raw)
        if not raw:
            return {}
        doc = json.loads(raw)
        return doc if isinstance(doc, dict) else {}

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


def _error(status: int, body: bytes) -> kubeapi.ApiError:
    reason, message = "", body[:300].decode("utf-8", "replace")
    try:
        doc = json.loads(body)
    except ValueError:
        pass
    else:
        if isinstance(doc, dict):
            reason = str(doc.get("reason", ""))
            message = str(doc.get("message", message))
    return kubeapi.ApiError(status, reason, message)


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


def events_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/events"


def webhook_configuration_path(name: str) -> str:
    return f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
