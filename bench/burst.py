"""``python -m bench.burst``: what a burst of connections leaves in the sidecar's memory.

The sidecar runs with the ``memdump`` patch (see bench.launch). After a
16-connection warm-up it is dumped once; then a burst of ``--connections``
(256) keep-alive connections, a dump right after it, RSS and RssAnon at
+5, +20 and +45 s (the pool's idle reaper closes the burst's upstream
connections after 15 s), and a last dump. The dumps go to the sidecar's log,
whose path is printed: there, ``arenas allocated current`` and ``unused
pools`` say how much of the allocator the burst left held, and the ``memdump
in pool`` lines name the objects that hold the arenas. docs/performance.md
("The memory after a burst") reads this output.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from bench import harness, kubelet, loads, procstats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--patches", default="", help="more bench.launch patches, joined by '+'")
    args = parser.parse_args(argv)
    patches = frozenset(p for p in args.patches.split("+") if p) | {"memdump"}
    os.environ["BENCH_KEEP"] = "1"  # the dumps are in the sidecar's log
    with harness.quick_run("sidekey-burst-") as run:
        s = kubelet.start_sidecar(run.cluster, run.pod, run.procs, "sidekey-burst", core=run.proxy_core,
                                  patches=patches, image=run.image)
        url = f"http://127.0.0.1:{s.port}/bench/v1/chat/completions"
        began = time.monotonic()

        def snap(label: str) -> None:
            print(f"{label:>12}: RSS {procstats.rss_kib([s.pid]) / 1024:5.1f} MiB, "
                  f"RssAnon {procstats.rss_kib([s.pid], 'RssAnon') / 1024:5.1f} MiB", flush=True)

        def dump() -> None:
            os.kill(s.pid, signal.SIGUSR1)
            time.sleep(1.5)

        snap("idle")
        loads.wrk(url, connections=16, seconds=2, token=run.pod.agent_token, core=run.load_core)
        snap("after 16")
        dump()
        loads.wrk(url, connections=args.connections, seconds=3, token=run.pod.agent_token, core=run.load_core)
        snap(f"after {args.connections}")
        dump()
        began = time.monotonic()
        for at in (5, 20, 45):
            time.sleep(max(0.0, began + at - time.monotonic()))
            snap(f"+{at} s")
        dump()
        print(f"dumps in {run.workdir / 'logs' / 'sidekey-burst.log'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
