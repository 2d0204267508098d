"""Kubernetes API access for the sidecar, the webhook and the operator's writes.

The ``kubernetes`` client costs tens of megabytes, aiohttp's client another 14,
and every agent pod pays the sidecar's memory, so the apiserver is reached here
over ``httpclient``: pooled keep-alive connections and a token file re-read
whenever the kubelet rewrites it. Where the apiserver is comes from
``apiconfig``; keeping a collection current with list and watch is
``reflector``'s. Transport failures are ``httpclient.HttpError`` (an
``OSError``); an answer with an error status is an ``ApiError``.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal, TypedDict

from sidekey.core import apiconfig, errors, httpclient

#: Client-side read timeout on a watch: longer than the server-side one, so it
#: only fires when the connection died without a FIN.
WATCH_READ_SLACK: Final = 30
CONNECT_TIMEOUT: Final = 10.0
#: The longest silence in the answer to a plain request.
READ_TIMEOUT: Final = 60.0
#: The largest answer read (a list page of 500 objects stays far below it).
MAX_ANSWER: Final = 256 * 1024 * 1024


class WatchEvent(TypedDict):
    type: Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]
    object: dict[str, Any]


class ApiError(errors.SidekeyError):
    """A non-2xx answer from the apiserver, with its Status fields."""

    type = "api_error"

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


class _TokenFile:
    """The bearer token, re-read when the file changes (the kubelet swaps a symlink).

    ``static`` is a token given inline (a kubeconfig's ``token``), used when there is no file.
    """

    def __init__(self, path: Path | None, static: str | None = None) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._value: str | None = None
        self._static = static

    def header(self) -> str | None:
        if self._path is None:
            return f"Bearer {self._static}" if self._static else None
        try:
            st = os.stat(self._path)
        except OSError:
            return None if self._value is None else f"Bearer {self._value}"
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                value = self._path.read_text().strip()
            except OSError:
                value = self._value or ""
            self._value, self._stamp = value, stamp
        return f"Bearer {self._value}" if self._value else None


def _status_error(status: int, body: bytes) -> ApiError:
    reason, message = "", body[:500].decode("utf-8", "replace")
    try:
        doc = json.loads(body)
    except ValueError:
        pass
    else:
        if isinstance(doc, dict):
            reason = str(doc.get("reason", ""))
            message = str(doc.get("message", message))
    return ApiError(status, reason, message)


class ApiClient:
    """Pooled connections to the apiserver: ``async with ApiClient(config) as api``.

    ``limit`` caps the connections open at once (each watch holds one while it runs).
    """

    def __init__(self, config: apiconfig.ApiConfig, *, limit: int = 20) -> None:
        self.config = config
        self._token = _TokenFile(config.token_file, static=config.token)
        self._limit = limit
        self._http: httpclient.Client | None = None

    async def __aenter__(self) -> ApiClient:
        self._http = httpclient.Client(
            tls=self.config.ssl_context(), limit=self._limit,
            connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> httpclient.Client:
        if self._http is None:
            raise RuntimeError("ApiClient is not open: use 'async with ApiClient(config) as api'")
        return self._http

    def _url(self, path: str, params: Mapping[str, str] | None) -> str:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"{self.config.server}{path}{query}"

    def _headers(self) -> list[tuple[str, str]]:
        # the JWKS endpoint serves application/jwk-set+json and answers 406 to JSON alone
        headers = [("Accept", "application/json, application/jwk-set+json;q=0.9")]
        auth = self._token.header()
        if auth:
            headers.append(("Authorization", auth))
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One JSON request; an empty answer is ``{}``, an error status an ``ApiError``."""
        headers = self._headers()
        data = None
        if body is not None:
            headers.append(("Content-Type", content_type))
            data = json.dumps(body).encode()
        resp = await self.http.request(method, self._url(path, params), headers=headers, body=data,
                                       read_timeout=READ_TIMEOUT, limit=MAX_ANSWER)
        raw = resp.body
        if resp.status >= 300:
            raise _status_error(resp.status, raw)
        if not raw:
            return {}
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ApiError(resp.status, "BadResponse", f"{path} did not return a JSON object")
        return doc

    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        return await self.request("GET", path, params=params)

    async def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[WatchEvent]:
        """Stream watch events; a Status in an ERROR event is yielded, not raised."""
        query = dict(params)
        query["watch"] = "true"
        server_timeout = int(query.get("timeoutSeconds", "0") or 0)
        read_timeout = float(server_timeout + WATCH_READ_SLACK) if server_timeout else None
        async with self.http.stream("GET", self._url(path, query), headers=self._headers(),
                                    read_timeout=read_timeout) as resp:
            if resp.status >= 300:
                raise _status_error(resp.status, await resp.read_all(64 * 1024))
            buf = b""
            async for chunk in resp:
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 1 :]
                    if line.strip():
                        event = json.loads(line)
                        yield WatchEvent(type=event["type"], object=event["object"])
            if buf.strip():
                event = json.loads(buf)
                yield WatchEvent(type=event["type"], object=event["object"])
