"""A local TLS upstream speaking the OpenAI and Anthropic API shapes and checking the key.

It runs in a thread with its own event loop so the synchronous SDK clients of
the e2e tests can call through the sidecar. Each request is recorded with
the key it carried (compared, never stored) and whether a JWT arrived.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from sidekey.core import certificates


@dataclass
class Seen:
    path: str
    key_ok: bool
    key_name: str
    jwt_seen: bool
    at: float


@dataclass
class LlmUpstream:
    openai_key: str
    anthropic_key: str
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    ca_pem: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    # --- the API shapes ---------------------------------------------------------------

    def _check(self, request: web.Request, which: str) -> bool:
        if which == "openai":
            ok = request.headers.get("Authorization") == f"Bearer {self.openai_key}"
            name = "openai-current" if ok else "wrong"
        else:
            ok = request.headers.get("x-api-key") == self.anthropic_key
            name = "anthropic-current" if ok else "wrong"
        blob = " ".join(request.headers.values())
        self.seen.append(Seen(request.path, ok, name, "eyJ" in blob, time.time()))
        return ok

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if not self._check(request, "openai"):
            return web.json_response(
                {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}},
                status=401,
            )
        body = await request.json()
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hello from upstream"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ["hello", " from", " stream"]:
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.1)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        if not self._check(request, "openai"):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "model-a", "object": "model", "created": 1, "owned_by": "test"}],
            }
        )

    async def messages(self, request: web.Request) -> web.StreamResponse:
        if not self._check(request, "anthropic"):
            return web.json_response(
                {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
                status=401,
            )
        body = await request.json()
        message = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": "hello from claude"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 3},
        }
        if not body.get("stream"):
            return web.json_response(message)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(kind: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

        await event(
            "message_start",
            {"type": "message_start", "message": {**message, "content": [], "stop_reason": None}},
        )
        await event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        for word in ["hello", " from", " claude"]:
            await event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
            )
            await asyncio.sleep(0.05)
        await event("content_block_stop", {"type": "content_block_stop", "index": 0})
        await event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 3},
            },
        )
        await event("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        return resp

    async def slow_stream(self, request: web.Request) -> web.StreamResponse:
        self._check(request, "openai")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(int(request.query.get("n", "10"))):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.2)
        await resp.write_eof()
        return resp

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, workdir: Path) -> None:
        ca = certificates.make_ca("llm-upstream-ca")
        leaf = certificates.issue(ca, "127.0.0.1", ip_addresses=["127.0.0.1"])
        (workdir / "up.crt").write_bytes(leaf.cert_pem)
        (workdir / "up.key").write_bytes(leaf.key_pem)
        self.ca_pem = ca.cert_pem.decode()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(workdir / "up.crt", workdir / "up.key")
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/v1/slow", self.slow_stream)
        started = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(app, shutdown_timeout=0.5)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._runner = runner
            started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        started.wait(10)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
