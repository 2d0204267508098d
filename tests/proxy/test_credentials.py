"""Credential attachment and header stripping, per auth type."""

from __future__ import annotations

import base64
import contextlib
import io
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from sidekey.core import certificates, logs, policies
from sidekey.proxy import credentials, forwarding, limits, routes
from tests.proxy.fakes import StaticRoutes, policy


def auth(raw: dict[str, Any]) -> policies.Auth:
    return policies.parse_auth(raw, "auth")


BEARER = {"type": "bearer", "secretRef": {"name": "s", "key": "k"}}
HEADER = {
    "type": "header",
    "secretRef": {"name": "s", "key": "k"},
    "header": {"name": "X-Goog-Api-Key", "prefix": "Key "},
}
BASIC = {"type": "basic", "secretRef": {"name": "s"}, "basic": {"usernameKey": "u", "passwordKey": "p"}}
QUERY = {"type": "query", "secretRef": {"name": "s", "key": "k"}, "query": {"param": "key"}}


def test_bearer_sets_the_authorization_header() -> None:
    c = credentials.build(auth(BEARER), {"k": "sk-1234567890"})
    assert c.headers == (("Authorization", "Bearer sk-1234567890"),) and c.query is None


def test_header_uses_the_name_and_prefix() -> None:
    c = credentials.build(auth(HEADER), {"k": "g-1234567890"})
    assert c.headers == (("X-Goog-Api-Key", "Key g-1234567890"),)


def test_basic_encodes_username_and_password() -> None:
    c = credentials.build(auth(BASIC), {"u": "alice", "p": "secret-pass"})
    assert c.headers == (("Authorization", "Basic " + base64.b64encode(b"alice:secret-pass").decode()),)
    assert c.scrubber.scrub(b"secret-pass") == b"*" * 11


def test_query_adds_an_encoded_parameter() -> None:
    c = credentials.build(auth(QUERY), {"k": "a b&c=d/e"})
    assert c.headers == () and c.query == ("key", "a+b%26c%3Dd%2Fe")


def test_oauth2_prepares_a_client_and_scrubs_the_client_secret() -> None:
    raw = {
        "type": "oauth2ClientCredentials",
        "secretRef": {"name": "s"},
        "oauth2ClientCredentials": {
            "tokenURL": "https://idp.example/token",
            "clientIdKey": "id",
            "clientSecretKey": "sec",
        },
    }
    c = credentials.build(auth(raw), {"id": "client", "sec": "client-secret-1"})
    assert c.oauth is not None and c.headers == ()
    assert b"client-secret-1" not in c.scrubber.scrub(b"x client-secret-1")


def test_an_http_token_url_needs_an_insecure_upstream() -> None:
    raw = {
        "type": "oauth2ClientCredentials",
        "secretRef": {"name": "s"},
        "oauth2ClientCredentials": {
            "tokenURL": "http://idp.example/token",
            "clientIdKey": "id",
            "clientSecretKey": "sec",
        },
    }
    with pytest.raises(credentials.CredentialError, match="https"):
        credentials.build(auth(raw), {"id": "client", "sec": "client-secret-1"})
    assert credentials.build(auth(raw), {"id": "client", "sec": "client-secret-1"}, insecure=True).oauth


def test_a_missing_secret_names_the_secret() -> None:
    with pytest.raises(credentials.CredentialError, match="'s' does not exist"):
        credentials.build(auth(BEARER), None)


def test_a_missing_key_names_the_key_and_not_the_others_values() -> None:
    with pytest.raises(credentials.CredentialError) as info:
        credentials.build(auth(BASIC), {"u": "alice", "other": "hunter2-value"})
    assert "'p'" in info.value.message and "hunter2" not in info.value.message


def test_control_characters_in_a_key_are_refused_without_showing_it() -> None:
    with pytest.raises(credentials.CredentialError) as info:
        credentials.build(auth(BEARER), {"k": "sk-abc\x00def"})
    assert "control characters" in info.value.message and "sk-abc" not in info.value.message


def test_secret_data_is_decoded_and_a_trailing_newline_dropped() -> None:
    obj = {"data": {"k": base64.b64encode(b"sk-from-file\n").decode(), "bad": "!!!"}}
    assert credentials.decode_secret(obj) == {"k": "sk-from-file", "bad": credentials.NOT_TEXT}


def test_a_value_that_is_not_text_is_reported_as_such_not_as_a_missing_key() -> None:
    data = credentials.decode_secret({"data": {"k": base64.b64encode(b"\xff\xfe\x80").decode()}})
    with pytest.raises(credentials.CredentialError) as info:
        credentials.build(auth(BEARER), data)
    assert "not UTF-8" in info.value.message


# --- header stripping ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,extra_stripped",
    [
        (BEARER, set()),
        (HEADER, {"x-goog-api-key"}),
        (BASIC, set()),
        (QUERY, set()),
    ],
)
def test_forwarded_headers_lose_hop_by_hop_caller_tokens_and_client_credentials(
    raw: dict[str, Any], extra_stripped: set[str]
) -> None:
    up = {"name": "u", "url": "https://api.example", "auth": raw, "allow": [{"paths": ["/**"]}]}
    table = StaticRoutes({"s": {"k": "sk-0123456789", "u": "a", "p": "b"}})
    table.set_policies(policy(up))
    route = table.table["u"]
    headers = CIMultiDict(
        {
            "Authorization": "Bearer caller",
            "X-Api-Key": "caller",
            "Api-Key": "caller",
            "X-Goog-Api-Key": "client-supplied",
            "Connection": "close, X-Custom-Hop",
            "X-Custom-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Transfer-Encoding": "chunked",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic x",
            "Host": "127.0.0.1:8787",
            "Content-Type": "application/json",
            "OpenAI-Beta": "assistants=v2",
        }
    )
    request = make_mocked_request("POST", "/u/x", headers=headers)
    out = dict(forwarding._forward_headers(request, route.strip))
    assert set(out) == {"Content-Type", "OpenAI-Beta"} | ({"X-Goog-Api-Key"} if not extra_stripped else set())


def test_the_callers_value_for_the_query_parameter_is_removed() -> None:
    assert forwarding._without_param("a=1&key=mine&b=2&ke%79=x", "key") == "a=1&b=2"


def test_the_audit_path_redacts_query_values() -> None:
    assert forwarding._redacted("/o/x?key=abc&q=1") == "/o/x?key=REDACTED&q=REDACTED"


# --- the token bucket ----------------------------------------------------------------------


def test_the_bucket_allows_a_burst_then_paces() -> None:
    now = [0.0]
    b = limits.TokenBucket(60, clock=lambda: now[0])
    assert all(b.take() == 0 for _ in range(60))
    wait = b.take()
    assert 0.9 < wait <= 1.0 and b.retry_after(wait) == "1"
    now[0] += 1.0
    assert b.take() == 0


# --- the OAuth2 token URL's own TLS ----------------------------------------------------------


def oauth(token_url: str, ca_bundle: str | None = None) -> policies.Auth:
    raw: dict[str, Any] = {"type": "oauth2ClientCredentials", "secretRef": {"name": "s"},
                           "oauth2ClientCredentials": {"tokenURL": token_url, "clientIdKey": "id",
                                                       "clientSecretKey": "sec"}}
    if ca_bundle is not None:
        raw["oauth2ClientCredentials"]["caBundle"] = ca_bundle
    return auth(raw)


SECRETS = {"id": "client", "sec": "client-secret-tls-1"}


@pytest.fixture
async def idp(tmp_path: Path) -> AsyncIterator[tuple[str, certificates.KeyPair, list[bytes]]]:
    """An https token endpoint on loopback with a certificate from its own private CA."""
    ca = certificates.make_ca("the IdP's CA")
    leaf = certificates.issue(ca, "idp", ip_addresses=["127.0.0.1"])
    (tmp_path / "idp.pem").write_bytes(leaf.cert_pem + leaf.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "idp.pem")
    forms: list[bytes] = []

    async def token(request: web.Request) -> web.Response:
        forms.append(await request.read() + request.headers.get("Authorization", "").encode())
        return web.json_response({"access_token": "at-from-the-idp", "expires_in": 300})

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"https://127.0.0.1:{port}/token", ca, forms
    await runner.cleanup()


async def fetch(client: credentials.OAuthClient) -> str:
    """One token call over the sidecar's own token client (the upstream's TLS is not an input)."""
    http = credentials.token_client()
    try:
        return await client.token(http)
    finally:
        await http.close()


async def test_an_insecure_upstream_never_lends_its_missing_verification_to_the_token_url(
    idp: tuple[str, certificates.KeyPair, list[bytes]],
) -> None:
    url, _, forms = idp
    cred = credentials.build(oauth(url), SECRETS, insecure=True)
    assert cred.oauth is not None
    with pytest.raises(credentials.CredentialError, match="unreachable"):
        await fetch(cred.oauth)  # an http upstream's route has no verification to lend
    assert forms == [], "the client secret reached a token URL nobody verified"


async def test_the_token_url_is_verified_against_its_own_ca_bundle(
    idp: tuple[str, certificates.KeyPair, list[bytes]],
) -> None:
    url, ca, forms = idp
    cred = credentials.build(oauth(url, ca.cert_pem.decode()), SECRETS, insecure=True)
    assert cred.oauth is not None
    assert await fetch(cred.oauth) == "at-from-the-idp"
    assert len(forms) == 1


async def test_the_upstreams_ca_bundle_does_not_apply_to_the_token_url(
    idp: tuple[str, certificates.KeyPair, list[bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, ca, forms = idp
    # the IdP is "public": its CA is in the system store, which SSL_CERT_FILE stands for
    (tmp_path / "store.pem").write_bytes(ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "store.pem"))
    # the routes' context cache holds the private upstream's context next to the system store's
    contexts = routes.TlsContexts()
    upstream_ssl = contexts.get(certificates.make_ca("private upstream").cert_pem.decode())
    cred = credentials.build(oauth(url), SECRETS, tls=contexts.get)
    assert cred.oauth is not None
    assert cred.oauth.context is contexts.get(None) and cred.oauth.context is not upstream_ssl
    assert await fetch(cred.oauth) == "at-from-the-idp"
    assert len(forms) == 1


def test_a_token_ca_bundle_that_does_not_load_is_a_clear_503() -> None:
    bad = "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    with pytest.raises(credentials.CredentialError, match="caBundle holds no usable PEM") as info:
        credentials.build(oauth("https://idp.example/token", bad), SECRETS)
    assert info.value.status == 503


def test_a_token_ca_bundle_must_be_pem() -> None:
    with pytest.raises(policies.PolicyError, match=r"oauth2ClientCredentials\.caBundle"):
        oauth("https://idp.example/token", "MIIB...")


@contextlib.asynccontextmanager
async def plain_token_endpoint(
        answer: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[credentials.OAuthClient]:
    """A plain-http token endpoint on loopback answering with ``answer``, and an OAuth2 client of it."""
    app = web.Application()
    app.router.add_post("/token", answer)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        cred = credentials.build(oauth(f"http://127.0.0.1:{port}/token"), SECRETS, insecure=True)
        assert cred.oauth is not None
        yield cred.oauth
    finally:
        await runner.cleanup()


async def test_an_access_token_ending_in_a_newline_is_unusable() -> None:
    """It would end the header line early upstream ('$' let a final newline through)."""
    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "at-1234567890\n", "expires_in": 300})

    async with plain_token_endpoint(token) as client:
        with pytest.raises(credentials.CredentialError, match="unusable access_token"):
            await fetch(client)


@pytest.mark.parametrize("expires_in", ['"NaN"', "NaN", "-30", "1e400", '"Infinity"', "1e12"])
async def test_an_expires_in_that_is_no_lifetime_is_read_as_a_bounded_one(expires_in: str) -> None:
    """NaN or a negative lifetime refetched the token on every request (hammering the IdP);
    an infinite one kept the token past its real end for good. Such a value counts as absent
    (the default lifetime), and any lifetime is capped, so the token is refreshed at least daily."""
    async def token(request: web.Request) -> web.Response:
        return web.Response(text='{"access_token": "at-1234567890", "expires_in": ' + expires_in + "}",
                            content_type="application/json")

    async with plain_token_endpoint(token) as client:
        assert await fetch(client) == "at-1234567890"
        assert await fetch(client) == "at-1234567890"
        assert client.fetches == 1  # the second request used the cached token
        left = client._refresh_at - time.monotonic()
        assert 0 < left <= credentials.OAUTH_MAX_LIFETIME


async def test_a_token_answer_too_large_for_a_token_is_refused_unread() -> None:
    sent: list[int] = []

    async def token(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"access_token": "at-1234567890", "padding": "')
        try:
            for _ in range(1024):  # up to 64 MB, unless the reader stops first
                await resp.write(b"x" * 65536)
                sent.append(1)
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    async with plain_token_endpoint(token) as client:
        with pytest.raises(credentials.CredentialError, match="too large") as info:
            await fetch(client)
        assert info.value.status == 502
        assert len(sent) < 1024  # the sidecar stopped reading; it never held the whole answer


async def test_the_proxys_token_client_refuses_a_token_url_name_that_resolves_to_loopback() -> None:
    """The token call goes through the same host guard as the upstreams: a name the pod's /etc/hosts
    (or DNS) points at loopback never gets the client secret; the IP literal, written as meant, does."""
    seen: list[bytes] = []

    async def token(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.json_response({"access_token": "at-1234567890", "expires_in": 300})

    async with plain_token_endpoint(token) as literal:
        port = int(literal.token_url.rsplit(":", 1)[1].split("/", 1)[0])
        by_name = credentials.build(oauth(f"http://localhost:{port}/token"), SECRETS, insecure=True).oauth
        assert by_name is not None
        proxy = forwarding.Proxy(table=dict, validator=lambda: None, ready=lambda: True,
                                 audit=logs.AuditWriter(io.StringIO()), pod="p", namespace="n",
                                 resolver=routes.GuardedResolver(frozenset()))
        try:
            with pytest.raises(credentials.CredentialError, match="unreachable") as info:
                await by_name.token(proxy.session)
            assert info.value.status == 502 and seen == []
            assert await literal.token(proxy.session) == "at-1234567890"
            assert len(seen) == 1
        finally:
            await proxy.close()
