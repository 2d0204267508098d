"""The operator's HTTP endpoints: liveness, readiness and Prometheus metrics.

Health and metrics listen on separate ports (``--health-port``,
``--metrics-port``) so the chart can expose metrics to a scraper without
exposing anything else. Plain HTTP: nothing here is secret.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from sidekey.core import health
from sidekey.operator import metrics


def health_app(alive: Callable[[], str | None], ready: Callable[[], str | None]) -> web.Application:
    """``alive``/``ready`` return None when fine, or why not.

    ``/readyz`` answers the JSON every sidekey component does (``core/health.py``),
    naming the failing check: ``running`` (a background task stopped) or
    ``started`` (kopf, its indexes or the webhook certificate not there yet).
    """

    async def healthz(_: web.Request) -> web.Response:
        problem = alive()
        return web.Response(status=503 if problem else 200, text=problem or "ok")

    async def readyz(_: web.Request) -> web.Response:
        checks = {"running": alive(), "started": ready()}
        status, body = health.readiness({name: problem for name, problem in checks.items() if problem})
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def metrics_app(stats: metrics.Metrics) -> web.Application:
    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=stats.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application()
    app.router.add_get("/metrics", serve)
    return app


#: Seconds ``AppRunner.cleanup`` gives a request that has begun (these answer at once);
#: idle keep-alive connections (a scraper's, the kubelet's probes) are closed without waiting.
SHUTDOWN_TIMEOUT = 1.0


async def start(app: web.Application, port: int, host: str = "0.0.0.0") -> web.AppRunner:  # noqa: S104
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
