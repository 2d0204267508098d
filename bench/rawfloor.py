"""The asyncio floor: bytes relayed between a client and an upstream, no HTTP at all.

Each client connection gets its own upstream connection and the bytes are
copied both ways by two ``asyncio.Protocol`` s, with no parsing, no header
handling, nothing attached. No real proxy can be this cheap; it shows what
the event loop and the four syscalls per request cost on their own, the
floor under any asyncio data plane.

    python -m bench.rawfloor PORT UPSTREAM_PORT        # then: python -m bench.rawfloor --measure
"""

from __future__ import annotations

import asyncio
import sys


class _Relay(asyncio.Protocol):
    def __init__(self) -> None:
        self.peer: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def client_side() -> _Relay:
        down = _Relay()

        async def connect() -> None:
            up_transport, up = await loop.create_connection(_Relay, "127.0.0.1", upstream_port)
            assert isinstance(up_transport, asyncio.Transport)
            up.peer = down.transport
            down.peer = up_transport
            for data in down.pending:
                up_transport.write(data)
            down.pending.clear()
        task = loop.create_task(connect())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return down

    server = await loop.create_server(client_side, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def measure(seconds: int = 5, reps: int = 3) -> None:
    """nginx upstream, this relay and (for comparison) the nginx proxy arm, pinned as in the harness."""
    import contextlib
    import os
    import shutil
    import statistics
    import tempfile
    from pathlib import Path

    from bench import loads, nginx, procstats
    from sidekey.localcluster.cluster import free_port
    from sidekey.localcluster.processes import Processes

    root = Path(__file__).resolve().parent.parent
    cores = procstats.cores()
    load_core, proxy_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="sidekey-rawfloor-"))
        if not os.environ.get("BENCH_KEEP"):  # the audit logs alone reach 100+ MB
            stack.callback(shutil.rmtree, workdir, True)
        procs = stack.enter_context(Processes(workdir / "logs"))
        stack.callback(procstats.raise_priority()[1])
        up_port, relay_port = free_port(), free_port()
        procs.start("upstream", [*procstats.pin_prefix(load_core),
                                 *nginx.command(nginx.upstream_config(workdir, up_port))])
        relay = procs.start("relay", [*procstats.pin_prefix(proxy_core), sys.executable, "-m",
                                      "bench.rawfloor", str(relay_port), str(up_port)],
                            env={**os.environ, "PYTHONPATH": str(root)})
        import time
        time.sleep(1.0)
        url = f"http://127.0.0.1:{relay_port}/v1/chat/completions"
        loads.wrk(url, connections=16, seconds=1, core=load_core)
        per_request = []
        for _ in range(reps):
            before = procstats.cpu_seconds([relay.popen.pid])
            r = loads.wrk(url, connections=16, seconds=seconds, core=load_core)
            per_request.append((procstats.cpu_seconds([relay.popen.pid]) - before) / r.requests * 1e6)
            print(f"raw asyncio relay, 16 conns: {r.rps:.0f} rps, {per_request[-1]:.1f} us CPU/request")
        print(f"median: {statistics.median(per_request):.1f} us CPU/request")


if __name__ == "__main__":
    if sys.argv[1:] == ["--measure"]:
        measure()
    else:
        asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
