"""``sidekey`` started with bench-only patches: the no-cache arm, and ablations for profiling.

``BENCH_PATCHES`` is a comma-separated list; each patch changes one thing,
so the benchmark can say what each part of the hot path costs by turning it
off (or what a candidate change gains by turning it on) without editing the
proxy:

- ``nocache``: the token-validation cache is patched out, so every request
  pays the full signature and claims check (a cache miss: the first call with
  each freshly rotated token). Used while the proxy has no
  ``SIDEKEY_TOKEN_CACHE`` knob.
- ``noaudit``, ``nometrics``, ``noscrub``: ablations (no audit line, no
  Prometheus updates, no response scrubbing). Never a way to run a sidecar.
- ``stdloop``: asyncio's own selector loop instead of the sidecar's uvloop
  (``sidekey.proxy.main.new_loop``): what the loop is worth.
- ``gcstats``: time every collector pass; log each pass of generation 2 and
  any over 5 ms to stderr (``gcstats gen=.. ms=..``), and on SIGUSR2 write
  one ``gcwindow`` line per generation (passes, total and longest ms since
  the last SIGUSR2) and start a new window: what the collector costs the
  tail of one measured run (``bench.tail``).
- ``trim``: ``malloc_trim(0)`` once the sidecar has started, handing the
  heap that start-up freed back to the kernel.
- ``memdump``: on SIGUSR1, write to stderr the allocator's statistics
  (``sys._debugmallocstats``) and the twenty most numerous object types the
  collector tracks: what a burst of connections leaves behind.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from sidekey import cli
from sidekey.core import tokens

#: The product itself now asks for ``application/jwk-set+json`` and calls
#: ``gc.freeze()`` after start-up, so those two former patches are gone.
KNOWN = frozenset({"nocache", "noaudit", "nometrics", "noscrub", "stdloop", "trim", "gcstats", "memdump", "memtrace"})


class _Nothing:
    """Stands in for a metric: every call is a no-op."""

    def __getattr__(self, name: str) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self


def apply(patches: set[str]) -> None:
    unknown = patches - KNOWN
    if unknown:
        raise SystemExit(f"bench.launch: unknown patches {sorted(unknown)}; known: {sorted(KNOWN)}")
    if "nocache" in patches:
        tokens.Validator.cached = lambda self, token: None  # type: ignore[method-assign]
        tokens.Validator._remember = lambda self, token, identity: None  # type: ignore[method-assign]
        from sidekey.proxy import forwarding
        fast = forwarding.Proxy.fast

        def fast_uncached(self: forwarding.Proxy, request: Any, conn: Any) -> Any:
            conn.last_token = None  # nor the token the connection sent last (its check remembered)
            return fast(self, request, conn)
        forwarding.Proxy.fast = fast_uncached  # type: ignore[method-assign]
    if "noaudit" in patches:
        from sidekey.core import logs
        logs.AuditWriter.write = lambda self, record: None  # type: ignore[method-assign]
        logs.AuditWriter.write_line = lambda self, line: None  # type: ignore[method-assign]
    if "nometrics" in patches:
        from sidekey.proxy import metrics
        for name in ("REQUESTS", "DURATION", "UPSTREAM_DURATION", "IN_FLIGHT", "TOKEN_FAILURES"):
            setattr(metrics, name, _Nothing())
    if "noscrub" in patches:
        from sidekey.proxy import scrubbing
        scrubbing.Scrubber.scrub = lambda self, data: data  # type: ignore[method-assign]
        scrubbing.Scrubber.scrub_text = lambda self, text: text  # type: ignore[method-assign]
        scrubbing.Scrubber.held_back = lambda self, data: 0  # type: ignore[method-assign]
    if "gcstats" in patches:
        _install_gcstats()
    if "trim" in patches:
        import ctypes

        from sidekey.proxy import sidecar
        start_untrimmed = sidecar.SidecarProcess.start

        async def start_then_trim(self: sidecar.SidecarProcess) -> None:
            await start_untrimmed(self)
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        sidecar.SidecarProcess.start = start_then_trim  # type: ignore[method-assign]
    if "memdump" in patches:
        _install_memdump(tracing="memtrace" in patches)
    if "stdloop" in patches:
        import asyncio

        from sidekey.proxy import main as proxy_main
        proxy_main.new_loop = asyncio.new_event_loop


def _install_gcstats() -> None:
    import signal
    import time
    began: list[float] = [0.0]
    window: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - began[0]) * 1000
        window[info["generation"]].append(ms)
        if info["generation"] == 2 or ms > 5:
            print(f"gcstats gen={info['generation']} ms={ms:.2f} collected={info['collected']}",
                  file=sys.stderr, flush=True)

    def report(signum: int, frame: object) -> None:
        for gen, passes in window.items():
            print(f"gcwindow gen={gen} passes={len(passes)} total_ms={sum(passes):.3f} "
                  f"max_ms={max(passes, default=0.0):.3f}", file=sys.stderr, flush=True)
            passes.clear()
    gc.callbacks.append(watch)
    signal.signal(signal.SIGUSR2, report)


def _install_memdump(tracing: bool) -> None:
    """SIGUSR1 writes what the small-object allocator holds, and what holds it.

    Each dump runs a full collection (which also empties CPython's free
    lists), prints the twenty most numerous tracked object types and
    ``sys._debugmallocstats()``, and records the 16 KiB pools that hold a
    reachable object. From the second dump on, it names the objects in pools
    the first dump did not know, with what refers to them: after a burst,
    these are what keeps an arena from being returned. The pool map is kept
    in one ``array`` (a single malloc'd buffer, outside pymalloc's pools), so
    the dump does not pin pools itself. ``memtrace`` adds ``tracemalloc``
    (started before the sidecar's imports) and its growth since the first dump.
    """
    import array
    import bisect
    import collections
    import signal
    import tracemalloc

    if tracing:
        tracemalloc.start(4)
    snapshots: list[tracemalloc.Snapshot] = []
    first: list[array.array[int]] = []

    def say(text: str) -> None:
        print("memdump " + text, file=sys.stderr, flush=True)

    def dump(signum: int, frame: Any) -> None:
        gc.collect()
        objects = gc.get_objects()
        say("objects " + " ".join(f"{k}={n}" for k, n in collections.Counter(
            type(o).__qualname__ for o in objects).most_common(20)))
        sys._debugmallocstats()
        reachable = {id(o): o for o in objects}
        for o in objects:
            for r in gc.get_referents(o):
                reachable.setdefault(id(r), r)
        small = [a for a, o in reachable.items() if sys.getsizeof(o) <= 512]  # pymalloc's blocks
        if not first:
            first.append(array.array("Q", sorted({a >> 14 for a in small})))
        else:
            known = first[0]

            def is_new(address: int) -> bool:
                i = bisect.bisect_left(known, address >> 14)
                return i == len(known) or known[i] != address >> 14
            new = [a for a in small if is_new(a)]
            say(f"pools new since the first dump: {len({a >> 14 for a in new})}, holding "
                + " ".join(f"{k}={n}" for k, n in collections.Counter(
                    type(reachable[a]).__qualname__ for a in new).most_common(20)))
            for a in new[:80]:
                o = reachable[a]
                holders = [f"{type(h).__qualname__}: {repr(h)[:90]}" for h in gc.get_referrers(o)
                           if h is not reachable and h is not objects]
                say(f"in pool {a >> 14:#x}: {type(o).__qualname__} {repr(o)[:80]} <- {holders[:2]}")
            del new
        del reachable, small, objects
        if tracing:
            snapshots.append(tracemalloc.take_snapshot())
            current, peak = tracemalloc.get_traced_memory()
            say(f"traced {current} peak {peak}")
            tracemalloc.reset_peak()
            for stat in snapshots[-1].compare_to(snapshots[0], "traceback")[:25]:
                say(f"grew {stat.size_diff} {stat.count_diff} " + " <- ".join(
                    f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback))
    signal.signal(signal.SIGUSR1, dump)


def main() -> int:
    apply({p.strip() for p in os.environ.get("BENCH_PATCHES", "").split(",") if p.strip()})
    return int(cli.main(sys.argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
