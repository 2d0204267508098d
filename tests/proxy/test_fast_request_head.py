"""The fast path's upstream request head is byte for byte the coroutine path's."""

from __future__ import annotations

from typing import Any

import pytest

from sidekey.proxy import headers, paths, upstreamheads
from tests.proxy.fakes import SECRETS, ProxyFactory, agent_request, bearer_upstream, policy

AUTHS: list[dict[str, Any]] = [
    {"type": "bearer", "secretRef": {"name": "keys", "key": "openai"}},
    {"type": "query", "secretRef": {"name": "keys", "key": "openai"}, "query": {"param": "key"}},
    {"type": "header", "secretRef": {"name": "keys", "key": "openai"}, "header": {"name": "X-Api-Key"}},
]


@pytest.mark.parametrize("auth", AUTHS, ids=["bearer", "query", "header"])
@pytest.mark.parametrize(("method", "target", "body"), [
    ("GET", "/openai/v1/models", b""),
    ("POST", "/openai/v1/chat?key=mine&x=1", b'{"a":1}'),
    ("POST", "/openai", b""),
    ("HEAD", "/openai/x/", b""),
])
async def test_the_head_is_the_slow_paths(
    make_proxy: ProxyFactory, auth: dict[str, Any], method: str, target: str, body: bytes
) -> None:
    p = await make_proxy(policy(bearer_upstream("http://127.0.0.1:8443", auth=auth)), secrets=SECRETS)
    route = p.routes.table["openai"]
    cred = route.credential
    assert cred is not None
    agent_headers = [("Host", "x"), ("Authorization", "Bearer t"), ("Accept", "*/*"), ("X-Keep", "1"),
                     ("Connection", "X-Keep")]
    request, _, _ = agent_request(method, target, agent_headers, "X-Keep")
    parsed = paths.parse(target)
    lines = headers.forward(agent_headers, "X-Keep", route.strip) + list(cred.headers)
    slow = upstreamheads.request_head(method, route, parsed, lines, body, len(body))
    for _ in range(2):  # built, then from the kept parts
        assert p.proxy.heads.build(p.routes.table, request, route, cred, parsed, body) == slow
    assert b"Bearer t" not in slow and b"X-Keep" not in slow
