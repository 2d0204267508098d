"""A Reflector: list and watch one collection and keep it current, as client-go's does.

Resume by resourceVersion, relist on 410 Gone with jitter, back off on
errors, server-side timeouts so a watch never freezes silently; when the
apiserver is unreachable the last known objects stay, so a sidecar keeps
serving from its cache. The sidecar (policies, Secrets), the webhook
(policies) and the operator's LLM ledgers use it over ``kubeapi.ApiClient``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any, Final

from sidekey.core import httpclient, kubeapi

log = logging.getLogger("sidekey.kubeapi")

#: Longest a watch stays open before the apiserver closes it (randomised per
#: watch so many sidecars do not reconnect in lockstep).
WATCH_TIMEOUT_RANGE: Final = (240, 300)
#: Backoff on errors, in seconds.
BACKOFF_START: Final = 0.5
BACKOFF_MAX: Final = 30.0
#: A forbidden list (no policy grants us yet) is retried at least this often,
#: so a policy applied later takes effect within seconds.
FORBIDDEN_RETRY_MAX: Final = 2.0
#: Spread of the pause before a relist after 410 Gone.
RELIST_JITTER: Final = 1.0


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
        api: kubeapi.ApiClient,
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
            except kubeapi.ApiError as exc:
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
                raise kubeapi.ApiError(code, str(obj.get("reason", "")), str(obj.get("message", "")))
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
            except kubeapi.ApiError as exc:
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
            except (httpclient.HttpError, TimeoutError, OSError, ValueError, KeyError) as exc:
                self._report(exc)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _report(self, exc: BaseException) -> None:
        if isinstance(exc, kubeapi.ApiError) and exc.status == 403 and self.forbidden_is_empty:
            log.debug("list %s forbidden: treated as empty", self.path)
        else:
            log.warning("watch %s failed, retrying: %s", self.path, _describe(exc))
        if self.on_error is not None:
            self.on_error(exc)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
