"""The AgentPolicy cache: served from the watch, read live on a miss."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from sidekey.core import kubeapi
from sidekey.webhook import caching


def policy(name: str, sa: str, rv: str = "1", namespace: str = "agents") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"subjects": {"serviceAccounts": [sa]}, "upstreams": [{
            "name": "up", "url": "https://api.example.com",
            "auth": {"type": "bearer", "secretRef": {"name": "k", "key": "k"}},
            "allow": [{"paths": ["/**"]}]}]},
    }


class FakeApi:
    """Answers lists from ``items``; watches hang (nothing changes)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.gets: list[str] = []
        self.fail = False

    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        self.gets.append(path)
        if self.fail:
            raise kubeapi.ApiError(503, "ServiceUnavailable", "down")
        ns = path.split("/namespaces/")[1].split("/")[0] if "/namespaces/" in path else None
        items = [i for i in self.items if ns is None or i["metadata"]["namespace"] == ns]
        return {"items": items, "metadata": {"resourceVersion": "10"}}

    async def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[kubeapi.WatchEvent]:
        await asyncio.sleep(3600)
        if False:  # pragma: no cover
            yield


async def _synced(api: FakeApi) -> tuple[caching.PolicyCache, asyncio.Task[None]]:
    cache = caching.PolicyCache(api)  # type: ignore[arg-type]
    task = asyncio.create_task(cache.run())
    await asyncio.wait_for(cache.reflector.synced.wait(), 5)
    return cache, task


async def test_a_hit_is_served_from_the_cache_without_an_api_call() -> None:
    api = FakeApi([policy("p", "agent")])
    cache, task = await _synced(api)
    try:
        before = len(api.gets)
        found = await cache.lookup("agents", "agent")
        assert [p.name for p in found.policies] == ["p"] and not found.live
        assert len(api.gets) == before
    finally:
        task.cancel()


async def test_a_policy_created_after_the_last_list_is_found_by_a_live_read() -> None:
    api = FakeApi([])
    cache, task = await _synced(api)
    try:
        api.items.append(policy("new", "agent"))
        found = await cache.lookup("agents", "agent")
        assert [p.name for p in found.policies] == ["new"] and found.live
        assert api.gets[-1] == caching.namespaced_collection("agents")
    finally:
        task.cancel()


async def test_an_invalid_policy_naming_the_account_is_a_warning_not_a_crash() -> None:
    bad = policy("bad", "agent")
    bad["spec"]["upstreams"] = []
    cache, task = await _synced(FakeApi([bad, policy("good", "agent", namespace="other")]))
    try:
        found = await cache.lookup("agents", "agent")
        assert found.policies == ()
        assert any("AgentPolicy bad is invalid" in w for w in found.warnings)
        other = await cache.lookup("other", "agent")
        assert [p.name for p in other.policies] == ["good"] and other.warnings == ()
    finally:
        task.cancel()


async def test_a_failed_live_read_falls_back_to_the_synced_cache() -> None:
    api = FakeApi([policy("p", "other-sa")])
    cache, task = await _synced(api)
    try:
        api.fail = True
        found = await cache.lookup("agents", "agent")
        assert [p.name for p in found.policies] == ["p"]
        assert any("could not be read live" in w for w in found.warnings)
    finally:
        task.cancel()


async def test_no_cache_and_no_live_read_is_unavailable() -> None:
    api = FakeApi([])
    api.fail = True
    cache = caching.PolicyCache(api)  # type: ignore[arg-type]
    with pytest.raises(caching.Unavailable):
        await cache.lookup("agents", "agent")
