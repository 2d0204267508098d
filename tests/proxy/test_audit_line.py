"""The audit line encoded without the generic JSON encoder parses to the same record."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidekey.proxy import audit, paths

PLAIN: dict[str, Any] = {
    "request_id": "a1b2c3d4-7", "pod": "agent-0", "namespace": "team", "service_account": "agent",
    "upstream": "openai", "method": "POST", "path": "/openai/v1/chat?key=REDACTED", "decision": "allowed",
    "reason": "ok", "bytes_in": 120, "bytes_out": 160, "status": 200, "duration_ms": 0.123,
    "time": "2026-12-01T22:00:00.123Z",
}


@pytest.mark.parametrize("change", [
    {},
    {"streamed": True},
    {"service_account": None, "upstream": None},
    {"path": '/a"b\\c\u00e9\u2028\n'},  # escapes and non-ASCII, as json.dumps writes them
    {"duration_ms": 1e-05, "bytes_out": 0},
])
def test_the_line_parses_to_the_record_and_is_ascii_on_one_line(change: dict[str, Any]) -> None:
    record = {**PLAIN, **change}
    line = audit.LineEncoder("agent-0", "team").encode(record)  # type: ignore[arg-type]
    assert line is not None and line.endswith("\n") and line.count("\n") == 1 and line.isascii()
    assert json.loads(line) == record


@pytest.mark.parametrize("change", [
    {"model": "gpt-4o"},  # another shape: the writer's json encodes it
    {"streamed": False},
    {"bytes_in": True},
    {"pod": "other"},
])
def test_any_other_record_is_left_to_json(change: dict[str, Any]) -> None:
    record = {**PLAIN, **change}
    assert audit.LineEncoder("agent-0", "team").encode(record) is None  # type: ignore[arg-type]


def test_a_parsed_target_is_reused_and_a_refused_one_stays_refused() -> None:
    first = paths.parse("/openai/v1/chat/completions?x=1")
    assert paths.parse("/openai/v1/chat/completions?x=1") is first
    assert first.segments == ("v1", "chat", "completions")
    for _ in range(2):
        with pytest.raises(paths.PathError):
            paths.parse("/openai/../admin")


@pytest.mark.parametrize("ms", [0.0, 0.5, 0.123, 12.0, 1999.999, 0.001, 123456.789, 1e-05, 0.0005, 3.0000001,
                                2.5e13, 1 / 3])
def test_a_duration_is_written_as_text_that_parses_back_to_it(ms: float) -> None:
    text = audit.milliseconds(ms)
    assert json.loads(text) == ms
    if round(ms, 3) == ms and ms < 1e12:  # three decimals: the integer text, no exponent
        assert "e" not in text and len(text.partition(".")[2]) == 3


def test_every_rounded_duration_takes_the_integer_text() -> None:
    for n in range(0, 3_000_000, 997):
        ms = round(n / 1000, 3)
        assert audit.milliseconds(ms) == f"{n // 1000}.{n % 1000:03d}"
        assert json.loads(audit.milliseconds(ms)) == ms


def test_a_duration_in_milliseconds_equals_round_to_three_places_and_takes_the_integer_text() -> None:
    for micros in [*range(0, 3_000_000, 997), 10**12 + 7]:
        for nudge in (-2e-10, 0.0, 2e-10):  # a clock's difference is never an exact decimal
            seconds = max(0.0, micros / 1e6 + nudge)
            ms = audit.duration_ms(seconds)
            assert ms == round(seconds * 1000, 3), seconds
            assert json.loads(audit.milliseconds(ms)) == ms
