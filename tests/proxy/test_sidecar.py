"""The whole sidecar process wiring against a small fake apiserver.

What the real apiserver cannot easily be made to do in a shared e2e cluster is
done here: refuse the policy list (no policy grants the account yet), then
grant it live; and go away entirely while the sidecar keeps serving.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import aiohttp
import pytest
import uvloop

from sidekey.core import llmledger, logs
from sidekey.proxy import main, sidecar
from tests.proxy.fakes import (
    ISSUER,
    NAMESPACE,
    POD_UID,
    SA,
    FakeApi,
    Upstream,
    bearer_upstream,
    mint,
    policy,
)


async def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.read()


async def until(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_forbidden_policies_mean_ready_with_no_upstreams_then_a_policy_applies_live(
    fake_api: FakeApi, running: sidecar.SidecarProcess, upstream: Upstream
) -> None:
    health = f"http://127.0.0.1:{running.health_port}"
    proxy = f"http://127.0.0.1:{running.proxy_port}"

    async def ready() -> bool:
        return (await get(f"{health}/readyz"))[0] == 200

    await until(ready)
    assert running.issuer == ISSUER  # from discovery, and the jwks_uri there was ignored
    status, body = await get(f"{proxy}/openai/v1/models", mint())
    assert status == 404 and b"no AgentPolicy" in body
    fake_api.secrets["keys"] = {
        "metadata": {"name": "keys", "namespace": NAMESPACE},
        "data": {"openai": "c2stbGl2ZS1rZXktMTIzNDU="},
    }  # sk-live-key-12345
    fake_api.policies["p"] = policy(bearer_upstream(upstream.url))
    fake_api.forbid_policies = False
    fake_api.bump()

    async def served() -> bool:
        return (await get(f"{proxy}/openai/v1/models", mint()))[0] == 200

    await until(served)
    assert upstream.last.headers["Authorization"] == "Bearer sk-live-key-12345"


async def test_the_apiserver_going_away_does_not_stop_the_sidecar(
    fake_api: FakeApi, running: sidecar.SidecarProcess, upstream: Upstream
) -> None:
    proxy = f"http://127.0.0.1:{running.proxy_port}"
    fake_api.secrets["keys"] = {
        "metadata": {"name": "keys", "namespace": NAMESPACE},
        "data": {"openai": "c2stbGl2ZS1rZXktMTIzNDU="},
    }
    fake_api.policies["p"] = policy(bearer_upstream(upstream.url))
    fake_api.forbid_policies = False
    fake_api.bump()

    async def served() -> bool:
        return (await get(f"{proxy}/openai/v1/models", mint()))[0] == 200

    await until(served)
    await fake_api.stop()
    await asyncio.sleep(0.5)  # watches fail and retry against a closed port
    token = mint(jti="new")  # not cached: validated offline with the cached JWKS
    status, _ = await get(f"{proxy}/openai/v1/models", token)
    assert status == 200
    assert (await get(f"http://127.0.0.1:{running.health_port}/readyz"))[0] == 200
    _, metrics_text = await get(f"http://127.0.0.1:{running.health_port}/metrics")
    assert b"sidekey_apiserver_errors_total{" in metrics_text
    assert b"sk-live-key" not in metrics_text


async def test_sigterm_style_stop_drains_and_readiness_drops(running: sidecar.SidecarProcess) -> None:
    health = f"http://127.0.0.1:{running.health_port}"
    stopping = asyncio.create_task(running.stop())
    await asyncio.sleep(0)
    assert running.draining and not running.ready
    await stopping
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"{health}/healthz")


async def test_a_deleted_secret_gives_503_for_its_upstream_only(
    fake_api: FakeApi, running: sidecar.SidecarProcess, upstream: Upstream
) -> None:
    proxy = f"http://127.0.0.1:{running.proxy_port}"
    fake_api.secrets["keys"] = {
        "metadata": {"name": "keys", "namespace": NAMESPACE},
        "data": {"openai": "c2stbGl2ZS1rZXktMTIzNDU="},
    }
    fake_api.secrets["other"] = {
        "metadata": {"name": "other", "namespace": NAMESPACE},
        "data": {"k": "c2stb3RoZXIta2V5LTY3ODkw"},
    }
    other = bearer_upstream(
        upstream.url, name="other", auth={"type": "bearer", "secretRef": {"name": "other", "key": "k"}}
    )
    fake_api.policies["p"] = policy(bearer_upstream(upstream.url), other)
    fake_api.forbid_policies = False
    fake_api.bump()

    async def both_served() -> bool:
        a = (await get(f"{proxy}/openai/x", mint()))[0]
        b = (await get(f"{proxy}/other/x", mint()))[0]
        return a == b == 200

    await until(both_served)
    del fake_api.secrets["keys"]
    fake_api.bump()

    async def gone() -> bool:
        return (await get(f"{proxy}/openai/x", mint()))[0] == 503

    await until(gone, timeout=2.0)
    status, body = await get(f"{proxy}/openai/x", mint())
    assert status == 503 and b"'keys'" in body and b"sk-live" not in body
    assert (await get(f"{proxy}/other/x", mint()))[0] == 200


class _FlushedStream(io.StringIO):
    """An audit stream that remembers what had been flushed: a pod's log has only that."""

    flushed = ""

    def flush(self) -> None:
        self.flushed = self.getvalue()


async def test_a_stop_flushes_the_audit_before_the_ledger_and_waits_for_it_only_so_long(
    fake_api: FakeApi, running: sidecar.SidecarProcess, upstream: Upstream
) -> None:
    budget = {"tokens": 100_000, "window": "24h", "scope": "serviceAccount"}
    name = llmledger.lease_name("p", "openai", 0, SA)
    fake_api.leases[name] = {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": NAMESPACE, "resourceVersion": "1",
                     "annotations": {llmledger.ANNOTATION: llmledger.dumps(llmledger.new(100_000, 86400, time.time()))}},
        "spec": {"leaseDurationSeconds": 120},
    }
    fake_api.secrets["keys"] = {"metadata": {"name": "keys", "namespace": NAMESPACE},
                                "data": {"openai": "c2stbGl2ZS1rZXktMTIzNDU="}}
    fake_api.policies["p"] = policy(bearer_upstream(upstream.url, api="openai", budgets=[budget]))
    fake_api.forbid_policies = False
    audit = _FlushedStream()
    sc = sidecar.SidecarProcess(running.settings, running.api_config, audit=logs.AuditWriter(audit))
    await sc.start()
    proxy = f"http://127.0.0.1:{sc.proxy_port}"

    async def ready() -> bool:
        return sc.ready and "openai" in sc.routes.table

    await until(ready)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy}/openai/chat/completions", headers={"Authorization": f"Bearer {mint()}"},
                          json={"model": "gpt-4.1", "max_tokens": 10,
                                "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200, await r.text()
        held = llmledger.loads(fake_api.leases[name]["metadata"]["annotations"][llmledger.ANNOTATION])
        assert held.holding(POD_UID) > 0  # a slice to hand back on stop

        flushed_at_release: list[str] = []
        fake_api.hang_lease_updates = lambda: flushed_at_release.append(audit.flushed)
        drained = asyncio.create_task(call_status(s, f"{proxy}/openai/slow?s=0.5"))
        await until(lambda: _true(sc.proxy.in_flight > 0))
        started = time.monotonic()
        await asyncio.wait_for(sc.stop(), 10)
        took = time.monotonic() - started
        assert await drained == 200
    assert flushed_at_release, "the sidecar never tried to hand its slice back"
    # the drained request's audit line was out before the sidecar waited on the ledger
    lines = [json.loads(line) for line in flushed_at_release[0].splitlines()]
    assert [(x["path"], x["status"]) for x in lines if x["path"].startswith("/openai/slow")] == [
        ("/openai/slow?s=REDACTED", 200)], lines
    assert took < 0.5 + sidecar.RELEASE_SECONDS + 2.5, took  # the drain, the bounded release, the rest


async def call_status(s: aiohttp.ClientSession, url: str) -> int:
    async with s.get(url, headers={"Authorization": f"Bearer {mint()}"}) as r:
        await r.read()
        return r.status


async def _true(value: bool) -> bool:
    return value


async def test_the_sidecars_code_is_tested_on_the_loop_it_runs_on() -> None:
    """``sidekey proxy`` runs on ``main.new_loop`` (uvloop); tests/loops.py puts this directory there too."""
    assert main.new_loop is uvloop.new_event_loop
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
