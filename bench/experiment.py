"""``python -m bench.experiment``: A/B sidecar variants, interleaved, CPU per request.

Each variant is the sidecar with a set of ``bench.launch`` patches (see
there), e.g. ``--variant base= --variant nometrics=nometrics --variant
std=stdloop``. All variants run side by side on the proxy core and take
turns under the same wrk load, repetition after repetition, so the
differences between them are measured under the same machine conditions.
This is how docs/performance.md attributes the hot path's cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import arms, harness, kubelet, loads, procstats, sse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME=PATCH+PATCH... (an empty list is the sidecar as it is)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, nargs="+", default=[16])
    parser.add_argument("--rate", type=int, default=0, help="pace wrk at this many requests/s")
    parser.add_argument("--sse", action="store_true",
                        help="SSE streams instead of wrk: CPU per event, --connections clients, 15 streams each")
    args = parser.parse_args(argv)
    variants: dict[str, frozenset[str]] = {}
    for spec in args.variant:
        name, _, patches = spec.partition("=")
        variants[name] = frozenset(p for p in patches.split("+") if p)
    cpu: dict[tuple[str, int], list[float]] = {}
    rps: dict[tuple[str, int], list[float]] = {}
    with harness.quick_run("sidekey-experiment-") as run:
        procs, cluster = run.procs, run.cluster
        sidecars = {name: kubelet.start_sidecar(cluster, run.pod, procs, f"sidekey-{name}",
                                                core=run.proxy_core, patches=patches, image=run.image)
                    for name, patches in variants.items()}
        rss_idle = {name: procstats.rss_kib([s.pid]) / 1024 for name, s in sidecars.items()}
        token = run.pod.agent_token
        names = list(sidecars)
        for name in names:  # warm up
            loads.wrk(f"http://127.0.0.1:{sidecars[name].port}/bench/v1/chat/completions",
                      connections=16, seconds=1, token=token, core=run.load_core)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for c in args.connections:
                for name in order:
                    s = sidecars[name]
                    before = procstats.cpu_seconds([s.pid])
                    if args.sse:
                        streamed = sse.run(s.port, "/sse" + arms.SSE_PATH, token, clients=c, streams=15)
                        units, rate = streamed.events, streamed.events / streamed.seconds
                    else:
                        r = loads.wrk(f"http://127.0.0.1:{s.port}/bench/v1/chat/completions",
                                      connections=c, seconds=args.seconds, token=token,
                                      core=run.load_core, rate=args.rate or None)
                        units, rate = r.requests, r.rps
                    used = procstats.cpu_seconds([s.pid]) - before
                    cpu.setdefault((name, c), []).append(used / units * 1e6)
                    rps.setdefault((name, c), []).append(rate)
                    print(f"[{time.strftime('%H:%M:%S')}] rep {rep + 1} c{c} {name:14} {rate:7.0f} /s "
                          f"{used / units * 1e6:7.1f} us each", flush=True)
        rss_loaded = {name: procstats.rss_kib([s.pid]) / 1024 for name, s in sidecars.items()}
    base = names[0]
    unit = "event" if args.sse else "req"
    print(f"\n| variant | patches | conns | {unit}/s | CPU us/{unit} | vs {base} | RSS idle / loaded MiB | ready s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for c in args.connections:
        ref = statistics.median(cpu[(base, c)])
        for name in names:
            m = statistics.median(cpu[(name, c)])
            print(f"| {name} | {'+'.join(sorted(variants[name])) or '-'} | {c} | "
                  f"{statistics.median(rps[(name, c)]):.0f} | {m:.1f} | {100 * (m - ref) / ref:+.1f}% | "
                  f"{rss_idle[name]:.1f} / {rss_loaded[name]:.1f} | {sidecars[name].ready_seconds:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
