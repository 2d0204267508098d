"""The mock LLM provider, served where the node's pods can reach it: the bridge address.

localcluster/upstreams.py's ``Served`` binds loopback, which a pod cannot
reach (it has its own). Here the same ``MockLLM`` app is served on the
bridge gateway over real TLS, with a serving certificate for that address;
the AgentPolicy trusts its CA through ``caBundle``.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from sidekey.core import certificates


class BridgeServed:
    """An aiohttp app on ``host`` over TLS, on its own loop in a daemon thread."""

    def __init__(self, app: web.Application, host: str) -> None:
        self.host = host
        ca = certificates.make_ca("sidekey-node-mock-ca")
        leaf = certificates.issue(ca, "mock-llm", ip_addresses=[host])
        self.ca_pem = ca.cert_pem.decode()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert.write_bytes(leaf.cert_pem)
            key.write_bytes(leaf.key_pem)
            ctx.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bridge-mock", daemon=True)
        self._thread.start()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)

        async def start() -> int:
            await self._runner.setup()
            site = web.TCPSite(self._runner, host, 0, ssl_context=ctx)
            await site.start()
            server: Any = site._server
            return int(server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
