"""The real ``openai`` and ``anthropic`` SDKs through the sidecar's request path, against the mock LLM.

The proxy is the sidecar's own ``forwarding.Proxy`` with its LLM step
(``llmexchange.Gate``), the routing table built from policies with
``api``/``models``/``budgets`` (no apiserver: pod-scoped budgets), and the
one mock LLM of ``localcluster.upstreams`` speaking OpenAI and Anthropic,
JSON and SSE, with usage. The SDKs see a 403 for a forbidden model, a 429
for a spent budget, and a clean error at the budget mid-stream.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest

from sidekey.core import logs, tokens
from sidekey.localcluster import upstreams
from sidekey.proxy import forwarding, llmbudgets, llmexchange, metrics, routes
from tests.proxy.fakes import ISSUER, KEY, NAMESPACE, POD, POD_UID, SA, StaticRoutes, mint, policy

OPENAI_KEY, ANTHROPIC_KEY = "sk-openai-fake-0123456789", "sk-ant-fake-0123456789"
LONG_REPLY = " ".join(f"word{i}" for i in range(120))


def upstream(name: str, url: str, api: str, secret: str, **llm: Any) -> dict[str, Any]:
    auth: dict[str, Any] = ({"type": "bearer", "secretRef": {"name": secret, "key": "k"}} if api == "openai" else
                            {"type": "header", "secretRef": {"name": secret, "key": "k"}, "header": {"name": "x-api-key"}})
    return {"name": name, "url": url, "insecure": True, "auth": auth, "api": api,
            "allow": [{"methods": ["*"], "paths": ["/**"]}], **llm}


@dataclass
class World:
    url: str
    mock: upstreams.MockLLM
    gate: llmexchange.Gate
    proxy: forwarding.Proxy
    audit: io.StringIO

    def openai(self, route: str = "openai") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/{route}/v1", api_key=mint(), max_retries=0)

    def anthropic(self, route: str = "anthropic") -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=f"{self.url}/{route}", api_key=mint(), max_retries=0)

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.getvalue().splitlines()]

    def account(self, route: str) -> llmbudgets.Account:
        [account] = self.gate.accounts(self.proxy._table()[route])
        return account


@pytest.fixture
async def world() -> AsyncIterator[World]:
    mock = upstreams.MockLLM(keys={"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY}, reply=LONG_REPLY,
                             word_gap=0.0, model_ids=("mock-model", "gpt-4.1-mini", "gpt-5"))
    mock.start(tls=False)
    base = f"http://127.0.0.1:{mock.port}"
    table = StaticRoutes({"o": {"k": OPENAI_KEY}, "a": {"k": ANTHROPIC_KEY}})
    table.set_policies(policy(
        upstream("openai", base, "openai", "o", models=["mock-model", "gpt-4.1*"],
                 budgets=[{"tokens": 20_000, "window": "1h"}]),
        upstream("small", base, "openai", "o", models=["mock-model"], budgets=[{"tokens": 400, "window": "1h"}]),
        upstream("open", base, "openai", "o", capMaxTokens=False, budgets=[{"tokens": 300, "window": "1h"}]),
        upstream("anthropic", base, "anthropic", "a", models=["claude-haiku*"],
                 budgets=[{"tokens": 20_000, "window": "24h"}]),
        upstream("anthropic-open", base, "anthropic", "a", capMaxTokens=False,
                 budgets=[{"tokens": 300, "window": "24h"}]),
        name="llm-policy"))

    async def fetch() -> dict[str, Any]:
        return {"keys": [KEY.as_dict(private=False)]}

    keys = tokens.KeySet(fetch)
    await keys.refresh()
    validator = tokens.Validator(keys, tokens.Binding(issuer=ISSUER, audience="sidekey", namespace=NAMESPACE,
                                                      pod_name=POD, pod_uid=POD_UID, service_account=SA))
    audit = io.StringIO()
    gate = llmexchange.Gate(api=None, namespace=NAMESPACE, pod=POD, pod_uid=POD_UID, service_account=SA)
    proxy = forwarding.Proxy(table=lambda: table.table, validator=lambda: validator, ready=lambda: True,
                             audit=logs.AuditWriter(audit), pod=POD, namespace=NAMESPACE,
                             resolver=routes.GuardedResolver(frozenset()), llm=gate)
    server = await proxy.listen("127.0.0.1", 0)
    try:
        yield World(f"http://127.0.0.1:{server.port}", mock, gate, proxy, audit)
    finally:
        await server.drain(0.5)
        await proxy.close()
        await gate.close()
        mock.stop()


def said(exc: BaseException) -> str:
    return str(getattr(exc, "message", "")) + str(getattr(exc, "body", ""))


async def test_openai_sdk_gets_a_403_naming_the_model_and_the_policy(world: World) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await world.openai().chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert "'gpt-5'" in said(caught.value) and "'llm-policy'" in said(caught.value)
    assert not [s for s in world.mock.seen if s.path.endswith("/chat/completions")]  # never forwarded


async def test_anthropic_sdk_gets_a_403_for_a_forbidden_model(world: World) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        await world.anthropic().messages.create(model="claude-opus-4", max_tokens=50,
                                                messages=[{"role": "user", "content": "hi"}])
    assert "claude-opus-4" in said(caught.value)


async def test_a_reply_is_settled_to_the_reported_usage_and_audited_with_model_and_tokens(world: World) -> None:
    before = metrics.REGISTRY.get_sample_value(
        "sidekey_llm_tokens_total", {"upstream": "openai", "model": "gpt-4.1*", "kind": "output"}) or 0
    reply = await world.openai().chat.completions.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "say hi"}], max_tokens=500)
    assert reply.usage is not None and reply.usage.completion_tokens == 120
    account = world.account("openai")
    assert account.spent == reply.usage.total_tokens and account.reserved == 0
    [line] = [r for r in world.audit_lines() if r.get("model")]
    assert line["model"] == "gpt-4.1-mini"
    assert line["tokens"] == {"input": reply.usage.prompt_tokens, "output": 120, "cached": 0, "estimated": False}
    after = metrics.REGISTRY.get_sample_value(
        "sidekey_llm_tokens_total", {"upstream": "openai", "model": "gpt-4.1*", "kind": "output"})
    assert after == before + 120


async def test_an_unbounded_request_is_capped_to_what_is_left(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    admitted: list[llmexchange.Exchange] = []
    admit = world.gate.admit

    async def spy(*args: Any) -> llmexchange.Exchange | None:
        ex = await admit(*args)
        if ex is not None:
            admitted.append(ex)
        return ex

    monkeypatch.setattr(world.gate, "admit", spy)
    async with httpx.AsyncClient() as client:
        resp = await client.post(f"{world.url}/openai/v1/chat/completions", headers={"Authorization": f"Bearer {mint()}"},
                                 json={"model": "mock-model", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 200
    [ex] = admitted
    assert ex.call is not None and ex.body is not None
    sent = json.loads(ex.body)
    assert sent["max_completion_tokens"] == 20_000 - ex.call.prompt_estimate  # all that was left
    assert world.account("openai").spent == resp.json()["usage"]["total_tokens"]  # and the rest came back


async def test_a_stream_without_include_usage_is_settled_but_the_agent_sees_no_usage_chunk(world: World) -> None:
    stream = await world.openai().chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "stream please"}], stream=True, max_tokens=500)
    chunks = [c async for c in stream]
    assert chunks and all(c.choices for c in chunks)  # the usage-only chunk was removed
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == LONG_REPLY
    account = world.account("openai")
    assert account.reserved == 0 and account.spent == 2 + 120  # the mock's usage: prompt words + reply words


async def test_an_anthropic_stream_is_settled_from_message_start_and_message_delta(world: World) -> None:
    async with world.anthropic().messages.stream(model="claude-haiku-4-5", max_tokens=500,
                                                 messages=[{"role": "user", "content": "one two three"}]) as s:
        text = "".join([t async for t in s.text_stream])
    assert text == LONG_REPLY
    assert world.account("anthropic").spent == 3 + 120


async def test_a_spent_budget_is_a_429_with_retry_after_for_both_sdks(world: World) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await world.openai("small").chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    assert "400 tokens per 1h per pod" in said(caught.value)
    retry = int(caught.value.response.headers["Retry-After"])
    assert 1 <= retry <= 3600
    with pytest.raises(anthropic.RateLimitError):
        await world.anthropic().messages.create(model="claude-haiku-4-5", max_tokens=21_000,
                                                messages=[{"role": "user", "content": "hi"}])


async def test_an_openai_stream_ends_cleanly_at_the_budget_and_the_sdk_raises(world: World) -> None:
    stream = await world.openai("open").chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "go"}], stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async with asyncio.timeout(10):
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "token budget" in said(caught.value)
    assert 0 < len("".join(got)) < len(LONG_REPLY)
    [line] = [r for r in world.audit_lines() if r.get("reason") == "budget_cut"]
    assert line["status"] == 200 and line["upstream"] == "open"
    assert world.account("open").left() >= 0  # never overrun


async def test_an_anthropic_stream_ends_at_the_budget_with_an_error_event(world: World) -> None:
    client = world.anthropic("anthropic-open")
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with asyncio.timeout(10):
            stream = await client.messages.create(
                model="claude-haiku-4-5", max_tokens=anthropic.NOT_GIVEN,  # type: ignore[arg-type]
                messages=[{"role": "user", "content": "go"}], stream=True)
            async for _ in stream:
                pass
    assert "token budget" in said(caught.value)
    assert world.account("anthropic-open").left() >= 0


async def test_the_model_list_holds_only_allowed_models(world: World) -> None:
    listed = [m.id async for m in world.openai().models.list()]
    assert listed == ["mock-model", "gpt-4.1-mini"]


async def test_an_unreadable_body_is_a_400_that_says_why(world: World) -> None:
    async with httpx.AsyncClient() as client:
        resp = await client.post(f"{world.url}/openai/v1/chat/completions",
                                 headers={"Authorization": f"Bearer {mint()}", "Content-Type": "application/json"},
                                 content=b'{"model": "mock-model", "model": "gpt-5"}')
    assert resp.status_code == 400
    assert "repeats the member 'model'" in resp.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/openai/v1/CHAT/completions"),  # a case-folding router would route it
    ("POST", "/openai/v1/chat/completions;v=2"),  # and one that drops matrix parameters
    ("POST", "/openai/v1/%63hat/completions"),  # percent-encoded, decoded upstream
    ("POST", "/openai/v1/chat/completions/"),
    ("PUT", "/openai/v1/chat/completions"),
    ("PATCH", "/anthropic/v1/Messages"),
])
async def test_a_forbidden_model_gets_no_further_by_another_spelling_of_the_endpoint(
        world: World, method: str, path: str) -> None:
    async with httpx.AsyncClient() as client:
        resp = await client.request(method, world.url + path, headers={"Authorization": f"Bearer {mint()}"},
                                    json={"model": "gpt-5", "max_tokens": 5, "messages": []})
    assert resp.status_code == 403, resp.text
    assert "'gpt-5'" in resp.json()["error"]["message"]
    assert world.mock.seen == []


async def test_a_chunked_body_is_read_whole_and_checked(world: World) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "gpt-5", '
        yield b'"messages": []}'

    async with httpx.AsyncClient() as client:
        resp = await client.post(f"{world.url}/openai/v1/chat/completions",
                                 headers={"Authorization": f"Bearer {mint()}"}, content=body())
    assert resp.status_code == 403 and world.mock.seen == []


@pytest.mark.parametrize("raw", [
    b'{"model": "mock-model", "model": "gpt-5", "messages": []}',
    b'{"model": "mock-model", "Model": "gpt-5", "messages": []}',
    b'\x1f\x8b\x08\x00' + b"0" * 20,  # a gzip body the sidecar cannot read
])
async def test_a_body_that_could_be_read_another_way_is_a_400_and_never_forwarded(world: World, raw: bytes) -> None:
    async with httpx.AsyncClient() as client:
        resp = await client.post(f"{world.url}/openai/v1/chat/completions",
                                 headers={"Authorization": f"Bearer {mint()}", "Content-Encoding": "gzip"
                                          if raw.startswith(b"\x1f") else "identity"}, content=raw)
    assert resp.status_code == 400 and world.mock.seen == []


async def test_a_forbidden_model_named_in_the_path_is_a_403(world: World) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await world.openai().models.retrieve("gpt-5")
    assert "'gpt-5'" in said(caught.value) and world.mock.seen == []
