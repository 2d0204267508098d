"""The proxy against a local upstream that records what it received."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidekey.core import certificates
from sidekey.proxy import forwarding
from tests.proxy.fakes import (
    SECRET,
    SECRETS,
    ProxyFactory,
    Running,
    Upstream,
    bearer_upstream,
    mint,
    policy,
)


async def call(
    url: str, method: str = "GET", token: str | None = None, header: str = "Authorization", **kw: Any
) -> tuple[int, dict[str, str], bytes]:
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers[header] = f"Bearer {token}" if header == "Authorization" else token
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.request(method, url, headers=headers, allow_redirects=False, **kw) as r,
    ):
        return r.status, dict(r.headers), await r.read()


# --- the key goes up, the caller's token does not ------------------------------------------


async def test_the_key_is_attached_and_the_callers_token_is_not_forwarded(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    token = mint()
    status, _, body = await call(
        f"{p.url}/openai/v1/chat/completions?x=1",
        "POST",
        token,
        json={"model": "m"},
        headers={
            "X-Api-Key": token,
            "api-key": token,
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "X-Keep": "2",
        },
    )
    assert status == 200, body
    got = upstream.last
    assert got.raw_path == "/base/v1/chat/completions?x=1"
    assert got.headers["Authorization"] == f"Bearer {SECRET}"
    assert token not in str(got.headers)
    assert "X-Hop" not in got.headers and "api-key" not in {k.lower() for k in got.headers}
    assert got.headers["X-Keep"] == "2"
    assert got.headers["Host"] == f"127.0.0.1:{upstream.port}"
    assert b'"model"' in got.body
    assert SECRET.encode() not in body  # the echo of the headers was scrubbed
    line = p.audit_lines()[-1]
    assert line["status"] == 200 and line["decision"] == "allowed" and line["upstream"] == "openai"
    assert token not in p.audit.getvalue() and SECRET not in p.audit.getvalue()


@pytest.mark.parametrize("header", ["Authorization", "x-api-key", "api-key"])
async def test_the_token_is_accepted_where_sdks_put_their_key(
    make_proxy: ProxyFactory, upstream: Upstream, header: str
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    status, _, _ = await call(f"{p.url}/openai/v1/models", token=mint(), header=header)
    assert status == 200


# --- refusals ------------------------------------------------------------------------------


async def test_no_token_is_401_with_a_json_error(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    status, headers, body = await call(f"{p.url}/openai/v1/models")
    assert status == 401
    assert headers["Content-Type"].startswith("application/json")
    assert b'"type": "authentication_error"' in body
    assert upstream.received == []


async def test_another_pods_token_is_401_naming_the_reason(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    status, _, body = await call(f"{p.url}/openai/v1/models", token=mint(pod_uid="other"))
    assert status == 401 and b"this pod" in body
    assert p.audit_lines()[-1]["reason"] == "wrong_pod"


async def test_unknown_upstream_is_404(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    status, _, body = await call(f"{p.url}/anthropic/v1/messages", token=mint())
    assert status == 404 and b"anthropic" in body


async def test_a_call_outside_the_allow_rules_is_403_naming_what_failed(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    up = bearer_upstream(upstream.url, allow=[{"methods": ["POST"], "paths": ["/v1/chat/completions"]}])
    p = await make_proxy(policy(up, name="narrow"), secrets=SECRETS)
    status, _, body = await call(f"{p.url}/openai/v1/files", "DELETE", mint())
    assert status == 403
    assert b"narrow" in body and b"DELETE" in body and b"/v1/files" in body
    status, _, _ = await call(f"{p.url}/openai/v1/chat/completions", "POST", mint(), data=b"{}")
    assert status == 200


@pytest.mark.parametrize(
    "path", ["/openai/v1/../admin", "/openai/v1/%2e%2e/admin", "/openai//admin", "/openai/v1%2fadmin"]
)
async def test_path_tricks_are_400_and_never_reach_the_upstream(
    make_proxy: ProxyFactory, upstream: Upstream, path: str
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    reader, writer = await asyncio.open_connection("127.0.0.1", int(p.url.rsplit(":", 1)[1]))
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mint()}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 400"), data[:100]
    assert upstream.received == []


async def test_an_absolute_form_target_cannot_change_the_host(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    reader, writer = await asyncio.open_connection("127.0.0.1", int(p.url.rsplit(":", 1)[1]))
    writer.write(
        f"GET http://evil.example/openai/v1/models HTTP/1.1\r\nHost: evil.example\r\n"
        f"Authorization: Bearer {mint()}\r\nConnection: close\r\n\r\n".encode()
    )
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 400")
    assert upstream.received == []


async def test_a_body_over_the_limit_is_413(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    p = await make_proxy(
        policy(bearer_upstream(upstream.url, limits={"maxRequestBytes": 1000})), secrets=SECRETS
    )
    status, _, _ = await call(f"{p.url}/openai/x", "POST", mint(), data=b"a" * 1001)
    assert status == 413

    async def chunks() -> Any:
        for _ in range(10):
            yield b"b" * 500

    status, _, _ = await call(f"{p.url}/openai/x", "POST", mint(), data=chunks())
    assert status == 413


async def test_the_rate_limit_answers_429_with_retry_after(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(
        policy(bearer_upstream(upstream.url, limits={"requestsPerMinute": 3})), secrets=SECRETS
    )
    token = mint()
    codes = [(await call(f"{p.url}/openai/x", token=token))[0] for _ in range(3)]
    status, headers, _ = await call(f"{p.url}/openai/x", token=token)
    assert codes == [200, 200, 200]
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert len(upstream.received) == 3


async def test_a_missing_secret_is_503_for_that_upstream_only(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    other = bearer_upstream(
        upstream.url, name="other", auth={"type": "bearer", "secretRef": {"name": "gone", "key": "k"}}
    )
    p = await make_proxy(policy(bearer_upstream(upstream.url), other), secrets=SECRETS)
    status, _, body = await call(f"{p.url}/other/x", token=mint())
    assert status == 503 and b"gone" in body
    assert (await call(f"{p.url}/openai/x", token=mint()))[0] == 200


async def test_a_secret_rotation_applies_to_the_next_request(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(
        policy(bearer_upstream(upstream.url)), secrets={"keys": {"openai": "sk-old-1234567"}}
    )
    await call(f"{p.url}/openai/x", token=mint())
    p.routes.secrets["keys"] = {"openai": "sk-new-7654321"}
    p.routes.rebuild()
    await call(f"{p.url}/openai/x", token=mint())
    assert [r.headers["Authorization"] for r in upstream.received] == [
        "Bearer sk-old-1234567",
        "Bearer sk-new-7654321",
    ]


# --- streaming -----------------------------------------------------------------------------


async def test_sse_arrives_event_by_event(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    arrivals: list[float] = []
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{p.url}/openai/sse", headers={"Authorization": f"Bearer {mint()}"}) as r,
    ):
        assert r.status == 200
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                _, buf = buf.split(b"\n\n", 1)
                arrivals.append(time.monotonic())
    assert len(arrivals) == 6
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # five events 0.2 s apart upstream: spread out on arrival too, not buffered into one
    assert arrivals[-1] - arrivals[0] > 0.6, gaps
    assert sum(g > 0.1 for g in gaps) >= 3, gaps


async def test_large_bodies_stream_both_ways(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    p = await make_proxy(
        policy(bearer_upstream(upstream.url, limits={"maxRequestBytes": 50_000_000})), secrets=SECRETS
    )
    size = 20 * 1024 * 1024
    status, headers, body = await call(
        f"{p.url}/openai/big?size={size}", "PUT", mint(), data=b"u" * (8 * 1024 * 1024)
    )
    assert status == 200
    assert len(body) == size
    assert headers["X-Body-Sha"] == str(8 * 1024 * 1024)
    assert p.audit_lines()[-1]["bytes_out"] == size


async def test_the_upstream_is_asked_for_identity_and_a_compressed_answer_is_decoded_to_scrub_it(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    # A compressed body would hide an echoed key from the scrubber; on loopback
    # compression saves nothing, so the agent gets the body uncompressed.
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    status, headers, body = await call(
        f"{p.url}/openai/gzip", token=mint(), headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200 and "Content-Encoding" not in headers
    assert body.startswith(b"compressed hello")
    assert upstream.last.headers["Accept-Encoding"] == "identity"


async def test_a_streamed_compressed_page_echoing_the_key_is_decoded_and_scrubbed(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    status, headers, body = await call(
        f"{p.url}/openai/gzip-leak", token=mint(), headers={"Accept-Encoding": "gzip"}
    )
    assert status == 500 and "Content-Encoding" not in headers
    assert len(body) > 200_000 and SECRET.encode() not in body


async def test_an_encoding_the_sidecar_cannot_undo_is_a_502(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    status, _, body = await call(f"{p.url}/openai/brotli", token=mint(), headers={"Accept-Encoding": "br"})
    assert status == 502 and b"cannot be checked for the key" in body


async def test_every_content_encoding_header_is_read_so_none_hides_a_compressed_echo(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    # "identity" then "gzip": reading only the first would pass the gzip body through unscrubbed
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    status, headers, body = await call(f"{p.url}/openai/double-encoding", token=mint())
    assert status == 200 and "Content-Encoding" not in headers
    assert body.startswith(b"Bearer ") and SECRET.encode() not in body


async def test_a_compressed_body_that_decodes_past_the_bound_is_refused(
    make_proxy: ProxyFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forwarding._Decoder, "LIMIT", 1_000_000)
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    status, _, body = await call(f"{p.url}/openai/bomb", token=mint())
    assert status == 502 and len(body) < 1_000_000


# --- failures --------------------------------------------------------------------------------


async def test_an_unreachable_upstream_is_502(make_proxy: ProxyFactory) -> None:
    p = await make_proxy(policy(bearer_upstream("http://127.0.0.1:9")), secrets=SECRETS)
    status, _, body = await call(f"{p.url}/openai/x", token=mint())
    assert status == 502 and b"api_error" in body


async def test_a_slow_upstream_is_504(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url, limits={"timeoutSeconds": 1})), secrets=SECRETS)
    started = time.monotonic()
    status, _, body = await call(f"{p.url}/openai/slow?s=3", token=mint())
    assert status == 504 and b"timeoutSeconds" in body
    assert time.monotonic() - started < 2.5


async def test_the_timeout_is_a_read_timeout_not_a_total_one(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    # five events 0.2 s apart take 1 s in all; a 1 s total timeout would cut them
    p = await make_proxy(policy(bearer_upstream(upstream.url, limits={"timeoutSeconds": 1})), secrets=SECRETS)
    status, _, body = await call(f"{p.url}/openai/sse", token=mint())
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")


async def test_a_stream_the_upstream_breaks_is_cut_for_the_agent_too(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    with pytest.raises(aiohttp.ClientPayloadError):
        await call(f"{p.url}/openai/broken", token=mint())


async def test_a_hostname_resolving_to_loopback_is_refused(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    up = bearer_upstream(f"http://localhost:{upstream.port}")
    p = await make_proxy(policy(up), secrets=SECRETS)
    status, _, body = await call(f"{p.url}/openai/x", token=mint())
    assert status == 502 and b"loopback" in body
    assert upstream.received == []


async def test_redirects_are_passed_back_never_followed_and_scrubbed(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    up = bearer_upstream(
        upstream.url,
        auth={"type": "query", "secretRef": {"name": "keys", "key": "openai"}, "query": {"param": "key"}},
    )
    p = await make_proxy(policy(up), secrets=SECRETS)
    status, headers, body = await call(f"{p.url}/openai/redirect?a=1&key=callers", token=mint())
    assert status == 302
    assert len(upstream.received) == 1
    assert upstream.last.raw_path == f"/base/redirect?a=1&key={SECRET}"
    assert SECRET not in headers["Location"] and "key=*" in headers["Location"]
    assert SECRET.encode() not in body


# --- OAuth2 client credentials -------------------------------------------------------------


def oauth_upstream(upstream: Upstream) -> dict[str, Any]:
    return bearer_upstream(
        upstream.url,
        auth={
            "type": "oauth2ClientCredentials",
            "secretRef": {"name": "oauth"},
            "oauth2ClientCredentials": {
                "tokenURL": f"{upstream.url}/oauth/token",
                "clientIdKey": "id",
                "clientSecretKey": "secret",
                "scopes": ["read", "write"],
            },
        },
    )


OAUTH_SECRETS = {"oauth": {"id": "my-client", "secret": "client-secret-123"}}


async def test_oauth2_client_credentials_fetches_caches_and_attaches_a_token(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(oauth_upstream(upstream)), secrets=OAUTH_SECRETS)
    for _ in range(3):
        status, _, body = await call(f"{p.url}/openai/v1/x", token=mint())
        assert status == 200, body
    assert len(upstream.token_requests) == 1
    form = upstream.token_requests[0].body.decode()
    assert "grant_type=client_credentials" in form and "scope=read+write" in form
    assert {r.headers["Authorization"] for r in upstream.received} == {"Bearer access-1-abcdefgh"}
    assert b"client-secret-123" not in body and b"access-1" not in body


async def test_oauth2_tokens_are_refreshed_before_they_expire(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    upstream.oauth_lifetime = 1  # refresh at 80% of a second
    p = await make_proxy(policy(oauth_upstream(upstream)), secrets=OAUTH_SECRETS)
    await call(f"{p.url}/openai/x", token=mint())
    await asyncio.sleep(0.9)
    await call(f"{p.url}/openai/x", token=mint())
    assert [r.headers["Authorization"] for r in upstream.received] == [
        "Bearer access-1-abcdefgh",
        "Bearer access-2-abcdefgh",
    ]


async def test_a_refused_oauth2_client_is_502(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    p = await make_proxy(
        policy(oauth_upstream(upstream)), secrets={"oauth": {"id": "my-client", "secret": "wrong-secret-xyz"}}
    )
    status, _, body = await call(f"{p.url}/openai/x", token=mint())
    assert status == 502 and b"401" in body and b"wrong-secret" not in body
    assert upstream.received == []


# --- scrubbing, per auth type ----------------------------------------------------------------


@pytest.mark.parametrize(
    "auth,secrets,forms",
    [
        (
            {"type": "bearer", "secretRef": {"name": "s", "key": "k"}},
            {"s": {"k": "sk-bearer-abcdef123456"}},
            ["sk-bearer-abcdef123456"],
        ),
        (
            {"type": "header", "secretRef": {"name": "s", "key": "k"}, "header": {"name": "X-Api-Key"}},
            {"s": {"k": "hdr-key/with+chars=="}},
            ["hdr-key/with+chars==", "hdr-key%2Fwith%2Bchars%3D%3D"],
        ),
        (
            {"type": "basic", "secretRef": {"name": "s"}, "basic": {"usernameKey": "u", "passwordKey": "p"}},
            {"s": {"u": "alice", "p": "pa55word-very-secret"}},
            ["pa55word-very-secret", base64.b64encode(b"alice:pa55word-very-secret").decode()],
        ),
        (
            {"type": "query", "secretRef": {"name": "s", "key": "k"}, "query": {"param": "key"}},
            {"s": {"k": "AIzaQueryKey_0123456789"}},
            ["AIzaQueryKey_0123456789"],
        ),
    ],
)
async def test_echoed_credentials_are_scrubbed_from_headers_and_streamed_bodies(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    auth: dict[str, Any],
    secrets: dict[str, dict[str, str]],
    forms: list[str],
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url, auth=auth)), secrets=secrets)
    status, headers, body = await call(f"{p.url}/openai/leak", token=mint())
    assert status == 401
    sent = upstream.last
    # the credential did go up, in its form
    assert any(f in sent.raw_path or f in str(sent.headers) for f in forms)
    everything = body.decode() + str(headers)
    for f in forms:
        assert f not in everything
    for encoded in {base64.b64encode(f.encode()).decode()[:12] for f in forms}:
        assert encoded not in everything
    assert "error: bad credential" in body.decode()


# --- methods without a body ----------------------------------------------------------------


async def test_head_keeps_the_upstreams_content_length(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    status, headers, head_body = await call(f"{p.url}/openai/v1/models", "HEAD", mint())
    assert status == 200 and head_body == b""
    assert upstream.last.method == "HEAD"
    # the echo's JSON body the upstream would send (its length, not zero)
    assert int(headers["Content-Length"]) > 200


async def test_a_client_disconnect_cancels_the_upstream_request(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(call(f"{p.url}/openai/slow?s=1", token=mint()), 0.3)
    await asyncio.sleep(1.2)
    assert upstream.slow_abandoned is True  # the sidecar closed its upstream connection
    line = p.audit_lines()[-1]
    assert line["reason"] == "client_disconnected" and line["status"] == 499


@contextlib.asynccontextmanager
async def private_tls_upstream(tmp_path: Any) -> AsyncIterator[tuple[int, certificates.KeyPair, list[str]]]:
    """An HTTPS upstream on loopback whose certificate a private CA issued: (port, CA, the
    Authorization headers it saw). It answers every GET with "private"."""
    ca = certificates.make_ca("private-ca")
    leaf = certificates.issue(ca, "127.0.0.1", ip_addresses=["127.0.0.1"])
    (tmp_path / "c.pem").write_bytes(leaf.cert_pem)
    (tmp_path / "k.pem").write_bytes(leaf.key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    seen: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.Response(text="private")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1], ca, seen  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_an_upstream_certificate_from_an_unknown_ca_is_502(
    make_proxy: ProxyFactory, tmp_path: Any
) -> None:
    async with private_tls_upstream(tmp_path) as (port, ca, seen):
        up = bearer_upstream(f"https://127.0.0.1:{port}")
        up.pop("insecure")
        p = await make_proxy(policy(up), secrets=SECRETS)
        status, _, body = await call(f"{p.url}/openai/x", token=mint())
        assert status == 502 and b"TLS" in body
        assert seen == []
        up["caBundle"] = ca.cert_pem.decode()
        p = await make_proxy(policy(up), secrets=SECRETS)
        status, _, body = await call(f"{p.url}/openai/x", token=mint())
        assert status == 200 and body == b"private"
        assert seen == [f"Bearer {SECRET}"]


async def test_a_connection_verified_under_one_upstreams_ca_is_never_reused_for_another(
    make_proxy: ProxyFactory, tmp_path: Any
) -> None:
    """The pool keys connections by the TLS context that verified them, not by origin alone:
    an upstream trusting the system store must not ride a connection that another
    upstream's ``caBundle`` verified, though both name the same host and port."""
    async with private_tls_upstream(tmp_path) as (port, ca, _):
        trusting = bearer_upstream(f"https://127.0.0.1:{port}", caBundle=ca.cert_pem.decode())
        trusting.pop("insecure")
        system = bearer_upstream(f"https://127.0.0.1:{port}", name="system")
        system.pop("insecure")
        p = await make_proxy(policy(trusting, system), secrets=SECRETS)
        for _ in range(2):  # the second call is served on the pooled, verified connection
            status, _, body = await call(f"{p.url}/openai/x", token=mint())
            assert status == 200 and body == b"private"
        status, _, body = await call(f"{p.url}/system/x", token=mint())
        assert status == 502 and b"TLS" in body  # verified afresh, against the system store


async def test_expect_100_continue_is_answered_once_the_call_is_allowed(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    reader, writer = await asyncio.open_connection("127.0.0.1", int(p.url.rsplit(":", 1)[1]))
    writer.write(
        f"POST /openai/v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mint()}\r\n"
        "Content-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
    assert first.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    rest = await reader.read()
    writer.close()
    assert rest.startswith(b"HTTP/1.1 200")
    assert upstream.last.body == b"hello" and "Expect" not in upstream.last.headers


# --- streams the agent closes (bugs seen with the openai SDK) ---------------------------------


def _requests_counted(upstream_name: str, code: str) -> float:
    from sidekey.proxy import metrics

    value = metrics.REGISTRY.get_sample_value(
        "sidekey_requests_total", {"upstream": upstream_name, "method": "GET", "code": code, "decision": "allowed"}
    )
    return value or 0.0


async def _first_audit_line(p: Running, within: float = 10.0) -> dict[str, Any]:
    """The proxy's first audit line, polled for: it is written when the sidecar notices the
    agent left, which on a loaded machine can take longer than any fixed sleep."""
    deadline = time.monotonic() + within
    while not p.audit_lines():
        assert time.monotonic() < deadline, f"no audit line within {within} s"
        await asyncio.sleep(0.02)
    return p.audit_lines()[0]


async def _lingering_sse_upstream() -> tuple[web.AppRunner, int]:
    """Sends three events and ``[DONE]``, then keeps the stream open (its last chunk comes late)."""

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f'data: {{"n": {i}}}\n\n'.encode())
        await resp.write(b"data: [DONE]\n\n")
        await asyncio.sleep(2)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", sse)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_a_client_that_closes_after_the_final_event_completed_its_stream(make_proxy: ProxyFactory) -> None:
    runner, port = await _lingering_sse_upstream()
    try:
        p = await make_proxy(policy(bearer_upstream(f"http://127.0.0.1:{port}")), secrets=SECRETS)
        before = _requests_counted("openai", "200")
        reader, writer = await asyncio.open_connection("127.0.0.1", int(p.url.rsplit(":", 1)[1]))
        writer.write(f"GET /openai/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mint()}\r\n\r\n".encode())
        seen = b""
        while b"data: [DONE]\n\n" not in seen:
            seen += await asyncio.wait_for(reader.read(4096), 2)
        writer.close()  # as the openai SDK does once it read [DONE]
        line = await _first_audit_line(p)
        assert (line["status"], line["reason"], line["upstream"]) == (200, "ok", "openai"), line
        assert _requests_counted("openai", "200") == before + 1
    finally:
        await runner.cleanup()


async def test_a_client_that_leaves_mid_request_keeps_the_upstream_label(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    before = _requests_counted("openai", "499")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(call(f"{p.url}/openai/slow?s=1", token=mint()), 0.3)
    line = await _first_audit_line(p)
    assert (line["status"], line["reason"], line["upstream"]) == (499, "client_disconnected", "openai")
    assert _requests_counted("openai", "499") == before + 1
    assert _requests_counted("", "499") == 0


async def test_a_pooled_connection_the_upstream_dropped_is_retried_once_on_a_new_one(
    make_proxy: ProxyFactory,
) -> None:
    # each connection answers its first request and closes on the second without a word:
    # what an upstream's idle timeout looks like when it races the sidecar's next request
    seen: list[int] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                seen.append(served)
                if served:
                    return
                served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        p = await make_proxy(policy(bearer_upstream(f"http://127.0.0.1:{port}")), secrets=SECRETS)
        for _ in range(3):
            status, _, body = await call(f"{p.url}/openai/x", token=mint())
            assert (status, body) == (200, b"ok")
        assert seen.count(1) >= 1, seen  # a reused connection was dropped at least once, and retried
    finally:
        server.close()


async def test_a_pipelined_request_whose_body_comes_later_is_served_in_order(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    p = await make_proxy(policy(bearer_upstream(upstream.url)), secrets=SECRETS)
    reader, writer = await asyncio.open_connection("127.0.0.1", int(p.url.rsplit(":", 1)[1]))
    token = mint()
    writer.write(
        f"GET /openai/slow?s=0.3 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        f"POST /openai/v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 5\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    await asyncio.sleep(0.5)  # the second body arrives while the first is still being answered
    writer.write(b"hello")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    first, _, second = answer.partition(b"late")
    assert first.startswith(b"HTTP/1.1 200") and second.lstrip().startswith(b"HTTP/1.1 200"), answer
    assert upstream.last.body == b"hello"


async def test_an_upstream_that_stops_reading_an_upload_times_out(make_proxy: ProxyFactory) -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head, then never another byte of the body
        await asyncio.sleep(10)
        writer.close()

    server = await asyncio.start_server(stalls, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        up = bearer_upstream(f"http://127.0.0.1:{port}", limits={"timeoutSeconds": 1, "maxRequestBytes": 100_000_000})
        p = await make_proxy(policy(up), secrets=SECRETS)
        reader, writer = await asyncio.open_connection("127.0.0.1", int(p.url.rsplit(":", 1)[1]))
        size = 64 * 1024 * 1024
        writer.write(f"PUT /openai/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mint()}\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())

        async def upload() -> None:
            chunk = b"u" * (1 << 20)
            try:
                for _ in range(size // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
            except ConnectionError:
                pass

        task = asyncio.create_task(upload())
        started = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 504"), head
        assert time.monotonic() - started < 3
        task.cancel()
        writer.close()
    finally:
        server.close()


async def test_the_idle_sweep_runs_only_while_there_are_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """No timer re-armed forever: after a burst its objects would pin the burst's arenas."""
    from sidekey.proxy import listener

    monkeypatch.setattr(listener, "IDLE_SECONDS", 0.25)

    async def handler(request: listener.Request, conn: listener.AgentConnection) -> None:
        listener.Reply(conn, request).whole(200, b"", b"ok")

    server = listener.Listener(handler)
    await server.start("127.0.0.1", 0)
    try:
        assert server._sweep is None  # nothing connected, nothing scheduled
        for _ in range(2):  # and again after it stopped
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"ok"), 3)
            assert server._sweep is not None
            assert await asyncio.wait_for(reader.read(), 2) == b""  # idle: closed by the sweep
            writer.close()
            await asyncio.sleep(0.1)  # the next sweep finds no connection and stops
            assert not server.connections and server._sweep is None
    finally:
        await server.drain(0.1)


async def test_an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidekey.proxy import listener

    monkeypatch.setattr(listener, "IDLE_SECONDS", 0.5)

    async def handler(request: listener.Request, conn: listener.AgentConnection) -> None:
        if request.target == "/slow":
            await asyncio.sleep(1.2)
        listener.Reply(conn, request).whole(200, b"", b"ok")

    server = listener.Listener(handler)
    await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"ok"), 3)  # busy past the idle limit: served
        assert head.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.read(), 2) == b""  # then idle: closed by the sweep
        writer.close()
    finally:
        await server.drain(0.1)
