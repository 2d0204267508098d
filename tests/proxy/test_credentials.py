"""Credential attachment and header stripping, per auth type."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from sidekey.core import policies
from sidekey.proxy import credentials, forwarding, limits
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
