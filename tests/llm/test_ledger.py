"""The serviceAccount budget ledger's arithmetic (core/llmledger.py), without a cluster."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidekey.core import llmledger

T0 = 1_764_547_200.0  # a UTC midnight


def test_a_grant_never_exceeds_what_is_left() -> None:
    led = llmledger.new(1000, 3600, T0)
    led, a = llmledger.take(led, "a", "pod-a", used=0, want=700, need=1, now=T0)
    led, b = llmledger.take(led, "b", "pod-b", used=0, want=700, need=1, now=T0)
    assert (a, b) == (700, 300)
    assert led.granted == 1000 and led.available == 0
    led, c = llmledger.take(led, "c", "pod-c", used=0, want=10, need=1, now=T0)
    assert c == 0


def test_less_than_needed_is_no_grant_at_all() -> None:
    led = llmledger.new(100, 3600, T0)
    led, got = llmledger.take(led, "a", "p", used=0, want=500, need=200, now=T0)
    assert got == 0 and led.granted == 0
    assert "a" in led.holders  # the report is recorded all the same


def test_a_dead_holder_loses_only_its_unspent_slice_and_it_comes_back_after_the_timeout() -> None:
    led = llmledger.new(1000, 3600, T0)
    led, _ = llmledger.take(led, "a", "p", used=0, want=400, need=1, now=T0)
    led, _ = llmledger.take(led, "a", "p", used=150, want=0, need=0, now=T0 + 5)  # a heartbeat
    led, gone = llmledger.reclaim(led, T0 + 60, holder_seconds=120)
    assert gone == [] and led.available == 600
    led, gone = llmledger.reclaim(led, T0 + 130, holder_seconds=120)
    assert gone == ["a"]
    assert led.retired == 150 and led.available == 850  # 250 unspent came back, 150 stays spent


def test_a_restarted_holder_finds_what_it_held_not_a_fresh_budget() -> None:
    led = llmledger.new(1000, 3600, T0)
    led, _ = llmledger.take(led, "uid-1", "p", used=0, want=1000, need=1, now=T0)
    led, _ = llmledger.take(led, "uid-1", "p", used=300, want=0, need=0, now=T0 + 1)
    # the sidecar restarts: it knows nothing, the ledger knows what it holds
    assert led.holding("uid-1") == 700
    led, more = llmledger.take(led, "uid-1", "p", used=300, want=1000, need=1, now=T0 + 2)
    assert more == 0 and led.granted == 1000


def test_a_use_above_the_grant_is_charged_not_hidden() -> None:
    led = llmledger.new(1000, 3600, T0)
    led, _ = llmledger.take(led, "a", "p", used=0, want=100, need=1, now=T0)
    led, _ = llmledger.take(led, "a", "p", used=130, want=0, need=0, now=T0 + 1)
    assert led.holders["a"].granted == 130 and led.granted == 130


def test_a_new_window_starts_empty_and_keeps_the_holders() -> None:
    led = llmledger.new(1000, 3600, T0)
    led, _ = llmledger.take(led, "a", "p", used=900, want=100, need=1, now=T0)
    led = llmledger.rolled(led, T0 + 3600)
    assert led.window == T0 + 3600 and led.granted == 0 and led.holders["a"].used == 0


def test_release_returns_the_unspent_part_at_once() -> None:
    led = llmledger.new(1000, 3600, T0)
    led, _ = llmledger.take(led, "a", "p", used=0, want=500, need=1, now=T0)
    led = llmledger.release(led, "a", used=120, now=T0 + 1)
    assert led.available == 880 and led.retired == 120 and not led.holders


def test_the_annotation_round_trips_and_a_broken_one_is_an_error() -> None:
    led = llmledger.new(1000, 3600, T0)
    led, _ = llmledger.take(led, "a", "pod-a", used=5, want=50, need=1, now=T0)
    assert llmledger.loads(llmledger.dumps(led)) == led
    for bad in ("{", "[]", '{"v": 2}', '{"v":1,"tokens":-1,"windowSeconds":1,"window":0}'):
        with pytest.raises(llmledger.LedgerError):
            llmledger.loads(bad)


def test_slices_are_a_twentieth_of_the_budget_and_at_least_a_thousand() -> None:
    assert llmledger.slice_size(1_000_000) == 50_000
    assert llmledger.slice_size(5000) == 1000
    assert llmledger.slice_size(300) == 300


@settings(max_examples=200, deadline=None)
@given(tokens=st.integers(1, 10_000), seed=st.integers(0, 2**32))
def test_under_any_interleaving_of_compare_and_swap_writes_granted_and_spent_stay_within_the_budget(
        tokens: int, seed: int) -> None:
    """Holders read, compute and write back with the version they read; a stale write loses (409).

    Each holder spends only what it was granted by writes that won, as the
    sidecar does, so the sum of what all spend is bounded by the budget.
    """
    rng = random.Random(seed)
    stored = (llmledger.new(tokens, 3600, T0), 0)  # (ledger, resourceVersion)
    got = dict.fromkeys("abcdef", 0)
    used = dict.fromkeys("abcdef", 0)
    views: dict[str, tuple[llmledger.Ledger, int]] = {}
    for step in range(300):
        h = rng.choice("abcdef")
        used[h] += rng.randint(0, got[h] - used[h])
        if h not in views or rng.random() < 0.5:
            views[h] = stored
            continue
        led, version = views.pop(h)
        new, given = llmledger.take(led, h, h, used=used[h], want=rng.randint(0, tokens), need=1,
                                    now=T0 + step)
        if version == stored[1]:  # the apiserver's compare-and-swap
            stored = (new, version + 1)
            got[h] += given
        assert stored[0].granted <= tokens
    assert sum(got.values()) <= tokens
    assert sum(used.values()) <= tokens
