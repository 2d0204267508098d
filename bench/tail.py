"""``python -m bench.tail``: the paced run alone, repeated, to find whose tail it is.

The benchmark's added p99 at 500 rps is one 6 s wrk run per arm and
repetition, after the saturation runs. That figure moves with the machine
(nginx's own added p99 read 0.38 to 2.03 ms in one run), so a change to the
sidecar's tail cannot be told from noise in three samples. This tool runs
only that phase, many times, direct, nginx and each sidecar variant taking
turns, and prints every run's p50, p99, p99.9 and max, then the medians and
the worst.

Each variant is the sidecar with ``bench.launch`` patches, as in
``bench.experiment`` (``--variant base= --variant gc=gcstats``). With
``gcstats`` the variant's collector passes during each paced run are read
from its log (``gcwindow`` lines, written on SIGUSR2), so a tail can be set
beside the pauses that were in it. ``--burst`` runs the benchmark's
saturation sequence (16, 64, 1 and 256 connections) on every variant first,
as ``bench/run`` does before its paced phase, so a burst's leftovers (idle
pooled connections, arenas, a reaper due) are in the measured window too.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import time
from pathlib import Path

from bench import arms, harness, kubelet, loads, procstats

GCWINDOW = re.compile(r"gcwindow gen=(\d) passes=(\d+) total_ms=([\d.]+) max_ms=([\d.]+)")


def _gc_window(log: str, pid: int, offset: int) -> tuple[str, int]:
    """Ask the variant for its collector window and read it from the log."""
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        with open(log, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            text = f.read()
        found = GCWINDOW.findall(text)
        if len(found) >= 3:
            parts = [f"g{g}:{n}x/{float(t):.2f}ms/max{float(m):.2f}" for g, n, t, m in found[-3:]]
            return " ".join(parts), offset + len(text.encode())
        time.sleep(0.02)
    return "no gcwindow lines (is gcstats among the patches?)", offset


def _waits(pids: list[int]) -> tuple[float, int]:
    """Seconds the pids spent runnable but not running (schedstat's run_delay), and the
    times they were preempted (nonvoluntary context switches), summed over their threads."""
    preempted = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith("nonvoluntary_ctxt_switches"):
                    preempted += int(line.split()[1])
    return procstats.schedstat(pids)[1] / 1e9, preempted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tail", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=PATCH+PATCH... (default: one variant, the sidecar as it is)")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--burst", action="store_true",
                        help="the bench's saturation sequence on every variant before each paced round")
    args = parser.parse_args(argv)
    variants: dict[str, frozenset[str]] = {}
    for spec in args.variant or ["sidekey="]:
        name, _, patches = spec.partition("=")
        variants[name] = frozenset(p for p in patches.split("+") if p)
    rows: dict[str, list[loads.WrkResult]] = {}
    with harness.quick_run("sidekey-tail-") as run:
        run.start_nginx_proxy()
        sidecars = {name: kubelet.start_sidecar(run.cluster, run.pod, run.procs, f"sidekey-{name}",
                                                core=run.proxy_core, patches=patches, image=run.image)
                    for name, patches in variants.items()}
        token = run.pod.agent_token
        targets: dict[str, arms.Arm] = {
            "direct": arms.Arm("direct", run.upstream_port, "", run.sse_port, ""),
            "nginx": run.nginx_arm,
            **{name: arms.Arm(name, s.port, "/bench", s.port, "/sse", token=token,
                              pids=lambda s=s: [s.pid])  # type: ignore[misc]
               for name, s in sidecars.items()}}
        logs = {name: str(run.procs.log_dir / f"sidekey-{name}.log") for name in sidecars}
        offsets = {name: 0 for name in sidecars}
        for name in sidecars:
            if "gcstats" in variants[name]:
                _, offsets[name] = _gc_window(logs[name], sidecars[name].pid, 0)
        for arm in targets.values():
            loads.wrk(arm.json_url, connections=16, seconds=1, token=arm.token, core=run.load_core)
        names = list(targets)
        for rep in range(args.reps):
            if args.burst:
                for name in sidecars:
                    for c in (16, 64, 1, 256):
                        loads.wrk(targets[name].json_url, connections=c, seconds=4, token=token,
                                  core=run.load_core)
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                arm = targets[name]
                waited, ticks = _waits(arm.pids()), procstats.core_ticks(run.proxy_core)
                spent = procstats.cpu_ticks(arm.pids())
                r = loads.wrk(arm.json_url, connections=args.connections, seconds=args.seconds,
                              token=arm.token, rate=args.rate, core=run.load_core)
                rows.setdefault(name, []).append(r)
                delay, preempted = (a - b for a, b in zip(_waits(arm.pids()), waited, strict=True))
                steal = procstats.steal_share(ticks, procstats.core_ticks(run.proxy_core))
                user, system = (b - a for a, b in zip(spent, procstats.cpu_ticks(arm.pids()), strict=True))
                per = 1e6 / procstats.TICKS / r.requests
                extra = f"steal {100 * steal:4.1f}%  " + (f"CPU {user * per:4.0f} user + {system * per:4.0f} system us/req, runq {delay / r.requests * 1e6:5.1f} us/req, preempted {preempted:4d}  " if arm.pids() else "")
                if name in sidecars and "gcstats" in variants[name]:
                    window, offsets[name] = _gc_window(logs[name], sidecars[name].pid, offsets[name])
                    extra += window
                print(f"[{time.strftime('%H:%M:%S')}] rep {rep + 1} {name:10} {r.rps:5.0f}/s "
                      f"p50 {r.p50_us:5d}  p99 {r.p99_us:5d}  p99.9 {r.p999_us:6d}  max {r.max_us:6d} us  "
                      f"{extra}", flush=True)
    print("\n| arm | patches | runs | p50 us | p99 us (median / worst) | p99.9 us (median / worst) "
          "| added p99 (median / worst) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    direct = rows["direct"]
    for name, results in rows.items():
        added = [r.p99_us - d.p99_us for r, d in zip(results, direct, strict=True)]
        p99 = [r.p99_us for r in results]
        p999 = [r.p999_us for r in results]
        print(f"| {name} | {'+'.join(sorted(variants.get(name, ()))) or '-'} | {len(results)} | "
              f"{statistics.median(r.p50_us for r in results):.0f} | "
              f"{statistics.median(p99):.0f} / {max(p99)} | {statistics.median(p999):.0f} / {max(p999)} | "
              f"{statistics.median(added):.0f} / {max(added)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
