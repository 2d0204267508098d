"""``sidekey operator``: reconcile AgentPolicies, keep webhook TLS, report pods.

One active instance at a time: the chart runs a single replica with the
``Recreate`` strategy (kopf peering is not leader election; equal-priority
peers freeze each other). kopf runs standalone, cluster-wide.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import kopf

from sidekey.core import logs
from sidekey.operator import (
    controller,
    handlers,
    ledger,
    login,
    metrics,
    options,
    pods,
    recording,
    rest,
    serving,
    webhook_tls,
)

log = logging.getLogger("sidekey.operator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    opts = options.from_args(args)
    logs.configure(opts.log_level)
    # kopf's own per-event chatter stays at WARNING unless debugging.
    if opts.log_level != "debug":
        logging.getLogger("kopf").setLevel(logging.WARNING)
    try:
        asyncio.run(operate(opts))
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


async def operate(opts: options.Options, *, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT, when in the main thread)."""
    config = login.api_config(opts.kubeconfig)
    stats = metrics.Metrics()
    async with rest.Rest(config) as api:
        recorder = recording.Recorder(api)
        images = opts.sidecar_images | {opts.sidecar_image} if opts.sidecar_image else None
        ctl = controller.Controller(api, recorder, stats, agent_audiences=opts.agent_audiences,
                                    sidecar_images=images)
        reporter = pods.PodReporter(recorder, stats, pods.Rules(
            own_namespace=opts.namespace, sidecar_image=opts.sidecar_image,
            sidecar_images=opts.sidecar_images, excluded_namespaces=opts.excluded_namespaces))
        tls = webhook_tls.TlsManager(api, opts, stats) if opts.certificates == "operator" else None
        registry = kopf.OperatorRegistry()
        handlers.register(registry, opts, ctl, reporter, tls)
        settings = kopf.OperatorSettings()
        login.configure(settings)
        kopf_ready = asyncio.Event()
        background: list[asyncio.Task[None]] = [
            asyncio.create_task(ctl.queue.run(), name="reconcile-queue"),
            # serviceAccount token budgets: ledger Leases and status.budgets (operator/ledger.py)
            asyncio.create_task(ledger.LedgerKeeper(api).run(), name="budget-ledgers")]
        if tls is not None:
            background.append(asyncio.create_task(tls.run(), name="webhook-tls"))

        def alive() -> str | None:
            dead = [t.get_name() for t in background if t.done()]
            return f"stopped: {', '.join(dead)}" if dead else None

        def is_ready() -> str | None:
            if not kopf_ready.is_set():
                return "kopf is starting"
            if not ctl.attached or not ctl.handling.is_set():
                return ("kopf has not delivered events yet: its indexes are filling (if this "
                        "lasts, check the operator may list and watch agentpolicies and namespaces)")
            if tls is not None and not tls.synced.is_set():
                return "the webhook certificate is not issued yet"
            return None

        runners = []
        if opts.health_port:
            runners.append(await serving.start(serving.health_app(alive, is_ready),
                                               opts.health_port, opts.listen_address))
        if opts.metrics_port:
            runners.append(await serving.start(serving.metrics_app(stats), opts.metrics_port,
                                               opts.listen_address))
        log.info("sidekey operator starting: namespace %s, certificates %s", opts.namespace,
                 opts.certificates)
        try:
            await kopf.operator(
                registry=registry, settings=settings, clusterwide=True, standalone=True,
                stop_flag=stop, ready_flag=kopf_ready, memo=kopf.Memo(),
            )
        finally:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for runner in runners:
                await runner.cleanup()
