"""The Reflector against a small fake apiserver that speaks list/watch: relists, 403s, outages."""

from __future__ import annotations

import asyncio

import pytest

from sidekey.core import kubeapi, reflector
from tests.core import fake_apiserver


async def test_reflector_lists_then_follows_watch_events(fake: tuple[fake_apiserver.FakeApiServer, str]) -> None:
    server, url = fake
    await server.put("a", {"k": "1"})
    changes: list[int] = []
    async with kubeapi.ApiClient(fake_apiserver.config(url)) as api:
        r = reflector.Reflector(api, fake_apiserver.PATH, on_change=lambda: changes.append(1))
        task = asyncio.create_task(r.run())
        try:
            await asyncio.wait_for(r.synced.wait(), 3)
            assert set(r.objects) == {"ns/a"}
            await fake_apiserver.until(lambda: server.watches_open == 1)
            await server.put("b", {"k": "2"})
            await fake_apiserver.until(lambda: "ns/b" in r.objects)
            await server.put("a", {"k": "3"}, kind="MODIFIED")
            await fake_apiserver.until(lambda: r.objects["ns/a"]["data"] == {"k": "3"})
            await server.put("b", kind="DELETED")
            await fake_apiserver.until(lambda: "ns/b" not in r.objects)
        finally:
            task.cancel()
    assert len(changes) >= 4
    watch = next(q for q in server.requests if q.get("watch") == "true")
    assert watch["allowWatchBookmarks"] == "true"
    assert 240 <= int(watch["timeoutSeconds"]) <= 300
    assert watch["resourceVersion"] == "11"


async def test_reflector_with_a_field_selector_sees_only_that_name(
    fake: tuple[fake_apiserver.FakeApiServer, str],
) -> None:
    server, url = fake
    await server.put("mine")
    await server.put("other")
    async with kubeapi.ApiClient(fake_apiserver.config(url)) as api:
        r = reflector.Reflector(api, fake_apiserver.PATH, field_selector="metadata.name=mine")
        task = asyncio.create_task(r.run())
        try:
            await asyncio.wait_for(r.synced.wait(), 3)
            await fake_apiserver.until(lambda: server.watches_open == 1)
            await server.put("other", {"x": "y"}, kind="MODIFIED")
            await server.put("mine", {"x": "z"}, kind="MODIFIED")
            await fake_apiserver.until(lambda: r.objects["ns/mine"]["data"] == {"x": "z"})
        finally:
            task.cancel()
    assert set(r.objects) == {"ns/mine"}
    assert all(q.get("fieldSelector") == "metadata.name=mine" for q in server.requests)


async def test_reflector_relists_after_410_gone(
    fake: tuple[fake_apiserver.FakeApiServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reflector, "RELIST_JITTER", 0.01)
    server, url = fake
    await server.put("a")
    async with kubeapi.ApiClient(fake_apiserver.config(url)) as api:
        r = reflector.Reflector(api, fake_apiserver.PATH)
        task = asyncio.create_task(r.run())
        try:
            await asyncio.wait_for(r.synced.wait(), 3)
            await fake_apiserver.until(lambda: server.watches_open == 1)
            # history is compacted: the open watch ends and resuming gets 410
            server.objects["c"] = {
                "metadata": {"name": "c", "namespace": "ns", "resourceVersion": "50"}
            }
            server.rv = 50
            server.oldest_rv = 100
            async with server.changed:
                server.changed.notify_all()
            await fake_apiserver.until(lambda: "ns/c" in r.objects)
        finally:
            task.cancel()
    lists = [q for q in server.requests if q.get("watch") != "true"]
    assert len(lists) >= 2


async def test_reflector_treats_forbidden_as_empty_and_keeps_retrying(
    fake: tuple[fake_apiserver.FakeApiServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reflector, "BACKOFF_START", 0.05)
    monkeypatch.setattr(reflector, "FORBIDDEN_RETRY_MAX", 0.1)
    server, url = fake
    server.forbidden = True
    async with kubeapi.ApiClient(fake_apiserver.config(url)) as api:
        r = reflector.Reflector(api, fake_apiserver.PATH, forbidden_is_empty=True)
        task = asyncio.create_task(r.run())
        try:
            await asyncio.wait_for(r.synced.wait(), 3)
            assert r.objects == {}
            assert r.forbidden
            await server.put("late")
            server.forbidden = False
            await fake_apiserver.until(lambda: "ns/late" in r.objects)
            assert not r.forbidden
        finally:
            task.cancel()


async def test_reflector_without_forbidden_is_empty_is_not_synced_by_a_403(
    fake: tuple[fake_apiserver.FakeApiServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reflector, "BACKOFF_START", 0.05)
    server, url = fake
    server.forbidden = True
    errors: list[BaseException] = []
    async with kubeapi.ApiClient(fake_apiserver.config(url)) as api:
        r = reflector.Reflector(api, fake_apiserver.PATH, on_error=errors.append)
        task = asyncio.create_task(r.run())
        try:
            await fake_apiserver.until(lambda: len(errors) >= 2)
            assert not r.synced.is_set()
        finally:
            task.cancel()
    assert all(isinstance(e, kubeapi.ApiError) and e.status == 403 for e in errors)


async def test_reflector_keeps_its_cache_while_the_apiserver_is_down(
    fake: tuple[fake_apiserver.FakeApiServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reflector, "BACKOFF_START", 0.05)
    server, url = fake
    await server.put("a", {"k": "v"})
    errors: list[BaseException] = []
    async with kubeapi.ApiClient(fake_apiserver.config(url)) as api:
        r = reflector.Reflector(api, fake_apiserver.PATH, on_error=errors.append)
        task = asyncio.create_task(r.run())
        try:
            await asyncio.wait_for(r.synced.wait(), 3)
            await fake_apiserver.until(lambda: server.watches_open == 1)
            server.fail_with = 500
            server.oldest_rv = 10_000  # end the open watch
            async with server.changed:
                server.changed.notify_all()
            await fake_apiserver.until(lambda: len(errors) >= 1)
            assert r.objects["ns/a"]["data"] == {"k": "v"}
        finally:
            task.cancel()


async def test_reflector_against_a_closed_port_backs_off_and_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reflector, "BACKOFF_START", 0.01)
    errors: list[BaseException] = []
    async with kubeapi.ApiClient(fake_apiserver.config("http://127.0.0.1:9")) as api:
        r = reflector.Reflector(api, fake_apiserver.PATH, on_error=errors.append)
        task = asyncio.create_task(r.run())
        try:
            await fake_apiserver.until(lambda: len(errors) >= 2)
        finally:
            task.cancel()
    assert not r.synced.is_set()
