"""``python -m bench.requestpath``: the sidecar's CPU per request with the sockets taken out.

The end-to-end arms (``bench.standalone``) spread ±20 % between repetitions on
a shared machine, which hides a change of a few microseconds. Here the whole
request path runs in one process on the real objects (the listener's and the
upstream's Protocols, llhttp, the token cache, the decision, the key, the
scrubber, the audit line, the metrics) with transports that only collect what
is written: the agent's request is fed to the listener, the upstream's answer
(the benchmark's chat-completion JSON, as nginx sends it) to the pooled
upstream connection. What is left out is the kernel (two sends, two reads)
and the selector; what is measured is process CPU time per request, the fast
path (callbacks only) and the coroutine path (``fast`` off) in alternating
blocks, medians. Read the fast path's figure as the cost of sidekey's own
work per request; the coroutine path's is overstated: with one connection
each of its task steps takes a loop turn of its own (a ``select`` with no
timeout), which under load it shares with the other connections' events.

    python -m bench.requestpath [--requests 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import statistics
import time
from typing import Any

from bench import nginx
from bench.standalone import KEY, _policy


class CollectingTransport(asyncio.Transport):
    """A transport that keeps what is written (and never pushes back)."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def _setup() -> tuple[Any, Any, Any, CollectingTransport, CollectingTransport, bytes]:
    from joserfc import jwk, jwt

    from sidekey.core import logs, policies, tokens
    from sidekey.proxy import forwarding, listener, routes, upstream

    key = jwk.RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})

    async def fetch() -> dict[str, Any]:
        return {"keys": [key.as_dict(private=False)]}

    keys = tokens.KeySet(fetch)
    await keys.refresh()
    issuer = "https://127.0.0.1:6443"
    validator = tokens.Validator(keys, tokens.Binding(
        issuer=issuer, audience="sidekey", namespace="team", pod_name="agent-0", pod_uid="uid-0",
        service_account="agent"))

    class Static(routes.Routes):
        def secret_data(self, name: str) -> dict[str, str] | None:
            return {"k": KEY}

    table = Static(None, namespace="team", service_account="agent")  # type: ignore[arg-type]
    table.selection = policies.select([policies.parse(_policy(18080, 18081))], "agent")
    table.rebuild()
    now = int(time.time())
    token = jwt.encode({"alg": "RS256", "kid": "k1"}, {
        "iss": issuer, "aud": ["sidekey"], "sub": "system:serviceaccount:team:agent", "exp": now + 36000,
        "iat": now, "nbf": now, "kubernetes.io": {"namespace": "team", "pod": {"name": "agent-0", "uid": "uid-0"},
                                                  "serviceaccount": {"name": "agent", "uid": "sa"}}}, key)
    await validator.validate(token)  # cached from here, as in the benchmark's steady state
    kwargs: dict[str, Any] = {}
    code = getattr(forwarding.Proxy.__init__, "__code__", None)  # none when compiled (setup.py)
    if code is not None and "session" in code.co_varnames:  # an older copy of the package
        import aiohttp
        kwargs["session"] = aiohttp.ClientSession()
    proxy = forwarding.Proxy(table=lambda: table.table, validator=lambda: validator, ready=lambda: True,
                             audit=logs.AuditWriter(io.StringIO()), pod="agent-0", namespace="team", **kwargs)
    route = table.table["bench"]
    up_sink = CollectingTransport()
    up_conn = upstream.UpstreamConnection(proxy.pool, ("http", "127.0.0.1", 18080, None))
    up_conn.connection_made(up_sink)
    proxy.pool._all.add(up_conn)
    proxy.pool.put(up_conn)
    fast = getattr(proxy, "fast", None)  # None: a copy of the package from before the fast path
    server = listener.Listener(proxy.handle, *([fast] if fast else []))
    agent_sink = CollectingTransport()
    conn = listener.AgentConnection(proxy.handle, server, *([fast] if fast else []))
    conn.connection_made(agent_sink)
    body = b'{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
    request = (f"POST /bench/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    assert route is not None
    return proxy, conn, up_conn, agent_sink, up_sink, request


_ANSWER = (f"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 22:00:00 GMT\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(nginx.BODY)}\r\nConnection: keep-alive\r\n\r\n"
           f"{nginx.BODY}").encode()


async def _turns(waiting: Any) -> None:
    """Let the loop run its ready callbacks (the tasks of the coroutine path) until done waiting."""
    while waiting():  # noqa: ASYNC110 - stepping the loop is the point: nothing would set an Event
        await asyncio.sleep(0)


async def _block(conn: Any, up_conn: Any, agent: CollectingTransport, up: CollectingTransport, request: bytes, n: int) -> float:
    """CPU seconds for ``n`` requests, one after another on one keep-alive connection."""
    started = time.process_time()
    for _ in range(n):
        conn.data_received(request)
        await _turns(lambda: not up.out)  # the coroutine path: its task runs up to the upstream write
        up.out.clear()
        up_conn.data_received(_ANSWER)
        await _turns(lambda: not agent.out)
        agent.out.clear()
        await _turns(lambda: conn.busy)  # the coroutine path: the audit line and the count after the write
    return time.process_time() - started


async def main_async(requests: int, rounds: int) -> dict[str, list[float]]:
    _proxy, conn, up_conn, agent, up, request = await _setup()
    fast = getattr(conn, "_fast", None)
    results: dict[str, list[float]] = {"fast path": [], "coroutine path": []} if fast else {"coroutine path": []}
    await _block(conn, up_conn, agent, up, request, 500)  # warm up
    gc.collect()
    gc.freeze()
    for _ in range(rounds):
        for name in results:
            if fast is not None:
                conn._fast = fast if name == "fast path" else None
            results[name].append(await _block(conn, up_conn, agent, up, request, requests) / requests * 1e6)
    assert b"200 OK" in _ANSWER
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.requestpath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args.requests, args.rounds))
    for name, values in results.items():
        print(f"{name:15s} {statistics.median(values):6.1f} us CPU/request  {[round(v, 1) for v in values]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
