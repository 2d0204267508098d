"""What the validator remembers between tokens, and that none of it lets a token skip a check.

Two things are kept across tokens besides the result cache: the imported keys
(an unchanged JWK is not imported again on the periodic refresh) and the
checked headers (every token one key signs has the same header). A rotation
must still retire the old key at once, and a remembered header must never
stand for the key, the signature or the claims of the next token.
"""

from __future__ import annotations

import json

import pytest
from joserfc import jwk

from sidekey.core import tokens
from tests.core.test_tokens import (
    BINDING,
    EC,
    NOW,
    RSA,
    RSA_2,
    STRANGER,
    b64,
    claims,
    make,
    public_jwks,
    sign,
    sign_raw,
)
from tests.core.test_tokens_joserfc_parity import signed


async def refused_with(v: tokens.Validator, token: str) -> str:
    with pytest.raises(tokens.TokenError) as info:
        await v.validate(token)
    return info.value.reason


# --- imported keys ---------------------------------------------------------------------------


async def test_an_unchanged_jwks_keeps_its_imported_keys() -> None:
    v, _, _ = await make(RSA, EC)
    imported = dict(v.keys.keys)
    generation = v.keys.generation
    assert await v.keys.refresh()
    assert v.keys.generation == generation
    assert all(v.keys.keys[kid] is key for kid, key in imported.items())


async def test_a_kid_whose_key_changed_is_imported_anew_and_the_old_keys_tokens_are_refused() -> None:
    v, fetcher, _ = await make(RSA)
    old = sign(claims())
    assert await v.validate(old)  # cached, and its header remembered
    before = v.keys.keys["rsa-1"]
    fetcher.document = public_jwks(STRANGER)  # the same kid, another key
    await v.keys.refresh()
    assert v.keys.keys["rsa-1"] is not before
    assert v.cached(old) is None
    assert await refused_with(v, old) == "bad_signature"
    assert await refused_with(v, sign(claims(jti="new"))) == "bad_signature"  # a new token of the old key
    assert (await v.validate(sign(claims(), STRANGER))).pod_uid == "uid-0"


async def test_a_removed_keys_new_token_is_refused_though_its_header_is_remembered() -> None:
    v, fetcher, _ = await make(RSA)
    first = sign(claims())
    assert await v.validate(first)
    assert first.split(".")[0] in v._headers
    fetcher.document = public_jwks(RSA_2)
    await v.keys.refresh()
    fresh = sign(claims(jti="fresh"))
    assert fresh.split(".")[0] == first.split(".")[0]
    assert await refused_with(v, fresh) == "unknown_kid"
    assert await refused_with(v, first) == "unknown_kid"


async def test_a_key_back_in_the_jwks_validates_again() -> None:
    v, fetcher, _ = await make(RSA)
    fetcher.document = public_jwks(RSA_2)
    await v.keys.refresh()
    fetcher.document = public_jwks(RSA, RSA_2)
    await v.keys.refresh()
    assert await v.validate(sign(claims()))


# --- remembered headers -------------------------------------------------------------------------


async def test_a_remembered_header_still_meets_the_key_type_check_every_time() -> None:
    """The kid of a remembered RS256 header now names an EC key: the next token is refused."""
    v, fetcher, _ = await make(RSA)
    assert await v.validate(sign(claims()))
    assert sign(claims()).split(".")[0] in v._headers
    fetcher.document = public_jwks(jwk.ECKey.generate_key("P-256", parameters={"kid": "rsa-1", "alg": "ES256"}))
    await v.keys.refresh()
    assert await refused_with(v, sign(claims(jti="next"))) == "bad_algorithm"


async def test_only_headers_of_accepted_tokens_are_remembered() -> None:
    v, _, _ = await make(RSA, EC)
    assert await refused_with(v, sign(claims(), STRANGER)) == "bad_signature"
    assert await refused_with(v, sign(claims(), RSA, "RS256", kid="ec-1")) == "bad_algorithm"
    assert await refused_with(v, sign(claims(exp=int(NOW) - 120, iat=int(NOW) - 200))) == "expired"
    assert v._headers == {}
    assert await v.validate(sign(claims()))
    assert list(v._headers) == [sign(claims()).split(".")[0]]


async def test_a_remembered_header_does_not_vouch_for_the_claims() -> None:
    v, _, _ = await make(RSA)
    assert await v.validate(sign(claims()))
    c = claims()
    c["kubernetes.io"]["pod"]["uid"] = "uid-other"
    assert await refused_with(v, sign(c)) == "wrong_pod"


async def test_the_header_memo_is_bounded() -> None:
    v, _, _ = await make(RSA)
    for i in range(3 * tokens._HEADER_MEMO_SIZE):
        header: dict[str, object] = {"alg": "RS256", "kid": "rsa-1", "typ": f"JWT{i}"}
        assert await v.validate(tokens_signed(header))
    assert len(v._headers) == tokens._HEADER_MEMO_SIZE


def tokens_signed(header: dict[str, object]) -> str:
    return signed(header, claims())


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "RS256", "kid": "rsa-1", "unregistered": 1},  # joserfc allows registered names only
        {"alg": "RS256", "kid": "rsa-1", "typ": 1},  # a registered name with a value of the wrong type
        {"alg": "RS256", "kid": "rsa-1", "typ": "x" * 600},  # over joserfc's header size
    ],
)
async def test_a_header_joserfc_refuses_is_refused_every_time_and_never_remembered(header: dict[str, object]) -> None:
    v, _, _ = await make(RSA)
    token = tokens_signed(header)
    for _ in range(2):
        assert await refused_with(v, token) == "malformed"
    assert v._headers == {}


# --- the strict JSON reader (one decoder, built once) --------------------------------------------


async def test_a_repeated_claim_is_refused() -> None:
    v, _, _ = await make(RSA)
    body = json.dumps(claims())[:-1] + ', "iss": "https://evil.example"}'
    with pytest.raises(tokens.TokenError) as info:
        await v.validate(sign_raw(body.encode()))
    assert info.value.reason == "malformed" and "repeats a member name" in info.value.message


async def test_a_repeated_member_deep_in_the_claims_is_refused() -> None:
    v, _, _ = await make(RSA)
    body = json.dumps(claims()).replace('"uid": "uid-0"', '"uid": "uid-0", "uid": "uid-other"')
    assert '"uid": "uid-other"' in body
    with pytest.raises(tokens.TokenError) as info:
        await v.validate(sign_raw(body.encode()))
    assert "repeats a member name" in info.value.message


async def test_a_repeated_header_member_is_refused() -> None:
    v, _, _ = await make(RSA)
    head = b64(b'{"alg":"RS256","kid":"rsa-1","kid":"rsa-2"}')
    _, payload, signature = sign(claims()).split(".")
    with pytest.raises(tokens.TokenError) as info:
        await v.validate(f"{head}.{payload}.{signature}")
    assert "header repeats a member name" in info.value.message


@pytest.mark.parametrize("body", [b"[" * 5000 + b"]" * 5000, b'{"iss":"\xff\xfe"}', b'{"iss": "x"} trailing'])
async def test_payloads_no_strict_reader_takes_are_refused(body: bytes) -> None:
    v, _, _ = await make(RSA)
    with pytest.raises(tokens.TokenError) as info:
        await v.validate(sign_raw(body))
    assert info.value.reason == "malformed"


# --- the token a connection sent last -------------------------------------------------------


async def test_a_connections_last_token_stands_only_for_itself_under_the_same_keys_and_lifetime() -> None:
    v, _, clock = await make(RSA)
    token = sign(claims())
    identity = await v.validate(token)
    last = v.last(token, identity)
    assert v.again(last, token) is identity
    assert v.again(None, token) is None
    assert v.again(last, sign(claims(jti="another"))) is None  # another token: checked in full
    assert v.again(last, token + "x") is None
    other, _, _ = await make(RSA)
    assert other.again(last, token) is None  # kept by another validator
    v.keys.generation += 1  # the key set changed (a rotation): the check no longer counts
    assert v.again(last, token) is None
    last = v.last(token, identity)
    clock.now = identity.expires_at + BINDING.leeway
    assert v.again(last, token) is identity  # within the leeway, as the cache
    clock.now += 1
    assert v.again(last, token) is None  # expired: as the cache, and validate refuses it
