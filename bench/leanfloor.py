"""A prototype, not a product: an HTTP/1.1 proxy on asyncio Protocols and llhttp (httptools).

It asks what the sidecar could cost without aiohttp's per-request object
machinery while still parsing every request and response with a real,
strict C parser (llhttp, the parser Node.js uses; aiohttp's own C parser is
llhttp too). It does the passthrough part of the job: hop-by-hop and
credential headers dropped, ``Authorization`` set to a static key, the body
of the response streamed back with its framing re-done, keep-alive on both sides.
Requests without a body only (the benchmark's GETs); no auth, policy,
audit or metrics. One
upstream connection per client connection and route (the benchmark's
clients keep theirs alive), so there is no pool.

    python -m bench.leanfloor PORT UPSTREAM_PORT SSE_PORT KEY   # needs: pip install httptools
    python -m bench.leanfloor --measure [--with-work]
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httptools

DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                  b"upgrade", b"host", b"authorization", b"x-api-key", b"api-key", b"content-length"})


class _Upstream(asyncio.Protocol):
    """Parses one response at a time and relays it to the client."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low == b"content-length":
            self.length = value
        if low not in DROP:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        lines = [b"HTTP/1.1 %d X" % status]
        lines += [k + b": " + v for k, v in self.headers]
        lines.append(b"Content-Length: " + self.length if self.length is not None
                     else b"Transfer-Encoding: chunked")
        self.client.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if WORK is not None:
            body = WORK.scrubber.scrub(body)
        if self.length is not None:
            self.client.write(body)
        else:
            self.client.write(b"%x\r\n%s\r\n" % (len(body), body))

    def on_message_complete(self) -> None:
        if self.length is None:
            self.client.write(b"0\r\n\r\n")
        if WORK is not None:
            WORK.finish(self.client.method, self.client.target, self.parser.get_status_code(),
                        self.client.started)
        self.headers, self.length = [], None


class _Work:
    """sidekey's per-request work, done with sidekey's own functions (``--with-work``).

    Path checks, the token-cache lookup (a SHA-256 and a dict hit), the allow
    rules, one audit line and the request counter and histogram, plus the
    response scrub: what the real handler adds to the passthrough, without
    aiohttp. It shows whether the data plane plus sidekey's checks fit the
    CPU goal.
    """

    def __init__(self, key: str) -> None:
        import hashlib
        import io
        import itertools

        from sidekey.core import logs, policies
        from sidekey.proxy import metrics, paths, scrubbing
        self.hashlib, self.paths, self.metrics = hashlib, paths, metrics
        policy = policies.parse({
            "apiVersion": "sidekey.io/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": "p", "namespace": "team", "uid": "u", "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"subjects": {"serviceAccounts": ["agent"]}, "upstreams": [
                {"name": "bench", "url": "http://127.0.0.1:1", "insecure": True,
                 "auth": {"type": "bearer", "secretRef": {"name": "k", "key": "k"}},
                 "allow": [{"methods": ["GET", "POST"], "paths": ["/**"]}]}]}})
        self.upstream = policy.upstreams[0]
        self.scrubber = scrubbing.Scrubber([key])
        self.audit = logs.AuditWriter(io.StringIO())
        self.cache: dict[bytes, str] = {}
        self.ids = itertools.count(1)
        self.counter = metrics.REQUESTS.labels("bench", "GET", "200", "allowed")
        self.histogram = metrics.DURATION.labels("bench")

    def check(self, method: bytes, url: bytes, token: bytes) -> None:
        target = self.paths.parse(url.decode("latin-1"))
        digest = self.hashlib.sha256(token).digest()
        if self.cache.setdefault(digest, "agent") != "agent":
            raise PermissionError("token")
        if not self.upstream.allows(method.decode(), target.segments):
            raise PermissionError("policy")

    def finish(self, method: bytes, url: bytes, status: int, started: float) -> None:
        import time
        elapsed = time.perf_counter() - started
        self.audit.write({"request_id": next(self.ids), "pod": "agent-0", "namespace": "team",
                          "service_account": "agent", "upstream": "bench", "method": method.decode(),
                          "path": url.decode("latin-1"), "status": status, "decision": "allowed",
                          "reason": "ok", "duration_ms": round(elapsed * 1000, 3)})
        self.counter.inc()
        self.histogram.observe(elapsed)


WORK: _Work | None = None


class _Client(asyncio.Protocol):
    """One agent connection: parses its requests, relays each to the route's upstream connection."""

    def __init__(self, origins: dict[bytes, tuple[str, int]], key: bytes) -> None:
        self.origins = origins
        self.auth = b"Bearer " + key
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstreams: dict[bytes, _Upstream] = {}
        self.connecting: set[asyncio.Task[Any]] = set()
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.token = b""
        self.queue: dict[bytes, list[bytes]] = {}
        self.method, self.target, self.started = b"", b"", 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low == b"authorization":
            self.token = value[7:]
        elif low not in DROP:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if WORK is not None:
            import time
            self.started = time.perf_counter()
            WORK.check(self.parser.get_method(), self.url, self.token)
            self.method, self.target = self.parser.get_method(), self.url
        route, _, rest = self.url[1:].partition(b"/")
        origin = self.origins.get(route)
        if origin is None:
            self.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            self.url, self.headers = b"", []
            return
        lines = [self.parser.get_method() + b" /" + rest + b" HTTP/1.1",
                 b"Host: %s:%d" % (origin[0].encode(), origin[1]),
                 b"Authorization: " + self.auth]
        lines += [k + b": " + v for k, v in self.headers]
        lines.append(b"Content-Length: 0")  # the prototype forwards body-less requests only
        self._send(route, origin, b"\r\n".join(lines) + b"\r\n\r\n")
        self.url, self.headers = b"", []

    def _send(self, route: bytes, origin: tuple[str, int], data: bytes) -> None:
        up = self.upstreams.get(route)
        if up is not None and up.transport is not None:
            up.transport.write(data)
            return
        waiting = self.queue.setdefault(route, [])
        waiting.append(data)
        if len(waiting) == 1:
            task = asyncio.get_running_loop().create_task(self._connect(route, origin))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    async def _connect(self, route: bytes, origin: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: _Upstream(self), *origin)
        self.upstreams[route] = up
        assert up.transport is not None
        for data in self.queue.pop(route, []):
            up.transport.write(data)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for up in self.upstreams.values():
            if up.transport is not None:
                up.transport.close()


async def serve(port: int, upstream_port: int, sse_port: int, key: str) -> None:
    loop = asyncio.get_running_loop()
    origins = {b"bench": ("127.0.0.1", upstream_port), b"sse": ("127.0.0.1", sse_port)}
    server = await loop.create_server(lambda: _Client(origins, key.encode()), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def measure(seconds: int = 5, reps: int = 3, work: bool = False) -> None:
    """nginx upstream and this prototype, pinned as in the harness; CPU per request at 16 connections."""
    import contextlib
    import os
    import shutil
    import statistics
    import tempfile
    import time
    from pathlib import Path

    from bench import loads, nginx, procstats
    from sidekey.localcluster.cluster import free_port
    from sidekey.localcluster.processes import Processes

    root = Path(__file__).resolve().parent.parent
    cores = procstats.cores()
    load_core, proxy_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="sidekey-leanfloor-"))
        if not os.environ.get("BENCH_KEEP"):  # the audit logs alone reach 100+ MB
            stack.callback(shutil.rmtree, workdir, True)
        procs = stack.enter_context(Processes(workdir / "logs"))
        stack.callback(procstats.raise_priority()[1])
        up_port, port = free_port(), free_port()
        procs.start("upstream", [*procstats.pin_prefix(load_core),
                                 *nginx.command(nginx.upstream_config(workdir, up_port))])
        proxy = procs.start("lean", [*procstats.pin_prefix(proxy_core), sys.executable, "-m",
                                     "bench.leanfloor", str(port), str(up_port), str(up_port),
                                     "sk-bench-FAKE"],
                            env={**os.environ, "PYTHONPATH": str(root), "LEAN_WORK": "1" if work else ""})
        time.sleep(1.0)
        url = f"http://127.0.0.1:{port}/bench/v1/chat/completions"
        loads.wrk(url, connections=16, seconds=1, core=load_core, token="agent-token")
        per_request = []
        for _ in range(reps):
            before = procstats.cpu_seconds([proxy.popen.pid])
            r = loads.wrk(url, connections=16, seconds=seconds, core=load_core, token="agent-token")
            per_request.append((procstats.cpu_seconds([proxy.popen.pid]) - before) / r.requests * 1e6)
            print(f"llhttp + asyncio proxy{' + sidekey work' if work else ''}, 16 conns: {r.rps:.0f} rps, {per_request[-1]:.1f} us CPU/request")
        print(f"median: {statistics.median(per_request):.1f} us CPU/request")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(work="--with-work" in sys.argv)
    else:
        import os
        if os.environ.get("LEAN_WORK"):
            WORK = _Work(sys.argv[4])
        asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
