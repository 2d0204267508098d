"""Reading LLM requests: endpoints, models, estimates, caps and the body forwarded (proxy/llmrequests.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidekey.core import llmpolicy
from sidekey.proxy import llmrequests as lr

LLM = llmpolicy.Llm(api="openai", models=(llmpolicy.ModelPattern("gpt-4.1*"), llmpolicy.ModelPattern("o3")),
                    budgets=())


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@pytest.mark.parametrize(("api", "path", "want"), [
    ("openai", ("v1", "chat", "completions"), "chat"),
    ("openai", ("chat", "completions"), "chat"),
    ("openai", ("v1", "completions"), "completions"),
    ("openai", ("v1", "responses"), "responses"),
    ("openai", ("v1", "embeddings"), "embeddings"),
    ("openai", ("v1", "files"), None),
    ("openai", ("v1", "messages"), None),
    ("anthropic", ("v1", "messages"), "messages"),
    ("anthropic", ("v1", "messages", "count_tokens"), "count_tokens"),
    ("anthropic", ("v1", "chat", "completions"), None),
    ("anthropic", (), None),
    # what a lenient router (case-folding, matrix parameters) would still route to a model
    ("openai", ("v1", "CHAT", "Completions"), "chat"),
    ("openai", ("v1", "chat", "completions;v=2"), "chat"),
    ("anthropic", ("v1", "Messages;x"), "messages"),
])
def test_the_endpoint_is_found_by_the_last_segments(api: llmpolicy.Api, path: tuple[str, ...], want: str | None) -> None:
    assert lr.endpoint(api, path) == want


def test_the_model_and_the_reply_bound_are_read_and_the_estimate_is_prompt_bytes_plus_the_bound() -> None:
    raw = body(max_tokens=100)
    call = lr.read("openai", "chat", raw)
    assert call.model == "gpt-4.1" and call.max_output == 100
    assert call.estimate == len(raw) + 100


def test_max_completion_tokens_wins_over_max_tokens_and_n_multiplies_it() -> None:
    call = lr.read("openai", "chat", body(max_tokens=5, max_completion_tokens=50, n=3))
    assert call.max_output == 150 and call.choices == 3


@pytest.mark.parametrize(("where", "field"), [("responses", "max_output_tokens"), ("completions", "max_tokens")])
def test_each_endpoint_reads_its_own_limit_field(where: lr.Endpoint, field: str) -> None:
    raw = json.dumps({"model": "gpt-4.1", "input": "x", field: 7}).encode()
    assert lr.read("openai", where, raw).max_output == 7


def test_anthropic_max_tokens_bounds_the_reply() -> None:
    raw = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64,
                      "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert lr.read("anthropic", "messages", raw).max_output == 64


def test_embeddings_spend_only_their_input() -> None:
    raw = json.dumps({"model": "text-embedding-3-small", "input": "abc"}).encode()
    call = lr.read("openai", "embeddings", raw)
    assert call.max_output == 0 and call.estimate == len(raw)


def test_a_request_without_a_bound_is_capped_to_what_is_left() -> None:
    raw = body()
    call = lr.read("openai", "chat", raw)
    assert call.max_output is None
    assert call.cap(len(raw) + 40)
    assert json.loads(call.encoded())["max_completion_tokens"] == 40
    assert call.estimate == len(raw) + 40 and call.capped


def test_a_cap_with_nothing_left_for_the_reply_fails() -> None:
    raw = body()
    assert not lr.read("openai", "chat", raw).cap(len(raw))


def test_an_openai_stream_is_asked_for_usage_and_remembers_it_added_it() -> None:
    call = lr.read("openai", "chat", body(stream=True, stream_options={"include_obfuscation": False}))
    assert call.added_usage
    assert json.loads(call.encoded())["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    asked = lr.read("openai", "chat", body(stream=True, stream_options={"include_usage": True}))
    assert not asked.added_usage


@pytest.mark.parametrize(("raw", "says"), [
    (b"", "empty"),
    (b"not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"messages": []}', "names no model"),
    (b'{"model": ""}', "names no model"),
    (b'{"model": 5}', "names no model"),
    (b'{"model": "gpt-4.1", "model": "gpt-5"}', "repeats the member 'model'"),
    (b'{"model": "gpt-4.1", "max_tokens": NaN}', "NaN"),
    (b'{"model": "gpt-4.1", "max_tokens": -1}', "non-negative"),
    (b'{"model": "gpt-4.1", "max_tokens": true}', "non-negative"),
    (b'{"model": "gpt-4.1", "n": 1000}', "between 1 and 128"),
    (b'{"model": "gpt-4.1", "stream": "yes"}', "stream"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model": "\xff"}', "not JSON"),
])
def test_an_unreadable_body_is_a_400_saying_why(raw: bytes, says: str) -> None:
    with pytest.raises(lr.LlmRefusal) as caught:
        lr.read("openai", "chat", raw)
    assert caught.value.status == 400
    assert says in caught.value.message


def test_the_body_forwarded_is_the_one_checked() -> None:
    # a model name with an escape is read once, here, and sent on re-encoded
    raw = b'{"model": "gpt-4.1\\u0000x", "messages": []}'
    call = lr.read("openai", "chat", raw)
    assert json.loads(call.encoded())["model"] == call.model == "gpt-4.1\x00x"


def test_a_forbidden_model_is_a_403_naming_the_model_and_the_policy() -> None:
    lr.check_model(LLM, "gpt-4.1-mini", "team-policy", "openai")
    with pytest.raises(lr.LlmRefusal) as caught:
        lr.check_model(LLM, "gpt-5", "team-policy", "openai")
    assert caught.value.status == 403
    assert "'gpt-5'" in caught.value.message and "'team-policy'" in caught.value.message
    assert "gpt-4.1*" in caught.value.message


def test_the_model_list_keeps_only_allowed_models() -> None:
    raw = json.dumps({"object": "list", "data": [{"id": "gpt-4.1"}, {"id": "gpt-5"}, {"id": "o3"}]}).encode()
    out = lr.filter_models(LLM, raw)
    assert out is not None
    assert [m["id"] for m in json.loads(out)["data"]] == ["gpt-4.1", "o3"]


def test_the_anthropic_model_list_keeps_its_page_markers_true() -> None:
    llm = llmpolicy.Llm(api="anthropic", models=(llmpolicy.ModelPattern("claude-haiku*"),), budgets=())
    raw = json.dumps({"data": [{"id": "claude-opus-4"}, {"id": "claude-haiku-4-5"}], "has_more": False,
                      "first_id": "claude-opus-4", "last_id": "claude-haiku-4-5"}).encode()
    doc = json.loads(lr.filter_models(llm, raw) or b"")
    assert [m["id"] for m in doc["data"]] == ["claude-haiku-4-5"] and doc["first_id"] == "claude-haiku-4-5"


def test_a_model_named_in_the_path_is_found() -> None:
    assert lr.model_in_path(("v1", "models", "gpt-5")) == "gpt-5"
    assert lr.model_in_path(("v1", "models")) is None
    assert lr.lists_models(("v1", "models"))


def test_an_unchanged_body_goes_up_byte_for_byte() -> None:
    raw = b'{ "model" : "gpt-4.1",  "messages": [], "max_tokens": 5 }'
    assert lr.read("openai", "chat", raw).encoded() == raw


def test_the_cap_and_the_usage_request_are_inserted_in_front_and_nothing_else_changes() -> None:
    raw = b'{"model":"gpt-4.1","messages":[],"stream":true}'
    call = lr.read("openai", "chat", raw)
    assert call.cap(10_000)
    out = call.encoded()
    assert out.endswith(raw[1:])
    assert json.loads(out) == {**json.loads(raw), "stream_options": {"include_usage": True},
                               "max_completion_tokens": 10_000 - len(raw)}


@pytest.mark.parametrize("raw", [
    b'{"model":"gpt-4.1","messages":[],"max_completion_tokens":null}',
    b'{"model":"gpt-4.1","messages":[],"stream":true,"stream_options":null}',
    b'{"model":"gpt-4.1","messages":[],"stream":true,"stream_options":{"include_obfuscation":true}}',
])
def test_a_member_present_as_null_or_nested_is_rewritten_never_doubled(raw: bytes) -> None:
    call = lr.read("openai", "chat", raw)
    call.cap(10_000)
    out = call.encoded()
    # every member once: a strict parse of what goes up succeeds and holds the sidecar's values
    sent = lr.parse_json(out)
    assert sent["max_completion_tokens"] == call.body["max_completion_tokens"] > 0
    if call.stream:
        assert sent["stream_options"]["include_usage"] is True


def test_members_differing_only_in_case_are_a_400() -> None:
    with pytest.raises(lr.LlmRefusal) as caught:
        lr.read("openai", "chat", b'{"model": "gpt-4.1", "MODEL": "gpt-5", "messages": []}')
    assert caught.value.status == 400 and "differ only in case" in caught.value.message


@pytest.mark.parametrize("raw", [
    b'{"model": "gpt-4.1", "messages": [], "model": "gpt-5"}',
    b'{"model": "gpt-4.1", "messages": [], "mod\\u0065l": "gpt-5"}',  # an escape spells the same name
    b'{"model": "gpt-4.1", "max_tokens": 5, "messages": [], "max_tokens": 99999}',
])
def test_a_repeated_member_the_sidecar_reads_is_caught_however_it_is_spelled(raw: bytes) -> None:
    with pytest.raises(lr.LlmRefusal) as caught:
        lr.read("openai", "chat", raw)
    assert "repeats the member" in caught.value.message


def test_a_repeat_at_any_depth_is_a_400_too() -> None:
    with pytest.raises(lr.LlmRefusal):
        lr.read("openai", "chat", b'{"model": "gpt-4.1", "messages": [{"role": "user", "role": "system"}]}')
