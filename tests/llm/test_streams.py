"""Usage from JSON replies and SSE streams, the added usage chunk removed, and the cut (proxy/llmstreams.py)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sidekey.proxy import llmrequests, llmstreams


def sse(doc: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n"


def chunk(text: str) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


USAGE_CHUNK = {"object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 12, "completion_tokens": 3,
                         "prompt_tokens_details": {"cached_tokens": 4}}}


def call(api: str = "openai", **fields: Any) -> llmrequests.Call:
    where: llmrequests.Endpoint = "messages" if api == "anthropic" else "chat"
    raw = json.dumps({"model": "m", "messages": [], "stream": True, **fields}).encode()
    return llmrequests.read(api, where, raw)  # type: ignore[arg-type]


def meter(c: llmrequests.Call, api: str = "openai", room: int = 10**9) -> llmstreams.StreamMeter:
    left = [room]

    def more(n: int) -> bool:
        if left[0] < n:
            return False
        left[0] -= n
        return True

    return llmstreams.StreamMeter(api, c, more=more, message=lambda: "budget spent")  # type: ignore[arg-type]


def test_openai_json_usage_is_split_into_input_cached_and_output() -> None:
    raw = json.dumps({"usage": USAGE_CHUNK["usage"]}).encode()
    assert llmstreams.usage_from_json("openai", raw) == llmstreams.Usage(input=8, output=3, cached=4)


def test_responses_and_anthropic_json_usage() -> None:
    responses = {"usage": {"input_tokens": 10, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}}}
    assert llmstreams.usage_from_json("openai", json.dumps(responses).encode()) == llmstreams.Usage(9, 2, 1)
    anthropic = {"usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 3,
                           "cache_creation_input_tokens": 2}}
    got = llmstreams.usage_from_json("anthropic", json.dumps(anthropic).encode())
    assert got == llmstreams.Usage(5, 7, 5) and got.total == 17


def test_the_usage_chunk_the_sidecar_asked_for_is_removed_and_read() -> None:
    c = call()
    assert c.added_usage
    m = meter(c)
    stream = sse(chunk("hel")) + sse(chunk("lo")) + sse(USAGE_CHUNK) + sse(b"[DONE]")
    out = m.feed(stream[:25]) + m.feed(stream[25:]) + m.flush()
    assert out == sse(chunk("hel")) + sse(chunk("lo")) + sse(b"[DONE]")
    assert m.usage == llmstreams.Usage(8, 3, 4)
    assert m.counted == 5


def test_an_agent_that_asked_for_usage_keeps_its_chunk() -> None:
    m = meter(call(stream_options={"include_usage": True}))
    stream = sse(chunk("a")) + sse(USAGE_CHUNK) + sse(b"[DONE]")
    assert m.feed(stream) == stream and m.usage is not None


def test_events_split_across_reads_and_crlf_separators_pass_whole() -> None:
    m = meter(call())
    event = b"data: " + json.dumps(chunk("x")).encode() + b"\r\n\r\n"
    assert m.feed(event[:10]) == b""
    assert m.feed(event[10:]) == event


def test_anthropic_usage_comes_from_message_start_and_message_delta() -> None:
    m = meter(call("anthropic", max_tokens=50), "anthropic")
    stream = (sse({"type": "message_start", "message": {"usage": {"input_tokens": 20, "output_tokens": 1,
                                                                   "cache_read_input_tokens": 6}}}, "message_start")
              + sse({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hello"}},
                    "content_block_delta")
              + sse({"type": "message_delta", "usage": {"output_tokens": 9}}, "message_delta"))
    assert m.feed(stream) == stream
    assert m.usage == llmstreams.Usage(input=20, output=9, cached=6)
    assert m.counted == 0  # bounded by max_tokens: paid by the reservation, its deltas are not read


def test_an_unbounded_anthropic_stream_counts_its_output_as_it_arrives() -> None:
    c = call("anthropic")
    c.max_output = None
    m = meter(c, "anthropic")
    m.feed(sse({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "héllo"}},
               "content_block_delta"))
    assert m.counted == 6  # UTF-8 bytes: no token is shorter than one


def test_responses_stream_usage_comes_from_response_completed() -> None:
    c = llmrequests.read("openai", "responses", b'{"model": "m", "input": "x", "stream": true}')
    m = meter(c)
    stream = (sse({"type": "response.output_text.delta", "delta": "abc"}, "response.output_text.delta")
              + sse({"type": "response.completed", "response": {"usage": {"input_tokens": 4, "output_tokens": 3}}},
                    "response.completed"))
    assert m.feed(stream) == stream
    assert m.usage == llmstreams.Usage(4, 3, 0) and m.counted == 3


def test_an_unbounded_openai_stream_is_cut_at_the_budget_with_an_error_event_then_done() -> None:
    m = meter(call(), room=6)
    first = m.feed(sse(chunk("abcd")))
    assert first == sse(chunk("abcd")) and not m.cut
    tail = m.feed(sse(chunk("efgh")) + sse(chunk("never")))
    assert m.cut
    events = [e for e in tail.split(b"\n\n") if e]
    assert json.loads(events[0][len(b"data: "):])["error"]["code"] == "budget_exceeded"
    assert events[1] == b"data: [DONE]"
    assert m.feed(sse(chunk("later"))) == b""


def test_an_unbounded_anthropic_stream_is_cut_with_an_error_event() -> None:
    c = call("anthropic")
    c.max_output = None
    m = meter(c, "anthropic", room=2)
    out = m.feed(sse({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hello"}},
                     "content_block_delta"))
    assert m.cut
    assert out.startswith(b"event: error\ndata: ")
    assert json.loads(out.split(b"data: ", 1)[1])["error"]["message"] == "budget spent"


def test_a_bounded_stream_is_never_cut_the_upstream_stops_at_max_tokens() -> None:
    m = meter(call(max_tokens=2), room=0)
    assert m.feed(sse(chunk("a long delta"))) == sse(chunk("a long delta")) and not m.cut


def test_what_is_not_sse_json_passes_unread() -> None:
    m = meter(call())
    junk = b": comment\n\n" + b"data: {not json\n\n" + b"event: ping\n\n"
    assert m.feed(junk) == junk and m.usage is None


def test_a_reply_whose_text_says_usage_is_not_read_as_usage() -> None:
    raw = json.dumps({"usage": {"prompt_tokens": 10, "completion_tokens": 5},
                      "choices": [{"message": {"content": "usage"}}], "x": {"prompt_tokens": 1}}).encode()
    assert llmstreams.usage_from_json("openai", raw) == llmstreams.Usage(10, 5, 0)
    assert llmstreams.usage_from_json("openai", b'{"usage" : {"prompt_tokens": 3}}') == llmstreams.Usage(3, 0, 0)


def test_a_bounded_openai_stream_reads_only_the_event_with_the_usage() -> None:
    m = meter(call(max_tokens=100))
    with_null = {**chunk("hi"), "usage": None}
    stream = sse(with_null) + sse(USAGE_CHUNK) + sse(b"[DONE]")
    assert m.feed(stream) == sse(with_null) + sse(b"[DONE]")  # the added usage chunk still goes
    assert m.usage == llmstreams.Usage(8, 3, 4) and m.counted == 0

_STREAM = (sse(chunk("hel")) + sse(chunk("lo wörld")) + b": keep-alive\n\n" + sse(USAGE_CHUNK)
           + sse(b"[DONE]")).replace(b"\n\n", b"\r\n\r\n", 1)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(_STREAM)), max_size=12))
def test_however_the_stream_is_cut_into_reads_the_agent_gets_the_same_bytes_and_the_usage(cuts: list[int]) -> None:
    whole = meter(call())
    expected = whole.feed(_STREAM) + whole.flush()
    m = meter(call())
    out, last = b"", 0
    for cut in sorted(cuts):
        out += m.feed(_STREAM[last:cut])
        last = cut
    out += m.feed(_STREAM[last:]) + m.flush()
    assert out == expected
    assert m.usage == whole.usage == llmstreams.Usage(8, 3, 4)
    assert m.counted == whole.counted
