"""``python -m bench.llm_cost``: what the LLM features cost the sidecar, side by side with a plain route.

Two real sidecars (``sidekey proxy`` processes, started as the kubelet
would by ``localcluster.podplayer``) on the local control plane, each with
one upstream to the same mock LLM over plain HTTP on loopback (so TLS does
not blur the difference): one with ``allow`` rules only, one with
``api: openai``, a model allow-list and a pod token budget. The same
chat-completion requests (about 1 KB, ``max_tokens`` set) and SSE streams go
through each, arms interleaved per repetition; the figure is the sidecar
process's own CPU time (``/proc/<pid>/stat``, user plus system) per request
and per SSE event, median over the repetitions.

``--micro`` times the LLM step's own functions instead (no cluster): the
request step (parse, model check, reserve, usage read, settle) and one SSE
event through the stream meter, CPU time, best of several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from sidekey.localcluster import podplayer, subjects
from sidekey.localcluster.cluster import LocalCluster
from sidekey.localcluster.processes import Processes
from sidekey.localcluster.upstreams import MockLLM

KEY = "sk-bench-llm-0123456789abcdef"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def upstream(port: int, llm: bool) -> dict[str, Any]:
    up: dict[str, Any] = {"name": "openai", "url": f"http://127.0.0.1:{port}/v1", "insecure": True,
                          "auth": {"type": "bearer", "secretRef": {"name": "llm", "key": "openai"}},
                          "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}]}
    if llm:
        up.update(api="openai", models=["mock-model", "gpt-4.1*"],
                  budgets=[{"tokens": 10**12, "window": "24h", "scope": "pod"}])
    return up


def body(stream: bool) -> dict[str, Any]:
    return {"model": "mock-model", "max_tokens": 256, "stream": stream,
            "messages": [{"role": "system", "content": "You are a helpful assistant. " * 8},
                         {"role": "user", "content": "Summarise: " + "lorem ipsum dolor sit amet " * 28}]}


def run(requests: int, streams: int, repetitions: int) -> dict[str, dict[str, float]]:
    mock = MockLLM(keys={"openai": KEY}, reply="ok", word_gap=0.0)
    mock.start(tls=False)
    sse_mock = MockLLM(keys={"openai": KEY}, reply=" ".join(["w"] * 200), word_gap=0.0)
    sse_mock.start(tls=False)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="sidekey-llm-cost-") as tmp, LocalCluster() as cluster, \
            Processes(Path(tmp) / "procs") as procs:
        cluster.kubectl("apply", "--server-side", "-f",
                        str(Path(__file__).resolve().parent.parent / "crds" / "sidekey.io_agentpolicies.yaml"))
        cluster.wait_established("agentpolicies.sidekey.io")
        arms: dict[str, tuple[int, str, str]] = {}  # name -> (pid, url, token)
        for name, llm in (("plain", False), ("llm", True)):
            for kind, port in (("", mock.port), ("-sse", sse_mock.port)):
                ns = subjects.namespace(cluster, f"bench-{name}{kind}")
                pod = subjects.create_subject(cluster, ns, account="agent", pod="agent", secret_name="llm",
                                              keys={"openai": KEY}, upstreams=[upstream(port, llm)])
                identity = podplayer.PodIdentity.of(pod)
                sidecar = podplayer.start_sidecar(cluster, identity, procs, Path(tmp) / f"{name}{kind}",
                                                  name=f"{name}{kind}")
                arms[name + kind] = (sidecar.pid, f"{sidecar.url}/openai/chat/completions",
                                     podplayer.mint_agent_token(cluster, identity))
        plain_body, stream_body = json.dumps(body(False)).encode(), json.dumps(body(True)).encode()
        for rep in range(repetitions):
            order = ["plain", "llm"] if rep % 2 == 0 else ["llm", "plain"]
            for name in order:
                pid, url, token = arms[name]
                headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                with httpx.Client(timeout=30) as client:
                    for _ in range(50):  # warm the connection, the token cache and the pool
                        client.post(url, content=plain_body, headers=headers).raise_for_status()
                    before = cpu_seconds(pid)
                    for _ in range(requests):
                        client.post(url, content=plain_body, headers=headers).raise_for_status()
                    per_request = (cpu_seconds(pid) - before) / requests * 1e6
                pid, url, token = arms[name + "-sse"]
                headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                events = 0
                with httpx.Client(timeout=30) as client:
                    before = cpu_seconds(pid)
                    for _ in range(streams):
                        with client.stream("POST", url, content=stream_body, headers=headers) as resp:
                            resp.raise_for_status()
                            events += sum(1 for line in resp.iter_lines() if line.startswith("data:"))
                    per_event = (cpu_seconds(pid) - before) / max(1, events) * 1e6
                arm = results.setdefault(name, {})
                arm.setdefault("cpu_us_per_request", []).append(per_request)
                arm.setdefault("cpu_us_per_sse_event", []).append(per_event)
                print(f"rep {rep + 1} {name:5s}: {per_request:7.1f} us/request, {per_event:6.1f} us/SSE event "
                      f"({events} events)", flush=True)
    mock.stop()
    sse_mock.stop()
    return {arm: {m: statistics.median(v) for m, v in metrics.items()} for arm, metrics in results.items()}


def _best(f: Any, n: int, reps: int = 7) -> float:
    runs = []
    for _ in range(reps):
        t = time.process_time()
        for _ in range(n):
            f()
        runs.append((time.process_time() - t) / n * 1e6)
    return min(runs)


def micro() -> None:
    from sidekey.core import llmpolicy
    from sidekey.proxy import llmbudgets, llmrequests, llmstreams

    llm = llmpolicy.Llm(api="openai", models=(llmpolicy.ModelPattern("gpt-4.1*"),),
                        budgets=(llmpolicy.Budget(10**12, "24h", 86400, "pod"),))
    account = llmbudgets.Account(llm.budgets[0])
    reply = json.dumps({"object": "chat.completion", "choices": [{"message": {"content": "ok " * 50}}],
                        "usage": {"prompt_tokens": 200, "completion_tokens": 50}}).encode()
    for label, doc in (("max_tokens set", body(False)), ("capped", {**body(False), "max_tokens": None}),
                       ("stream", body(True))):
        doc = {k: v for k, v in doc.items() if v is not None}
        raw = json.dumps({**doc, "model": "gpt-4.1-mini"}).encode()

        def step(raw: bytes = raw) -> None:
            call = llmrequests.read("openai", "chat", raw)
            llmrequests.check_model(llm, call.model, "p", "u")
            reservation = llmbudgets.reserve([account], call, cap=True, upstream="u", policy="p")
            call.encoded()
            usage = llmstreams.usage_from_json("openai", reply)
            reservation.settle(usage.total if usage else None)

        print(f"request step, {label} ({len(raw)} B): {_best(step, 5000):.1f} us")
    event = b"data: " + json.dumps({"object": "chat.completion.chunk", "model": "gpt-4.1", "usage": None,
                                    "choices": [{"index": 0, "delta": {"content": " word"}}]}).encode() + b"\n\n"
    for label, extra in (("bounded", ',"max_tokens":100'), ("unbounded, counted", "")):
        call = llmrequests.read("openai", "chat", f'{{"model":"gpt-4.1","messages":[],"stream":true{extra}}}'.encode())
        meter = llmstreams.StreamMeter("openai", call, more=lambda n: True, message=lambda: "")
        print(f"SSE event ({len(event)} B), OpenAI {label}: {_best(lambda m=meter: m.feed(event), 50000):.2f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--micro", action="store_true", help="time the LLM functions alone (no cluster)")
    args = parser.parse_args()
    if args.micro:
        micro()
        return
    started = time.monotonic()
    medians = run(args.requests, args.streams, args.repetitions)
    print(json.dumps(medians, indent=2))
    p, q = medians["plain"], medians["llm"]
    print(f"LLM features add {q['cpu_us_per_request'] - p['cpu_us_per_request']:+.1f} us CPU per request and "
          f"{q['cpu_us_per_sse_event'] - p['cpu_us_per_sse_event']:+.1f} us per SSE event "
          f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
