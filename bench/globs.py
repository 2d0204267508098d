"""``python -m bench.globs``: the worst case of the path-glob match, against a time bound.

A policy pattern such as ``/**/a/**/b/**/c`` made a backtracking matcher try
every way of splitting the path between its ``**``: cubic in the number of
segments, seconds for a 1.2 KB request target, all of it on the event loop
every stream of the pod shares. The matcher in ``core/policies.py`` walks the
path once holding a set of pattern positions instead (O(pattern x path)).
This benchmark runs the worst shapes we know and fails (exit 1) when one
match takes longer than ``BOUND_MS``; it is a benchmark, not a unit test,
because a shared CI machine cannot time a unit test reliably.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from sidekey.core import policies

#: A match of a 1.2 KB target may take at most this long (median CPU time); the
#: linear matcher takes well under a millisecond, the backtracking one took seconds.
BOUND_MS = 5.0

#: name -> (pattern, path segments); every target is about 1.2 KB.
CASES: dict[str, tuple[str, list[str]]] = {
    # no 'c' at the end: every split is tried before the answer is "no"
    "three-double-stars-no-match": ("/**/a/**/b/**/c", ["a", "b"] * 300),
    "three-double-stars-match": ("/**/a/**/b/**/c", ["a", "b"] * 299 + ["c"]),
    "eight-double-stars": ("/**/a/**/a/**/a/**/a/**/a/**/a/**/a/**/z", ["a"] * 600),
    "stars-and-double-stars": ("/**/*/a/**/*/b/**/c", ["a"] * 300 + ["b"] * 300),
    "long-segments": ("/**/x/**/y/**/z", ["x" * 40, "y" * 40] * 15),
}


def median_ms(pattern: policies.PathPattern, path: list[str], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.process_time()
        pattern.matches(path)
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.globs", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="timed matches per case (median)")
    args = parser.parse_args(argv)
    worst = 0.0
    print(f"{'case':32} {'target bytes':>12} {'median ms':>10}")
    for name, (text, path) in CASES.items():
        ms = median_ms(policies.PathPattern.compile(text), path, args.rounds)
        worst = max(worst, ms)
        size = sum(len(s) + 1 for s in path)
        print(f"{name:32} {size:>12} {ms:>10.3f}")
    verdict = "ok" if worst <= BOUND_MS else "TOO SLOW"
    print(f"worst {worst:.3f} ms, bound {BOUND_MS} ms: {verdict}")
    return 0 if worst <= BOUND_MS else 1


if __name__ == "__main__":
    sys.exit(main())
