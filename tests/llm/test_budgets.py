"""Reservations before forwarding, settles after, 429 at the budget (proxy/llmbudgets.py)."""

from __future__ import annotations

import json

import pytest

from sidekey.core import llmpolicy
from sidekey.proxy import llmbudgets as lb
from sidekey.proxy import llmrequests as lr

T0 = 1_764_547_200.0


class Clock:
    def __init__(self) -> None:
        self.now = T0 + 100

    def __call__(self) -> float:
        return self.now


def account(tokens: int, clock: Clock, window: str = "1h") -> lb.Account:
    return lb.Account(llmpolicy.Budget(tokens, window, llmpolicy.window_seconds(window), "pod"), clock=clock)


def call(max_tokens: int | None = None, size: int = 0) -> lr.Call:
    doc = {"model": "m", "messages": [{"role": "user", "content": "x" * size}]}
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    return lr.read("openai", "chat", json.dumps(doc).encode())


def test_the_estimate_is_reserved_and_the_settle_charges_the_actual_and_releases_the_rest() -> None:
    clock = Clock()
    a = account(10_000, clock)
    c = call(max_tokens=500)
    r = lb.reserve([a], c, cap=True, upstream="openai", policy="p")
    assert a.reserved == c.estimate and a.left() == 10_000 - c.estimate
    r.settle(42)
    assert (a.reserved, a.spent, a.left()) == (0, 42, 10_000 - 42)
    r.settle(42)  # a second settle changes nothing
    assert a.spent == 42


def test_a_failed_request_settles_to_its_estimate() -> None:
    a = account(10_000, Clock())
    c = call(max_tokens=100)
    lb.reserve([a], c, cap=True, upstream="openai", policy="p").settle(None)
    assert a.spent == c.estimate and a.reserved == 0


def test_concurrent_reservations_never_overrun_together() -> None:
    a = account(1000, Clock())
    c = call(max_tokens=100)
    held = []
    with pytest.raises(lr.LlmRefusal):
        for _ in range(100):
            held.append(lb.reserve([a], call(max_tokens=100), cap=True, upstream="u", policy="p"))
    assert len(held) == 1000 // c.estimate
    assert a.reserved <= 1000


def test_a_spent_budget_is_a_429_with_retry_after_at_the_window_end_naming_the_budget() -> None:
    clock = Clock()
    a = account(100, clock)
    with pytest.raises(lr.LlmRefusal) as caught:
        lb.reserve([a], call(max_tokens=1000), cap=True, upstream="openai", policy="team")
    refusal = caught.value
    assert refusal.status == 429 and refusal.retry_after == 3600 - 100
    assert "100 tokens per 1h per pod" in refusal.message and "'team'" in refusal.message
    assert "lower max_tokens" in refusal.message


def test_an_unbounded_request_is_capped_to_what_is_left() -> None:
    a = account(5000, Clock())
    lb.reserve([a], call(max_tokens=1000), cap=True, upstream="u", policy="p")
    left = a.left()
    c = call()
    r = lb.reserve([a], c, cap=True, upstream="u", policy="p")
    assert c.capped and c.body["max_completion_tokens"] == left - c.prompt_estimate
    assert a.left() == 0 and r.tokens == left


def test_a_cap_with_no_room_for_a_reply_is_a_429() -> None:
    c = call(size=200)
    a = account(c.prompt_estimate, Clock())
    with pytest.raises(lr.LlmRefusal) as caught:
        lb.reserve([a], c, cap=True, upstream="u", policy="p")
    assert caught.value.status == 429 and a.reserved == 0


def test_without_capping_an_unbounded_request_reserves_its_prompt_only() -> None:
    a = account(5000, Clock())
    c = call()
    lb.reserve([a], c, cap=False, upstream="u", policy="p")
    assert not c.capped and a.reserved == c.prompt_estimate


def test_with_two_budgets_a_refusal_by_one_takes_nothing_from_the_other() -> None:
    clock = Clock()
    big, small = account(10_000, clock), account(50, clock, "24h")
    with pytest.raises(lr.LlmRefusal) as caught:
        lb.reserve([big, small], call(max_tokens=100), cap=True, upstream="u", policy="p")
    assert "per 24h" in caught.value.message
    assert big.reserved == 0 and small.reserved == 0


def test_a_stream_extends_its_reservation_until_the_budget_says_no() -> None:
    a = account(1000, Clock())
    c = call()
    r = lb.reserve([a], c, cap=False, upstream="u", policy="p")
    assert r.extend(1000 - c.prompt_estimate)
    assert not r.extend(1)
    r.settle(10)
    assert a.spent == 10 and a.reserved == 0


def test_a_new_window_starts_empty_and_an_old_reservation_settles_into_it() -> None:
    clock = Clock()
    a = account(1000, clock)
    r = lb.reserve([a], call(max_tokens=900), cap=True, upstream="u", policy="p")
    clock.now += 3600
    assert a.left() == 1000
    r.settle(30)
    assert a.spent == 30 and a.reserved == 0


def test_count_tokens_spends_nothing() -> None:
    a = account(10, Clock())
    c = lr.read("anthropic", "count_tokens", b'{"model": "claude", "messages": []}')
    assert lb.reserve([a], c, cap=True, upstream="u", policy="p").parts == []


def test_a_new_total_keeps_what_was_spent_in_the_window() -> None:
    a = account(1000, Clock())
    lb.reserve([a], call(max_tokens=500), cap=True, upstream="u", policy="p").settle(600)
    a.rebudget(llmpolicy.Budget(2000, "1h", 3600, "pod"))
    assert a.spent == 600 and a.left() == 1400
