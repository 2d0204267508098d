"""The operator's /readyz answers the JSON every sidekey component does, naming the failing check."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from sidekey.operator import serving


async def _readyz(alive: str | None, ready: str | None) -> tuple[int, object]:
    client = TestClient(TestServer(serving.health_app(lambda: alive, lambda: ready)))
    await client.start_server()
    try:
        resp = await client.get("/readyz")
        return resp.status, await resp.json()
    finally:
        await client.close()


async def test_ready_is_200_with_nothing_failing() -> None:
    assert await _readyz(None, None) == (200, {"ready": True, "failing": {}})


async def test_not_ready_names_each_failing_check_and_why() -> None:
    status, body = await _readyz("stopped: webhook-tls", "kopf is starting")
    assert status == 503
    assert body == {"ready": False, "failing": {"running": "stopped: webhook-tls", "started": "kopf is starting"}}
