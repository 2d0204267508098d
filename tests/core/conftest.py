"""Fixtures of the core tests: the fake apiserver, served on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.core import fake_apiserver
from tests.loops import pytest_asyncio_loop_factories  # noqa: F401  (the sidecar's event loop)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[fake_apiserver.FakeApiServer, str]]:
    server = fake_apiserver.FakeApiServer()
    app = web.Application()
    app.router.add_get(fake_apiserver.PATH, server.handle)
    app.router.add_get("/api/v1/namespaces/ns/configmaps/x", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server, f"http://127.0.0.1:{port}"
    await runner.cleanup()
