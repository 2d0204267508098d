"""Kubernetes API access for the sidecar and the webhook, on aiohttp alone.

The ``kubernetes`` client costs tens of megabytes and every agent pod pays the
sidecar's memory, so the lean parts talk to the apiserver here: one pooled
session, a token file re-read whenever the kubelet rewrites it, and a
``Reflector`` that lists and watches one collection and keeps it current the
way client-go's does (resume by resourceVersion, relist on 410 with jitter,
back off on errors, server-side timeouts so a watch never freezes silently).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypedDict

import aiohttp

from sidekey.core import contract, errors

log = logging.getLogger("sidekey.kubeapi")

#: Longest a watch stays open before the apiserver closes it (randomised per
#: watch so many sidecars do not reconnect in lockstep).
WATCH_TIMEOUT_RANGE: Final = (240, 300)
#: Client-side read timeout on a watch: longer than the server-side one, so it
#: only fires when the connection died without a FIN.
WATCH_READ_SLACK: Final = 30
#: Backoff on errors, in seconds.
BACKOFF_START: Final = 0.5
BACKOFF_MAX: Final = 30.0
#: A forbidden list (no policy grants us yet) is retried at least this often,
#: so a policy applied later takes effect within seconds.
FORBIDDEN_RETRY_MAX: Final = 2.0
#: Spread of the pause before a relist after 410 Gone.
RELIST_JITTER: Final = 1.0


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


@dataclass(frozen=True)
class ApiConfig:
    """Where the apiserver is and who we are to it.

    ``token_file`` is a path, not a token: the kubelet rotates the projected
    token, so the file is re-read whenever it changes and never kept for the
    process's life. A kubeconfig's inline credentials (``*-data``, ``token``)
    stay in memory (``ca_data``, ``client_cert_data``, ``client_key_data``,
    ``token``): written to a temp dir they would outlive the process, a
    client key and a token left on disk.
    """

    server: str
    ca_file: Path | None
    token_file: Path | None
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_data: bytes | None = None
    client_cert_data: bytes | None = None
    client_key_data: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def in_cluster(cls, token_dir: Path | None = None, server: str | None = None) -> ApiConfig:
        """The apiserver as a pod sees it, trusting only the CA mounted with the token.

        An https apiserver is verified against ``ca.crt`` from the token
        directory and nothing else: without it the start fails instead of
        falling back to the system store, because the token this client sends
        reads the policy's Secret, and a system store accepts any host with a
        public certificate (a pod spec that points ``KUBERNETES_SERVICE_HOST``
        elsewhere and drops the ``kube-root-ca.crt`` source would collect it).
        A plain-http server (``SIDEKEY_API_SERVER``, tests only) needs no CA.
        """
        if token_dir is None:
            token_dir = Path(os.environ.get(contract.ENV_API_TOKEN_DIR) or contract.API_TOKEN_DIR)
        if server is None:
            server = os.environ.get(contract.ENV_API_SERVER) or None
        if server is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ValueError(
                    f"no apiserver address: set {contract.ENV_API_SERVER} or KUBERNETES_SERVICE_HOST"
                )
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            server = f"https://{host}:{port}"
        ca = token_dir / contract.API_CA_FILENAME
        https = server.lower().startswith("https://")
        if https and not ca.is_file():
            raise ValueError(
                f"no cluster CA at {ca}: the sidecar verifies the apiserver against the "
                f"{contract.API_CA_FILENAME} mounted with its API token (the kube-root-ca.crt "
                "source of the projected volume) and never against the system store"
            )
        return cls(
            server=server.rstrip("/"),
            ca_file=ca if https else None,
            token_file=token_dir / contract.API_TOKEN_FILENAME,
        )

    @classmethod
    def from_kubeconfig(cls, path: Path) -> ApiConfig:
        """The current context of a kubeconfig; inline ``*-data`` and tokens are kept in memory."""
        import base64

        import yaml  # only tools and tests use kubeconfigs; the sidecar never imports yaml

        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a kubeconfig")
        current = doc.get("current-context")
        contexts = {c["name"]: c.get("context", {}) for c in doc.get("contexts") or []}
        if current not in contexts:
            raise ValueError(f"{path}: current-context {current!r} is not defined")
        ctx = contexts[current]
        clusters = {c["name"]: c.get("cluster", {}) for c in doc.get("clusters") or []}
        users = {u["name"]: u.get("user", {}) or {} for u in doc.get("users") or []}
        cluster = clusters.get(ctx.get("cluster"))
        if cluster is None:
            raise ValueError(f"{path}: cluster {ctx.get('cluster')!r} is not defined")
        user = users.get(ctx.get("user"), {})

        def file(key: str, source: Mapping[str, Any]) -> Path | None:
            if not source.get(key):
                return None
            p = Path(source[key])
            return p if p.is_absolute() else path.parent / p

        def data(key: str, source: Mapping[str, Any]) -> bytes | None:
            return base64.b64decode(source[key]) if source.get(key) else None

        return cls(
            server=str(cluster["server"]).rstrip("/"),
            ca_file=file("certificate-authority", cluster),
            token_file=Path(user["tokenFile"]) if user.get("tokenFile") else None,
            client_cert=file("client-certificate", user),
            client_key=file("client-key", user),
            ca_data=None if cluster.get("certificate-authority") else data("certificate-authority-data", cluster),
            client_cert_data=None if user.get("client-certificate") else data("client-certificate-data", user),
            client_key_data=None if user.get("client-key") else data("client-key-data", user),
            token=None if user.get("tokenFile") else (str(user["token"]) if user.get("token") else None),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """Verify the server against ``ca_file`` alone when one is set.

        ``create_default_context(cafile=...)`` loads only that file, not the
        system store; the store is used only when a kubeconfig names no CA (as
        kubectl does). A CA file that does not parse is a ``ValueError`` that
        names it, so a start-up with a broken mount says what is wrong.
        """
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None,
                                             cadata=self.ca_data.decode() if self.ca_data else None)
        except (ssl.SSLError, OSError, UnicodeDecodeError) as exc:
            where = self.ca_file or "the kubeconfig's certificate-authority-data"
            raise ValueError(f"cannot load the cluster CA from {where}: {getattr(exc, 'strerror', None) or exc}"
                             ) from exc
        if self.client_cert is not None:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key) if self.client_key else None)
        elif self.client_cert_data is not None:
            import tempfile  # ssl loads a chain from files only; they exist just long enough to be read

            with tempfile.TemporaryDirectory(prefix="sidekey-client-cert-") as tmp:
                cert, key = Path(tmp) / "client.crt", Path(tmp) / "client.key"
                cert.write_bytes(self.client_cert_data)  # the directory is the user's alone (0700)
                key.write_bytes(self.client_key_data or b"")
                ctx.load_cert_chain(str(cert), str(key) if self.client_key_data else None)
        return ctx


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
    """One pooled aiohttp session to the apiserver: ``async with ApiClient(config) as api``."""

    def __init__(self, config: ApiConfig, *, limit: int = 20) -> None:
        self.config = config
        self._token = _TokenFile(config.token_file, static=config.token)
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        connector = aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=self._limit)
        self._session = aiohttp.ClientSession(
            base_url=None,
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=60),
            auto_decompress=True,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ApiClient is not open: use 'async with ApiClient(config) as api'")
        return self._session

    def _headers(self) -> dict[str, str]:
        # the JWKS endpoint serves application/jwk-set+json and answers 406 to JSON alone
        headers = {"Accept": "application/json, application/jwk-set+json;q=0.9"}
        auth = self._token.header()
        if auth:
            headers["Authorization"] = auth
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
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        async with self.session.request(
            method, self.config.server + path, data=data, params=params or None, headers=headers
        ) as resp:
            raw = await resp.read()
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
        read_timeout = (server_timeout + WATCH_READ_SLACK) if server_timeout else None
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=read_timeout)
        async with self.session.get(
            self.config.server + path, params=query, headers=self._headers(), timeout=timeout
        ) as resp:
            if resp.status >= 300:
                raise _status_error(resp.status, await resp.read())
            buf = b""
            async for chunk in resp.content.iter_any():
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


class _Gone(Exception):
    """The resourceVersion we hold is too old: relist."""


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class Reflector:
    """List and watch one collection and keep ``objects`` current.

    ``objects`` is replaced wholesale on a relist and updated in place for
    watch events; readers on the event loop see a consistent mapping.
    When the apiserver is unreachable the last known objects stay: the
    sidecar keeps serving from its cache.
    """

    def __init__(
        self,
        api: ApiClient,
        path: str,
        *,
        field_selector: str | None = None,
        label_selector: str | None = None,
        forbidden_is_empty: bool = False,
        on_change: Callable[[], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.api = api
        self.path = path
        self.field_selector = field_selector
        self.label_selector = label_selector
        self.forbidden_is_empty = forbidden_is_empty
        self.on_change = on_change
        self.on_error = on_error
        self.objects: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        #: Set after the first list attempt, whatever its outcome (readiness
        #: must not wait forever on something the apiserver refuses).
        self.attempted = asyncio.Event()
        #: True while the last list was refused with 403 (forbidden_is_empty).
        self.forbidden = False
        self._rv: str | None = None

    def _selectors(self) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        return params

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("on_change callback failed for %s", self.path)

    async def relist(self) -> None:
        """One live list now; replaces ``objects`` and the resume point."""
        try:
            await self._relist()
        finally:
            self.attempted.set()

    async def _relist(self) -> None:
        items: dict[str, dict[str, Any]] = {}
        params = self._selectors()
        params["limit"] = "500"
        while True:
            try:
                doc = await self.api.get_json(self.path, params)
            except ApiError as exc:
                if exc.status == 403 and self.forbidden_is_empty:
                    self.forbidden = True
                    self._rv = None
                    first = not self.synced.is_set()
                    self.synced.set()
                    if self.objects or first:
                        self.objects = {}
                        self._changed()
                raise
            for item in doc.get("items") or []:
                items[_key(item)] = item
            cont = (doc.get("metadata") or {}).get("continue")
            if not cont:
                break
            params["continue"] = cont
        self.forbidden = False
        self._rv = str((doc.get("metadata") or {}).get("resourceVersion", "")) or None
        self.objects = items
        self.synced.set()
        self._changed()

    async def _watch_once(self) -> None:
        params = self._selectors()
        params["allowWatchBookmarks"] = "true"
        params["timeoutSeconds"] = str(random.randint(*WATCH_TIMEOUT_RANGE))
        if self._rv:
            params["resourceVersion"] = self._rv
        async for event in self.api.watch(self.path, params):
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":
                code = int(obj.get("code", 0) or 0)
                if code == 410:
                    raise _Gone()
                raise ApiError(code, str(obj.get("reason", "")), str(obj.get("message", "")))
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            if rv:
                self._rv = str(rv)
            if kind == "BOOKMARK":
                continue
            key = _key(obj)
            if kind == "DELETED":
                if self.objects.pop(key, None) is not None:
                    self._changed()
            else:
                self.objects[key] = obj
                self._changed()

    async def run(self) -> None:
        """Forever: list, then watch from where the list left off."""
        backoff = BACKOFF_START
        while True:
            try:
                if self._rv is None:
                    await self.relist()
                await self._watch_once()
                backoff = BACKOFF_START
            except asyncio.CancelledError:
                raise
            except _Gone:
                self._rv = None
                await asyncio.sleep(random.uniform(0, RELIST_JITTER))
            except ApiError as exc:
                # Any refusal (410, 403 after an RBAC change, ...) means our
                # view may be stale: start again from a list.
                self._rv = None
                if exc.status == 410:
                    await asyncio.sleep(random.uniform(0, RELIST_JITTER))
                    continue
                self._report(exc)
                limit = (
                    FORBIDDEN_RETRY_MAX if (exc.status == 403 and self.forbidden_is_empty) else BACKOFF_MAX
                )
                await asyncio.sleep(min(backoff, limit) * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, limit)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError) as exc:
                self._report(exc)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _report(self, exc: BaseException) -> None:
        if isinstance(exc, ApiError) and exc.status == 403 and self.forbidden_is_empty:
            log.debug("list %s forbidden: treated as empty", self.path)
        else:
            log.warning("watch %s failed, retrying: %s", self.path, _describe(exc))
        if self.on_error is not None:
            self.on_error(exc)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
