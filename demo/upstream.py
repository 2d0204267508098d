"""A local stand-in for the OpenAI API, served over real TLS, that checks the key.

It speaks just enough of the API for the official SDK: ``POST
/v1/chat/completions`` (plain and ``stream: true`` as server-sent events) and
``GET /v1/models``. Every request is recorded, with *which* of the configured
keys it carried (never the key itself), so the demo and its test can prove
from the outside that the upstream received the key the agent never held.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web


@dataclass
class Record:
    method: str
    path: str
    key: str  # the name of the key that matched, "none" or "unknown"
    caller_token_seen: bool  # did anything that looks like the agent's token arrive?


@dataclass
class MockOpenAI:
    """``keys`` maps a name ("first", "rotated") to a key the upstream accepts."""

    keys: Mapping[str, str]
    record_file: Path | None = None
    records: list[Record] = field(default_factory=list)

    def _which_key(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        if not auth:
            return "none"
        for name, key in self.keys.items():
            if auth == f"Bearer {key}":
                return name
        return "unknown"

    def _record(self, request: web.Request) -> Record:
        auth = request.headers.get("Authorization", "")
        rec = Record(request.method, request.path, self._which_key(request),
                     caller_token_seen=auth.count(".") == 2 and auth.startswith("Bearer ey"))
        self.records.append(rec)
        if self.record_file is not None:
            with self.record_file.open("a") as f:
                f.write(json.dumps(rec.__dict__) + "\n")
        return rec

    @staticmethod
    def _unauthorized() -> web.Response:
        return web.json_response(
            {"error": {"type": "invalid_request_error", "message": "Incorrect API key provided."}},
            status=401)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        rec = self._record(request)
        if rec.key in ("none", "unknown"):
            return self._unauthorized()
        body = await request.json()
        words = f"Hello from the upstream; your call carried the {rec.key} key.".split(" ")
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-demo", "object": "chat.completion", "created": created,
                "model": body.get("model", "demo"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": " ".join(words)}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)},
            })
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, word in enumerate(words):
            chunk = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": created,
                     "model": body.get("model", "demo"),
                     "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                                  "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.02)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        rec = self._record(request)
        if rec.key in ("none", "unknown"):
            return self._unauthorized()
        return web.json_response({"object": "list", "data": [
            {"id": "demo-model", "object": "model", "created": 0, "owned_by": "sidekey"}]})

    async def other(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response({"error": {"type": "not_found", "message": "no such route"}}, status=404)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_route("*", "/{tail:.*}", self.other)
        return app


async def serve(upstream: MockOpenAI, cert_file: Path, key_file: Path) -> tuple[web.AppRunner, int]:
    """Serve on an ephemeral loopback port with TLS; return the runner and the port."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    runner = web.AppRunner(upstream.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    server: Any = site._server  # aiohttp exposes no public accessor for the bound port
    port = int(server.sockets[0].getsockname()[1])
    return runner, port


def serve_in_thread(upstream: MockOpenAI, cert_file: Path, key_file: Path, stack: ExitStack) -> int:
    """Run the mock on its own event loop in a daemon thread; ``stack`` stops it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="mock-openai", daemon=True)
    thread.start()
    runner, port = asyncio.run_coroutine_threadsafe(serve(upstream, cert_file, key_file), loop).result(10)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    stack.callback(stop)
    return port
