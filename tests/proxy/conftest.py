"""Fixtures for the proxy: a recording upstream, and a proxy without an apiserver (helpers in fakes.py)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidekey.core import apiconfig, logs, reflector, tokens
from sidekey.proxy import forwarding, routes, settings, sidecar
from tests.loops import pytest_asyncio_loop_factories  # noqa: F401  (the sidecar's event loop)
from tests.proxy.fakes import (
    ISSUER,
    KEY,
    NAMESPACE,
    POD,
    POD_UID,
    SA,
    FakeApi,
    ProxyFactory,
    Running,
    StaticRoutes,
    Upstream,
    _upstream_app,
)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream(url="", port=0)
    runner = web.AppRunner(_upstream_app(state), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url, state.port = f"http://127.0.0.1:{port}", port
    yield state
    await runner.cleanup()


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def factory(
        *objs: Mapping[str, Any], secrets: dict[str, dict[str, str]] | None = None, pod_ip: str = ""
    ) -> Running:
        async def fetch() -> Mapping[str, Any]:
            return {"keys": [KEY.as_dict(private=False)]}

        keys = tokens.KeySet(fetch)
        await keys.refresh()
        validator = tokens.Validator(
            keys,
            tokens.Binding(
                issuer=ISSUER,
                audience="sidekey",
                namespace=NAMESPACE,
                pod_name=POD,
                pod_uid=POD_UID,
                service_account=SA,
            ),
        )
        table = StaticRoutes(secrets or {})
        table.set_policies(*objs)
        audit_stream = io.StringIO()
        resolver = routes.GuardedResolver(frozenset({pod_ip} - {""}))
        proxy = forwarding.Proxy(
            table=lambda: table.table,
            validator=lambda: validator,
            ready=lambda: True,
            audit=logs.AuditWriter(audit_stream),
            pod=POD,
            namespace=NAMESPACE,
            resolver=resolver,
        )
        server = await proxy.listen("127.0.0.1", 0)
        port = server.port

        async def cleanup() -> None:
            await server.drain(0.5)
            await proxy.close()

        cleanups.append(cleanup)
        return Running(f"http://127.0.0.1:{port}", table, audit_stream, proxy, validator)

    yield factory
    for c in cleanups:
        await c()


# --- the whole sidecar against the fake apiserver ---------------------------------------


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApi]:
    api = FakeApi()
    await api.start()
    yield api
    if api.runner is not None:
        await api.runner.cleanup()


@pytest.fixture
async def running(
    fake_api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[sidecar.SidecarProcess]:
    monkeypatch.setattr(reflector, "FORBIDDEN_RETRY_MAX", 0.2)
    monkeypatch.setattr(reflector, "BACKOFF_START", 0.05)
    monkeypatch.setattr(reflector, "RELIST_JITTER", 0.01)
    (tmp_path / "token").write_text("api-token")
    config = settings.Settings(
        pod_name=POD,
        namespace=NAMESPACE,
        pod_uid=POD_UID,
        pod_ip="10.0.0.9",
        service_account=SA,
        port=0,
        health_port=0,
        health_address="127.0.0.1",
        drain_seconds=2,
    )
    api_config = apiconfig.ApiConfig(
        server=f"http://127.0.0.1:{fake_api.port}", ca_file=None, token_file=tmp_path / "token"
    )
    sc = sidecar.SidecarProcess(config, api_config, audit=logs.AuditWriter(io.StringIO()))
    await sc.start()
    yield sc
    if not sc.draining:
        await sc.stop()

