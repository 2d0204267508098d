"""First figures for the sidecar: CPU per request and RSS, on the full request path.

Not a test (pytest does not collect it); run it by hand::

    .venv/bin/python -m tests.proxy.bench_sidecar [--seconds 10] [--connections 8]

It starts a fake apiserver (discovery, JWKS, one policy, one Secret) and a
small upstream in this process, `sidekey proxy` as a subprocess configured by
env exactly as the webhook would, then drives it with wrk (one pod-bound
token, Bearer auth, allowed GET). CPU is the sidecar's utime+stime from
/proc/<pid>/stat across the load, divided by the requests it served (its
own sidekey_requests_total); RSS is VmRSS/VmHWM from /proc/<pid>/status.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

from sidekey.core import contract
from tests.proxy.fakes import POD, POD_UID, SA, FakeApi, bearer_upstream, mint, policy


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) in seconds: fields 14 and 15 of /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def proc_memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def served(health: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{health}/metrics", timeout=5).read().decode()
    return sum(
        float(m)
        for m in re.findall(r'^sidekey_requests_total\{[^}]*decision="allowed"[^}]*\} (\S+)$', text, re.M)
    )


async def main(seconds: int, connections: int, scrub_chunks: bool) -> dict[str, Any]:
    api = FakeApi()
    await api.start()

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "model-a"}]})

    up_app = web.Application()
    up_app.router.add_get("/base/v1/models", hello)
    up_runner = web.AppRunner(up_app, access_log=None)
    await up_runner.setup()
    up_site = web.TCPSite(up_runner, "127.0.0.1", 0)
    await up_site.start()
    up_port = up_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    api.secrets["keys"] = {
        "metadata": {"name": "keys", "namespace": "team"},
        "data": {"openai": base64.b64encode(b"sk-bench-0123456789abcdef").decode()},
    }
    api.policies["p"] = policy(bearer_upstream(f"http://127.0.0.1:{up_port}"))
    api.forbid_policies = False
    tmp = Path(tempfile.mkdtemp(prefix="sidekey-bench-"))
    (tmp / "token").write_text("api-token")
    port, health = 18787, 18788
    env = {
        "PATH": os.environ["PATH"],
        contract.ENV_POD_NAME: POD,
        contract.ENV_POD_NAMESPACE: "team",
        contract.ENV_POD_UID: POD_UID,
        contract.ENV_SERVICE_ACCOUNT: SA,
        contract.ENV_PROXY_PORT: str(port),
        contract.ENV_HEALTH_PORT: str(health),
        contract.ENV_HEALTH_ADDRESS: "127.0.0.1",
        contract.ENV_API_SERVER: f"http://127.0.0.1:{api.port}",
        contract.ENV_API_TOKEN_DIR: str(tmp),
    }
    prefix = os.environ.get("BENCH_PROFILE")  # e.g. "-m cProfile -o /tmp/sidecar.prof"
    argv = [sys.executable, *(prefix.split() if prefix else []), "-m", "sidekey", "proxy"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        idle = proc_memory(proc.pid)
        token = mint(exp_in=3600)
        url = f"http://127.0.0.1:{port}/openai/v1/models"
        wrk = shutil.which("wrk")
        assert wrk, "wrk is needed (hack/system-packages.sh)"
        # warm up (token validation, connection pool), then measure
        await asyncio.to_thread(
            subprocess.run,
            [wrk, "-t1", "-c2", "-d1s", "-H", f"Authorization: Bearer {token}", url],
            capture_output=True,
            check=True,
        )
        cpu0, n0 = proc_cpu_seconds(proc.pid), served(health)
        result = await asyncio.to_thread(
            subprocess.run,
            [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "-H", f"Authorization: Bearer {token}", url],
            capture_output=True,
            text=True,
            check=True,
        )
        cpu1, n1 = proc_cpu_seconds(proc.pid), served(health)
        loaded = proc_memory(proc.pid)
        requests = n1 - n0
        user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        rps = re.search(r"Requests/sec:\s+(\S+)", result.stdout)
        return {
            "requests": int(requests),
            "cpu_seconds": round(user + system, 3),
            "cpu_us_per_request": round((user + system) / requests * 1e6, 1) if requests else None,
            "user_us_per_request": round(user / requests * 1e6, 1) if requests else None,
            "system_us_per_request": round(system / requests * 1e6, 1) if requests else None,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "requests_per_second": float(rps.group(1)) if rps else None,
            "rss_kib_idle": idle.get("VmRSS"),
            "rss_kib_after_load": loaded.get("VmRSS"),
            "rss_kib_peak": loaded.get("VmHWM"),
            "connections": connections,
            "seconds": seconds,
        }
    finally:
        proc.terminate()
        proc.wait(15)
        await up_runner.cleanup()
        await api.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        _ = time


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    print(asyncio.run(main(args.seconds, args.connections, False)))
