"""``sidekey proxy``: the sidecar. Configured by its environment only (see settings)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvloop

from sidekey.core import apiconfig, contract, logs
from sidekey.proxy import settings, sidecar

if TYPE_CHECKING:
    import argparse  # only ``sidekey proxy --help`` parses: see sidekey.cli

log = logging.getLogger("sidekey.proxy")

#: The sidecar's event loop: uvloop (libuv, its transports in C). The request path is
#: asyncio Protocols either way; on asyncio's own selector loop the same request costs
#: ~15 % more CPU (``python -m bench.experiment --variant base= --variant std=stdloop``).
#: The tests that run the sidecar's code in-process use it too (tests/loops.py).
new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = f"Configured by environment variables set by the webhook: {', '.join(contract.SIDECAR_ENV)}."


async def serve(config: settings.Settings) -> int:
    app = sidecar.SidecarProcess(config, apiconfig.ApiConfig.in_cluster())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    # What start-up built (modules, the app) lives as long as the process: move it out
    # of the collector's reach, so a full pass no longer rescans it (15-25 ms -> 0.3 ms).
    gc.collect()
    gc.freeze()
    await stop.wait()
    await app.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    return main()


def main() -> int:
    """The sidecar until SIGTERM; 2 when its environment or the apiserver's address is wrong."""
    try:
        config = settings.Settings.from_env()
    except settings.SettingsError as exc:
        print(f"sidekey proxy: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(serve(config))
    except ValueError as exc:  # no apiserver address, unreadable CA
        log.error("cannot start: %s", exc)
        return 2
