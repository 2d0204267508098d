"""The sidecar's request path without an apiserver: for profiling and quick side-by-side ratios.

The full path runs (token signature checked then cached, policy, key,
scrubbing, audit line, metrics), with the routing table built from a policy
given here and a signing key made here instead of the apiserver's. It is the
inner loop of work on the hot path: seconds to start, no cluster needed. The
figures it prints are not the benchmark's (``bench/run`` starts the real
sidecar against a real apiserver), only ratios measured side by side.

    python -m bench.standalone serve PORT UPSTREAM_PORT SSE_PORT   # prints the caller's token
    python -m bench.standalone measure [--reps 3] [--seconds 4] [--conns 16] [--baseline [NAME=]DIR ...]

``--baseline DIR`` (repeatable) adds an arm (``sidekey-before``, or NAME): the
same path served from another copy of the package (``DIR/sidekey``, e.g.
``git archive`` of an earlier commit), so a change is measured side by side
with what it replaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench-FAKE-0123456789abcdef"


def _policy(upstream_port: int, sse_port: int) -> dict[str, Any]:
    def up(name: str, port: int) -> dict[str, Any]:
        return {"name": name, "url": f"http://127.0.0.1:{port}", "insecure": True,
                "auth": {"type": "bearer", "secretRef": {"name": "keys", "key": "k"}},
                "allow": [{"methods": ["GET", "POST"], "paths": ["/**"]}]}

    return {"apiVersion": "sidekey.io/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": "bench", "namespace": "team", "uid": "u", "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"subjects": {"serviceAccounts": ["agent"]},
                     "upstreams": [up("bench", upstream_port), up("sse", sse_port)]}}


async def serve(port: int, upstream_port: int, sse_port: int) -> None:
    from joserfc import jwk, jwt

    from sidekey.core import logs, policies, tokens
    from sidekey.proxy import forwarding, routes

    key = jwk.RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})

    async def fetch() -> dict[str, Any]:
        return {"keys": [key.as_dict(private=False)]}

    keys = tokens.KeySet(fetch)
    await keys.refresh()
    issuer = "https://127.0.0.1:6443"
    validator = tokens.Validator(keys, tokens.Binding(issuer=issuer, audience="sidekey", namespace="team",
                                                      pod_name="agent-0", pod_uid="uid-0",
                                                      service_account="agent"))

    class Static(routes.Routes):
        def secret_data(self, name: str) -> dict[str, str] | None:
            return {"k": KEY}

    table = Static(None, namespace="team", service_account="agent")  # type: ignore[arg-type]
    table.selection = policies.select([policies.parse(_policy(upstream_port, sse_port))], "agent")
    table.rebuild()
    now = int(time.time())
    token = jwt.encode({"alg": "RS256", "kid": "k1"}, {
        "iss": issuer, "aud": ["sidekey"], "sub": "system:serviceaccount:team:agent", "exp": now + 36000,
        "iat": now, "nbf": now, "kubernetes.io": {"namespace": "team", "pod": {"name": "agent-0", "uid": "uid-0"},
                                                  "serviceaccount": {"name": "agent", "uid": "sa"}}}, key)
    sink = io.StringIO() if os.environ.get("BENCH_AUDIT") == "memory" else open(os.devnull, "w")  # noqa: SIM115, ASYNC230
    audit = logs.AuditWriter(sink)
    extra: dict[str, Any] = {}
    if inspect.signature(forwarding.Proxy).parameters["session"].default is inspect.Parameter.empty:
        import aiohttp  # a --baseline copy from before the sidecar's own token client needs a session

        extra["session"] = aiohttp.ClientSession()
    proxy = forwarding.Proxy(table=lambda: table.table, validator=lambda: validator, ready=lambda: True,
                             **extra, audit=audit, pod="agent-0", namespace="team",
                             token_cache=os.environ.get("SIDEKEY_TOKEN_CACHE", "") != "0")
    await proxy.listen("127.0.0.1", port)
    print(token, flush=True)
    gc.collect()
    gc.freeze()
    until = time.monotonic() + float(os.environ.get("BENCH_SECONDS", "inf"))
    while time.monotonic() < until:
        await asyncio.sleep(0.2)
        audit.flush()
        if isinstance(sink, io.StringIO):
            sink.seek(0)
            sink.truncate()


def measure(reps: int, seconds: float, conns: int, baselines: list[str] | None = None,
            interpreters: list[str] | None = None) -> None:
    """nginx upstream; direct, nginx proxy, the llhttp prototype and this path, interleaved."""
    from bench import leanfloor, loads, nginx, procstats  # noqa: F401
    from sidekey.localcluster.cluster import free_port
    from sidekey.localcluster.processes import Processes

    cores = procstats.cores()
    load_core, proxy_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="sidekey-standalone-"))
        stack.callback(shutil.rmtree, workdir, True)
        procs = stack.enter_context(Processes(workdir / "logs"))
        up_port, ngx_port, lean_port, sk_port = free_port(), free_port(), free_port(), free_port()
        procs.start("upstream", [*procstats.pin_prefix(load_core), *nginx.command(nginx.upstream_config(workdir, up_port))])
        ngx = procs.start("nginx", [*procstats.pin_prefix(proxy_core), *nginx.command(
            nginx.proxy_config(workdir, ngx_port, up_port, up_port, KEY))])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        lean = procs.start("lean", [*procstats.pin_prefix(proxy_core), sys.executable, "-m", "bench.leanfloor",
                                    str(lean_port), str(up_port), str(up_port), KEY], env=env)
        sk = procs.start("sidekey", [*procstats.pin_prefix(proxy_core), sys.executable, "-m", "bench.standalone",
                                     "serve", str(sk_port), str(up_port), str(up_port)], env=env)
        started = [sk]
        others: dict[str, int] = {}
        for spec in baselines or []:
            name, _, where = spec.rpartition("=")
            name = name or "sidekey-before"
            others[name] = free_port()
            started.append(procs.start(name, [
                *procstats.pin_prefix(proxy_core), sys.executable, "-m", "bench.standalone", "serve",
                str(others[name]), str(up_port), str(up_port)], env={**env, "PYTHONPATH": str(Path(where).resolve())}))
        # the same path on another interpreter (the image's: bench.shipped), with only bench/ on its
        # path: the tree's root also holds the dev build's shared C module, which would shadow the venv's
        # (and ``-P`` keeps ``-m`` from putting the working directory, often that root, first)
        only_bench = workdir / "only-bench"
        only_bench.mkdir()
        (only_bench / "bench").symlink_to(ROOT / "bench")
        for spec in interpreters or []:
            name, _, python = spec.rpartition("=")
            name = name or "sidekey-other-python"
            others[name] = free_port()
            started.append(procs.start(name, [
                *procstats.pin_prefix(proxy_core), python, "-P", "-m", "bench.standalone", "serve",
                str(others[name]), str(up_port), str(up_port)], env={**env, "PYTHONPATH": str(only_bench)}))
        tokens = []
        for proc in started:
            deadline = time.monotonic() + 30
            token = ""
            while time.monotonic() < deadline and not token and proc.popen.poll() is None:
                time.sleep(0.1)
                token = next((line for line in proc.log.read_text().splitlines() if line.startswith("ey")), "")
            if not token:
                raise SystemExit("the standalone sidecar did not start; see its log")
            tokens.append(token)
        arms = {"direct": (f"http://127.0.0.1:{up_port}/v1/chat/completions", []),
                "nginx": (f"http://127.0.0.1:{ngx_port}/bench/v1/chat/completions",
                          procstats.children(ngx.popen.pid) or [ngx.popen.pid]),
                "llhttp-floor": (f"http://127.0.0.1:{lean_port}/bench/v1/chat/completions", [lean.popen.pid]),
                "sidekey": (f"http://127.0.0.1:{sk_port}/bench/v1/chat/completions", [sk.popen.pid])}
        tokens_of = dict.fromkeys(arms, tokens[0])
        for i, (name, port) in enumerate(others.items(), 1):
            arms[name] = (f"http://127.0.0.1:{port}/bench/v1/chat/completions", [started[i].popen.pid])
            tokens_of[name] = tokens[i]
        for arm, (url, _) in arms.items():
            loads.wrk(url, connections=conns, seconds=1, core=load_core, token=tokens_of[arm])
        cpu: dict[str, list[float]] = {a: [] for a in arms}
        rps: dict[str, list[float]] = {a: [] for a in arms}
        names = list(arms)
        for rep in range(reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for arm in order:
                url, pids = arms[arm]
                before = procstats.cpu_seconds(pids) if pids else 0.0
                r = loads.wrk(url, connections=conns, seconds=seconds, core=load_core, token=tokens_of[arm])
                if pids:
                    cpu[arm].append((procstats.cpu_seconds(pids) - before) / r.requests * 1e6)
                rps[arm].append(r.rps)
        for arm in names:
            c = f"{statistics.median(cpu[arm]):6.1f} us CPU/request" if cpu[arm] else " " * 21
            print(f"{arm:14s} {statistics.median(rps[arm]):8.0f} rps  {c}  {[round(x, 1) for x in cpu[arm]]}")
        print(f"sidekey RSS {procstats.rss_kib([sk.popen.pid]) / 1024:.1f} MB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        from sidekey.proxy import main as sidecar_main

        # the sidecar's own loop (uvloop): on asyncio's selector loop the transports are
        # Python, and a profile of them says nothing about the sidecar
        with asyncio.Runner(loop_factory=sidecar_main.new_loop) as runner:
            runner.run(serve(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
    else:
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        p.add_argument("--reps", type=int, default=3)
        p.add_argument("--seconds", type=float, default=4)
        p.add_argument("--conns", type=int, default=16)
        p.add_argument("--baseline", action="append",
                       help="[NAME=]DIR: a directory holding another copy of the package as sidekey/")
        p.add_argument("--python", action="append",
                       help="[NAME=]PYTHON: this path served by another interpreter and its venv's sidekey "
                            "(the image's: python -c 'from bench import shipped; print(shipped.shipped().python)')")
        a = p.parse_args()
        measure(a.reps, a.seconds, a.conns, a.baseline, a.python)
