"""``python -m bench.profiling``: where the sidecar's CPU goes on the hot path.

Starts the same setup as the benchmark (control plane, pod, upstream), puts
the sidecar under a steady wrk load and samples it with py-spy (which reads
the process from outside, so the profile costs the sidecar nothing). The
collapsed stacks are folded into two lists of self time,
per function and per package, as a share of busy samples; ``--flamegraph`` also writes an SVG.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from bench import arms, harness, kubelet, loads, procstats, sse

ROOT = Path(__file__).resolve().parent.parent


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    return found


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


#: py-spy names the proxy's modules by bare file name (they load through the editable finder).
_OWN = frozenset({p.name for p in (ROOT / "proxy").glob("*.py")} | {"sidekey"})


def _frame(text: str) -> tuple[str, str]:
    """``func (path/file.py:12)`` -> (``func (path/file.py)``, the area it belongs to)."""
    m = _FRAME.match(text.strip())
    if m is None:
        return text, "other"
    path = m["file"]
    if path.startswith(("sidekey/", "core/")) or path in _OWN:
        area = "sidekey"
    elif "/" in path:
        area = path.split("/", 1)[0]
    else:
        area = path.removesuffix(".py")
    return f"{m['func']} ({path})", area


def fold(raw: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Busy samples, self samples by function, self samples by package ("area").

    py-spy cuts the stacks of suspended coroutines short, so inclusive time
    is unreliable for asyncio code; self time, attributed to the innermost
    frame, is what the report uses.
    """
    own: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue  # py-spy's raw format does not escape spaces inside frame names
        n = int(count)
        frame, area = _frame(stack.split(";")[-1])
        total += n
        own[frame] += n
        areas[area] += n
    return total, own, areas


def own_lines(raw: Path) -> collections.Counter[str]:
    """Self samples by ``file:line`` for frames in sidekey's own modules."""
    lines: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        m = re.match(r"^(?P<func>.*) \((?P<file>[^()]*)\)$", stack.split(";")[-1].strip())
        if m is None:
            continue
        where = m["file"]
        path = where.rsplit(":", 1)[0]
        if _frame(stack.split(";")[-1])[1] == "sidekey":
            lines[f"{where} {m['func']}"] += int(count)
        del path
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profiling", description=__doc__)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-cache", action="store_true", help="profile with the token cache off")
    parser.add_argument("--sse", action="store_true", help="load with SSE streams (100 events each) instead")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--lines", action="store_true",
                        help="also list sidekey's own source lines by self time")
    parser.add_argument("--flamegraph", type=Path, help="also write a flamegraph SVG here")
    args = parser.parse_args(argv)
    with harness.quick_run("sidekey-profile-") as run:
        workdir, procs, cluster = run.workdir, run.procs, run.cluster
        sidecar = kubelet.start_sidecar(cluster, run.pod, procs, "sidekey", core=run.proxy_core,
                                        token_cache=not args.no_cache, image=run.image)
        url = f"http://127.0.0.1:{sidecar.port}/bench/v1/chat/completions"
        loads.wrk(url, connections=args.connections, seconds=2, token=run.pod.agent_token,
                  core=run.load_core)
        raw = workdir / "profile.txt"
        result: list[loads.WrkResult | sse.SseResult] = []
        if args.sse:
            streams = max(1, int(args.seconds * 8))  # ~0.12 s per stream
            load = threading.Thread(target=lambda: result.append(sse.run(
                sidecar.port, "/sse" + arms.SSE_PATH, run.pod.agent_token, clients=args.connections,
                streams=streams)))
        else:
            load = threading.Thread(target=lambda: result.append(loads.wrk(
                url, connections=args.connections, seconds=args.seconds + 2,
                token=run.pod.agent_token, core=run.load_core)))
        cpu0 = procstats.cpu_seconds([sidecar.pid])
        load.start()
        spy = [_py_spy(), "record", "--pid", str(sidecar.pid), "--rate", "250",
               "--duration", str(args.seconds), "--nonblocking"]
        subprocess.run([*spy, "--format", "raw", "--output", str(raw)], check=True,
                       capture_output=True, env={**os.environ})
        load.join()
        cpu = procstats.cpu_seconds([sidecar.pid]) - cpu0
        if args.flamegraph:
            subprocess.run([*spy[:-2], "--duration", "5", "--format", "flamegraph",
                            "--output", str(args.flamegraph)], check=False, capture_output=True)
        # read the samples before the workdir is removed on leaving the block
        total, own, areas = fold(raw)
        lines = own_lines(raw) if args.lines else None
    r = result[0]
    if isinstance(r, sse.SseResult):
        print(f"sidecar under {args.connections} SSE clients: {r.events / r.seconds:.0f} events/s, "
              f"{cpu / r.events * 1e6:.1f} us CPU/event, {total} busy samples")
    else:
        print(f"sidecar under wrk -c{args.connections}: {r.rps:.0f} rps, "
              f"{cpu / r.requests * 1e6:.1f} us CPU/request, {total} busy samples")
    print(f"\n## self time (top {args.top})")
    for frame, n in own.most_common(args.top):
        print(f"{100 * n / total:5.1f}%  {frame}")
    if lines is not None:
        print(f"\n## sidekey's own lines by self time (top {args.top})")
        for line, n in lines.most_common(args.top):
            print(f"{100 * n / total:5.1f}%  {line}")
    print("\n## self time by package")
    for area, n in areas.most_common():
        print(f"{100 * n / total:5.1f}%  {area}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
