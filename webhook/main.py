"""``sidekey webhook``: the mutating admission webhook's process.

Start-up order matters: the settings are checked first (a bad file stops the
process with the key to fix), then the certificate (no TLS, no webhook),
then the AgentPolicy watch starts and ``/readyz`` turns green once the first
list arrived, so a Service never routes admissions to a replica that would
have to read every policy live.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from sidekey.core import apiconfig, contract, kubeapi, logs
from sidekey.webhook import caching, serving, settings, tls
from sidekey.webhook import metrics as metrics_mod

log = logging.getLogger("sidekey.webhook")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=contract.DEFAULT_WEBHOOK_PORT,
                        help="HTTPS port for /mutate, /healthz, /readyz and /metrics (default %(default)s)")
    parser.add_argument("--host", default="0.0.0.0",  # noqa: S104 - a Service routes to the pod IP
                        help="address to listen on (default %(default)s)")
    parser.add_argument("--tls-dir", type=Path, required=True,
                        help=f"directory with {contract.TLS_CERT_KEY} and {contract.TLS_KEY_KEY}; "
                             "reloaded when the files change")
    parser.add_argument("--settings", type=Path, default=None,
                        help="settings YAML (image, allow-list, ports, audience, resources...)")
    parser.add_argument("--namespace", default=None,
                        help="the webhook's own namespace: never injected")
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="kubeconfig to reach the apiserver (in-cluster config otherwise)")


async def _cluster_minor(api: kubeapi.ApiClient) -> int | None:
    """The apiserver's minor version, to refuse injection where native sidecars are missing."""
    try:
        async with asyncio.timeout(10):
            version = await api.get_json("/version")
        return int("".join(ch for ch in str(version.get("minor", "")) if ch.isdigit()))
    except (kubeapi.ApiError, TimeoutError, OSError, ValueError) as exc:
        log.warning("could not read the apiserver version (%s); assuming native sidecars",
                    type(exc).__name__)
        return None


async def serve(args: argparse.Namespace, config: settings.Settings) -> int:
    metrics = metrics_mod.Metrics()
    certificate = tls.ReloadingTLS(args.tls_dir, metrics)
    api_config = (apiconfig.ApiConfig.from_kubeconfig(args.kubeconfig) if args.kubeconfig
                  else apiconfig.ApiConfig.in_cluster())
    async with kubeapi.ApiClient(api_config) as api:
        cache = caching.PolicyCache(api)
        handler = serving.Handler(config, cache, metrics=metrics, own_namespace=args.namespace,
                                  cluster_minor=await _cluster_minor(api))
        runner = web.AppRunner(serving.make_app(handler), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, ssl_context=certificate.context,
                           shutdown_timeout=5.0)
        await site.start()
        log.info("sidekey webhook listening on https://%s:%d", args.host, args.port)
        # Start-up objects live forever: keep the collector from rescanning them
        # on every full collection (a tail-latency spike under load).
        gc.collect()
        gc.freeze()
        tasks = [asyncio.create_task(cache.run(), name="policy-watch"),
                 asyncio.create_task(certificate.watch(), name="tls-reload")]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("sidekey webhook stopping")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await runner.cleanup()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        config = settings.load(args.settings) if args.settings else settings.Settings()
    except settings.SettingsError as exc:
        print(f"sidekey webhook: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)  # one JSON object per line, as the operator and the sidecar
    try:
        return asyncio.run(serve(args, config))
    except FileNotFoundError as exc:
        print(f"sidekey webhook: {exc}", file=sys.stderr)
        return 2
    except (OSError, kubeapi.ApiError, ValueError) as exc:
        print(f"sidekey webhook: cannot start: {exc}", file=sys.stderr)
        return 1
