"""``sidekey operator``: reconcile AgentPolicies, keep webhook TLS, report pods.

One active instance at a time: the chart runs a single replica with the
``Recreate`` strategy (kopf peering is not leader election; equal-priority
peers freeze each other). kopf runs standalone, cluster-wide.

Stopping (SIGTERM, SIGINT or the ``stop`` flag) takes well under a second
when nothing is being written. kopf stops its watches first (its workers get
``settings.queueing.exit_timeout``, 2 s, to hand over the events they hold),
then runs the cleanup handler here, ``stop_background``: the reconcile queue
is closed, the budget ledgers and webhook TLS start no further pass, and what
has already begun (a reconcile writing a status and then the Events of its
transitions, a ledger pass, a TLS ensure) is given ``STOP_GRACE`` seconds to
finish before it is cancelled; the health and metrics servers close. What
waited in the queue, or in a retry's backoff, is dropped: the next instance
reconciles every policy on its first listing, re-reads every Lease and the
TLS material, and reports again each pod without its sidecar, so nothing a
handler accepted is lost, only redone. Only work past the grace (a hung
apiserver) can lose an Event: a status written, its transition's Event not.

The cleanup handler matters for the time as well: kopf waits 5 s at exit for
any task created after it started ("hung" tasks, ``kopf/_core/reactor/
running.py``) before it cancels them and returns, and the ``finally`` below
only runs after that. Every task of ours is finished before kopf looks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

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
#: Seconds a reconcile, ledger pass or TLS ensure that has begun gets to finish at shutdown.
#: Within the pod's default terminationGracePeriodSeconds (30) with kopf's own share.
STOP_GRACE = 10.0


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
        # serviceAccount token budgets: ledger Leases and status.budgets (operator/ledger.py)
        keeper = ledger.LedgerKeeper(api)
        background: list[asyncio.Task[None]] = [
            asyncio.create_task(ctl.queue.run(), name="reconcile-queue"),
            asyncio.create_task(keeper.run(), name="budget-ledgers")]
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

        async def stop_background(grace: float) -> None:
            """Let begun work finish (within ``grace``), cancel the rest, close the servers.

            Safe to call again, e.g. from the ``finally`` after kopf ran it as a cleanup handler.
            """
            ctl.queue.close()
            keeper.stop()
            if tls is not None:
                tls.stop()
            try:
                async with asyncio.timeout(grace):
                    await ctl.queue.wait_idle()
                    await keeper.idle.wait()
                    if tls is not None:
                        await tls.idle.wait()
            except TimeoutError:
                busy = [f"reconcile of {key}" for key in ctl.queue.running]
                busy += [] if keeper.idle.is_set() else ["budget ledger pass"]
                busy += [] if tls is None or tls.idle.is_set() else ["webhook TLS ensure"]
                log.warning("stopping: cancelled after %.0fs: %s", grace, ", ".join(busy))
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            while runners:
                await runners.pop().cleanup()

        @kopf.on.cleanup(registry=registry, id="stop-background")
        async def _cleanup(**_: Any) -> None:
            await stop_background(STOP_GRACE)

        log.info("sidekey operator starting: namespace %s, certificates %s", opts.namespace,
                 opts.certificates)
        try:
            await kopf.operator(
                registry=registry, settings=settings, clusterwide=True, standalone=True,
                stop_flag=stop, ready_flag=kopf_ready, memo=kopf.Memo(),
            )
        finally:
            # a no-op after kopf's cleanup; if kopf failed or was cancelled before it, no grace
            await stop_background(0)
