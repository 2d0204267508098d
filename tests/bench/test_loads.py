"""The paced phase's slices merge into one latency distribution without losing a sample."""

from __future__ import annotations

import math
import random

import pytest

from bench import loads


def _result(samples: list[int]) -> loads.WrkResult:
    counts: dict[int, int] = {}
    for v in samples:
        counts[v] = counts.get(v, 0) + 1
    hist = tuple(sorted(counts.items()))
    return loads.WrkResult(requests=len(samples), seconds=2.0, rps=len(samples) / 2.0, p50_us=0, p90_us=0,
                           p99_us=0, p999_us=0, mean_us=0.0, errors={"connect": 0, "timeout": 1},
                           max_us=max(samples), hist=hist)


def _nearest_rank(samples: list[int], p: float) -> int:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(len(ordered) * p / 100)) - 1]


def test_merged_slices_read_the_percentiles_of_all_their_samples() -> None:
    rng = random.Random(15)
    slices = [[int(rng.lognormvariate(5.5, 0.6)) for _ in range(n)] for n in (997, 1000, 1003)]
    slices[1] += [20_000] * 15  # one slice met a steal burst: its tail reaches the merged p99
    merged = loads.merged([_result(s) for s in slices])
    everything = [v for s in slices for v in s]
    assert merged.requests == len(everything) and merged.seconds == 6.0
    assert sum(c for _, c in merged.hist) == len(everything)
    for p, got in ((50, merged.p50_us), (90, merged.p90_us), (99, merged.p99_us), (99.9, merged.p999_us)):
        assert got == _nearest_rank(everything, p), p
    assert merged.max_us == 20_000 and merged.errors == {"connect": 0, "timeout": 3}
    assert merged.mean_us == pytest.approx(sum(everything) / len(everything))


def test_a_result_without_its_distribution_is_refused() -> None:
    bare = loads.WrkResult(requests=1, seconds=1.0, rps=1.0, p50_us=1, p90_us=1, p99_us=1, p999_us=1,
                           mean_us=1.0, errors={})
    with pytest.raises(ValueError, match="distribution"):
        loads.merged([bare])
    with pytest.raises(ValueError, match="empty"):
        loads.percentile([], 99)
