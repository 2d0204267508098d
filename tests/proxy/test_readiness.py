"""The sidecar's /readyz answers the JSON every sidekey component does, naming what it waits for."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from sidekey.proxy import sidecar
from tests.proxy.fakes import FakeApi


async def _readyz(port: int) -> tuple[int, object]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/readyz") as r:
        return r.status, json.loads(await r.read())


async def test_a_ready_sidecar_answers_200_with_nothing_failing(running: sidecar.SidecarProcess) -> None:
    for _ in range(100):
        if running.ready:
            break
        await asyncio.sleep(0.05)
    assert await _readyz(running.health_port) == (200, {"ready": True, "failing": {}})


async def test_a_sidecar_without_signing_keys_names_the_jwks_check(
        fake_api: FakeApi, running: sidecar.SidecarProcess) -> None:
    running.keys.keys.clear()  # the state before the first JWKS fetch
    running._was_ready = False  # readiness latches once reached; this sidecar never was
    status, body = await _readyz(running.health_port)
    assert status == 503
    assert body == {"ready": False, "failing": {"jwks": "no signing keys loaded from the apiserver's JWKS yet"}}


async def test_the_ready_gauge_is_read_at_scrape_time(running: sidecar.SidecarProcess) -> None:
    """No ticking task keeps ``sidekey_ready`` up to date: the scrape asks the sidecar."""
    from sidekey.proxy import metrics

    for _ in range(100):
        if running.ready:
            break
        await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{running.health_port}/metrics") as r:
        assert "\nsidekey_ready 1.0\n" in await r.text()
    running.draining = True  # what stop() sets first
    try:
        assert metrics.REGISTRY.get_sample_value("sidekey_ready") == 0.0
    finally:
        running.draining = False
    assert metrics.REGISTRY.get_sample_value("sidekey_ready") == 1.0
    assert not [t for t in asyncio.all_tasks() if "flush" in t.get_name()]
