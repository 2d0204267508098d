"""The shared mock LLM speaks to the real SDKs, checks the key and records without it."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from sidekey.localcluster import upstreams

KEY = "sk-mock-0123456789"


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[upstreams.MockLLM]:
    record = tmp_path_factory.mktemp("mock") / "seen.jsonl"
    with upstreams.MockLLM({"current": KEY}, record_file=record, reply="hello from upstream", word_gap=0) as m:
        yield m


def _http(mock: upstreams.MockLLM) -> httpx2.Client:
    return httpx2.Client(verify=ssl.create_default_context(cadata=mock.ca_pem))


def test_openai_chat_answers_as_json_and_as_a_stream_with_usage(mock: upstreams.MockLLM) -> None:
    with openai.OpenAI(base_url=mock.url, api_key=KEY, http_client=_http(mock), max_retries=0) as client:
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "say hi"}])
        assert reply.choices[0].message.content == "hello from upstream"
        assert reply.usage is not None and reply.usage.total_tokens == 2 + 3
        chunks = list(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "say hi"}], stream=True,
            stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello from upstream"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        assert [m.id for m in client.models.list()] == ["mock-model"]
    assert all(s.key == "current" and not s.caller_token_seen for s in mock.seen[-3:])


def test_anthropic_messages_answer_as_json_and_as_a_stream_with_usage(mock: upstreams.MockLLM) -> None:
    with anthropic.Anthropic(base_url=mock.url.removesuffix("/v1"), api_key=KEY, http_client=_http(mock),
                             max_retries=0) as client:
        msg = client.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        assert msg.content[0].text == "hello from upstream"  # type: ignore[union-attr]
        assert msg.usage.output_tokens == 3
        with client.messages.stream(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as s:
            assert "".join(s.text_stream) == "hello from upstream"
            assert s.get_final_message().usage.output_tokens == 3


def test_a_wrong_key_is_refused_and_recorded_by_name_never_by_value(mock: upstreams.MockLLM) -> None:
    with openai.OpenAI(base_url=mock.url, api_key="sk-wrong", http_client=_http(mock), max_retries=0) as client, \
            pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert mock.seen[-1].key == upstreams.UNKNOWN_KEY and not mock.seen[-1].key_ok
    assert mock.record_file is not None
    text = Path(mock.record_file).read_text()
    assert KEY not in text and "sk-wrong" not in text
    assert json.loads(text.splitlines()[-1])["key"] == upstreams.UNKNOWN_KEY
