"""Webhook handler latency at a steady 100 AdmissionReviews per second.

Not a test: it prints numbers (and writes JSON with --out). The goal in the
issue is p99 <= 5 ms for the handler. Two measurements:

- ``handler_cpu``: the CPU time of ``serving.Handler.review`` per review,
  which other processes on a shared machine cannot inflate;
- ``handler``: the service time of ``serving.Handler.review`` on the raw request body, exactly
  what runs per admission inside the server (parse, decide, policy lookup
  on the real ``PolicyCache`` hit path, patch, encode), open-loop: reviews
  are started on a fixed 10 ms schedule whether or not the previous one
  was slow, so queueing shows up in the tail;
- ``https``: the same reviews POSTed over real TLS to the aiohttp server on
  127.0.0.1 with a keep-alive client, as the apiserver would.

The review mix comes from the golden pods (several containers, init
containers, existing env, overrides, an already injected pod, a refused
pod), admitted against the golden policies, plus 200 unrelated policies
in other namespaces so the cache holds more than the namespace at hand.

    .venv/bin/python bench/webhook_bench.py --seconds 30 [--out bench/results/webhook.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import ssl
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from sidekey.core import certificates, contract
from sidekey.webhook import caching, serving, tls
from sidekey.webhook import metrics as metrics_mod
from sidekey.webhook import settings as settings_mod

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "webhook" / "golden"
CASES = ("several-containers", "existing-init-containers", "existing-env-and-volumes",
         "annotation-overrides", "already-injected", "job-pod", "several-policies-and-conflict",
         "host-network-refused")


class _NoApi:
    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        raise AssertionError("the benchmark must stay on the cache hit path")


def _cache() -> caching.PolicyCache:
    cache = caching.PolicyCache(_NoApi())  # type: ignore[arg-type]
    objects: dict[str, dict[str, Any]] = {}
    golden = yaml.safe_load((GOLDEN / "policies.yaml").read_text())
    for obj in golden:
        objects[f"agents/{obj['metadata']['name']}"] = obj
    template = golden[0]
    for i in range(200):
        obj = json.loads(json.dumps(template))
        obj["metadata"].update(name=f"p{i}", namespace=f"team-{i % 40}", resourceVersion=str(1000 + i))
        objects[f"team-{i % 40}/p{i}"] = obj
    cache.reflector.objects = objects
    cache.reflector.synced.set()
    return cache


def _bodies() -> list[bytes]:
    out = []
    for i, case in enumerate(CASES):
        pod = yaml.safe_load((GOLDEN / case / "pod.yaml").read_text())
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": f"bench-{i}", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "agents", "operation": "CREATE", "object": pod, "oldObject": None,
            "userInfo": {"username": "bench"}, "dryRun": False}}
        out.append(json.dumps(review).encode())
    return out


def _summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50_ms": round(q[49], 3), "p90_ms": round(q[89], 3),
            "p99_ms": round(q[98], 3), "max_ms": round(ms[-1], 3)}


async def _paced(rate: float, seconds: float, call: Any,
                 bodies: list[bytes]) -> tuple[list[float], list[float], list[float]]:
    """Open loop: start one call every 1/rate s.

    Returns (cpu, service, latency): cpu is the CPU time the call used (immune
    to other processes holding the CPU; meaningful for the direct handler call
    only, which never awaits on the cache-hit path), service its wall time,
    and latency counts from the scheduled start, so it also holds any wait for
    the event loop or the CPU (on a loaded machine, the machine, not the code).
    """
    latencies: list[float] = []
    service: list[float] = []
    cpu: list[float] = []
    interval = 1.0 / rate
    start = time.perf_counter()
    total = int(rate * seconds)
    tasks = []

    async def one(i: int, due: float) -> None:
        began, began_cpu = time.perf_counter(), time.thread_time()
        await call(bodies[i % len(bodies)])
        ended = time.perf_counter()
        cpu.append(time.thread_time() - began_cpu)
        service.append(ended - began)
        latencies.append(ended - due)

    for i in range(total):
        due = start + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    return cpu, service, latencies


async def main(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_mod.load(GOLDEN / "settings.yaml")
    handler = serving.Handler(settings, _cache(), metrics=metrics_mod.Metrics(), cluster_minor=36)
    bodies = _bodies()
    for b in bodies:  # warm up, and check every review is answered
        status, _ = await handler.review(b)
        assert status == 200
    logging_off()
    gc.collect()
    gc.freeze()  # as `sidekey webhook` does after start-up

    async def direct(body: bytes) -> None:
        await handler.review(body)

    results: dict[str, Any] = {"rate_per_second": args.rate, "seconds": args.seconds,
                               "cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    cpu, service, latency = await _paced(args.rate, args.seconds, direct, bodies)
    results["handler_cpu"] = _summary(cpu)
    results["handler"] = _summary(service)
    results["handler_open_loop"] = _summary(latency)

    with tempfile.TemporaryDirectory() as d:
        ca = certificates.make_ca("bench-ca")
        pair = certificates.issue(ca, "bench", ip_addresses=["127.0.0.1"])
        (Path(d) / contract.TLS_CERT_KEY).write_bytes(pair.cert_pem)
        (Path(d) / contract.TLS_KEY_KEY).write_bytes(pair.key_pem)
        runner = web.AppRunner(serving.make_app(handler), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.ReloadingTLS(Path(d)).context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx, limit=8)) as http:
            url = f"https://127.0.0.1:{port}{contract.WEBHOOK_PATH}"

            async def over_https(body: bytes) -> None:
                async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200

            for b in bodies:
                await over_https(b)
            _, _, latency = await _paced(args.rate, args.seconds, over_https, bodies)
            results["https_open_loop"] = _summary(latency)
        await runner.cleanup()
    results["load_average_after"] = os.getloadavg()
    return results


def logging_off() -> None:
    import logging
    logging.getLogger("sidekey.webhook").setLevel(logging.WARNING)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0, help="AdmissionReviews per second (default 100)")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of each run (default 30)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    ns = parser.parse_args()
    res = asyncio.run(main(ns))
    print(json.dumps(res, indent=2))
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(res, indent=2) + "\n")
