"""One run of the benchmark: every arm, every metric, interleaved, then the report.

The order inside a repetition is phase by phase (saturation at 16 and at 64
connections, a paced 500 rps, SSE), and inside a phase arm by arm, with the
arm order rotated each repetition, so drift on a shared machine (other
work, thermal, page cache) spreads over all arms instead of favouring one.
Latency "added" by a proxy is its figure minus the direct arm's figure in
the same repetition; every reported number is the median over repetitions.

With two or more cores the load side (wrk, the upstreams, this process,
the control plane) runs on the first core and the proxy under test alone on
the second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import arms, compiled, kubelet, litellm_peer, loads, nginx, procstats, reports, shipped, sse
from sidekey.localcluster.cluster import LocalCluster, free_port
from sidekey.localcluster.processes import Process, Processes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ARM_NAMES = ("direct", "nginx", "llhttp-floor", "aiohttp-floor", "sidekey", "sidekey-nocache", "sidekey-llm",
             "litellm")
#: The arms of the scaling rows (concurrency from 1 to 256 connections, 1 to 100 streams).
SCALING_ARMS = ("nginx", "sidekey")


@dataclass(frozen=True)
class Plan:
    reps: int = 3
    saturation_seconds: float = 4.0
    paced_seconds: float = 6.0
    #: the paced run of each arm is this many runs of ``paced_seconds / paced_slices``, taking turns
    paced_slices: int = 3
    paced_rate: int = 500
    paced_connections: int = 8
    sse_ttfb_streams: int = 30
    sse_clients: int = 8
    sse_streams_per_client: int = 15
    warmup_seconds: float = 1.0
    ready_samples: int = 3  # extra cold starts of the sidecar, besides one per repetition
    connections: tuple[int, ...] = (16, 64)
    #: the scaling rows: saturation at these connection counts besides ``connections`` ...
    scaling_connections: tuple[int, ...] = (1, 256)
    #: ... and this many concurrent SSE streams (each client reads ``max(1, 20 // n)`` streams)
    scaling_streams: tuple[int, ...] = (1, 10, 100)
    #: LiteLLM's proxy, installed by the bench into its own venv (pip): kept out of the quick run
    litellm: bool = True

    @classmethod
    def quick(cls) -> Plan:
        return cls(reps=1, saturation_seconds=1, paced_seconds=1, paced_slices=1, sse_ttfb_streams=3, sse_clients=2,
                   sse_streams_per_client=2, warmup_seconds=0, ready_samples=0, scaling_connections=(1,),
                   scaling_streams=(1, 10), litellm=False)


@dataclass
class Samples:
    """Per arm, per metric: one value per repetition."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, arm: str, metric: str, value: float) -> None:
        self.values.setdefault(arm, {}).setdefault(metric, []).append(value)

    def medians(self) -> dict[str, dict[str, float]]:
        return {arm: {m: statistics.median(v) for m, v in metrics.items()}
                for arm, metrics in self.values.items()}


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _first_call(url: str, token: str | None, timeout: float = 60.0) -> None:
    """One chat completion with a long timeout: LiteLLM builds its router and
    client on the first request (a run failed when wrk's 1-second check got no
    answer in time), so that cost is paid here, outside any measurement."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=arms.JSON_BODY.encode(), method="POST",  # noqa: S310
                                     headers=headers)  # (a loopback URL the bench built)
    with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - loopback only
        answer.read()


def _wait_http(url: str, proc: Process, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"{proc.name} did not answer {url}; log:\n{proc.tail()}")


def _start_cluster(workdir: Path) -> LocalCluster:
    """The control plane (apiserver, etcd, controller manager) on the load core, off the proxy's.

    Left on any core, it ran on the proxy's core between the proxy's requests: nginx
    was preempted 37 to 80 times in a 6 s paced run, and 0 to 10 times with the
    control plane on the load core, when steal was low (``python -m bench.tail``).
    The load side is light in the paced phase, where the tail is read. The control
    plane's processes inherit this process's affinity when they are started.
    """
    cores = procstats.cores()
    with _pinned(cores[0] if len(cores) >= 2 else None):
        return kubelet.start_cluster(workdir)


@contextlib.contextmanager
def _pinned(core: int | None) -> Iterator[None]:
    """Run this process (the SSE client, the wrk launcher) on the load core."""
    before = os.sched_getaffinity(0)
    if core is not None:
        os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Run:
    def __init__(self, plan: Plan, workdir: Path, procs: Processes, cluster: LocalCluster) -> None:
        self.plan = plan
        self.workdir = workdir
        self.procs = procs
        self.cluster = cluster
        cores = procstats.cores()
        self.load_core: int | None = cores[0] if len(cores) >= 2 else None
        self.proxy_core: int | None = cores[1] if len(cores) >= 2 else None
        #: the image of this tree, unpacked: the sidecar and the floors run on its interpreter
        self.image = shipped.shipped()
        self.samples = Samples()
        self.notes: list[str] = []

    # --- setup -------------------------------------------------------------------

    def start_upstreams(self) -> None:
        self.upstream_port, self.sse_port = free_port(), free_port()
        conf = nginx.upstream_config(self.workdir, self.upstream_port)
        up = self.procs.start("nginx-upstream", [*procstats.pin_prefix(self.load_core), *nginx.command(conf)])
        _wait_http(f"http://127.0.0.1:{self.upstream_port}/", up)
        sse_up = self.procs.start("sse-upstream", [*procstats.pin_prefix(self.load_core), sys.executable,
                                                   "-m", "bench.sse_upstream", str(self.sse_port)],
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        _wait_http(f"http://127.0.0.1:{self.sse_port}/ready?events=0", sse_up)

    def create_pod(self) -> None:
        self.pod = kubelet.create_pod(self.cluster, self.workdir, upstream_port=self.upstream_port,
                                      sse_port=self.sse_port)

    def create_llm_pod(self) -> None:
        """A second pod whose policy reads bodies as OpenAI's, allows two models and has a budget."""
        self.llm_pod = kubelet.create_pod(self.cluster, self.workdir, upstream_port=self.upstream_port,
                                          sse_port=self.sse_port, llm=True)

    def start_litellm(self) -> None:
        """LiteLLM's proxy; a failure to install or start it fails the run (PeerError, TimeoutError)."""
        self.litellm_arm: arms.Arm | None = None
        if not self.plan.litellm:
            return
        script = litellm_peer.ensure_installed(_say)
        port = free_port()
        conf = litellm_peer.config(self.workdir, self.upstream_port, self.sse_port, self.pod.key)
        proc = self.procs.start("litellm", [*procstats.pin_prefix(self.proxy_core),
                                            *litellm_peer.command(script, conf, port)],
                                env=litellm_peer.environment(self.workdir))
        started = time.monotonic()
        _wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, timeout=180)
        self.notes.append(f"litellm {litellm_peer.VERSION} started in {time.monotonic() - started:.1f} s")
        pid = int(proc.popen.pid)
        self.litellm_arm = arms.Arm("litellm", port, "", port, "", token=litellm_peer.MASTER_KEY,
                                    pids=lambda: [pid, *procstats.children(pid)],
                                    label=f"LiteLLM proxy {litellm_peer.VERSION} (Python peer)")
        for arm in (self.litellm_arm,):  # one call of each kind, so a misparse fails here, loudly
            _first_call(arm.json_url, arm.token)
            loads.wrk(arm.json_url, connections=1, seconds=1, token=arm.token, core=self.load_core)
            sse.run(arm.sse_port, arm.sse_path, arm.token, clients=1, streams=1)

    def start_nginx_proxy(self) -> None:
        port = free_port()
        conf = nginx.proxy_config(self.workdir, port, self.upstream_port, self.sse_port, self.pod.key)
        proc = self.procs.start("nginx-proxy", [*procstats.pin_prefix(self.proxy_core), *nginx.command(conf)])
        _wait_http(f"http://127.0.0.1:{port}/bench/", proc)
        master = int(proc.popen.pid)
        self.nginx_arm = arms.Arm("nginx", port, "/bench", port, "/sse",
                                  pids=lambda: [master, *procstats.children(master)],
                                  label="nginx 1 worker (C baseline)")

    def start_floor(self) -> None:
        port = free_port()
        proc = self.procs.start("aiohttp-floor", [
            *procstats.pin_prefix(self.proxy_core), str(self.image.python), "-m", "bench.passthrough", str(port),
            str(self.upstream_port), str(self.sse_port), self.pod.key],
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        _wait_http(f"http://127.0.0.1:{port}/bench/", proc)
        pid = int(proc.popen.pid)
        self.floor_arm = arms.Arm("aiohttp-floor", port, "/bench", port, "/sse", pids=lambda: [pid],
                                  label="bare aiohttp passthrough (reference floor)")

    def start_lean_floor(self) -> None:
        """The llhttp prototype (bench/leanfloor.py), on the image's httptools (the sidecar's own)."""
        self.lean_arm: arms.Arm | None = None
        port = free_port()
        proc = self.procs.start("llhttp-floor", [
            *procstats.pin_prefix(self.proxy_core), str(self.image.python), "-m", "bench.leanfloor", str(port),
            str(self.upstream_port), str(self.sse_port), self.pod.key],
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        _wait_http(f"http://127.0.0.1:{port}/bench/", proc)
        pid = int(proc.popen.pid)
        self.lean_arm = arms.Arm("llhttp-floor", port, "/bench", port, "/sse", pids=lambda: [pid],
                                 label="asyncio Protocols + llhttp passthrough (prototype floor)")

    def all_arms(self) -> list[arms.Arm]:
        direct = arms.Arm("direct", self.upstream_port, "", self.sse_port, "", label="direct to upstream")
        lean = [self.lean_arm] if self.lean_arm is not None else []
        peer = [self.litellm_arm] if self.litellm_arm is not None else []
        return [direct, self.nginx_arm, *lean, self.floor_arm, self.sidekey_arm, self.nocache_arm,
                self.llm_arm, *peer]

    def proxy_arms(self) -> list[arms.Arm]:
        return [a for a in self.all_arms() if a.measured]

    def start_sidecars(self, rep: int) -> None:
        cache = kubelet.start_sidecar(self.cluster, self.pod, self.procs, f"sidekey-{rep}",
                                      core=self.proxy_core, image=self.image)
        nocache = kubelet.start_sidecar(self.cluster, self.pod, self.procs, f"sidekey-nocache-{rep}",
                                        core=self.proxy_core, token_cache=False, image=self.image)
        llm = kubelet.start_sidecar(self.cluster, self.llm_pod, self.procs, f"sidekey-llm-{rep}",
                                    core=self.proxy_core, image=self.image)
        self.sidecars = [cache, nocache, llm]
        for sidecar in self.sidecars:  # the arms measure what a pod runs, or the run stops here
            self.image.check_runs(sidecar.pid)
        self.llm_arm = arms.Arm("sidekey-llm", llm.port, "/bench", llm.port, "/sse",
                                token=self.llm_pod.agent_token, pids=lambda: [llm.pid],
                                label="sidekey, api: openai + model allow-list + token budget")
        token = self.pod.agent_token
        self.sidekey_arm = arms.Arm("sidekey", cache.port, "/bench", cache.port, "/sse", token=token,
                                    pids=lambda: [cache.pid], label="sidekey, token cache on")
        self.nocache_arm = arms.Arm("sidekey-nocache", nocache.port, "/bench", nocache.port, "/sse",
                                    token=token, pids=lambda: [nocache.pid],
                                    label="sidekey, token cache off")
        self.samples.add("sidekey", "ready_s", cache.ready_seconds)
        time.sleep(0.5)  # let start-up work settle before reading idle memory
        for arm in self.proxy_arms():
            self.samples.add(arm.name, "rss_idle_mib", arm.rss_kib() / 1024)

    def stop_sidecars(self) -> None:
        for sidecar in self.sidecars:
            sidecar.process.stop()

    def extra_cold_starts(self) -> None:
        """More start-to-ready samples: start a sidecar, wait for /readyz, stop it."""
        for i in range(self.plan.ready_samples):
            sidecar = kubelet.start_sidecar(self.cluster, self.pod, self.procs, f"sidekey-cold-{i}",
                                            core=self.proxy_core, image=self.image)
            self.samples.add("sidekey", "ready_s", sidecar.ready_seconds)
            sidecar.process.stop()

    # --- phases --------------------------------------------------------------------

    def _ordered(self, rep: int) -> list[arms.Arm]:
        all_arms = self.all_arms()
        k = rep % len(all_arms)
        return all_arms[k:] + all_arms[:k]

    def _measure(self, arm: arms.Arm, work: Callable[[], int]) -> tuple[float, int]:
        """CPU seconds of the arm's processes for ``work``; work returns the units done.

        The count ends once the arm has gone quiet (``settle``), not when the load
        stops: an arm still working through its backlog is charged for it, and the
        next arm does not start on a core that is still busy.
        """
        before = arm.cpu() if arm.measured else 0.0
        units = work()
        if arm.measured and not procstats.settle(arm.pids()):
            self.notes.append(f"{arm.name} was still using CPU {procstats.SETTLE_LIMIT_S:g} s after its load ended")
        after = arm.cpu() if arm.measured else 0.0
        return after - before, units

    def warmup(self, rep: int) -> None:
        if not self.plan.warmup_seconds:
            return
        for arm in self._ordered(rep):
            loads.wrk(arm.json_url, connections=16, seconds=self.plan.warmup_seconds, token=arm.token,
                      core=self.load_core)

    def saturation(self, rep: int, connections: int, only: tuple[str, ...] | None = None) -> None:
        for arm in self._ordered(rep):
            if only is not None and arm.name not in only:
                continue
            result: loads.WrkResult | None = None

            def work(arm: arms.Arm = arm) -> int:
                nonlocal result
                result = loads.wrk(arm.json_url, connections=connections,
                                   seconds=self.plan.saturation_seconds, token=arm.token, core=self.load_core)
                return result.requests
            cpu, requests = self._measure(arm, work)
            assert result is not None
            self.samples.add(arm.name, f"rps_c{connections}", result.rps)
            if arm.measured:
                self.samples.add(arm.name, f"rss_c{connections}_mib", arm.rss_kib() / 1024)
                self.samples.add(arm.name, f"cpu_us_per_req_c{connections}", cpu / requests * 1e6)
                # below 1.0 at saturation, other processes held the proxy's core
                self.samples.add(arm.name, f"core_share_c{connections}", cpu / result.seconds)
            _say(f"rep {rep + 1} c{connections} {arm.name:16} {result.rps:8.0f} rps"
                 + (f"  {cpu / requests * 1e6:6.1f} us CPU/req" if arm.measured else ""))

    def paced(self, rep: int) -> None:
        """The paced rate, each arm in ``paced_slices`` short runs that take turns.

        The tail at 500 rps is mostly the machine's: hypervisor steal on the proxy's
        core comes in bursts of a few seconds: nginx read 15 ms of p99 in a 6 s
        run that met one (15 % steal) and 1.5 ms in a quieter one a minute later
        (``python -m bench.tail``). In slices that take turns, every arm meets the same bursts;
        each arm's slices are merged into one distribution (``loads.merged``), and
        the core's steal during the arm's slices is reported beside its tail.
        """
        p = self.plan
        slices = max(1, p.paced_slices)
        seconds = max(1.0, p.paced_seconds / slices)
        runs: dict[str, list[loads.WrkResult]] = {}
        cpu: dict[str, float] = {}
        steal: dict[str, list[tuple[int, int]]] = {}
        ordered = self._ordered(rep)
        for s in range(slices):
            k = s % len(ordered)
            for arm in ordered[k:] + ordered[:k]:
                def work(arm: arms.Arm = arm) -> int:
                    runs.setdefault(arm.name, []).append(loads.wrk(
                        arm.json_url, connections=p.paced_connections, seconds=seconds, token=arm.token,
                        rate=p.paced_rate, core=self.load_core))
                    return runs[arm.name][-1].requests
                before = procstats.core_ticks(self.proxy_core)
                used, _ = self._measure(arm, work)
                after = procstats.core_ticks(self.proxy_core)
                cpu[arm.name] = cpu.get(arm.name, 0.0) + used
                steal.setdefault(arm.name, []).append((after[0] - before[0], after[1] - before[1]))
        results = {name: loads.merged(parts) for name, parts in runs.items()}
        for arm in ordered:
            r = results[arm.name]
            if r.rps < 0.95 * p.paced_rate:
                self.notes.append(f"rep {rep + 1}: {arm.name} reached only {r.rps:.0f} of {p.paced_rate} rps "
                                  "in the paced run (the arm at its limit, or the machine overloaded)")
            stolen = procstats.steal_share((0, 0), (sum(t[0] for t in steal[arm.name]),
                                                    sum(t[1] for t in steal[arm.name])))
            self.samples.add(arm.name, "p50_us_500", r.p50_us)
            self.samples.add(arm.name, "p99_us_500", r.p99_us)
            self.samples.add(arm.name, "p999_us_500", r.p999_us)
            self.samples.add(arm.name, "rate_500", r.rps)
            self.samples.add(arm.name, "steal_pct_500", 100 * stolen)
            if arm.measured:
                self.samples.add(arm.name, "cpu_us_per_req_500", cpu[arm.name] / r.requests * 1e6)
            _say(f"rep {rep + 1} {p.paced_rate} rps {arm.name:16} {r.rps:6.0f} rps  p50 {r.p50_us} us  "
                 f"p99 {r.p99_us} us  p99.9 {r.p999_us} us  steal on the proxy core {100 * stolen:.1f} %")
        direct = results["direct"]
        for name, r in results.items():
            if name != "direct":
                self.samples.add(name, "added_p50_us_500", r.p50_us - direct.p50_us)
                self.samples.add(name, "added_p99_us_500", r.p99_us - direct.p99_us)
                self.samples.add(name, "added_p999_us_500", r.p999_us - direct.p999_us)

    def sse(self, rep: int) -> None:
        p = self.plan
        ttfb: dict[str, float] = {}
        for arm in self._ordered(rep):
            first = sse.run(arm.sse_port, arm.sse_path, arm.token, clients=1, streams=p.sse_ttfb_streams)
            ttfb[arm.name] = first.ttfb_p50_us
            self.samples.add(arm.name, "sse_ttfb_us", first.ttfb_p50_us)
            result: sse.SseResult | None = None

            def work(arm: arms.Arm = arm) -> int:
                nonlocal result
                result = sse.run(arm.sse_port, arm.sse_path, arm.token, clients=p.sse_clients,
                                 streams=p.sse_streams_per_client)
                return result.events
            cpu, events = self._measure(arm, work)
            if arm.measured:
                self.samples.add(arm.name, "sse_cpu_us_per_event", cpu / events * 1e6)
            _say(f"rep {rep + 1} sse {arm.name:16} ttfb p50 {first.ttfb_p50_us:7.0f} us"
                 + (f"  {cpu / events * 1e6:5.1f} us CPU/event" if arm.measured else ""))
        for name, value in ttfb.items():
            if name != "direct":
                self.samples.add(name, "added_sse_ttfb_us", value - ttfb["direct"])

    def sse_scaling(self, rep: int) -> None:
        """CPU per event and RSS with n concurrent streams (n clients at once, each reading its streams)."""
        for arm in self._ordered(rep):
            if arm.name not in SCALING_ARMS:
                continue
            for n in self.plan.scaling_streams:
                result: sse.SseResult | None = None

                def work(arm: arms.Arm = arm, n: int = n) -> int:
                    nonlocal result
                    result = sse.run(arm.sse_port, arm.sse_path, arm.token, clients=n, streams=max(1, 20 // n))
                    return result.events
                cpu, events = self._measure(arm, work)
                self.samples.add(arm.name, f"sse_cpu_us_per_event_s{n}", cpu / events * 1e6)
                self.samples.add(arm.name, f"rss_s{n}_mib", arm.rss_kib() / 1024)
                _say(f"rep {rep + 1} sse x{n:<3} {arm.name:16} {cpu / events * 1e6:5.1f} us CPU/event")

    def after_load(self) -> None:
        for arm in self.proxy_arms():
            self.samples.add(arm.name, "rss_loaded_mib", arm.rss_kib() / 1024)
            self.samples.add(arm.name, "rss_anon_loaded_mib", arm.rss_kib("RssAnon") / 1024)


#: The sibling benchmarks (their engineers' scripts), with the arguments for a full and a quick run.
EXTERNALS: dict[str, tuple[list[str], list[str]]] = {
    "webhook_bench": (["--rate", "100", "--seconds", "20"], ["--rate", "100", "--seconds", "2"]),
    "operator_ready": (["--rounds", "10"], ["--rounds", "1"]),
}


def _external(module: str, out: Path, quick: bool) -> dict[str, Any] | None:
    """Results of a sibling benchmark (webhook, operator), if its script exists."""
    script = ROOT / "bench" / f"{module}.py"
    if not script.exists():
        return None
    full, short = EXTERNALS[module]
    proc = subprocess.run([sys.executable, str(script), *(short if quick else full), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0 or not out.exists():
        return {"error": f"bench/{module}.py exited {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@contextlib.contextmanager
def quick_run(prefix: str) -> Iterator[Run]:
    """The setup the side tools share (bench.profiling, bench.experiment): a control
    plane, the upstreams and a pod, pinned and at raised priority. The sidecars are
    theirs to start; everything is stopped, and the workdir removed, on exit."""
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix=prefix))
        if not os.environ.get("BENCH_KEEP"):  # the audit logs alone reach 100+ MB
            stack.callback(shutil.rmtree, workdir, True)
        procs = stack.enter_context(Processes(workdir / "logs"))
        cluster = _start_cluster(workdir)
        stack.callback(cluster.stop)
        run = Run(Plan.quick(), workdir, procs, cluster)
        stack.callback(procstats.raise_priority()[1])
        with _pinned(run.load_core):
            run.start_upstreams()
            run.create_pod()
            yield run


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "proxy", "core"], cwd=ROOT,
                                capture_output=True, text=True, check=False).stdout.strip())
    return {"cpu": model, "cores": len(procstats.cores()), "load_average_before": os.getloadavg(),
            "python": sys.version.split()[0], "commit": commit + ("+dirty" if dirty else "")}


def execute(plan: Plan, *, quick: bool, externals: bool) -> dict[str, Any]:
    started = time.time()
    machine = _machine()
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="sidekey-bench-"))
        if not os.environ.get("BENCH_KEEP"):  # the audit logs alone reach 100+ MB
            stack.callback(shutil.rmtree, workdir, True)
        procs = stack.enter_context(Processes(workdir / "logs"))
        _say("starting the local control plane")
        cluster = _start_cluster(workdir)
        stack.callback(cluster.stop)
        run = Run(plan, workdir, procs, cluster)
        machine["arm_python"], machine["image"] = run.image.version, run.image.image
        run.notes.append(f"the sidecar and the floors ran on the image's Python {run.image.version} (Debian 12's "
                         f"build; image {run.image.image[:19]}, bench/shipped.py), LiteLLM on this host's "
                         f"{litellm_peer.INTERPRETER}; the harness on {machine['python']}")
        raised, restore = procstats.raise_priority()
        stack.callback(restore)
        run.notes.append(f"the harness and every arm ran at {raised}" if raised is not None else
                         "not root: the benchmark ran at normal priority, other work disturbs it more")
        if run.load_core is None:
            run.notes.append("one core only: nothing pinned")
        with _pinned(run.load_core):
            run.start_upstreams()
            run.create_pod()
            run.create_llm_pod()
            run.start_nginx_proxy()
            run.start_floor()
            run.start_lean_floor()
            run.start_litellm()
            if not plan.litellm:
                run.notes.append("LiteLLM's arm was left out of this run (--quick or --no-litellm)")
            if not kubelet.cache_knob_exists():
                run.notes.append("the proxy has no SIDEKEY_TOKEN_CACHE knob yet: the no-cache arm runs "
                                 "the sidecar through bench.launch, which patches the cache out")
            run.extra_cold_starts()
            for rep in range(plan.reps):
                _say(f"repetition {rep + 1} of {plan.reps}")
                run.start_sidecars(rep)
                run.warmup(rep)
                for c in plan.connections:
                    run.saturation(rep, c)
                for c in plan.scaling_connections:
                    run.saturation(rep, c, only=SCALING_ARMS)
                run.paced(rep)
                run.sse(rep)
                run.sse_scaling(rep)
                run.after_load()
                run.stop_sidecars()
        external: dict[str, Any] = {}
        if externals:
            for module in ("webhook_bench", "operator_ready"):
                _say(f"running bench.{module}")
                got = _external(module, workdir / f"{module}.json", quick)
                if got is not None:
                    external[module] = got
    labels = {arm.name: arm.label for arm in run.all_arms()}
    machine["load_average_after"] = os.getloadavg()
    return reports.assemble(
        plan=plan.__dict__, machine=machine, notes=run.notes, labels=labels,
        samples=run.samples.values, medians=run.samples.medians(), external=external,
        seconds=time.time() - started, quick=quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 repetition, 1 s per arm (a smoke test, not a measurement)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3)")
    parser.add_argument("--seconds", type=float, help="seconds per saturation run (default 5)")
    parser.add_argument("--out", type=Path, help="JSON result file (default bench/results/latest.json)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument("--no-externals", action="store_true",
                        help="skip the webhook and operator benchmarks")
    parser.add_argument("--no-litellm", action="store_true",
                        help="leave LiteLLM's arm out (said in the table); by default a full run installs it")
    parser.add_argument("--update-docs", action="store_true",
                        help="write the table into docs/performance.md (between its bench:results marks)")
    args = parser.parse_args(argv)
    problem = compiled.advice()
    if problem is not None:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    plan = Plan.quick() if args.quick else Plan()
    if args.reps:
        plan = Plan(**{**plan.__dict__, "reps": args.reps})
    if args.seconds:
        plan = Plan(**{**plan.__dict__, "saturation_seconds": args.seconds})
    if args.no_litellm:
        plan = Plan(**{**plan.__dict__, "litellm": False})
    out = args.out or (RESULTS / ("quick.json" if args.quick else "latest.json"))
    result = execute(plan, quick=args.quick, externals=not args.no_externals)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_chart:
        chart = out.with_suffix(".png")
        try:
            reports.chart(result, chart)
        except ImportError:
            _say("matplotlib is not installed: no chart (pip install matplotlib)")
        else:
            _say(f"chart: {chart}")
    _say(f"results: {out}")
    if args.update_docs and reports.update_docs(result, ROOT / "docs" / "performance.md"):
        _say("docs/performance.md updated")
    print(reports.table(result))
    return 0
