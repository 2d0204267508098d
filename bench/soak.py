"""The soak: N minutes of load through a real sidecar, with key rotations and policy edits.

    .venv/bin/python -m bench.soak --minutes 30            # its own control plane
    .venv/bin/python -m bench.soak --minutes 1 --json out.json

Concurrent agents call the sidecar in a loop (plain calls, POSTs, short SSE
streams, and a path the policy denies), re-reading a token that "the
kubelet" re-mints on every rotation. Meanwhile the upstream key in the
Secret is rotated and the AgentPolicy edited periodically. Pass criteria:

- zero errors apart from the intended denials (every allowed call 200 with a
  complete body, every denied one 403);
- after the last rotation the upstream receives the newest key;
- the sidecar's RSS grows less than 10% from the end of warm-up to the end.

It uses the shared harness the attack catalogues use (``localcluster``: the
recording upstream, the subject's objects, the kubelet-style launch).
A 20-second version runs in CI (``tests/attacks/test_soak.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import procstats
from sidekey.localcluster import podplayer, subjects, upstreams
from sidekey.localcluster.cluster import LocalCluster
from sidekey.localcluster.processes import Processes

MAX_RSS_GROWTH = 0.10
ROOT = Path(__file__).resolve().parent.parent
SA = "agent"
POD = "agent-pod"
SECRET = "upstream-keys"
FIRST_KEY = "sk-soak-0000+first/key="


def upstream_spec(url: str) -> dict[str, Any]:
    """The policy's one upstream: the recording upstream, every call of CALLS but the denied one allowed."""
    return {"name": "openai", "url": f"{url}/v1", "insecure": True,
            "auth": {"type": "bearer", "secretRef": {"name": SECRET, "key": "openai"}},
            "allow": [{"methods": ["GET"], "paths": ["/models", "/stream"]},
                      {"methods": ["POST"], "paths": ["/chat/completions"]}],
            "env": [{"name": "OPENAI_BASE_URL"}]}


@dataclass
class Report:
    seconds: float
    requests: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    denials: int = 0
    rotations: int = 0
    edits: int = 0
    newest_key_used: bool = False
    rss_kib_after_warmup: int = 0
    rss_kib_end: int = 0
    rss_kib_samples: list[int] = field(default_factory=list)

    @property
    def rss_growth(self) -> float:
        if not self.rss_kib_after_warmup:
            return 0.0
        return (self.rss_kib_end - self.rss_kib_after_warmup) / self.rss_kib_after_warmup

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.newest_key_used and self.rss_growth < MAX_RSS_GROWTH

    def summary(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("rss_kib_samples")
        doc.update(rss_growth=round(self.rss_growth, 4), rps=round(self.requests / self.seconds, 1), ok=self.ok)
        return doc


#: (method, target, body, expected status); the last one is an intended denial.
CALLS = [
    ("GET", "/openai/models", b"", 200),
    ("POST", "/openai/chat/completions", b'{"model":"m","messages":[]}', 200),
    ("GET", "/openai/stream?n=3&gap=0.01", b"", 200),
    ("GET", "/openai/admin", b"", 403),
]


def run(cluster: LocalCluster, workdir: Path, seconds: float, *, concurrency: int = 8,
        rotate_every: float = 5.0, edit_every: float = 7.0, warmup: float | None = None) -> Report:
    """Soak a sidecar on ``cluster`` for ``seconds``; the cluster is left running."""
    warmup = min(max(5.0, seconds * 0.25), 60.0) if warmup is None else warmup
    report = Report(seconds)
    namespace = subjects.namespace(cluster, "sksoak")
    try:
        with upstreams.Trap() as trap, upstreams.RecordingUpstream(trap.url) as up, \
                Processes(workdir / "logs") as procs:
            spec = [upstream_spec(up.url)]
            pod = podplayer.PodIdentity.of(subjects.create_subject(
                cluster, namespace, account=SA, pod=POD, secret_name=SECRET, keys={"openai": FIRST_KEY},
                upstreams=spec))
            sc = podplayer.start_sidecar(cluster, pod, procs, workdir / "sidecar")
            _soak(cluster, sc, pod, up, spec, report, seconds, concurrency, rotate_every, edit_every, warmup)
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    return report


def _get(url: str, token: str) -> None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback only
            resp.read()
    except (OSError, urllib.error.URLError):
        pass


def _soak(cluster: LocalCluster, sc: podplayer.RunningSidecar, pod: podplayer.PodIdentity,
          up: upstreams.RecordingUpstream, spec: list[dict[str, Any]], report: Report, seconds: float,
          concurrency: int, rotate_every: float, edit_every: float, warmup: float) -> None:
    namespace = pod.namespace
    state = {"token": podplayer.mint_agent_token(cluster, pod), "key": FIRST_KEY}
    stop = threading.Event()
    outcomes: Counter[str] = Counter()

    def control() -> None:
        """The kubelet and the team: rotate the key (and re-mint the token), edit the policy."""
        started = time.monotonic()
        next_rotation, next_edit = started + rotate_every, started + edit_every
        while not stop.wait(0.2):
            now = time.monotonic()
            if now >= next_rotation:
                report.rotations += 1
                key = f"sk-soak-{report.rotations:04d}+rotated/key="
                subjects.apply(cluster, subjects.secret(namespace, SECRET, {"openai": key}))
                state["key"] = key
                state["token"] = podplayer.mint_agent_token(cluster, pod)
                next_rotation = now + rotate_every
            if now >= next_edit:
                report.edits += 1
                edited = json.loads(json.dumps(spec))
                if report.edits % 2:  # alternately add and remove a rule; the calls above stay allowed
                    edited[0]["allow"].append({"methods": ["GET"], "paths": [f"/extra/{report.edits}"]})
                    edited[0]["limits"] = {"timeoutSeconds": 30 + report.edits}
                subjects.apply(cluster, subjects.policy(namespace, "agent", [SA], edited))
                next_edit = now + edit_every

    def sample_rss() -> None:
        started = time.monotonic()
        while not stop.wait(0.5):
            rss = procstats.rss_kib([sc.pid])
            report.rss_kib_samples.append(rss)
            if not report.rss_kib_after_warmup and time.monotonic() - started >= warmup:
                report.rss_kib_after_warmup = rss

    async def agents() -> None:
        deadline = time.monotonic() + seconds
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as s:
            async def agent(i: int) -> None:
                n = i
                while time.monotonic() < deadline:
                    method, target, body, expected = CALLS[n % len(CALLS)]
                    n += 1
                    try:
                        async with s.request(method, sc.url + target, data=body or None,
                                             headers={"Authorization": f"Bearer {state['token']}"}) as resp:
                            data = await resp.read()
                            status = resp.status
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        status, data = 0, type(exc).__name__.encode()
                    report.requests += 1
                    complete = expected != 200 or "stream" not in target or data.endswith(b"[DONE]\n\n")
                    if status == expected and complete:
                        outcomes[f"{status}"] += 1
                        report.denials += expected == 403
                    else:
                        report.errors += 1
                        outcomes[f"error {status}"] += 1
                        if len(report.error_samples) < 5:
                            report.error_samples.append(f"{method} {target} -> {status}: {data[:200]!r}")

            await asyncio.gather(*(agent(i) for i in range(concurrency)))

    threads = [threading.Thread(target=control, daemon=True), threading.Thread(target=sample_rss, daemon=True)]
    for t in threads:
        t.start()
    try:
        asyncio.run(agents())
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    report.by_outcome = dict(outcomes)
    report.rss_kib_end = procstats.rss_kib([sc.pid])
    if not report.rss_kib_after_warmup and report.rss_kib_samples:
        report.rss_kib_after_warmup = report.rss_kib_samples[0]
    # the newest key is in use within 2 s of the last rotation
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline and not report.newest_key_used:
        before = len(up.seen)
        _get(f"{sc.url}/openai/models", state["token"])
        report.newest_key_used = any(s.headers.get("Authorization") == f"Bearer {state['key']}"
                                     for s in up.seen[before:])
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to load the sidecar")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent agents")
    parser.add_argument("--rotate-every", type=float, default=30.0, help="seconds between key rotations")
    parser.add_argument("--edit-every", type=float, default=45.0, help="seconds between policy edits")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sidekey-soak-") as tmp, LocalCluster() as cluster:
        for f in sorted((ROOT / "crds").glob("*.yaml")):
            cluster.kubectl("apply", "--server-side", "-f", str(f))
        cluster.wait_established("agentpolicies.sidekey.io")
        report = run(cluster, Path(tmp), args.minutes * 60, concurrency=args.concurrency,
                     rotate_every=args.rotate_every, edit_every=args.edit_every)
    summary = report.summary()
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
