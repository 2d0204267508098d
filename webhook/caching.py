"""AgentPolicies as the webhook sees them: a watch-backed cache, read live on a miss.

The cache answers in microseconds, which keeps admission latency low, but a
pod created right after its policy must still get it: when no cached policy
in the namespace names the pod's service account (or the cache has not
synced yet), the namespace's AgentPolicies are read live from the apiserver,
with a short timeout so admission stays within its own deadline. A policy
that does not parse is skipped with a warning naming it, never a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp

from sidekey.core import contract, errors, kubeapi, policies, reflector

log = logging.getLogger("sidekey.webhook.caching")

COLLECTION: Final = f"/apis/{contract.GROUP}/{contract.VERSION}/{contract.PLURAL}"
#: The live read on a miss must leave time for the rest of admission (timeoutSeconds ≤ 5).
LIVE_READ_TIMEOUT: Final = 2.0


def namespaced_collection(namespace: str) -> str:
    return f"/apis/{contract.GROUP}/{contract.VERSION}/namespaces/{namespace}/{contract.PLURAL}"


class Unavailable(errors.Unavailable):
    """No trustworthy view of the policies: neither a synced cache nor a live read."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """The namespace's usable policies, and warnings about the unusable ones."""

    policies: tuple[policies.AgentPolicy, ...]
    warnings: tuple[str, ...] = ()
    live: bool = False  # read from the apiserver, not the cache


class PolicySource(Protocol):
    """Where the handler gets policies: the cache, or an in-memory twin in tests."""

    @property
    def ready(self) -> bool: ...

    async def lookup(self, namespace: str, service_account: str) -> Lookup: ...


def names(obj: Mapping[str, Any], service_account: str) -> bool:
    """Whether a policy that failed to parse still seems to name ``service_account``.

    Only those are worth a warning on this pod; an unreadable subject list counts.
    """
    subjects = ((obj.get("spec") or {}).get("subjects") or {}) if isinstance(obj.get("spec"), Mapping) else {}
    accounts = subjects.get("serviceAccounts") if isinstance(subjects, Mapping) else None
    return not isinstance(accounts, list) or service_account in accounts


def _invalid(name: str, exc: policies.PolicyError) -> str:
    return f"AgentPolicy {name} is invalid and was ignored: {exc}"


def parse_all(objects: Iterable[Mapping[str, Any]], service_account: str) -> Lookup:
    parsed: list[policies.AgentPolicy] = []
    warnings: list[str] = []
    for obj in objects:
        name = str((obj.get("metadata") or {}).get("name", "?"))
        try:
            parsed.append(policies.parse(policies.raw(obj)))
        except policies.PolicyError as exc:
            if names(obj, service_account):
                warnings.append(_invalid(name, exc))
    return Lookup(tuple(sorted(parsed, key=lambda p: p.age_key)), tuple(warnings))


class StaticPolicies:
    """An in-memory PolicySource: the tests' and the benchmark's twin of the cache."""

    def __init__(self, objects: Iterable[Mapping[str, Any]] = ()) -> None:
        self.objects = list(objects)
        self._parsed: dict[tuple[str, str], Lookup] = {}

    @property
    def ready(self) -> bool:
        return True

    async def lookup(self, namespace: str, service_account: str) -> Lookup:
        key = (namespace, service_account)
        if key not in self._parsed:
            mine = [o for o in self.objects if (o.get("metadata") or {}).get("namespace") == namespace]
            self._parsed[key] = parse_all(mine, service_account)
        return self._parsed[key]


class PolicyCache:
    """A Reflector over every AgentPolicy, parsed once per resourceVersion."""

    def __init__(self, api: kubeapi.ApiClient) -> None:
        self.api = api
        self.reflector = reflector.Reflector(api, COLLECTION, on_change=self._changed)
        self._parsed: dict[str, tuple[str, policies.AgentPolicy | policies.PolicyError]] = {}
        #: namespace -> keys of its policies; rebuilt after any change, so a
        #: lookup touches its namespace only, however many policies the cluster has.
        self._index: dict[str, list[str]] | None = None
        self.live_reads = 0

    @property
    def ready(self) -> bool:
        return self.reflector.synced.is_set()

    async def run(self) -> None:
        await self.reflector.run()

    def _changed(self) -> None:
        self._index = None

    def _keys(self, namespace: str) -> list[str]:
        if self._index is None:
            index: dict[str, list[str]] = {}
            for key in self.reflector.objects:
                index.setdefault(key.split("/", 1)[0], []).append(key)
            self._index = index
        return self._index.get(namespace, [])

    def _cached(self, namespace: str, service_account: str) -> Lookup:
        found: list[policies.AgentPolicy] = []
        warnings: list[str] = []
        objects = self.reflector.objects
        for key in self._keys(namespace):
            obj = objects.get(key)
            if obj is None:
                continue
            rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
            hit = self._parsed.get(key)
            if hit is None or hit[0] != rv:
                try:
                    hit = (rv, policies.parse(policies.raw(obj)))
                except policies.PolicyError as exc:
                    hit = (rv, exc)
                self._parsed[key] = hit
            if isinstance(hit[1], policies.PolicyError):
                if names(obj, service_account):
                    warnings.append(_invalid(key.split("/", 1)[1], hit[1]))
            else:
                found.append(hit[1])
        if len(self._parsed) > 2 * len(self.reflector.objects) + 100:
            self._parsed = {k: v for k, v in self._parsed.items() if k in self.reflector.objects}
        return Lookup(tuple(sorted(found, key=lambda p: p.age_key)), tuple(warnings))

    async def lookup(self, namespace: str, service_account: str) -> Lookup:
        cached = self._cached(namespace, service_account)
        if self.ready and any(p.selects(service_account) for p in cached.policies):
            return cached
        self.live_reads += 1
        try:
            async with asyncio.timeout(LIVE_READ_TIMEOUT):
                doc = await self.api.get_json(namespaced_collection(namespace))
        except (kubeapi.ApiError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            if not self.ready:
                raise Unavailable("AgentPolicies cannot be read yet (the webhook is starting); "
                                  "retry in a few seconds") from None
            log.warning("live read of AgentPolicies in %s failed, using the cache: %s",
                        namespace, type(exc).__name__)
            return Lookup(cached.policies, (*cached.warnings,
                                            "AgentPolicies could not be read live; used the cache"))
        live = parse_all(doc.get("items") or [], service_account)
        return Lookup(live.policies, live.warnings, live=True)
